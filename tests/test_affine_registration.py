# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""Tests of ``scripts.engines.affine_registration`` on the shipped Colin27 -> MNI152 pair downsampled to 3 mm.

Known transforms are applied by changing the moving image's affine header (not its voxels): with the new header
``Q @ moving_affine`` the right answer is ``Q @ T0``, where ``T0`` is the result on the original pair.
"""

from __future__ import annotations

import math

import nibabel as nib
import numpy as np
import pytest
import torch
from workflow_data import SAMPLE_DIR, downsample_volume

from scripts.engines.affine_registration import AffineRegistration, check_affine_result
from scripts.layers import resample_moving

FAST = {"levels_mm": (8.0, 4.0), "iterations": (60, 30), "search_iterations": 10}  # seconds on 2 cores at 3 mm


def _rotation(axis: int, degrees: float, translation=(0.0, 0.0, 0.0)) -> np.ndarray:
    a = math.radians(degrees)
    out, (i, j) = np.eye(4), [k for k in range(3) if k != axis]
    out[i, i] = out[j, j] = math.cos(a)
    out[i, j], out[j, i] = -math.sin(a), math.sin(a)
    out[:3, 3] = translation
    return out


@pytest.fixture(scope="module")
def pair():
    """3 mm pair: tensors (1, 1, 60, 72, 60), affines, brain points (N, 4) of the fixed image, rigid and affine T0."""
    fixed = downsample_volume(SAMPLE_DIR / "fixed_mni152_t1.nii.gz", 3, label=False)
    moving = downsample_volume(SAMPLE_DIR / "moving_colin27_t1.nii.gz", 3, label=False)
    data = np.asarray(fixed.dataobj)
    brain = np.argwhere(data > np.percentile(data[data > 0], 10))
    out = {
        "fixed": torch.as_tensor(data)[None, None], "moving": torch.as_tensor(np.asarray(moving.dataobj))[None, None],
        "fixed_affine": fixed.affine, "moving_affine": moving.affine, "moving_nib": moving,
        "points": np.c_[brain, np.ones(len(brain))] @ fixed.affine.T,
    }
    for transform in ("rigid", "affine"):
        reg = AffineRegistration(transform=transform, **FAST)
        out[transform] = reg(out["moving"], out["fixed"], moving.affine, fixed.affine)
        out[transform + "_report"] = reg.last_report
    return out


def _rms_mm(points: np.ndarray, a, b) -> float:
    """RMS over world points (N, 4) of |a x - b x| in mm."""
    d = points @ (np.asarray(a) - np.asarray(b)).T
    return float(np.sqrt((d[:, :3] ** 2).sum(1).mean()))


def _angle_deg(a, b) -> float:
    u, _, vt = np.linalg.svd(np.asarray(a)[:3, :3] @ np.linalg.inv(np.asarray(b)[:3, :3]))
    return math.degrees(math.acos(np.clip((np.trace(u @ vt) - 1) / 2, -1.0, 1.0)))


def test_reference_result_is_sane(pair):
    """The shipped pair is nearly aligned: T0 stays within a few mm of identity and improves on the COM start."""
    for transform in ("rigid", "affine"):
        t0, report = pair[transform][0].numpy(), pair[transform + "_report"]
        assert pair[transform].shape == (1, 4, 4) and pair[transform].dtype == torch.float64
        assert _rms_mm(pair["points"], t0, np.eye(4)) < 3.0
        assert report["final_loss"] <= report["initial_loss"] and report["final_loss"] <= report["identity_loss"]
        assert all(isinstance(report[k], float) for k in ("initial_loss", "identity_loss", "final_loss"))
        assert [lv["spacing_mm"] for lv in report["levels"]] == [8.0, 4.0]
        check_affine_result(pair[transform])


def test_rigid_header_transform_recovered(pair):
    """12 degrees about the S axis + 10 mm translation in the header: T = Q T0 within 1 mm RMS and 1 degree."""
    q = _rotation(2, 12.0, (10.0, -6.0, 4.0))
    reg = AffineRegistration(transform="rigid", **FAST)
    t = reg(pair["moving"], pair["fixed"], q @ pair["moving_affine"], pair["fixed_affine"])[0].numpy()
    truth = q @ pair["rigid"][0].numpy()
    assert _rms_mm(pair["points"], t, truth) < 1.0
    assert _angle_deg(t, truth) < 1.0
    assert _rms_mm(pair["points"], np.eye(4), truth) > 10.0  # the test moves the image far enough to mean something
    assert abs(np.linalg.det(t[:3, :3]) - 1) < 1e-9  # rigid stays rigid


@pytest.mark.parametrize("axis, degrees", [(2, 180.0), (0, 90.0)])
def test_large_rotation_found_by_principal_axes(pair, axis, degrees):
    """A header turned upside down / face down is found by the principal-axes candidates (whatever the eigenvector
    signs), which score clearly better than the identity rotation after the search steps."""
    q = _rotation(axis, degrees, (20.0, -10.0, 5.0))
    reg = AffineRegistration(transform="rigid", **FAST)
    t = reg(pair["moving"], pair["fixed"], q @ pair["moving_affine"], pair["fixed_affine"])[0].numpy()
    assert _rms_mm(pair["points"], t, q @ pair["rigid"][0].numpy()) < 1.0
    losses = reg.last_report["items"][0]["candidate_losses"]
    assert len(losses) == 5 and min(losses) < losses[0] - 0.05  # the identity rotation (first) is clearly worse


def test_affine_header_transform_recovered(pair):
    """Scaling 1.08, a 0.06 shear and a 10 degree rotation in the header are recovered by transform='affine'."""
    q = _rotation(0, -10.0, (-8.0, 5.0, 6.0))
    q[:3, :3] = q[:3, :3] @ np.array([[1.08, 0.06, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.95]])
    reg = AffineRegistration(transform="affine", **FAST)
    t = reg(pair["moving"], pair["fixed"], q @ pair["moving_affine"], pair["fixed_affine"])[0].numpy()
    truth = q @ pair["affine"][0].numpy()
    assert _rms_mm(pair["points"], t, truth) < 1.0
    assert np.abs(np.linalg.svd(t[:3, :3])[1] - np.linalg.svd(truth[:3, :3])[1]).max() < 0.02


def test_deterministic_and_batched(pair):
    """Registering the same pair again (as item 0 of a batch of two, with per-item affines) gives a bit-identical
    matrix; item 1, whose header is moved by 8 degrees and 7 mm, gets its own result."""
    q = _rotation(1, 8.0, (0.0, 7.0, 0.0))
    affines = torch.as_tensor(np.stack([pair["moving_affine"], q @ pair["moving_affine"]]))
    reg = AffineRegistration(transform="rigid", **FAST)
    out = reg(pair["moving"].expand(2, -1, -1, -1, -1), pair["fixed"].expand(2, -1, -1, -1, -1), affines,
              pair["fixed_affine"])
    assert out.shape == (2, 4, 4) and len(reg.last_report["items"]) == 2
    assert torch.equal(out[0], pair["rigid"][0])
    assert _rms_mm(pair["points"], out[1].numpy(), q @ pair["rigid"][0].numpy()) < 1.0
    assert reg.last_report["items"][0]["final_loss"] == pair["rigid_report"]["final_loss"]


def test_early_stop_ends_levels_once_the_loss_flattens(pair):
    """With an early stop, a level ends once its windowed mean loss stops improving by the tolerance: fewer steps on
    the levels where that happens, each level at least two windows long, and a result close to the full run's. Without
    one (the default), every level runs its planned steps."""
    assert [level["steps"] for level in pair["affine_report"]["levels"]] == list(FAST["iterations"])
    reg = AffineRegistration(transform="affine", **FAST, tolerance=1e-3, tolerance_window=5)
    early = reg(pair["moving"], pair["fixed"], pair["moving_affine"], pair["fixed_affine"])
    steps = [level["steps"] for level in reg.last_report["levels"]]
    assert all(10 <= taken <= planned for taken, planned in zip(steps, FAST["iterations"]))
    assert sum(steps) < sum(FAST["iterations"])
    assert reg.last_report["final_loss"] < reg.last_report["initial_loss"]
    assert _rms_mm(pair["points"], early[0].numpy(), pair["affine"][0].numpy()) < 1.0


def test_mutual_information_handles_inverted_contrast(pair):
    """With the brain's contrast inverted (a second contrast), similarity='mi' still recovers a header rotation, which
    NCC cannot (it would need a negative correlation)."""
    moving = pair["moving"]
    inverted = torch.where(moving > 0.05 * moving.max(), 1.2 * moving.max() - moving, torch.zeros_like(moving))
    q = _rotation(2, 12.0, (10.0, -6.0, 4.0))
    reg = AffineRegistration(transform="rigid", similarity="mi", levels_mm=(8.0, 4.0), iterations=(40, 15),
                             search_iterations=5, mi_bins=16)
    t = reg(inverted, pair["fixed"], q @ pair["moving_affine"], pair["fixed_affine"])[0].numpy()
    assert _rms_mm(pair["points"], t, q @ pair["rigid"][0].numpy()) < 1.5
    assert reg.last_report["final_loss"] < reg.last_report["initial_loss"]


def _as_lia(image: nib.Nifti1Image) -> nib.Nifti1Image:
    """The same image stored with LIA voxel axes (voxels flipped/permuted, affine changed to match)."""
    ornt = nib.orientations.ornt_transform(nib.io_orientation(image.affine), nib.orientations.axcodes2ornt("LIA"))
    data = nib.orientations.apply_orientation(np.asarray(image.dataobj), ornt)
    affine = image.affine @ nib.orientations.inv_ornt_aff(ornt, image.shape)
    return nib.Nifti1Image(np.ascontiguousarray(data), affine)


def test_orientation_invariant(pair):
    """The moving image stored as LIA gives the same T, and resamples to the same fixed-grid image."""
    lia = _as_lia(pair["moving_nib"])
    assert nib.aff2axcodes(lia.affine) == ("L", "I", "A") and lia.shape != pair["moving_nib"].shape
    moving = torch.as_tensor(np.asarray(lia.dataobj))[None, None]
    t = AffineRegistration(transform="rigid", **FAST)(moving, pair["fixed"], lia.affine, pair["fixed_affine"])
    assert _rms_mm(pair["points"], t[0].numpy(), pair["rigid"][0].numpy()) < 0.1
    shape = pair["fixed"].shape[2:]
    a = resample_moving(moving, lia.affine, shape, pair["fixed_affine"], t)
    b = resample_moving(pair["moving"], pair["moving_affine"], shape, pair["fixed_affine"], t)
    assert torch.allclose(a, b, atol=1e-3 * float(b.max()))


def test_resample_known_shift_and_labels():
    """resample_moving with a pure world translation shifts voxels by the expected amount; labels stay integer."""
    label = torch.zeros(1, 1, 12, 10, 8, dtype=torch.uint8)
    label[0, 0, 4:7, 3:6, 2:5] = 3
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    shift = np.eye(4)
    shift[:3, 3] = [4.0, 0.0, -2.0]  # fixed x samples moving at x + (4, 0, -2) mm = (+2, 0, -1) voxels
    out = resample_moving(label, affine, (12, 10, 8), affine, shift, mode="nearest")
    assert out.dtype == torch.uint8
    assert torch.equal(out[0, 0, 2:5, 3:6, 3:6], label[0, 0, 4:7, 3:6, 2:5]) and int(out.sum()) == int(label.sum())


def test_resample_matches_simpleitk(pair):
    """resample_moving equals SimpleITK's Resample with the same transform written in LPS (pins the convention)."""
    sitk = pytest.importorskip("SimpleITK")
    lps = np.diag([-1.0, -1.0, 1.0, 1.0])

    def to_sitk(data, affine):
        image = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(data, (2, 1, 0))).astype(np.float32))
        spacing = np.linalg.norm(affine[:3, :3], axis=0)
        image.SetSpacing(spacing.tolist())
        image.SetDirection((lps[:3, :3] @ affine[:3, :3] / spacing).ravel().tolist())
        image.SetOrigin((lps[:3, :3] @ affine[:3, 3]).tolist())
        return image

    lia = _as_lia(pair["moving_nib"])
    world = _rotation(0, 9.0, (5.0, -7.0, 3.0)) @ np.diag([1.05, 0.97, 1.0, 1.0])
    ours = resample_moving(torch.as_tensor(np.asarray(lia.dataobj))[None, None], lia.affine,
                           pair["fixed"].shape[2:], pair["fixed_affine"], world)[0, 0].numpy()
    itk_t = sitk.AffineTransform(3)
    world_lps = lps @ world @ lps
    itk_t.SetMatrix(world_lps[:3, :3].ravel().tolist())
    itk_t.SetTranslation(world_lps[:3, 3].tolist())
    reference = to_sitk(pair["fixed"][0, 0].numpy(), pair["fixed_affine"])
    theirs = sitk.Resample(to_sitk(np.asarray(lia.dataobj), lia.affine), reference, itk_t, sitk.sitkLinear, 0.0)
    theirs = np.transpose(sitk.GetArrayFromImage(theirs), (2, 1, 0))
    assert theirs.shape == ours.shape and theirs.std() > 0
    assert np.corrcoef(ours.ravel(), theirs.ravel())[0, 1] > 0.99


def test_degenerate_results_raise(pair):
    check_affine_result(pair["affine"])
    check_affine_result(torch.as_tensor(_rotation(1, 170.0, (50.0, 0.0, 0.0))))
    for bad, words in [(np.diag([-1.0, 1.0, 1.0, 1.0]), "determinant"), (np.diag([3.0, 1.0, 1.0, 1.0]), "scalings"),
                       (np.diag([1.0, 0.3, 1.0, 1.0]), "scalings"), (np.full((4, 4), np.nan), "finite"),
                       (np.zeros((3, 3)), "4, 4"), (np.diag([0.0, 1.0, 1.0, 1.0]), "determinant")]:
        with pytest.raises(ValueError, match=words):
            check_affine_result(bad)


@pytest.mark.parametrize(
    "kwargs, word",
    [({"transform": "similarity"}, "transform"), ({"similarity": "mse"}, "similarity"), ({"init": "random"}, "init"),
     ({"levels_mm": (4.0, -2.0)}, "levels_mm"), ({"levels_mm": ()}, "levels_mm"),
     ({"iterations": (10, 10)}, "iterations"), ({"iterations": (10, -1, 5)}, "iterations"),
     ({"learning_rate": 0.0}, "learning_rate"), ({"search_iterations": -1}, "search_iterations"),
     ({"lncc_kernel": 4}, "lncc_kernel"), ({"mi_bins": 2}, "mi_bins"), ({"tolerance": -0.01}, "tolerance"),
     ({"tolerance": float("nan")}, "tolerance"), ({"tolerance_window": 0}, "tolerance_window")],
)
def test_bad_arguments_raise(kwargs, word):
    with pytest.raises(ValueError, match=f"^{word} must be"):
        AffineRegistration(**kwargs)


def test_bad_inputs_raise():
    reg, image, eye = AffineRegistration(**FAST), torch.rand(1, 1, 8, 8, 8), np.eye(4)
    with pytest.raises(ValueError, match="moving"):
        reg(image[0], image, eye, eye)
    with pytest.raises(ValueError, match="fixed_affine"):
        reg(image, image, eye, np.eye(3))
    with pytest.raises(ValueError, match="moving_affine"):
        reg(image, image, np.zeros((4, 4)), eye)
    with pytest.raises(ValueError, match="constant"):
        reg(torch.zeros(1, 1, 8, 8, 8), image, eye, eye)


@pytest.mark.parametrize("spacing", [2.0, 2.2, 3.1, 7.0])
def test_pyramid_level_equals_grid_sample(spacing):
    """A pyramid level is sampled one axis at a time (three 1-D linear interpolations): the same values as
    ``grid_sample`` at the level's points, on an anisotropic, oblique grid whose level grid has fractional offsets and
    steps and reaches past the image (border padding); at 2.2 mm it is the image's own grid along the last axis."""
    from scripts.engines.affine_registration import _index_points, _resample_level
    from scripts.layers.sampling import grid_sample_matrix, sample_points

    generator = torch.Generator().manual_seed(3)
    image = torch.rand(1, 1, 23, 17, 12, generator=generator, dtype=torch.float32)
    affine = torch.as_tensor(_rotation(2, 20.0, (4.0, -3.0, 7.0)) @ np.diag([1.3, 0.9, 2.2, 1.0]))
    # done_mm = blur_mm: no blur, so the comparison is of the sampling alone
    values, level_affine = _resample_level(image, affine, spacing, 1.0, 1.0)
    index_to_voxel = torch.linalg.inv(affine) @ level_affine
    assert torch.allclose(index_to_voxel[:3, :3], torch.diag(index_to_voxel.diagonal()[:3]))  # the image's axes
    voxels = _index_points(values.shape[2:], index_to_voxel).reshape(1, -1, 3)
    expected = sample_points(image, voxels, grid_sample_matrix(image.shape[2:])[None], padding_mode="border")
    torch.testing.assert_close(values.reshape(1, 1, -1), expected, rtol=0, atol=1e-6)
