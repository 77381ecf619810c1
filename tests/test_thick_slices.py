"""Thick slices (1 x 1 x 3 mm): the network and the refinement work on an isotropic grid in mm, every output stays on
the fixed grid, and the weights' record says which voxel size they were trained on (a warning when a pair is far
from it)."""

from __future__ import annotations

import json
import logging
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.data import MetaTensor

from conftest import BUNDLE_ROOT, REPO_ROOT, SAMPLE_PAIR, SHARED_DATA

from scripts.engines import FieldRefinementInferer, ForegroundCropInferer, ResolutionInferer
from scripts.engines.resolution_inferer import input_spacing, isotropic_network_scale
from scripts.io import (
    RegistrationInputError,
    check_network_scale,
    check_network_spacing,
    read_trained_spacing,
    trained_network_spacing,
    training_spacing,
    write_weights_info,
)
from scripts.losses import GradientLoss
from scripts.workflow import CheckNetworkGridd, DownsampleToNetworkGridd

if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench.accuracy.thick_slices import score_on_thick_grid, thick_axis, thick_slices  # noqa: E402


def _thick(tensor: torch.Tensor, spacing=(1.0, 1.0, 3.0)) -> MetaTensor:
    return MetaTensor(tensor, affine=torch.diag(torch.tensor([*spacing, 1.0], dtype=torch.float64)))


class _Recorder(torch.nn.Module):
    """Network stand-in: a zero field; records the spatial size it was given."""

    def forward(self, x):
        self.seen = tuple(x.shape[2:])
        return torch.zeros(x.shape[0], 3, *x.shape[2:])


class _ShiftOracle(torch.nn.Module):
    """Measures, in ITS OWN voxels, the shift along axis 2 between two images that are one linear ramp along it."""

    def forward(self, x):
        moving, fixed = x[:, 0], x[:, 1]
        n = moving.shape[3]
        slope = (moving[..., n - 3] - moving[..., 2]).mean() / (n - 5)  # interior: no replicate-padded border
        ddf = torch.zeros(x.shape[0], 3, *x.shape[2:])
        ddf[:, 2] = (fixed - moving).mean() / slope
        return ddf


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (3.0, 3.0, 3.0), (0.9375, 0.9375, 0.9375 * (1 + 1e-7))])
def test_isotropic_inputs_keep_the_given_scale_bit_for_bit(spacing):
    assert isotropic_network_scale(0.5, spacing) == (0.5, 0.5, 0.5)
    # an explicit per-axis scale that already makes the network grid isotropic (2 mm) is kept too
    assert isotropic_network_scale([0.5, 0.5, 1.0], (1.0, 1.0, 2.0)) == (0.5, 0.5, 1.0)


def test_thick_axes_are_upsampled_to_the_finest_network_voxel():
    assert isotropic_network_scale(0.5, (1.0, 1.0, 3.0)) == pytest.approx((0.5, 0.5, 1.5))
    assert isotropic_network_scale(0.5, (3.0, 0.9, 0.9)) == pytest.approx((5.0 / 3.0, 0.5, 0.5))
    # 1.8 mm network voxels along every axis of a 0.9 x 0.9 x 3 mm scan
    scale = isotropic_network_scale(0.5, (0.9, 0.9, 3.0))
    assert [s / k for s, k in zip((0.9, 0.9, 3.0), scale)] == pytest.approx([1.8, 1.8, 1.8])


def test_inferer_runs_a_thick_pair_on_an_isotropic_grid_and_returns_the_field_on_the_input_grid():
    net = _Recorder()
    pair = torch.rand(1, 2, 40, 48, 14)
    out = ResolutionInferer(network_scale=0.5)(_thick(pair), net)
    assert net.seen == (20, 24, 21)  # 2 x 2 x 2 mm, the thick axis upsampled 1.5x
    assert out.shape == (1, 3, 40, 48, 14)
    ResolutionInferer(network_scale=0.5)(pair, net)  # a plain tensor (training): its spacing is unknown
    assert net.seen == (20, 24, 7)
    ResolutionInferer(network_scale=0.5, isotropic=False)(_thick(pair), net)  # the former behaviour
    assert net.seen == (20, 24, 7)
    with pytest.raises(ValueError, match="isotropic must be True or False, got 'false'"):
        ResolutionInferer(network_scale=0.5, isotropic="false")  # as `monai.bundle run --... false` passes it


def test_a_known_shift_along_the_thick_axis_comes_back_in_thick_voxels():
    # moving(p) = 3 p_z mm, fixed = moving shifted by 6 mm: 2 thick voxels, measured by the network on 2 mm voxels
    z = torch.arange(20, dtype=torch.float32).view(1, 1, 1, 1, 20).expand(1, 1, 24, 24, 20) * 3.0
    pair = _thick(torch.cat([z, z + 6.0], dim=1))
    ddf = ResolutionInferer(network_scale=0.5)(pair, _ShiftOracle())
    assert ddf.shape == (1, 3, 24, 24, 20)
    assert torch.allclose(ddf[:, 2], torch.full_like(ddf[:, 2], 2.0), atol=1e-3)


def test_foreground_crop_keeps_the_spacing_and_moves_the_origin_to_the_box():
    seen = {}

    def base(inputs, network):
        seen["spacing"], seen["affine"] = input_spacing(inputs), inputs.affine.clone()
        return torch.zeros(inputs.shape[0], 3, *inputs.shape[2:])

    image = torch.zeros(1, 2, 64, 64, 30)
    image[:, :, 20:40, 10:50, 8:20] = 1.0
    ForegroundCropInferer(base, margin=2, min_size=4)(_thick(image), network=None)
    assert seen["spacing"] == (1.0, 1.0, 3.0)
    assert torch.allclose(seen["affine"].reshape(4, 4)[:3, 3], torch.tensor([18.0, 8.0, 18.0], dtype=torch.float64))


def test_refinement_grid_is_isotropic_in_mm():
    sizes = []

    def loss(warped, fixed):
        sizes.append(tuple(fixed.shape[2:]))
        return ((warped - fixed) ** 2).mean()

    base = ResolutionInferer(network_scale=0.5)
    refine = FieldRefinementInferer(base, loss, GradientLoss(), iterations=1, scale=0.5)
    out = refine(_thick(torch.rand(1, 2, 32, 32, 12)), _Recorder())
    assert sizes == [(16, 16, 18)] and out.shape == (1, 3, 32, 32, 12)


def test_training_downsampling_of_a_thick_pair_matches_the_inferer():
    image = _thick(torch.rand(1, 40, 48, 14))
    label = _thick(torch.randint(0, 5, (1, 40, 48, 14)))
    out = DownsampleToNetworkGridd(["image", "label"], 0.5, mode=["image", "nearest"])({"image": image, "label": label})
    assert out["image"].shape == out["label"].shape == (1, 20, 24, 21)
    assert out["label"].dtype == label.dtype and not isinstance(out["label"], MetaTensor)


def test_weights_record_gives_the_trained_network_voxel(tmp_path):
    weights = tmp_path / "model.pt"
    weights.write_bytes(b"weights")
    write_weights_info(weights, 0.5, spacing_mm=1.0)
    assert read_trained_spacing(weights) == (1.0, 1.0, 1.0)
    assert trained_network_spacing(weights) == (2.0, 2.0, 2.0)
    assert check_network_scale(1.5, weights)  # no warning by scale: each pair's network voxel is checked instead
    write_weights_info(weights, 0.5)  # an older record: the spacing is unknown, nothing is checked
    assert read_trained_spacing(weights) is None and trained_network_spacing(weights) is None
    assert trained_network_spacing(None) is None and trained_network_spacing(tmp_path / "absent.pt") is None
    weights.with_suffix(".json").write_text(json.dumps({"network_scale": 0.5, "spacing_mm": [1, 1]}))
    with pytest.raises(RegistrationInputError, match=r"spacing_mm must be a positive number or 3 positive numbers"):
        trained_network_spacing(weights)


def test_a_pair_far_from_the_trained_voxel_is_warned_about_with_the_scale_that_matches(caplog):
    with caplog.at_level(logging.WARNING, logger="scripts.io.weights"):
        assert check_network_spacing((2.0, 2.0, 2.0), (2.0,) * 3, (1.0, 1.0, 3.0), "thick.nii.gz")  # isotropic grid
        assert check_network_spacing((1.8,) * 3, (2.0,) * 3, (0.9, 0.9, 3.0), "a.nii.gz")
        assert check_network_spacing((6.0,) * 3, None, (3.0,) * 3, "unknown.nii.gz")  # nothing known
        assert not caplog.records
        assert not check_network_spacing((6.0,) * 3, (2.0,) * 3, (3.0,) * 3, "coarse.nii.gz")
    (record,) = caplog.records
    message = record.getMessage()
    assert "'coarse.nii.gz'" in message and "6 mm voxels" in message and "trained on 2 mm" in message
    assert "3x coarser" in message and "--network_scale 1.5" in message


def test_check_network_grid_logs_the_grid_of_a_thick_pair_and_warns_at_3_mm(caplog):
    check = CheckNetworkGridd("fixed_image", network_scale=0.5, trained_spacing=(2.0, 2.0, 2.0))
    thick = _thick(torch.rand(1, 8, 8, 8))
    thick.meta["filename_or_obj"] = "fixed_thick.nii.gz"
    with caplog.at_level(logging.INFO):
        assert check({"fixed_image": thick})["fixed_image"] is thick
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO and "network works" in r.getMessage()]
    assert len(infos) == 1 and "1 x 1 x 3 mm" in infos[0] and "2 mm voxels" in infos[0] and "0.5 x 0.5 x 1.5" in infos[0]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    caplog.clear()
    with caplog.at_level(logging.INFO):
        check({"fixed_image": _thick(torch.rand(1, 8, 8, 8), spacing=(3.0, 3.0, 3.0))})
    assert [r.levelno for r in caplog.records if "network" in r.getMessage()] == [logging.WARNING]


MAL2012 = SHARED_DATA / "brain_mal2012"
PAIR = ("1009", "1002")  # a test pair of the split (bench/accuracy/splits/mal2012_split.json)


@pytest.mark.slow
@pytest.mark.skipif(not (MAL2012 / f"mal{PAIR[1]}_t1.nii.gz").is_file(), reason=f"real data not found under {MAL2012}")
def test_a_thick_slice_pair_registers_as_well_as_the_same_pair_at_1_mm(tmp_path):
    """The default pipeline (affine stage + one forward pass; refine_iterations 0 to stay within a minute or two on 2
    cores) on a native brain_mal2012 pair at 1 mm and on the same pair with 1 x 1 x 3 mm slices: mean seg14 Dice,
    scored on the thick fixed grid, within 0.03 (before the isotropic network grid: 0.830 vs 0.686). Every output
    of the thick run lies on the thick fixed grid."""
    from scripts.cli import register

    pairs = {"1mm": {}, "thick": {}}
    for role, scan in zip(("moving", "fixed"), PAIR):
        for kind, is_label in (("t1", False), ("seg14", True)):
            source = MAL2012 / f"mal{scan}_{kind}.nii.gz"
            target = tmp_path / f"mal{scan}_{kind}_thick.nii.gz"
            nib.save(thick_slices(nib.load(str(source)), 3, label=is_label), str(target))
            key = f"{role}_{'label' if is_label else 'image'}"
            pairs["1mm"][key], pairs["thick"][key] = str(source), str(target)
    fixed_thick = nib.load(pairs["thick"]["fixed_label"])
    assert fixed_thick.header.get_zooms()[:3] == (1.0, 1.0, 3.0)
    axis = thick_axis(fixed_thick.affine)
    dice = {}
    for grid, pair in pairs.items():
        out = tmp_path / grid
        register(fixed=pair["fixed_image"], moving=pair["moving_image"], fixed_label=pair["fixed_label"],
                 moving_label=pair["moving_label"], out=str(out), refine_iterations=0)
        warped = np.asanyarray(nib.load(str(out / "warped_label.nii.gz")).dataobj)
        dice[grid] = score_on_thick_grid(warped, np.asanyarray(fixed_thick.dataobj), 3, axis)
    assert dice["1mm"] > 0.75, dice  # the registration itself works
    assert abs(dice["1mm"] - dice["thick"]) <= 0.03, dice
    for name in ("warped_image.nii.gz", "warped_label.nii.gz", "ddf.nii.gz", "jacobian_det.nii.gz", "warp.nii.gz"):
        written = nib.load(str(tmp_path / "thick" / name))
        assert written.shape[:3] == fixed_thick.shape and np.allclose(written.affine, fixed_thick.affine, atol=1e-4), name


def test_training_records_the_finest_spacing_of_its_images(tmp_path):
    thick = nib.Nifti1Image(np.zeros((20, 20, 8), np.float32), np.diag([1.2, 1.2, 3.0, 1.0]))
    nib.save(thick, str(tmp_path / "thick.nii.gz"))
    pairs = [{"moving_image": str(SAMPLE_PAIR["moving_image"]), "fixed_image": str(tmp_path / "thick.nii.gz")},
             {"moving_image": str(tmp_path / "thick.nii.gz"), "fixed_image": torch.zeros(1, 4, 4, 4)}]
    assert training_spacing(pairs) == pytest.approx(1.1)  # median of 1.0 (1 mm sample) and 1.2 (thick, finest axis)
    assert training_spacing([{"moving_image": torch.zeros(1), "fixed_image": torch.zeros(1)}]) is None
    parser = ConfigParser()
    parser.read_config(str(BUNDLE_ROOT / "configs" / "train.json"))
    parser["ckpt_dir"] = str(tmp_path / "run")
    item = [i for i, x in enumerate(parser.get("initialize")) if "write_weights_info" in str(x)][0]
    parser.get_parsed_content(f"initialize#{item}")  # the default datalist: the shipped 1 mm pair
    record = json.loads((tmp_path / "run" / "model.json").read_text())
    assert record == {"network_scale": 0.5, "spacing_mm": 1.0}


def test_thick_slice_simulation_averages_slabs_and_keeps_world_positions():
    """The benchmark's and the end-to-end test's thick scans (bench/accuracy/thick_slices.py)."""
    data = np.arange(4 * 5 * 7, dtype=np.float32).reshape(4, 5, 7)
    las = np.diag([-1.0, 1.0, 1.0, 1.0])
    las[:3, 3] = [10.0, -20.0, 5.0]
    image = nib.Nifti1Image(data, las)
    assert thick_axis(las) == 2 and thick_axis(np.array([[-1, 0, 0, 0], [0, 0, 1, 0], [0, -1, 0, 0], [0, 0, 0, 1]])) == 1
    thick = thick_slices(image, 3)
    assert thick.shape == (4, 5, 2) and thick.header.get_zooms() == (1.0, 1.0, 3.0)
    np.testing.assert_allclose(thick.get_fdata()[..., 1], data[..., 3:6].mean(-1))
    np.testing.assert_allclose(thick.affine @ [1, 2, 1, 1], las @ [1, 2, 4, 1])  # slab 1 is centred on slice 4
    labels = thick_slices(nib.Nifti1Image(data.astype(np.int16), las), 3, label=True)
    assert np.array_equal(np.asanyarray(labels.dataobj), data[..., [1, 4]].astype(np.int16))
    one_mm = np.zeros((4, 5, 6), np.int16)
    one_mm[..., 4] = 7  # only slice 4 (the centre of slab 1) is read for the thick grid
    assert score_on_thick_grid(one_mm, np.asanyarray(labels.dataobj) * 0 + np.array([0, 7]), 3, 2) == 1.0


def test_the_inferer_stack_gives_isotropic_pairs_the_same_field_as_before(sample_pair_small):
    """The configs' inferers (foreground box -> refinement -> network) on the real pair at 40x48x40 (voxels of
    4.55 x 4.54 x 4.55 mm: isotropic within the 1 % tolerance) give bit for bit the field of the former uniform scale."""
    from scripts.networks import SACBNet

    torch.manual_seed(0)
    network = SACBNet(base_channels=2, num_clusters=[2, 2, 2, 2]).eval()
    pair = torch.cat([sample_pair_small["moving"], sample_pair_small["fixed"]], dim=1)
    affine = torch.diag(torch.tensor([182 / 40, 218 / 48, 182 / 40, 1.0], dtype=torch.float64))

    def stack(isotropic):
        base = ResolutionInferer(network_scale=0.5, isotropic=isotropic)
        refine = FieldRefinementInferer(base, lambda w, f: ((w - f) ** 2).mean(), GradientLoss(), iterations=2,
                                        scale=0.5, isotropic=isotropic)
        return ForegroundCropInferer(refine, margin=2)

    with torch.no_grad():
        now = stack(True)(MetaTensor(pair, affine=affine), network)
        before = stack(False)(pair, network)
    assert torch.equal(now, before)
