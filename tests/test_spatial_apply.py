# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""``apply_transforms`` with ``affine.mat`` + ``warp.nii.gz`` against SimpleITK's composite transform and against the
bundle's own two-step warp, on the shipped pair at 3 mm (moving on another grid than the fixed)."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import SAMPLE_PAIR
from spatial_cases import FACTOR, brain_correlation, make_case, mean_dice, sitk_displacement, sitk_resample
from workflow_data import downsample_volume

from scripts.layers import warp_image
from scripts.spatial import apply_transforms, read_itk_displacement, save_transforms

sitk = pytest.importorskip("SimpleITK")


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    case = make_case(tmp_path_factory.mktemp("spatial_apply"))
    case["transforms"] = tmp_path_factory.mktemp("spatial_apply_tx")
    save_transforms(case["transforms"], case["fixed_affine"], case["rotation"], case["ddf"], inverse=False)
    fixed = np.asarray(nib.load(str(case["fixed"])).dataobj)
    case["brain"] = fixed > 0.2 * np.percentile(fixed, 99)
    return case


def _composite(case):
    """SimpleITK point map x -> T(x + d(x)): the last transform of the list is applied first."""
    affine = sitk.ReadTransform(str(case["transforms"] / "affine.mat"))
    return sitk.CompositeTransform([affine, sitk_displacement(case["transforms"] / "warp.nii.gz")])


def test_warp_and_affine_match_simpleitk_composite(case):
    ours = apply_transforms(case["fixed"], case["moving"], case["transforms"]).get_fdata()
    theirs = sitk_resample(case["moving"], case["fixed"], _composite(case))
    assert brain_correlation(ours, theirs, case["brain"]) >= 0.99
    assert np.abs(ours - theirs)[case["brain"]].max() < 1e-3 * theirs.max()
    ours_label = np.asarray(
        apply_transforms(case["fixed"], case["moving_label"], case["transforms"], "nearest").dataobj
    )
    theirs_label = sitk_resample(case["moving_label"], case["fixed"], _composite(case), label=True)
    assert mean_dice(theirs_label, ours_label) >= 0.97


def test_the_order_matters(case):
    """Warp-then-affine differs measurably from affine-then-warp, so the test above pins the order down."""
    affine = sitk.ReadTransform(str(case["transforms"] / "affine.mat"))
    reversed_order = sitk.CompositeTransform([sitk_displacement(case["transforms"] / "warp.nii.gz"), affine])
    ours = apply_transforms(case["fixed"], case["moving"], case["transforms"]).get_fdata()
    theirs = sitk_resample(case["moving"], case["fixed"], reversed_order)
    assert np.abs(ours - theirs)[case["brain"]].max() > 0.05 * theirs.max()


def test_matches_the_bundle_warp_of_the_affine_resampled_moving(case, tmp_path):
    """One interpolation of the composed map ~ the bundle's two steps: affine resampling, then warp(moving, ddf)."""
    save_transforms(tmp_path, case["fixed_affine"], transform_ras=case["rotation"])
    resampled = apply_transforms(case["fixed"], case["moving"], tmp_path).get_fdata(dtype=np.float32)
    ddf = torch.as_tensor(case["ddf"])[None]
    two_step = warp_image(torch.as_tensor(resampled)[None, None], ddf)[0, 0].numpy()
    ours = apply_transforms(case["fixed"], case["moving"], case["transforms"]).get_fdata()
    assert brain_correlation(ours, two_step, case["brain"]) >= 0.99
    labels = apply_transforms(case["fixed"], case["moving_label"], tmp_path, "nearest").get_fdata(dtype=np.float32)
    two_step_labels = warp_image(torch.as_tensor(labels)[None, None], ddf, mode="nearest")[0, 0].numpy()
    ours_labels = np.asarray(
        apply_transforms(case["fixed"], case["moving_label"], case["transforms"], "nearest").dataobj
    )
    # Two nearest-neighbour resamplings at 3 mm move small structures (140-620 voxels) by up to a voxel, so the
    # label agreement of one step vs two is about 0.85 (without the ddf it is 0.68, with the ddf negated 0.48).
    assert mean_dice(two_step_labels, ours_labels) >= 0.80


def test_deformable_only_is_the_bundle_warp_bit_for_bit(case, tmp_path):
    """Moving on the fixed grid and no affine: exactly ``warp_image(moving, ddf)`` with the ddf as stored (the mm
    float32 file holds it to about 1e-7 relative), images and labels."""
    moving = downsample_volume(SAMPLE_PAIR["moving_image"], FACTOR, label=False)
    label = downsample_volume(SAMPLE_PAIR["moving_label"], FACTOR, label=True)
    save_transforms(tmp_path, case["fixed_affine"], ddf_voxels=case["ddf"], inverse=False)
    stored, _ = read_itk_displacement(tmp_path / "warp.nii.gz")
    np.testing.assert_allclose(stored, case["ddf"], rtol=1e-6, atol=1e-6)
    ddf = torch.as_tensor(stored)[None]
    ours = np.asarray(apply_transforms(case["fixed"], moving, tmp_path).dataobj)
    theirs = warp_image(torch.as_tensor(np.asarray(moving.dataobj))[None, None], ddf)[0, 0].numpy()
    np.testing.assert_array_equal(ours, theirs)
    ours_label = np.asarray(apply_transforms(case["fixed"], label, tmp_path, "nearest").dataobj)
    theirs_label = warp_image(
        torch.as_tensor(np.asarray(label.dataobj), dtype=torch.float32)[None, None], ddf, "nearest"
    )
    np.testing.assert_array_equal(ours_label, theirs_label[0, 0].numpy().astype(np.uint8))


def test_output_file_has_the_reference_grid_and_label_dtype(case, tmp_path):
    out = tmp_path / "out" / "warped_label.nii.gz"
    apply_transforms(case["fixed"], case["moving_label"], case["transforms"], "nearest", out_path=out)
    written = nib.load(str(out))
    assert written.shape == tuple(case["fixed_shape"]) and written.get_data_dtype() == np.uint8
    np.testing.assert_allclose(written.affine, case["fixed_affine"], atol=1e-5)
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")], "a temporary file was left behind"
    back = apply_transforms(case["fixed"], case["moving"], case["transforms"], inverse=True)  # onto the moving grid
    moving = nib.load(str(case["moving"]))
    assert back.shape == moving.shape and back.get_data_dtype() == np.float32
    np.testing.assert_allclose(back.affine, moving.affine, atol=1e-5)
    with pytest.raises(ValueError, match="interpolation"):
        apply_transforms(case["fixed"], case["moving"], case["transforms"], "cubic")
