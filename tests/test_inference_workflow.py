"""Inference workflow (configs/inference.json) on the real Colin27 -> MNI152 pair at reduced size, and its building
blocks: the reduced-resolution inferer, grid restoration and resampling onto the fixed grid."""

from __future__ import annotations

import json
import os

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Orientation
from workflow_data import PLAIN_INFERENCE, run_bundle_workflow, write_small_pair

from scripts.io.errors import OutputExistsError
from scripts.engines.resolution_inferer import ResolutionInferer, network_grid_size, resize_displacement
from scripts.workflow.grid_transforms import ResampleToFixedGridd, RestoreOriginalGridd
from scripts.layers.warp import Warp

OUTPUTS = ("warped_image.nii.gz", "ddf.nii.gz", "warped_label.nii.gz", "jacobian_det.nii.gz", "metrics.json")


class _ConstantField(torch.nn.Module):
    """Network stand-in returning the same displacement (in its own voxels) everywhere; records its input size."""

    def __init__(self, shift):
        super().__init__()
        self.shift = torch.tensor(shift, dtype=torch.float32).view(1, 3, 1, 1, 1)
        self.seen = None

    def forward(self, x):
        self.seen = tuple(x.shape[2:])
        return self.shift.expand(x.shape[0], 3, *x.shape[2:]).clone()


class _RampShiftOracle(torch.nn.Module):
    """Measures, in ITS OWN voxels, the shift between two images that are the same linear ramp along axis 0."""

    def forward(self, x):
        moving, fixed = x[:, 0], x[:, 1]
        n = moving.shape[1]
        # slope from interior voxels (anti-aliasing smooths a ramp exactly except at the replicate-padded borders)
        slope = (moving[:, n - 3] - moving[:, 2]).mean() / (n - 5)
        shift = (fixed - moving).mean() / slope
        ddf = torch.zeros(x.shape[0], 3, *x.shape[2:])
        ddf[:, 0] = shift
        return ddf


def test_resize_displacement_scales_each_axis_by_align_corners_ratio():
    ddf = torch.ones(2, 3, 20, 24, 10) * torch.tensor([1.0, -2.0, 0.5]).view(1, 3, 1, 1, 1)
    full = resize_displacement(ddf, (40, 48, 30))
    assert full.shape == (2, 3, 40, 48, 30)
    expected = torch.tensor([39 / 19, -2 * 47 / 23, 0.5 * 29 / 9])
    assert torch.allclose(full.mean(dim=(0, 2, 3, 4)), expected, atol=1e-5)
    assert torch.allclose(full.std(dim=(0, 2, 3, 4)), torch.zeros(3), atol=1e-5)  # a translation stays a translation


def test_inferer_runs_network_on_reduced_grid_and_returns_full_size_field():
    net = _ConstantField([1.0, 0.0, -1.0])
    out = ResolutionInferer(network_scale=0.5)(torch.rand(1, 2, 40, 48, 30), net)
    assert net.seen == tuple(network_grid_size((40, 48, 30), 0.5)) == (20, 24, 15)
    assert out.shape == (1, 3, 40, 48, 30)
    assert torch.allclose(out[:, 0], torch.full_like(out[:, 0], 39 / 19), atol=1e-5)
    assert torch.allclose(out[:, 2], torch.full_like(out[:, 2], -29 / 14), atol=1e-5)


@pytest.mark.parametrize("scale", [0.5, (0.4, 0.5, 1.0)])
def test_known_translation_measured_at_low_resolution_warps_moving_onto_fixed(scale):
    # moving(p) = p0, fixed(p) = p0 + 3: warped(p) = moving(p + ddf(p)) equals fixed only with ddf_0 = 3 full voxels.
    d, h, w = 41, 30, 20
    ramp = torch.arange(d, dtype=torch.float32).view(1, 1, d, 1, 1).expand(1, 1, d, h, w)
    pair = torch.cat([ramp, ramp + 3.0], dim=1)
    ddf = ResolutionInferer(network_scale=scale, antialias=True)(pair, _RampShiftOracle())
    assert torch.allclose(ddf[:, 0], torch.full_like(ddf[:, 0], 3.0), atol=1e-3)
    warped = Warp(padding_mode="border")(ramp, ddf)
    assert torch.allclose(warped[..., : d - 4, :, :], (ramp + 3.0)[..., : d - 4, :, :], atol=1e-3)


def test_restore_original_grid_maps_field_components_to_stored_axes():
    # A field computed on the RAS-reoriented grid, restored to the LAS file grid, must warp the LAS-stored moving
    # image exactly like the reoriented warp (restored): this is what makes ddf.nii.gz valid on the file's axes.
    las = np.diag([-2.0, 2.0, 2.0, 1.0])
    las[:3, 3] = [40.0, -30.0, 10.0]
    torch.manual_seed(0)
    moving = torch.rand(1, 12, 10, 8)
    fixed_stored = MetaTensor(torch.rand(1, 12, 10, 8), affine=torch.as_tensor(las))
    fixed_stored.meta["original_affine"] = torch.as_tensor(las)
    orient = Orientation(axcodes="RAS")
    fixed_ras = orient(fixed_stored)
    moving_ras = orient(MetaTensor(moving.clone(), affine=torch.as_tensor(las)))
    ddf_ras = torch.randn(3, 12, 10, 8) * 0.8
    warped_ras = Warp()(moving_ras.as_tensor()[None], ddf_ras[None])[0]
    out = RestoreOriginalGridd(keys=["pred", "warped"], reference_key="fixed_image", vector_keys=["pred"])(
        {"pred": ddf_ras, "warped": warped_ras, "fixed_image": fixed_ras}
    )
    assert np.allclose(np.asarray(out["pred"].affine), las) and np.allclose(np.asarray(out["warped"].affine), las)
    rewarped = Warp()(moving[None], out["pred"].as_tensor()[None])[0]
    assert torch.allclose(rewarped, out["warped"].as_tensor(), atol=1e-5)


def test_restore_original_grid_leaves_a_ras_file_grid_as_it_is():
    """A fixed file stored in RAS: the outputs keep their values and memory (no copy of a CT-sized field), and
    carry the file's affine and placement codes."""
    ras = np.diag([0.7, 0.6, 2.5, 1.0])
    fixed = MetaTensor(torch.rand(1, 12, 10, 8), affine=torch.as_tensor(ras))
    fixed.meta.update(original_affine=torch.as_tensor(ras), qform_code=1, sform_code=2)
    ddf, det = torch.randn(3, 12, 10, 8), torch.rand(1, 12, 10, 8)
    out = RestoreOriginalGridd(keys=["pred", "jacobian_det"], vector_keys=["pred"])(
        {"pred": MetaTensor(ddf), "jacobian_det": MetaTensor(det), "fixed_image": fixed}
    )
    assert out["pred"].data_ptr() == ddf.data_ptr() and out["jacobian_det"].data_ptr() == det.data_ptr()
    assert torch.equal(out["pred"].as_tensor(), ddf) and np.allclose(np.asarray(out["pred"].affine), ras)
    assert out["pred"].meta["sform_code"] == 2


def test_moving_warp_for_the_figure_only_when_something_reads_it(small_pair):
    """``warped_moving_scaled`` (the moving image warped on the network-scaled fixed grid) is read by qc.png and the
    SSIM metric only: with both off, the post-processing makes no full-resolution warp of it."""
    from monai.bundle import ConfigParser

    from conftest import BUNDLE_ROOT

    def steps(**overrides):
        parser = ConfigParser()
        parser.read_config(str(BUNDLE_ROOT / "configs" / "inference.json"))
        parser.update({"bundle_root": str(BUNDLE_ROOT), **{k: str(v) for k, v in small_pair.items()}, **overrides})
        return [type(t).__name__ for t in parser.get_parsed_content("postprocessing").transforms]

    assert "WarpByDdfd" in steps() and "WarpByDdfd" in steps(qc=False, metrics_ssim=True)
    assert "WarpByDdfd" in steps(qc=True, metrics_ssim=False)
    without = steps(qc=False, metrics_ssim=False)
    assert "WarpByDdfd" not in without and without == [s for s in steps() if s != "WarpByDdfd"]


def test_moving_on_another_grid_is_resampled_onto_fixed_grid(caplog):
    fixed = MetaTensor(torch.zeros(1, 20, 20, 20), affine=torch.eye(4, dtype=torch.float64))
    coarse = np.diag([2.0, 2.0, 2.0, 1.0])
    moving = MetaTensor(torch.arange(1000, dtype=torch.float32).view(1, 10, 10, 10), affine=torch.as_tensor(coarse))
    with caplog.at_level("INFO"):
        out = ResampleToFixedGridd(keys=["moving_image"], mode="nearest")({"moving_image": moving, "fixed_image": fixed})
    assert "grids differ" in caplog.text
    assert out["moving_image"].shape == (1, 20, 20, 20)
    assert np.allclose(np.asarray(out["moving_image"].affine), np.eye(4))
    assert out["moving_image"][0, 4, 6, 8] == moving[0, 2, 3, 4]  # world (4, 6, 8) mm is coarse voxel (2, 3, 4)
    same = ResampleToFixedGridd(keys=["moving_image"])({"moving_image": fixed.clone(), "fixed_image": fixed})
    assert same["moving_image"].shape == fixed.shape


@pytest.fixture(scope="module")
def small_pair(tmp_path_factory):
    return write_small_pair(tmp_path_factory.mktemp("pair"), factor=4)  # 40 x 48 x 40 voxels of 4 mm


def _dice(a, b, label):
    a, b = a == label, b == label
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


@pytest.mark.slow
def test_inference_run_writes_outputs_on_fixed_grid(small_pair, tmp_path):
    out = tmp_path / "out"
    overrides = dict(small_pair, output_dir=str(out), network_scale=0.5, ckpt_path=str(tmp_path / "none.pt"))
    run_bundle_workflow(["inference.json"], **PLAIN_INFERENCE, **overrides)
    fixed = nib.load(small_pair["fixed_image"])
    for name in OUTPUTS:
        assert (out / name).is_file(), name
    assert not [p for p in os.listdir(out) if p.startswith(".")]  # no temporary files left
    images = {n: nib.load(str(out / n)) for n in OUTPUTS if n.endswith(".nii.gz")}
    for name, image in images.items():
        assert np.allclose(image.affine, fixed.affine), name
        assert image.shape[:3] == fixed.shape, name
    ddf = images["ddf.nii.gz"].get_fdata()
    assert ddf.shape == fixed.shape + (3,) and np.abs(ddf).max() > 0
    assert images["warped_label.nii.gz"].get_data_dtype() == np.uint8

    # The written field follows warped(p) = moving(p + ddf(p)) on the stored (LAS) axes of the fixed file.
    moving = torch.as_tensor(nib.load(small_pair["moving_image"]).get_fdata(), dtype=torch.float32)[None, None]
    field = torch.as_tensor(np.moveaxis(ddf, -1, 0), dtype=torch.float32)[None]
    rewarped = Warp()(moving, field)[0, 0].numpy()
    assert np.allclose(rewarped, images["warped_image.nii.gz"].get_fdata(), atol=1e-3 * moving.max().item())
    moving_label = torch.as_tensor(nib.load(small_pair["moving_label"]).get_fdata(), dtype=torch.float32)[None, None]
    relabel = Warp("nearest")(moving_label, field)[0, 0].numpy()
    assert (relabel == images["warped_label.nii.gz"].get_fdata()).mean() > 0.999

    # metrics.json agrees with the files.
    metrics = json.loads((out / "metrics.json").read_text())
    fixed_label = nib.load(small_pair["fixed_label"]).get_fdata()
    warped_label = images["warped_label.nii.gz"].get_fdata()
    moving_label_np = moving_label[0, 0].numpy()
    for row in metrics["labels"]:
        assert row["dice"] == pytest.approx(_dice(warped_label, fixed_label, row["label"]), abs=1e-4)
        assert row["dice_identity"] == pytest.approx(_dice(moving_label_np, fixed_label, row["label"]), abs=1e-4)
    det = images["jacobian_det.nii.gz"].get_fdata()
    assert metrics["percent_non_positive_jacobian"] == pytest.approx(100.0 * (det <= 0).mean(), abs=1e-3)


@pytest.mark.slow
def test_existing_outputs_are_kept_unless_overwrite(small_pair, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "ddf.nii.gz").write_bytes(b"earlier result")
    overrides = dict(small_pair, output_dir=str(out), network_scale=0.5, ckpt_path=str(tmp_path / "none.pt"))
    with pytest.raises(Exception) as excinfo:
        run_bundle_workflow(["inference.json"], **PLAIN_INFERENCE, **overrides)
    chain, error = [], excinfo.value
    while error is not None:
        chain.append(error)
        error = error.__cause__ or error.__context__
    assert any(isinstance(e, OutputExistsError) for e in chain)
    assert (out / "ddf.nii.gz").read_bytes() == b"earlier result"
    assert not (out / "warped_image.nii.gz").exists()  # refused before computing anything
    run_bundle_workflow(["inference.json"], **PLAIN_INFERENCE, overwrite=True, **overrides)
    assert nib.load(str(out / "ddf.nii.gz")).shape[-1] == 3


@pytest.mark.slow
def test_datalist_of_pairs_writes_one_folder_per_pair(small_pair, tmp_path):
    pairs = [
        {"id": "colin_to_mni", **{k: small_pair[k] for k in ("moving_image", "fixed_image")}},
        {"id": "mni_to_colin", "moving_image": small_pair["fixed_image"], "fixed_image": small_pair["moving_image"]},
    ]
    datalist = tmp_path / "pairs.json"
    datalist.write_text(json.dumps({"pairs": pairs}))
    out = tmp_path / "batch"
    run_bundle_workflow(
        ["inference.json"], **PLAIN_INFERENCE, datalist=str(datalist), output_dir=str(out), network_scale=0.5,
        ckpt_path=str(tmp_path / "none.pt"),
    )
    for pair_id, fixed in (("colin_to_mni", "fixed_image"), ("mni_to_colin", "moving_image")):
        ddf = nib.load(str(out / pair_id / "ddf.nii.gz"))
        assert np.allclose(ddf.affine, nib.load(small_pair[fixed]).affine)
        assert not (out / pair_id / "metrics.json").exists()  # no labels given
        assert not [p.name for p in (out / pair_id).iterdir() if p.name.startswith(".")]  # no marker, no temp file
    cohort = json.loads((out / "cohort.json").read_text())  # the datalist's summary (tests/test_cohort_*.py)
    assert [(r["pair_id"], r["status"]) for r in cohort["pairs"]] == [("colin_to_mni", "registered"),
                                                                      ("mni_to_colin", "registered")]
