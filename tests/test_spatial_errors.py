# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""Missing and corrupt transform files, and a warp used with the wrong fixed grid, fail with a message naming the file."""

from __future__ import annotations

import gzip
import re

import nibabel as nib
import numpy as np
import pytest
from spatial_cases import make_case

from scripts.io.errors import RegistrationInputError
from scripts.spatial import (
    TransformFileError,
    apply_transforms,
    load_transforms,
    read_itk_affine,
    read_itk_displacement,
    save_transforms,
    write_itk_displacement,
)

pytest.importorskip("SimpleITK")


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    case = make_case(tmp_path_factory.mktemp("spatial_errors"))
    case["transforms"] = tmp_path_factory.mktemp("spatial_errors_tx")
    save_transforms(case["transforms"], case["fixed_affine"], case["rotation"], case["ddf"], inverse=False)
    return case


def test_error_types_are_user_errors():
    assert issubclass(TransformFileError, RegistrationInputError)
    assert issubclass(TransformFileError, ValueError)


def test_missing_files_name_the_file(tmp_path):
    with pytest.raises(TransformFileError, match=re.escape(str(tmp_path / "affine.mat"))):
        read_itk_affine(tmp_path / "affine.mat")
    with pytest.raises(TransformFileError, match=re.escape(str(tmp_path / "warp.nii.gz"))):
        read_itk_displacement(tmp_path / "warp.nii.gz")
    with pytest.raises(TransformFileError, match=f"{re.escape(str(tmp_path))}.*holds none of"):
        load_transforms(tmp_path)
    with pytest.raises(TransformFileError, match="does not exist"):
        load_transforms(tmp_path / "nowhere")


def test_corrupt_affine_file_names_the_file(tmp_path):
    path = tmp_path / "affine.mat"
    path.write_bytes(b"\x00\x01 not a transform \xff" * 10)
    with pytest.raises(TransformFileError, match=re.escape(str(path))):
        read_itk_affine(path)


def test_corrupt_or_wrong_warp_file_names_the_file(case, tmp_path):
    good = (case["transforms"] / "warp.nii.gz").read_bytes()
    truncated = tmp_path / "warp.nii.gz"
    truncated.write_bytes(good[: len(good) // 2])
    with pytest.raises(TransformFileError, match=re.escape(str(truncated))):
        read_itk_displacement(truncated)
    garbage = tmp_path / "garbage.nii.gz"
    garbage.write_bytes(gzip.compress(b"nonsense" * 100))
    with pytest.raises(TransformFileError, match=re.escape(str(garbage))):
        read_itk_displacement(garbage)
    voxel_ddf = tmp_path / "ddf.nii.gz"  # the bundle's own voxel ddf is not an ITK field
    nib.save(nib.Nifti1Image(np.moveaxis(case["ddf"], 0, -1), case["fixed_affine"]), str(voxel_ddf))
    with pytest.raises(TransformFileError, match=f"{re.escape(str(voxel_ddf))}.*write_itk_displacement"):
        read_itk_displacement(voxel_ddf)


def test_corrupt_file_in_transform_folder_fails_apply(case, tmp_path):
    (tmp_path / "affine.mat").write_bytes(b"garbage")
    with pytest.raises(TransformFileError, match=re.escape(str(tmp_path / "affine.mat"))):
        apply_transforms(case["fixed"], case["moving"], tmp_path)


def test_warp_on_another_grid_than_the_fixed_image(case, tmp_path):
    """The moving image (another grid) passed as the fixed one: the message names the warp and both grids."""
    moving = nib.load(str(case["moving"]))
    with pytest.raises(TransformFileError) as raised:
        apply_transforms(case["moving"], case["moving"], case["transforms"])
    message = str(raised.value)
    assert str(case["transforms"] / "warp.nii.gz") in message and str(case["moving"]) in message
    assert "x".join(map(str, case["fixed_shape"])) in message and "x".join(map(str, moving.shape)) in message
    shifted = case["fixed_affine"].copy()
    shifted[:3, 3] += 1.5  # same shape, origin off by 1.5 mm
    write_itk_displacement(case["ddf"], shifted, tmp_path / "warp.nii.gz")
    with pytest.raises(TransformFileError, match="origin"):
        apply_transforms(case["fixed"], case["moving"], tmp_path)
