"""Field refinement: the early stop on a converged loss and the voxel budget of the refinement grid."""

import logging

import pytest
import torch
from conftest import load_sample_pair
from monai.bundle import ConfigParser

from scripts.engines import (
    FieldRefinementInferer,
    ResolutionInferer,
    loss_has_converged,
    network_grid_size,
    refine_displacement,
    scale_within_voxel_budget,
)
from scripts.layers import warp_image
from scripts.losses import GradientLoss, LocalNCCLoss


@pytest.fixture(scope="module")
def pair():
    return load_sample_pair((40, 48, 40))  # the shipped real pair at about 4.5 mm


def _refine(inputs, ddf, **settings):
    return refine_displacement(inputs, ddf, LocalNCCLoss(5), GradientLoss(), 1.0, return_info=True, **settings)


def test_loss_has_converged_compares_window_means_relative_to_the_loss():
    falling = [-0.1 * k for k in range(1, 21)]  # improves by 10 % of the loss per step and more
    assert not loss_has_converged(falling, tolerance=0.05, window=5)
    flat = [-0.50] * 10 + [-0.501] * 10  # 0.2 % better over a window
    assert loss_has_converged(flat, tolerance=0.01, window=10)
    assert not loss_has_converged(flat, tolerance=0.001, window=10)
    assert not loss_has_converged(flat, tolerance=0.0, window=10)  # 0 is off
    assert not loss_has_converged(flat[:19], tolerance=0.01, window=10)  # two whole windows needed
    rising = [-0.5] * 5 + [-0.4] * 5  # Adam's first steps disturb a good start: not converged, go on
    assert not loss_has_converged(rising, tolerance=0.5, window=5)


def test_early_stop_ends_a_converged_refinement_and_not_a_hard_one(pair):
    aligned = torch.cat([pair["fixed"], pair["fixed"]], 1)  # nothing to correct: the start is the optimum
    zero = torch.zeros(1, 3, *aligned.shape[2:])
    _, info = _refine(aligned, zero, iterations=40, learning_rate=0.05, scale=1.0, tolerance=1e-3, tolerance_window=5)
    assert 10 <= info["steps"] < 40 and len(info["losses"]) == info["steps"]  # two windows known, then flat: stop
    assert abs(info["losses"][-1] - info["losses"][0]) < 5e-3 * abs(info["losses"][0])  # back near the optimum
    # a real pair from a 3-voxel shift with small steps keeps improving by more than the tolerance for all its steps
    shift = zero.clone()
    shift[:, 1] = 3.0
    hard = torch.cat([pair["moving"], pair["fixed"]], 1)
    _, info = _refine(hard, shift, iterations=20, learning_rate=0.1, scale=1.0, tolerance=1e-3, tolerance_window=5)
    assert info["steps"] == 20
    assert info["losses"][-1] < info["losses"][0]


def test_early_stop_is_deterministic_and_the_steps_taken_match_a_fixed_count(pair):
    inputs = torch.cat([pair["moving"], pair["fixed"]], 1)
    zero = torch.zeros(1, 3, *inputs.shape[2:])
    settings = dict(iterations=40, learning_rate=1.0, scale=1.0, tolerance=0.05, tolerance_window=5)
    first, info = _refine(inputs, zero, **settings)
    second, again = _refine(inputs, zero, **settings)
    assert 10 <= info["steps"] < 40 and info["steps"] == again["steps"]
    assert torch.equal(first, second)
    # stopping early returns the field of a run with that many steps and no tolerance, bit for bit
    fixed_count, _ = _refine(inputs, zero, iterations=info["steps"], learning_rate=1.0, scale=1.0)
    assert torch.equal(first, fixed_count)
    loss = LocalNCCLoss(5)
    assert loss(warp_image(pair["moving"], first), pair["fixed"]) < loss(pair["moving"], pair["fixed"]) - 0.01


def test_voxel_budget_lowers_the_scale_isotropically_to_fit():
    head = (200, 256, 220)  # a whole head's foreground box, 1 mm
    scale = scale_within_voxel_budget(head, 0.5, 400_000)
    grid = network_grid_size(head, scale)
    assert grid[0] * grid[1] * grid[2] <= 400_000
    assert grid[0] * grid[1] * grid[2] > 0.95 * 400_000  # no coarser than it must be
    assert scale[0] == scale[1] == scale[2] < 0.5
    anisotropic = scale_within_voxel_budget(head, (0.5, 0.5, 1.5), 400_000)
    assert anisotropic[2] / anisotropic[0] == pytest.approx(3.0)  # one factor on every axis keeps mm isotropy
    assert scale_within_voxel_budget((150, 180, 150), 0.5, 0) == (0.5, 0.5, 0.5)  # 0: no budget
    assert scale_within_voxel_budget((150, 180, 150), (0.5, 0.4, 0.5), 10**7) == (0.5, 0.4, 0.5)  # fits: as given
    assert network_grid_size((64, 64, 64), scale_within_voxel_budget((64, 64, 64), 1.0, 8)) == [2, 2, 2]


def test_budget_caps_the_refinement_grid_and_leaves_small_inputs_bit_identical(pair, caplog):
    inputs = torch.cat([pair["moving"], pair["fixed"]], 1)
    ddf = torch.zeros(1, 3, *inputs.shape[2:])
    settings = dict(iterations=5, scale=1.0)
    unlimited, info = _refine(inputs, ddf, **settings)
    roomy, roomy_info = _refine(inputs, ddf, max_voxels=40 * 48 * 40, **settings)
    assert torch.equal(unlimited, roomy) and roomy_info["grid"] == info["grid"] == (40, 48, 40)
    with caplog.at_level(logging.INFO, logger="scripts.engines.field_refinement"):
        capped, capped_info = _refine(inputs, ddf, max_voxels=20_000, **settings)
    d, h, w = capped_info["grid"]
    assert d * h * w <= 20_000 and capped.shape == ddf.shape
    assert sum("max_voxels" in r.getMessage() for r in caplog.records) == 1  # said once, not per step
    assert not torch.equal(capped, unlimited)


def test_bad_stop_and_budget_settings_raise_with_what_was_expected(pair):
    inputs = torch.cat([pair["moving"], pair["fixed"]], 1)
    ddf = torch.zeros(1, 3, *inputs.shape[2:])
    with pytest.raises(ValueError, match="tolerance >= 0"):
        refine_displacement(inputs, ddf, LocalNCCLoss(5), GradientLoss(), tolerance=-0.1)
    with pytest.raises(ValueError, match="tolerance_window >= 1"):
        refine_displacement(inputs, ddf, LocalNCCLoss(5), GradientLoss(), tolerance_window=0)
    with pytest.raises(ValueError, match="max_voxels"):
        FieldRefinementInferer(ResolutionInferer(0.5), LocalNCCLoss(5), GradientLoss(), max_voxels=5)


def test_config_wires_the_stop_and_the_budget_into_the_refinement():
    parser = ConfigParser()
    parser.read_config("configs/inference.json")
    parser["refinement_tolerance"], parser["refinement_max_voxels"] = 0.002, 123_456
    parser.parse()
    refinement = parser.get_parsed_content("refinement")
    assert refinement.settings["tolerance"] == 0.002 and refinement.settings["max_voxels"] == 123_456
    assert refinement.settings["tolerance_window"] == parser.get_parsed_content("refinement_tolerance_window")
    assert refinement.settings["iterations"] == parser.get_parsed_content("refine_iterations")


def test_inferer_reports_its_run_through_refine_and_keeps_no_state(pair):
    """``refine`` returns the call's field and what the refinement did (the voxel budget's grid, the steps of the early
    stop); calling the inferer gives the same field, and nothing of a run stays on the object."""
    inputs = torch.cat([pair["moving"], pair["fixed"]], 1)
    zero_field = lambda x, network: torch.zeros(x.shape[0], 3, *x.shape[2:])  # noqa: E731
    inferer = FieldRefinementInferer(
        zero_field, LocalNCCLoss(5), GradientLoss(), iterations=12, learning_rate=0.5, scale=1.0,
        tolerance=1e-3, tolerance_window=3, max_voxels=20_000,
    )
    before = dict(vars(inferer))
    refined, info = inferer.refine(inputs, None)
    assert vars(inferer).keys() == before.keys()
    voxels = info["grid"][0] * info["grid"][1] * info["grid"][2]
    assert voxels <= 20_000 < inputs[0, 0].numel() and max(info["scale"]) < 1.0  # the budget lowered the grid
    assert 1 <= info["steps"] <= 12 and len(info["losses"]) == info["steps"]
    assert refined.shape == (1, 3, *inputs.shape[2:]) and refined.abs().max() > 0
    torch.testing.assert_close(inferer(inputs, None), refined)
