# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""ITK transform files of ``scripts.spatial``: ``affine.mat`` and ``warp.nii.gz`` round trips, their LPS meaning as
SimpleITK reads them, the point maps of the composite files ``transform.h5`` / ``inverse_transform.h5``, and
affine-only resampling against SimpleITK on the shipped pair at 3 mm."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from spatial_cases import brain_correlation, make_case, mean_dice, sitk_affine, sitk_resample

from scripts.spatial import (
    apply_transforms,
    itk_geometry,
    read_itk_affine,
    read_itk_displacement,
    save_transforms,
    write_itk_affine,
    write_itk_composite,
    write_itk_displacement,
)

sitk = pytest.importorskip("SimpleITK")
FLIP = np.diag([-1.0, -1.0, 1.0, 1.0])


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    return make_case(tmp_path_factory.mktemp("spatial_itk"))


def _brain(case) -> np.ndarray:
    fixed = np.asarray(nib.load(str(case["fixed"])).dataobj)
    return fixed > 0.2 * np.percentile(fixed, 99)


def test_affine_file_round_trip_and_lps_meaning(case, tmp_path):
    transform = case["rotation"].copy()
    transform[:3, :3] = transform[:3, :3] @ np.array([[1.05, 0.02, 0.0], [0.0, 0.97, 0.03], [0.01, 0.0, 1.1]])
    path = write_itk_affine(transform, tmp_path / "affine.mat")
    np.testing.assert_allclose(read_itk_affine(path), transform, rtol=0, atol=1e-12)
    itk = sitk.ReadTransform(str(path))
    points_ras = np.array([[10.0, -20.0, 30.0], [-55.0, 12.0, -7.0], [0.0, 0.0, 0.0]])
    for x in points_ras:  # ITK maps LPS points: F T F
        mapped_lps = np.array(itk.TransformPoint(tuple((FLIP[:3, :3] @ x).tolist())))
        np.testing.assert_allclose(FLIP[:3, :3] @ mapped_lps, transform[:3, :3] @ x + transform[:3, 3], atol=1e-9)
    assert not list(tmp_path.glob(".*")), "a temporary file was left behind"


def test_affine_file_with_centre_reads_as_the_same_point_map(tmp_path):
    """ANTs writes its 0GenericAffine.mat with a centre; the point map, not the parameters, must come back."""
    itk = sitk.AffineTransform(3)
    itk.SetMatrix([0.9, -0.2, 0.05, 0.2, 0.95, 0.0, -0.03, 0.01, 1.1])
    itk.SetTranslation([3.0, -4.0, 5.0])
    itk.SetCenter([12.0, -30.0, 8.0])
    sitk.WriteTransform(itk, str(tmp_path / "centred.mat"))
    transform = read_itk_affine(tmp_path / "centred.mat")
    for x in np.array([[1.0, 2.0, 3.0], [-40.0, 25.0, 60.0]]):
        expected = FLIP[:3, :3] @ np.array(itk.TransformPoint(tuple((FLIP[:3, :3] @ x).tolist())))
        np.testing.assert_allclose(transform[:3, :3] @ x + transform[:3, 3], expected, atol=1e-9)


def test_affine_translation_of_one_voxel_shifts_the_array(case, tmp_path):
    """T moving one voxel along array axis 0 in world space samples fixed[i + 1] at voxel i (direction check)."""
    transform = np.eye(4)
    transform[:3, 3] = case["fixed_affine"][:3, 0]
    save_transforms(tmp_path, case["fixed_affine"], transform_ras=transform)
    fixed = np.asarray(nib.load(str(case["fixed"])).dataobj)
    shifted = apply_transforms(case["fixed"], case["fixed"], tmp_path).get_fdata()
    np.testing.assert_allclose(shifted[:-1], fixed[1:], rtol=0, atol=1e-5 * fixed.max())  # float32 sampling grid
    assert np.all(shifted[-1] == 0)


def test_affine_only_matches_simpleitk(case, tmp_path):
    save_transforms(tmp_path, case["fixed_affine"], transform_ras=case["rotation"])
    reference = sitk.ReadTransform(str(tmp_path / "affine.mat"))
    ours = apply_transforms(case["fixed"], case["moving"], tmp_path).get_fdata()
    theirs = sitk_resample(case["moving"], case["fixed"], reference)
    brain = _brain(case)
    assert brain_correlation(ours, theirs, brain) >= 0.99
    assert np.abs(ours - theirs)[brain].max() < 1e-3 * theirs.max()
    assert brain_correlation(ours, np.asarray(nib.load(str(case["fixed"])).dataobj), brain) < 0.99  # it moved
    ours_label = np.asarray(apply_transforms(case["fixed"], case["moving_label"], tmp_path, "nearest").dataobj)
    theirs_label = sitk_resample(case["moving_label"], case["fixed"], sitk_affine(case["rotation"]), label=True)
    assert ours_label.dtype == np.uint8
    assert mean_dice(theirs_label, ours_label) >= 0.97


def test_displacement_file_round_trip_and_itk_meaning(case, tmp_path):
    ddf, affine = case["ddf"], case["fixed_affine"]
    path = write_itk_displacement(np.moveaxis(ddf, 0, -1), affine, tmp_path / "warp.nii.gz")  # (X, Y, Z, 3) as on disk
    image = nib.load(str(path))
    assert image.shape == (*case["fixed_shape"], 1, 3) and int(image.header["intent_code"]) == 1007
    np.testing.assert_allclose(image.affine, affine, atol=1e-5)
    back, back_affine = read_itk_displacement(path)
    np.testing.assert_allclose(back, ddf, atol=1e-5)
    np.testing.assert_allclose(back_affine, affine, atol=1e-5)
    field = sitk.ReadImage(str(path), sitk.sitkVectorFloat64)
    fixed = sitk.ReadImage(str(case["fixed"]))
    assert field.GetNumberOfComponentsPerPixel() == 3
    np.testing.assert_allclose(field.GetOrigin(), fixed.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(field.GetDirection(), fixed.GetDirection(), atol=1e-6)
    transform = sitk.DisplacementFieldTransform(field)
    for p in [(10, 20, 30), (25, 40, 12), (40, 8, 44)]:  # x -> x + d(x) in LPS == A (p + ddf(p)) in RAS
        x_lps = fixed.TransformIndexToPhysicalPoint(p)
        expected_ras = affine[:3, :3] @ (np.array(p) + ddf[(slice(None), *p)]) + affine[:3, 3]
        np.testing.assert_allclose(FLIP[:3, :3] @ np.array(transform.TransformPoint(x_lps)), expected_ras, atol=1e-4)


def test_itk_geometry_is_what_simpleitk_reads(case, tmp_path):
    origin, spacing, direction = itk_geometry(case["fixed_affine"])
    fixed = sitk.ReadImage(str(case["fixed"]))
    np.testing.assert_allclose(origin, fixed.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(spacing, fixed.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(direction, fixed.GetDirection(), atol=1e-6)
    sheared = case["fixed_affine"].copy()
    sheared[0, 1] = 0.5
    with pytest.raises(ValueError, match="shear"):
        write_itk_displacement(case["ddf"], sheared, tmp_path / "warp.nii.gz")


def test_displacement_layouts_write_the_same_file(case, tmp_path):
    ddf, affine = case["ddf"], case["fixed_affine"]
    write_itk_displacement(ddf, affine, tmp_path / "a.nii.gz")
    write_itk_displacement(torch.as_tensor(ddf)[None], affine, tmp_path / "b.nii.gz")
    a = np.asarray(nib.load(str(tmp_path / "a.nii.gz")).dataobj)
    b = np.asarray(nib.load(str(tmp_path / "b.nii.gz")).dataobj)
    np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="ambiguous"):
        write_itk_displacement(np.zeros((3, 4, 5, 3)), affine, tmp_path / "c.nii.gz")


def test_displacement_file_bytes_do_not_depend_on_slabs_or_dtype(case, tmp_path):
    """warp.nii.gz is converted to LPS in float64 slabs: the bytes equal a whole-field float64 conversion, for float32
    (kept without a float64 copy) and float64 input alike; a non-finite value in any slab is refused."""
    from scripts.spatial.itk_files import lps_displacement, lps_displacement_itk_blocks
    from scripts.spatial.world import voxel_ddf_to_lps

    ddf = case["ddf"].astype(np.float32)
    ddf[:, ::4] = 0.0
    ddf[1, 1::4] = -0.0  # signed zeros stay as the whole-field product writes them
    affine = case["fixed_affine"].copy()
    c, s = np.cos(0.3), np.sin(0.3)  # an oblique grid: every LPS component mixes two voxel components
    affine[:3, :3] = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]]) @ affine[:3, :3]
    whole = voxel_ddf_to_lps(ddf, affine).astype(np.float32)
    slabs = lps_displacement(ddf, affine, block_voxels=7 * ddf.shape[2] * ddf.shape[3])  # 7 slices a slab
    assert slabs.tobytes() == whole.tobytes()
    # the order of an ITK vector image's buffer (transform.h5 is written from it), block by block: the same vectors
    blocks = list(lps_displacement_itk_blocks(ddf, affine, block_voxels=7 * ddf.shape[1] * ddf.shape[2]))
    assert len(blocks) > 1 and all(b.flags.c_contiguous and b.dtype == np.float32 for b in blocks)
    assert b"".join(b.tobytes() for b in blocks) == np.ascontiguousarray(whole.transpose(3, 2, 1, 0)).tobytes()
    write_itk_displacement(ddf, affine, tmp_path / "f32.nii.gz")
    write_itk_displacement(torch.as_tensor(ddf.astype(np.float64)), affine, tmp_path / "f64.nii.gz")
    assert (tmp_path / "f32.nii.gz").read_bytes() == (tmp_path / "f64.nii.gz").read_bytes()
    stored = np.asarray(nib.load(str(tmp_path / "f32.nii.gz")).dataobj)[:, :, :, 0, :]
    assert stored.tobytes() == np.ascontiguousarray(np.moveaxis(whole, 0, -1)).tobytes()
    ddf[2, -1, 0, 0] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        write_itk_displacement(ddf, affine, tmp_path / "nan.nii.gz")
    assert not (tmp_path / "nan.nii.gz").exists()


def test_displacement_read_in_slabs_equals_the_whole_field_conversion(case, tmp_path):
    """read_itk_displacement converts float32 files (ours, ANTs') in float64 slabs without a whole float64 copy: the
    result equals the whole-field float64 conversion bit for bit, for ITK (LPS) and NIfTI (RAS, float64) vectors."""
    from scripts.spatial.itk_files import NIFTI_INTENT_DISPVECT
    from scripts.spatial.world import lps_to_voxel_ddf

    affine = case["fixed_affine"].copy()
    c, s = np.cos(0.3), np.sin(0.3)  # an oblique grid: every voxel component mixes two LPS components
    affine[:3, :3] = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]]) @ affine[:3, :3]
    path = write_itk_displacement(case["ddf"].astype(np.float32), affine, tmp_path / "warp.nii.gz")
    image = nib.load(str(path))
    affine = image.affine  # as the header stores it (float32 numbers)
    stored = np.asarray(image.dataobj, dtype=np.float64)[:, :, :, 0, :]
    whole = lps_to_voxel_ddf(np.moveaxis(stored, -1, 0), affine).astype(np.float32)
    plane = stored.shape[0] * stored.shape[1]  # the slabs run along the last axis
    for block in (1, 7 * plane, 1 << 30):  # one plane, 7 planes (an uneven last slab), the whole field at once
        field, field_affine = read_itk_displacement(path, block_voxels=block)
        assert field.dtype == np.float32 and field.tobytes() == whole.tobytes()
    np.testing.assert_allclose(field_affine, affine)
    ras = nib.Nifti1Image(stored[:, :, :, None, :] * np.array([-1.0, -1.0, 1.0]), affine)  # float64 RAS vectors
    ras.header.set_intent(NIFTI_INTENT_DISPVECT)
    nib.save(ras, str(tmp_path / "ras.nii.gz"))
    assert read_itk_displacement(tmp_path / "ras.nii.gz", block_voxels=5 * plane)[0].tobytes() == whole.tobytes()


def test_composite_files_hold_the_forward_and_inverse_point_maps(case, tmp_path):
    """transform.h5 maps a fixed point x to T(x + d(x)) (first the field, then the affine, as warp.nii.gz + affine.mat);
    inverse_transform.h5 maps a moving point m to y + e(y), y = T^-1 m; both as SimpleITK reads them back, in LPS."""
    ddf, affine, rotation = case["ddf"], case["fixed_affine"], case["rotation"]
    inverse_field = -0.5 * ddf  # any field on the fixed grid: the point map is what is checked here
    forward = sitk.ReadTransform(str(write_itk_composite(tmp_path / "transform.h5", affine, rotation, ddf)))
    inverse = sitk.ReadTransform(
        str(write_itk_composite(tmp_path / "inverse_transform.h5", affine, rotation, inverse_field, inverse=True))
    )
    assert forward.GetName() == inverse.GetName() == "CompositeTransform"
    world = lambda p, field: affine[:3, :3] @ (np.array(p) + field[(slice(None), *p)]) + affine[:3, 3]  # noqa: E731
    to_lps = lambda x: tuple((FLIP[:3, :3] @ x).tolist())  # noqa: E731
    for p in [(10, 20, 30), (25, 40, 12), (40, 8, 44)]:
        expected = rotation[:3, :3] @ world(p, ddf) + rotation[:3, 3]
        x = affine[:3, :3] @ np.array(p) + affine[:3, 3]
        np.testing.assert_allclose(forward.TransformPoint(to_lps(x)), to_lps(expected), atol=1e-4)
        m = rotation[:3, :3] @ x + rotation[:3, 3]  # the moving point whose T^-1 is the fixed voxel p
        np.testing.assert_allclose(inverse.TransformPoint(to_lps(m)), to_lps(world(p, inverse_field)), atol=1e-4)
    affine_only = sitk.ReadTransform(str(write_itk_composite(tmp_path / "a.h5", affine, rotation)))
    point = (12.0, -30.0, 40.0)
    expected = FLIP[:3, :3] @ (rotation[:3, :3] @ (FLIP[:3, :3] @ np.array(point)) + rotation[:3, 3])
    np.testing.assert_allclose(affine_only.TransformPoint(point), expected, atol=1e-6)
