# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""``transform.h5`` / ``inverse_transform.h5`` are written with h5py, block by block, in ITK's own layout: the file
holds what ``sitk.WriteTransform`` writes for the same composite (built in SimpleITK from ``affine.mat``'s transform
and ``warp.nii.gz``'s float32 vectors, as the writer did before), dataset for dataset, and SimpleITK and ANTs read and
apply it to the same result."""

from __future__ import annotations

import h5py
import nibabel as nib
import numpy as np
import pytest

from scripts.spatial import itk_geometry, sitk_affine, write_itk_composite, write_itk_displacement

sitk = pytest.importorskip("SimpleITK")

SHAPE = (13, 11, 9)
#: the datasets that say which software wrote the file, not what it holds
VERSION_STRINGS = ("HDFVersion", "ITKVersion")


@pytest.fixture(scope="module")
def case():
    """A smooth-ish float32 voxel field on an oblique, anisotropic grid that does not start at the origin, and an
    affine stage with shear, scaling and translation (every LPS component mixes the voxel components)."""
    rng = np.random.default_rng(22)
    ddf = (rng.normal(size=(3, *SHAPE)) * 1.5).astype(np.float32)
    c, s = np.cos(0.4), np.sin(0.4)
    fixed_affine = np.eye(4)
    fixed_affine[:3, :3] = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, -1.0]]) @ np.diag([0.9, 1.1, 2.5])
    fixed_affine[:3, 3] = [-12.0, 30.5, 7.25]
    transform = np.eye(4)
    transform[:3, :3] = [[1.02, 0.05, 0.0], [-0.03, 0.97, 0.02], [0.01, 0.0, 1.05]]
    transform[:3, 3] = [3.0, -2.5, 1.5]
    return {"ddf": ddf, "fixed_affine": fixed_affine, "transform": transform}


def _simpleitk_composite(case, folder, inverse: bool):
    """The reference: SimpleITK's own file for the composite of ``affine.mat``'s transform and ``warp.nii.gz``'s
    vectors (the float32 values the bundle writes, widened in SimpleITK)."""
    warp = write_itk_displacement(case["ddf"], case["fixed_affine"], folder / "warp.nii.gz")
    vectors = np.asarray(nib.load(str(warp)).dataobj)[:, :, :, 0, :]  # (X, Y, Z, 3) float32 LPS mm
    image = sitk.GetImageFromArray(np.ascontiguousarray(vectors.transpose(2, 1, 0, 3)), isVector=True)
    image = sitk.Cast(image, sitk.sitkVectorFloat64)
    origin, spacing, direction = itk_geometry(case["fixed_affine"])
    image.SetOrigin(origin)
    image.SetSpacing(spacing)
    image.SetDirection(direction)
    affine = sitk_affine(case["transform"])
    parts = [sitk.DisplacementFieldTransform(image), affine.GetInverse()] if inverse else [
        affine, sitk.DisplacementFieldTransform(image)]
    path = folder / f"sitk_{'inverse' if inverse else 'forward'}.h5"
    sitk.WriteTransform(sitk.CompositeTransform(parts), str(path))
    return path


def _datasets(path) -> dict:
    """Dataset name -> (type class, type size, variable-length string?, contiguous?, filters, shape, values)."""
    found = {}

    def visit(name, item):
        if isinstance(item, h5py.Dataset):
            kind = item.id.get_type()
            variable = kind.is_variable_str() if isinstance(kind, h5py.h5t.TypeStringID) else False
            plist = item.id.get_create_plist()
            found[name] = (kind.get_class(), kind.get_size(), variable, plist.get_layout() == h5py.h5d.CONTIGUOUS,
                           plist.get_nfilters(), item.shape, None if name in VERSION_STRINGS else item[()].tolist())

    with h5py.File(path, "r") as file:
        file.visititems(visit)
    return found


def _transforms(path) -> list:
    composite = sitk.CompositeTransform(sitk.ReadTransform(str(path)))
    parts = [composite.GetNthTransform(i) for i in range(composite.GetNumberOfTransforms())]
    return [(t.GetName(), t.GetParameters(), t.GetFixedParameters()) for t in parts]


@pytest.mark.parametrize("inverse", [False, True], ids=["forward", "inverse"])
def test_composite_file_is_what_simpleitk_writes(case, tmp_path, inverse):
    """Same datasets, types, layout and values (version strings aside) as SimpleITK's file, for any block size, and
    the same transforms read back; a float64 field gives the same file as its float32 values."""
    reference = _simpleitk_composite(case, tmp_path, inverse)
    expected_datasets, expected = _datasets(reference), _transforms(reference)
    plane = SHAPE[0] * SHAPE[1]
    for block in (1, 4 * plane, 1 << 30):  # one z plane a block, an uneven last block, the whole field at once
        path = write_itk_composite(tmp_path / f"ours_{block}.h5", case["fixed_affine"], case["transform"], case["ddf"],
                                   inverse=inverse, block_voxels=block)
        assert _datasets(path) == expected_datasets
        assert _transforms(path) == expected
    widened = write_itk_composite(tmp_path / "f64.h5", case["fixed_affine"], case["transform"],
                                  case["ddf"].astype(np.float64), inverse=inverse)
    assert _transforms(widened) == expected
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")], "a temporary file was left behind"


def test_affine_only_composite_is_what_simpleitk_writes(case, tmp_path):
    reference = tmp_path / "sitk.h5"
    sitk.WriteTransform(sitk.CompositeTransform([sitk_affine(case["transform"])]), str(reference))
    ours = write_itk_composite(tmp_path / "ours.h5", case["fixed_affine"], case["transform"])
    assert _datasets(ours) == _datasets(reference) and _transforms(ours) == _transforms(reference)
    identity = write_itk_composite(tmp_path / "identity.h5", case["fixed_affine"])
    assert _transforms(identity) == [("AffineTransform", (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0, 0, 0, 0), (0, 0, 0))]


def test_simpleitk_and_ants_resample_through_our_file_as_through_simpleitks(case, tmp_path):
    """Applied to an image on a grid near the fixed one, our file and SimpleITK's give identical resamplings in
    SimpleITK and in ANTs, in both directions."""
    ants = pytest.importorskip("ants")
    rng = np.random.default_rng(5)
    moving_affine = case["fixed_affine"].copy()  # the fixed grid with 4 more voxels on every side
    moving_affine[:3, 3] -= moving_affine[:3, :3] @ [4.0, 4.0, 4.0]
    moving = nib.Nifti1Image(rng.random(tuple(n + 8 for n in SHAPE)).astype(np.float32), moving_affine)
    fixed = nib.Nifti1Image(np.zeros(SHAPE, dtype=np.float32), case["fixed_affine"])
    nib.save(moving, str(tmp_path / "moving.nii.gz"))
    nib.save(fixed, str(tmp_path / "fixed.nii.gz"))
    for inverse in (False, True):
        files = [_simpleitk_composite(case, tmp_path, inverse),
                 write_itk_composite(tmp_path / f"ours_{inverse}.h5", case["fixed_affine"], case["transform"],
                                     case["ddf"], inverse=inverse)]
        image, reference = (sitk.ReadImage(str(tmp_path / f"{n}.nii.gz")) for n in ("moving", "fixed"))
        theirs, ours = (sitk.GetArrayFromImage(sitk.Resample(image, reference, sitk.ReadTransform(str(f)),
                                                             sitk.sitkLinear, -1.0, sitk.sitkFloat32)) for f in files)
        assert np.array_equal(theirs, ours) and (ours != -1.0).mean() > 0.5
        image, reference = (ants.image_read(str(tmp_path / f"{n}.nii.gz")) for n in ("moving", "fixed"))
        theirs, ours = (ants.apply_transforms(reference, image, [str(f)]).numpy() for f in files)
        assert np.array_equal(theirs, ours) and np.abs(ours).sum() > 0


def test_bad_fields_are_refused_before_a_file_appears(case, tmp_path):
    ddf = case["ddf"].copy()
    ddf[1, 3, 4, -1] = np.nan  # in the last block written
    with pytest.raises(ValueError, match="non-finite"):
        write_itk_composite(tmp_path / "nan.h5", case["fixed_affine"], case["transform"], ddf, block_voxels=1)
    sheared = case["fixed_affine"].copy()
    sheared[0, 1] += 0.3
    with pytest.raises(ValueError, match="shears"):
        write_itk_composite(tmp_path / "sheared.h5", sheared, case["transform"], case["ddf"])
    assert list(tmp_path.iterdir()) == []
