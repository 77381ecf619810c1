# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""
Reading and writing ITK/ANTs transform files: ``affine.mat`` and ``warp.nii.gz`` (also ``inverse_warp.nii.gz``).

* ``affine.mat``: an ITK ``AffineTransform_double_3_3`` (MATLAB binary, written by SimpleITK) holding the affine
  stage's ``T`` in **LPS** (``T_LPS = F4 T_RAS F4``, centre 0). Like every ITK transform it maps a FIXED point to the
  MOVING point: ``resampled(x) = moving(T x)``.
* ``warp.nii.gz``: an ITK/ANTs displacement field: a 5-D NIfTI of shape (X, Y, Z, 1, 3), ``intent_code`` 1007
  (vector), float32, **LPS millimetres**, on the fixed image's grid (same shape and affine as the fixed file). As an
  ITK ``DisplacementFieldTransform`` it maps a fixed point ``x`` to ``x + d(x)``.
* Together (ANTs order, point mapping from the fixed space): first the warp, then the affine,
  ``x -> T(x + d(x))``; ``antsApplyTransforms -r fixed -i moving -t warp.nii.gz -t affine.mat``,
  ``ants.apply_transforms(fixed, moving, [warp, affine])`` or ``sitk.CompositeTransform([affine, warp])``
  (SimpleITK applies the last transform of the list first).

A file written by ANTs itself (``0GenericAffine.mat``, ``1Warp.nii.gz``) reads the same way. Writes are atomic.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np

from scripts.io.atomic import atomic_path, save_nifti
from scripts.io.errors import RegistrationInputError

from .world import (
    RAS_LPS_FLIP,
    as_channel_first,
    as_matrix4,
    itk_geometry,
    lps_to_voxel_ddf,
    ras_lps_transform,
    voxel_ddf_to_lps,
)

__all__ = [
    "NIFTI_INTENT_DISPVECT",
    "NIFTI_INTENT_VECTOR",
    "TransformFileError",
    "read_itk_affine",
    "read_itk_displacement",
    "sitk_affine",
    "write_itk_affine",
    "write_itk_displacement",
]

NIFTI_INTENT_VECTOR = 1007  # ITK / ANTs displacement fields: vectors stored in LPS as they are
NIFTI_INTENT_DISPVECT = 1006  # NIfTI "displacement vector": vectors in RAS (ITK >= 5.4 converts them on reading)


class TransformFileError(RegistrationInputError):
    """A transform file is missing, unreadable, of the wrong kind, or on a grid other than the image it is used with."""


def _check_exists(path: Path, kind: str) -> None:
    if not path.is_file():
        raise TransformFileError(f"{kind} '{path}' does not exist (or is not a file).")


def write_itk_affine(transform_ras, path: str | os.PathLike) -> Path:
    """Write a RAS world transform as an ITK affine transform file (``.mat``; ``.tfm`` / ``.txt`` give text).

    Args:
        transform_ras: (4, 4) matrix mapping a FIXED world point (RAS mm) to the MOVING world point.
        path: destination, normally ``affine.mat``; written atomically.

    Returns:
        ``path``.
    """
    import SimpleITK as sitk

    with atomic_path(path) as tmp:
        sitk.WriteTransform(sitk_affine(transform_ras), str(tmp))
    return Path(path)


def sitk_affine(transform_ras):
    """The SimpleITK ``AffineTransform`` of a RAS world transform (LPS, centre 0), as ``affine.mat`` holds it.

    Args:
        transform_ras: (4, 4) matrix mapping a FIXED world point (RAS mm) to the MOVING world point.
    """
    import SimpleITK as sitk

    transform_lps = ras_lps_transform(as_matrix4(transform_ras, "transform_ras"))
    affine = sitk.AffineTransform(3)
    affine.SetCenter((0.0, 0.0, 0.0))
    affine.SetMatrix(tuple(transform_lps[:3, :3].ravel().tolist()))
    affine.SetTranslation(tuple(transform_lps[:3, 3].tolist()))
    return affine


def read_itk_affine(path: str | os.PathLike) -> np.ndarray:
    """Read an ITK linear transform file (ours, ANTs' ``0GenericAffine.mat``, any centre) as a RAS 4x4 matrix.

    The matrix is measured by mapping points, so every ITK linear type (affine, Euler, similarity, a composite of
    them) reads the same; a non-linear transform is refused.

    Returns:
        (4, 4) float64 matrix mapping a FIXED world point (RAS mm) to the MOVING world point.

    Raises:
        TransformFileError: missing, unreadable, not 3-D, or not a linear transform.
    """
    import SimpleITK as sitk

    path = Path(path)
    _check_exists(path, "affine transform file")
    try:
        transform = sitk.ReadTransform(str(path))
    except RuntimeError as error:
        detail = [line.strip() for line in str(error).splitlines() if line.strip()][-1:] or [type(error).__name__]
        raise TransformFileError(
            f"affine transform file '{path}' could not be read as an ITK transform ({detail[0]}); expected an ITK/ANTs "
            "affine file (.mat, .tfm, .txt or .h5) such as write_itk_affine or antsRegistration writes."
        ) from error
    if transform.GetDimension() != 3:
        raise TransformFileError(f"'{path}' holds a {transform.GetDimension()}-D transform; expected 3-D.")
    corners = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=np.float64) * 100.0
    mapped = np.array([transform.TransformPoint(tuple(c.tolist())) for c in corners])
    transform_lps = np.eye(4)
    transform_lps[:3, 3] = mapped[0]
    transform_lps[:3, :3] = (mapped[1:] - mapped[0]).T / 100.0
    probe = np.array([37.0, -61.0, 83.0])
    expected = transform_lps[:3, :3] @ probe + transform_lps[:3, 3]
    if not np.allclose(transform.TransformPoint(tuple(probe.tolist())), expected, atol=1e-6):
        raise TransformFileError(f"'{path}' holds a non-linear {transform.GetName()}; expected an affine transform.")
    try:
        return ras_lps_transform(transform_lps)
    except ValueError as error:
        raise TransformFileError(f"affine transform file '{path}' holds an unusable matrix: {error}") from error


def write_itk_displacement(
    ddf_voxels, fixed_affine, path: str | os.PathLike, channel_first: bool | None = None
) -> Path:
    """Write a voxel displacement field as an ITK/ANTs displacement field file (``warp.nii.gz``).

    Args:
        ddf_voxels: (3, X, Y, Z) or (X, Y, Z, 3) displacement in voxels of the fixed grid (the bundle's ``ddf``;
            numpy or torch); see :func:`scripts.spatial.world.as_channel_first` for the accepted layouts.
        fixed_affine: (4, 4) RAS voxel-to-world matrix of the fixed image (the file gets exactly this affine).
        path: destination, normally ``warp.nii.gz``; written atomically.
        channel_first: layout of ``ddf_voxels`` when its shape alone is ambiguous.

    Returns:
        ``path``. The file is (X, Y, Z, 1, 3) float32, intent 1007, LPS millimetres, readable by ``sitk.ReadImage`` /
        ``sitk.DisplacementFieldTransform`` and ``ants.image_read`` / ``ants.apply_transforms``.
    """
    return save_nifti(_displacement_image(ddf_voxels, fixed_affine, channel_first), path)


def _displacement_image(ddf_voxels, fixed_affine, channel_first: bool | None = None) -> nib.Nifti1Image:
    """The in-memory image :func:`write_itk_displacement` saves.

    Args:
        ddf_voxels: (3, X, Y, Z) or (X, Y, Z, 3) voxel displacement on the fixed grid, numpy or torch.
        fixed_affine: (4, 4) RAS voxel-to-world matrix of the fixed image.
        channel_first: layout of ``ddf_voxels`` when its shape alone is ambiguous.

    Returns:
        a (X, Y, Z, 1, 3) float32 NIfTI image, intent 1007, LPS millimetres.

    Raises:
        ValueError: a sheared grid, an unknown layout or non-finite displacements.
    """
    fixed_affine = as_matrix4(fixed_affine, "fixed_affine")
    itk_geometry(fixed_affine)  # refuses a sheared grid, which ITK/ANTs would read differently
    ddf = as_channel_first(ddf_voxels, channel_first, dtype=None)  # float32 stays float32: the slabs convert it
    data = np.moveaxis(lps_displacement(ddf, fixed_affine), 0, -1)
    image = nib.Nifti1Image(data[:, :, :, None, :], fixed_affine)
    image.header.set_intent(NIFTI_INTENT_VECTOR, (), name="displacement")
    image.header.set_xyzt_units("mm")
    image.header.set_qform(fixed_affine, code=1)
    image.header.set_sform(fixed_affine, code=1)
    return image


def lps_displacement(ddf: np.ndarray, fixed_affine: np.ndarray, block_voxels: int = 1 << 19) -> np.ndarray:
    """
    :func:`scripts.spatial.world.voxel_ddf_to_lps` in float64 slabs of about ``block_voxels`` voxels, stored as float32.

    Each vector is computed exactly as for the whole field at once (the same float64 product, rounded to float32
    once), so the file's bytes are unchanged; the slabs only keep the float64 temporaries small and in cache.

    Args:
        ddf: (3, X, Y, Z) voxel displacement.
        fixed_affine: (4, 4) RAS voxel-to-world matrix of the grid.

    Returns:
        (3, X, Y, Z) float32 displacement in LPS millimetres.

    Raises:
        ValueError: a non-finite displacement (NaN or inf).
    """
    out = np.empty(ddf.shape, dtype=np.float32)
    step = max(1, block_voxels // max(1, int(np.prod(ddf.shape[2:]))))
    for start in range(0, ddf.shape[1], step):
        out[:, start : start + step] = _finite_lps(ddf[:, start : start + step], fixed_affine)
    return out


def lps_displacement_itk_blocks(
    ddf: np.ndarray, fixed_affine: np.ndarray, block_voxels: int = 1 << 19
) -> Iterator[np.ndarray]:
    """
    The float32 vectors of :func:`lps_displacement` in the order of an ITK vector image's pixel buffer, block by block.

    ITK stores a vector image with ``x`` fastest, then ``y``, then ``z``, the three components of a voxel together: the
    buffer is the C-order (Z, Y, X, 3) array. Blocks of whole ``z`` planes are consecutive runs of that buffer, so a
    writer can put them one after the other (``transform.h5``'s field) without the whole buffer ever existing. The
    vectors are those of :func:`lps_displacement` (the same float64 product per voxel, rounded to float32 once).

    Args:
        ddf: (3, X, Y, Z) voxel displacement (any float dtype; a float32 field is not copied whole).
        fixed_affine: (4, 4) RAS voxel-to-world matrix of the grid.
        block_voxels: about how many voxels a block holds (at least one ``z`` plane).

    Yields:
        C-contiguous float32 (z, Y, X, 3) blocks, ``z`` planes in order; concatenated along axis 0: the whole buffer.

    Raises:
        ValueError: a non-finite displacement (NaN or inf), raised at the block that holds it.
    """
    step = max(1, block_voxels // max(1, int(np.prod(ddf.shape[1:3]))))
    for start in range(0, ddf.shape[3], step):
        lps = _finite_lps(ddf[:, :, :, start : start + step], fixed_affine)  # (3, X, Y, z)
        yield np.ascontiguousarray(lps.transpose(3, 2, 1, 0), dtype=np.float32)


def _finite_lps(ddf: np.ndarray, fixed_affine: np.ndarray) -> np.ndarray:
    """:func:`scripts.spatial.world.voxel_ddf_to_lps` of a slab (float64), refusing NaN and inf."""
    lps = voxel_ddf_to_lps(ddf, fixed_affine)
    if not np.isfinite(lps).all():
        raise ValueError("the displacement field has non-finite values (NaN or inf).")
    return lps


def read_itk_displacement(path: str | os.PathLike, block_voxels: int = 1 << 19) -> tuple[np.ndarray, np.ndarray]:
    """Read an ITK/ANTs displacement field file (ours or ANTs' ``1Warp.nii.gz`` / ``1InverseWarp.nii.gz``).

    ``block_voxels``: the LPS -> voxel conversion runs in float64 slabs of about this many voxels (the result is the
    same as converting the whole field at once).

    Returns:
        ``(ddf_voxels, affine)``: (3, X, Y, Z) float32 displacement in voxels of the file's grid along its array axes,
        and that grid's (4, 4) RAS voxel-to-world matrix.

    Raises:
        TransformFileError: missing or unreadable file, or not a 5-D (X, Y, Z, 1, 3) vector image (for example the
            bundle's voxel ``ddf.nii.gz``, which must be converted with :func:`write_itk_displacement` first).
    """
    path = Path(path)
    _check_exists(path, "displacement field file")
    try:
        image = nib.load(str(path))
        # float32 files (ours, ANTs') are read as they are stored: the conversion below is made in float64 slabs, so a
        # CT-sized field is never held as whole float64 copies (the values are the same, float32 -> float64 is exact)
        stored = np.float32 if image.get_data_dtype() == np.float32 else np.float64
        data = np.asarray(image.dataobj, dtype=stored)
    except Exception as error:  # nibabel raises ImageFileError, EOFError, zlib errors, ... depending on the damage
        raise TransformFileError(
            f"displacement field file '{path}' could not be read ({type(error).__name__}: {error})."
        ) from error
    try:
        intent = int(image.header["intent_code"])
    except (KeyError, TypeError, ValueError):  # not a NIfTI header (e.g. .mgz)
        intent = 0
    if data.ndim != 5 or data.shape[3:] != (1, 3) or intent not in (NIFTI_INTENT_VECTOR, NIFTI_INTENT_DISPVECT):
        raise TransformFileError(
            f"'{path}' is not an ITK displacement field: shape {data.shape}, intent code {intent}; expected "
            "(X, Y, Z, 1, 3) with intent 1007 in LPS mm. A voxel ddf.nii.gz of the bundle (X, Y, Z, 3) must be "
            "converted with write_itk_displacement(ddf, fixed_affine, 'warp.nii.gz')."
        )
    if not np.isfinite(data).all():
        raise TransformFileError(f"displacement field file '{path}' has non-finite values (NaN or inf).")
    affine = np.asarray(image.affine, dtype=np.float64)
    ddf = np.empty((3, *data.shape[:3]), dtype=np.float32)
    # slabs along the last axis, the slowest of a NIfTI array (Fortran order): each is one block of the file's array
    step = max(1, block_voxels // max(1, int(np.prod(data.shape[:2]))))
    for start in range(0, data.shape[2], step):  # each vector converted in float64 and rounded to float32 once
        displacement = np.moveaxis(data[:, :, start : start + step, 0, :], -1, 0).astype(np.float64)
        if intent == NIFTI_INTENT_DISPVECT:  # NIfTI displacement vectors are RAS
            displacement = np.einsum("ij,j...->i...", RAS_LPS_FLIP[:3, :3], displacement)
        ddf[:, :, :, start : start + step] = lps_to_voxel_ddf(displacement, affine)
    return ddf, affine
