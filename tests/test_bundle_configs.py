"""The config ids later issues and users rely on: network_def, warp (inference.json), image_loss, regularization (train.json)."""

import os

import pytest
import torch
from monai.bundle import ConfigParser

from conftest import BUNDLE_ROOT
from scripts.losses.ncc import LocalNCCLoss
from scripts.networks.sacb_net import SACBNet
from scripts.losses.regularization import GradientLoss
from scripts.layers.warp import Warp


def _parser(config_name):
    parser = ConfigParser()
    parser.read_config(str(BUNDLE_ROOT / "configs" / config_name))
    parser["bundle_root"] = str(BUNDLE_ROOT)
    return parser


@pytest.fixture
def in_bundle_root():
    previous = os.getcwd()
    os.chdir(BUNDLE_ROOT)  # as a user runs the bundle
    yield
    os.chdir(previous)


def test_network_def_maps_pairs_to_fields_at_two_sizes(in_bundle_root):
    network = _parser("inference.json").get_parsed_content("network_def")
    assert isinstance(network, SACBNet)
    assert abs(sum(p.numel() for p in network.parameters()) - 1.11e6) / 1.11e6 < 0.02
    network.eval()
    for spatial in [(80, 96, 112), (70, 90, 100)]:
        with torch.inference_mode():
            ddf = network(torch.rand(1, 2, *spatial))
        assert ddf.shape == (1, 3, *spatial)
        assert torch.isfinite(ddf).all()


def test_warp_id_warps_image_by_ddf(in_bundle_root):
    warp = _parser("inference.json").get_parsed_content("warp")
    assert isinstance(warp, Warp)
    image = torch.rand(1, 1, 8, 9, 10)
    ddf = torch.zeros(1, 3, 8, 9, 10)
    ddf[:, 2] = 1.0
    assert torch.allclose(warp(image, ddf)[..., :-1], image[..., 1:], atol=1e-5)


def test_train_losses_are_built_from_their_ids(in_bundle_root):
    parser = _parser("train.json")
    image_loss = parser.get_parsed_content("image_loss")
    regularization = parser.get_parsed_content("regularization")
    assert isinstance(image_loss, LocalNCCLoss) and isinstance(regularization, GradientLoss)
    image = torch.rand(1, 1, 12, 12, 12)
    assert image_loss(image, image).item() == pytest.approx(-1.0, abs=1e-3)
    ramp = torch.zeros(1, 3, 6, 6, 6)
    ramp[:, 0] = torch.arange(6.0).view(6, 1, 1)  # channel 0 rises by 1 per voxel along axis 0, nothing else varies
    # mean over axes of the mean squared forward difference: axis 0 gives 1 on one channel of three, others 0.
    assert regularization(ramp).item() == pytest.approx(1.0 / 9.0, rel=1e-5)


def test_inference_configs_never_read_train_json():
    """Inference stands alone: no config outside training's own (train.json, its multi-GPU overlay, the presets)
    mentions train.json, so an inference run never depends on the training config."""
    training = {"train.json", "multi_gpu_train.json", "metadata.json"}  # metadata: the changelog's prose
    for path in sorted((BUNDLE_ROOT / "configs").glob("*.json")):
        if path.name not in training:
            assert "train.json" not in path.read_text(), path.name


@pytest.mark.parametrize(
    "overrides, stages",
    [({}, ["refinement", "InstanceOptimizationInferer"]),  # register's default: network (0 fine-tuning steps) + refinement
     ({"refine_iterations": 0, "instance_optimization_iterations": 0}, ["refinement", "InstanceOptimizationInferer"]),
     ({"affine_only": True}, ["ZeroFieldInferer"])],
)
def test_one_inferer_id_runs_the_stages_the_flags_switch(in_bundle_root, overrides, stages):
    parser = _parser("inference.json")
    for key, value in overrides.items():
        parser[key] = value
    inferer = parser.get_parsed_content("inferer")
    assert parser["evaluator"]["inferer"] == "@inferer"
    chain, step = [], inferer.base_inferer  # ForegroundCropInferer -> its stages
    while step is not None:
        chain.append(type(step).__name__)
        step = getattr(step, "base_inferer", None)
    expected = {"refinement": "FieldRefinementInferer"}
    assert chain == [expected.get(s, s) for s in stages]
    if "refine_iterations" in overrides:  # 0 steps: each stage passes its input through
        assert inferer.base_inferer.settings["iterations"] == 0 and inferer.base_inferer.base_inferer.iterations == 0
    assert parser.get_parsed_content("alignment_transforms")  # the affine stage is on by default
    parser["affine_transform"] = "none"
    assert parser.get_parsed_content("alignment_transforms") == [] and parser.get_parsed_content("min_fov_overlap") == 0.1


def test_affine_stage_settings_come_from_their_ids(in_bundle_root):
    """The affine stage's levels, steps and early stop are read from their config ids (what a run overrides)."""
    parser = _parser("inference.json")
    parser["affine_levels_mm"], parser["affine_iterations"] = [8.0, 5.0], [40, 20]
    parser["affine_tolerance"], parser["affine_tolerance_window"] = 2e-5, 7
    registration = parser.get_parsed_content("affine_registration")
    assert registration.levels_mm == (8.0, 5.0) and registration.iterations == (40, 20)
    assert registration.tolerance == 2e-5 and registration.tolerance_window == 7


@pytest.mark.parametrize("affine_only,override,expected", [
    (False, None, "ncc"), (True, None, "lncc"), (True, "mi", "mi"), (False, "lncc", "lncc"),
])
def test_affine_stage_uses_local_ncc_where_it_is_the_whole_result(affine_only, override, expected):
    """``affine_similarity`` follows ``affine_only`` (local NCC when the affine is the result, global NCC before the
    deformable stages, docs/usage.md); a value the user sets wins either way."""
    parser = _parser("inference.json")
    parser["affine_only"] = affine_only
    if override is not None:
        parser["affine_similarity"] = override
    registration = parser.get_parsed_content("affine_registration")
    assert registration.similarity == expected
