# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""ANTs reads the bundle's ``affine.mat`` / ``warp.nii.gz`` / ``inverse_warp.nii.gz`` and reproduces ``apply_transforms``
in both directions (bench only: skipped without antspyx)."""

from __future__ import annotations

import shutil

import nibabel as nib
import numpy as np
import pytest
from spatial_cases import brain_correlation, make_case, mean_dice

from scripts.spatial import apply_transforms, save_transforms

ants = pytest.importorskip("ants")


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    case = make_case(tmp_path_factory.mktemp("spatial_ants"))
    folder = tmp_path_factory.mktemp("spatial_ants_tx")
    save_transforms(folder, case["fixed_affine"], case["rotation"], case["ddf"])
    case["transforms"] = folder
    case["affine"], case["warp"] = str(folder / "affine.mat"), str(folder / "warp.nii.gz")
    case["inverse_warp"] = str(folder / "inverse_warp.nii.gz")
    return case


def _brain(path) -> np.ndarray:
    image = np.asarray(nib.load(str(path)).dataobj)
    return image > 0.2 * np.percentile(image, 99)


def test_ants_forward_matches(case):
    fixed, moving = ants.image_read(str(case["fixed"])), ants.image_read(str(case["moving"]))
    theirs = ants.apply_transforms(fixed, moving, [case["warp"], case["affine"]]).numpy()
    ours = apply_transforms(case["fixed"], case["moving"], case["transforms"]).get_fdata()
    brain = _brain(case["fixed"])
    assert brain_correlation(ours, theirs, brain) >= 0.99
    assert np.abs(ours - theirs)[brain].max() < 1e-3 * theirs.max()
    label = ants.image_read(str(case["moving_label"]))
    theirs_label = ants.apply_transforms(fixed, label, [case["warp"], case["affine"]], interpolator="nearestNeighbor")
    ours_label = np.asarray(
        apply_transforms(case["fixed"], case["moving_label"], case["transforms"], "nearest").dataobj
    )
    assert mean_dice(theirs_label.numpy(), ours_label) >= 0.97


def test_ants_inverse_matches(case):
    fixed, moving = ants.image_read(str(case["fixed"])), ants.image_read(str(case["moving"]))
    order, invert = [case["affine"], case["inverse_warp"]], [True, False]
    theirs = ants.apply_transforms(moving, fixed, order, whichtoinvert=invert).numpy()
    ours = apply_transforms(case["fixed"], case["moving"], case["transforms"], inverse=True).get_fdata()
    brain = _brain(case["moving"])
    assert brain_correlation(ours, theirs, brain) >= 0.99
    assert np.abs(ours - theirs)[brain].max() < 1e-3 * theirs.max()
    label = ants.image_read(str(case["fixed_label"]))
    theirs_label = ants.apply_transforms(moving, label, order, whichtoinvert=invert, interpolator="nearestNeighbor")
    ours_label = apply_transforms(case["fixed_label"], case["moving"], case["transforms"], "nearest", inverse=True)
    assert mean_dice(theirs_label.numpy(), np.asarray(ours_label.dataobj)) >= 0.97


def test_ants_own_registration_files_read_back(case, tmp_path):
    """ANTs' 0GenericAffine.mat (float, with a centre), 1Warp and 1InverseWarp, renamed into a transform folder,
    reproduce ANTs' own warped images in both directions (a short SyN run, about 2 s)."""
    fixed, moving = ants.image_read(str(case["fixed"])), ants.image_read(str(case["moving"]))
    result = ants.registration(
        fixed, moving, "SyN", reg_iterations=(20, 10, 0), aff_iterations=(50, 20, 0, 0), outprefix=f"{tmp_path}/"
    )
    folder = tmp_path / "transforms"
    folder.mkdir()
    warp, affine = result["fwdtransforms"]
    shutil.copy(affine, folder / "affine.mat")
    shutil.copy(warp, folder / "warp.nii.gz")
    shutil.copy(result["invtransforms"][1], folder / "inverse_warp.nii.gz")
    ours = apply_transforms(case["fixed"], case["moving"], folder).get_fdata()
    brain = _brain(case["fixed"])
    assert brain_correlation(ours, result["warpedmovout"].numpy(), brain) >= 0.99
    assert np.abs(ours - result["warpedmovout"].numpy())[brain].max() < 1e-3 * ours.max()
    ours_inverse = apply_transforms(case["fixed"], case["moving"], folder, inverse=True).get_fdata()
    assert brain_correlation(ours_inverse, result["warpedfixout"].numpy(), _brain(case["moving"])) >= 0.99
