# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""
One file per direction: ``transform.h5`` and ``inverse_transform.h5``, ITK ``CompositeTransform`` files (HDF5).

* ``transform.h5``: ``affine.mat`` and ``warp.nii.gz`` in one file, the forward point map ``x -> T(x + u(x))`` (a FIXED
  world point to the MOVING point it samples: resamples a moving-space image onto the fixed grid). An ITK composite
  applies the LAST transform of its list to a point first, so the list is ``[affine, displacement]``.
* ``inverse_transform.h5``: ``affine.mat`` inverted and ``inverse_warp.nii.gz``, the point map ``m -> y + v(y)`` with
  ``y = T^-1 m`` (a MOVING point to the FIXED point it samples: resamples a fixed-space image onto the moving grid),
  the list ``[inverse displacement, affine^-1]``.

Both are applied in one step: ``sitk.Resample(image, reference, sitk.ReadTransform(path), ...)``,
``ants.apply_transforms(reference, image, [path])``, ``antsApplyTransforms -t path``. They hold exactly the values of
the two-file pair (the displacement as ``warp.nii.gz`` stores it, float32 LPS mm, on the fixed grid), so either
gives the same resampling. SimpleITK writes the field as uncompressed float64: 24 bytes per fixed voxel (about 120 MB
for a 1 mm brain grid), three times ``warp.nii.gz`` before its compression. Writes are atomic.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from scripts.io.atomic import atomic_path

from .itk_files import lps_displacement, sitk_affine
from .world import as_channel_first, as_matrix4, itk_geometry

__all__ = ["sitk_displacement_transform", "write_itk_composite"]


def sitk_displacement_transform(ddf_voxels, fixed_affine):
    """A SimpleITK ``DisplacementFieldTransform`` of a voxel field on the fixed grid, with ``warp.nii.gz``'s values.

    Args:
        ddf_voxels: (3, X, Y, Z) or (X, Y, Z, 3) displacement in voxels of the fixed grid, numpy or torch.
        fixed_affine: (4, 4) RAS voxel-to-world matrix of the fixed image.

    Returns:
        the transform, mapping a fixed point ``x`` (LPS mm) to ``x + d(x)``; zero displacement outside the grid (ITK).
    """
    import SimpleITK as sitk

    fixed_affine = as_matrix4(fixed_affine, "fixed_affine")
    origin, spacing, direction = itk_geometry(fixed_affine)
    # SimpleITK arrays run (Z, Y, X, component) for an ITK index (i, j, k) = the NIfTI array axes (X, Y, Z); the
    # float32 vectors of warp.nii.gz are made in that order, copied into a float32 image and widened there: ITK's
    # displacement transform is double only, and float32 -> float64 is exact, so the values are warp.nii.gz's. Peak:
    # 3 float32 copies of the field while building (the old float64 array + image route held 5), then the float64
    # image alone.
    lps = lps_displacement(as_channel_first(ddf_voxels, dtype=None), fixed_affine, itk_order=True)
    field = sitk.GetImageFromArray(lps, isVector=True)
    del lps
    field = sitk.Cast(field, sitk.sitkVectorFloat64)
    field.SetOrigin(origin)
    field.SetSpacing(spacing)
    field.SetDirection(direction)
    return sitk.DisplacementFieldTransform(field)  # takes the image over (SimpleITK empties `field`)


def write_itk_composite(
    path: str | os.PathLike, fixed_affine, transform_ras=None, ddf_voxels=None, inverse: bool = False
) -> Path:
    """Write one direction of a registration as an ITK ``CompositeTransform`` file (``.h5``), atomically.

    Args:
        path: destination, normally ``transform.h5`` or ``inverse_transform.h5``.
        fixed_affine: (4, 4) RAS voxel-to-world matrix of the fixed image (the field's grid).
        transform_ras: (4, 4) affine stage, FIXED world -> MOVING world (RAS); None: the identity.
        ddf_voxels: (3, X, Y, Z) or (X, Y, Z, 3) voxel displacement on the fixed grid: the forward ``u``, or with
            ``inverse`` the inverse field ``v``; None: the affine alone.
        inverse: write the inverse direction ``m -> T^-1 m + v(T^-1 m)``; else the forward ``x -> T(x + u(x))``.

    Returns:
        ``path``.
    """
    import SimpleITK as sitk

    affine = sitk_affine(np.eye(4) if transform_ras is None else transform_ras)
    affine = affine.GetInverse() if inverse else affine
    composite = sitk.CompositeTransform(3)
    # the last transform of the list is applied to a point first; the field is added without a Python name kept on
    # it, so the composite's copy of it is the only one left (SimpleITK copies a transform it takes into a composite)
    if ddf_voxels is not None and inverse:
        composite.AddTransform(sitk_displacement_transform(ddf_voxels, fixed_affine))
    composite.AddTransform(affine)
    if ddf_voxels is not None and not inverse:
        composite.AddTransform(sitk_displacement_transform(ddf_voxels, fixed_affine))
    with atomic_path(path) as tmp:
        sitk.WriteTransform(composite, str(tmp))
    return Path(path)
