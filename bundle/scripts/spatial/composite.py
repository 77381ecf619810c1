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
the two-file pair (the displacement as ``warp.nii.gz`` stores it, float32 LPS mm, on the fixed grid, widened to
float64, which is exact), so either gives the same resampling.

The file is written with h5py in the layout ITK's ``HDF5TransformIO`` writes (what ``sitk.WriteTransform`` gives for
the same composite; ``tests/test_spatial_composite.py`` compares the two), not through SimpleITK: ITK's transforms are
double only, and building the composite there held the float64 field 4x over (the image, the composite's copy, the
write buffer: 11.8 GB peak for a 512 x 512 x 400 CT). Here the field goes to the file a block of ``z`` planes at a time
(:func:`scripts.spatial.itk_files.lps_displacement_itk_blocks`): a few MB above the field itself. The layout::

    /HDFVersion, /ITKVersion, /OSName, /OSVersion       (1,) variable-length ASCII strings
    /TransformGroup/0/TransformType                      "CompositeTransform_double_3_3"
    /TransformGroup/<n>/TransformType                    "AffineTransform_double_3_3" or
                                                         "DisplacementFieldTransform_double_3_3"
    /TransformGroup/<n>/TransformParameters              float64: affine 3x3 row-major + translation (12); field
                                                         vectors in ITK buffer order (x fastest, 3 per voxel)
    /TransformGroup/<n>/TransformFixedParameters         float64: affine centre (3); field size (3), origin (3),
                                                         spacing (3), direction row-major (9)

``<n>`` counts from 1 in the composite's list order (the transform applied to a point first is the last). Every
dataset is contiguous and uncompressed, as ITK writes them by default. Writes are atomic.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

import numpy as np

from scripts.io.atomic import atomic_path

from .itk_files import lps_displacement_itk_blocks, sitk_affine
from .world import as_channel_first, as_matrix4, itk_geometry

__all__ = ["write_itk_composite"]

#: ITK's names of the transform types written here (double precision, 3-D in and out), as ``TransformType`` holds them
COMPOSITE_TYPE = "CompositeTransform_double_3_3"
AFFINE_TYPE = "AffineTransform_double_3_3"
DISPLACEMENT_TYPE = "DisplacementFieldTransform_double_3_3"


def write_itk_composite(
    path: str | os.PathLike,
    fixed_affine,
    transform_ras=None,
    ddf_voxels=None,
    inverse: bool = False,
    block_voxels: int = 1 << 19,
) -> Path:
    """Write one direction of a registration as an ITK ``CompositeTransform`` file (``.h5``), atomically.

    Args:
        path: destination, normally ``transform.h5`` or ``inverse_transform.h5``.
        fixed_affine: (4, 4) RAS voxel-to-world matrix of the fixed image (the field's grid).
        transform_ras: (4, 4) affine stage, FIXED world -> MOVING world (RAS); None: the identity.
        ddf_voxels: (3, X, Y, Z) or (X, Y, Z, 3) voxel displacement on the fixed grid, numpy or torch: the forward
            ``u``, or with ``inverse`` the inverse field ``v``; None: the affine alone.
        inverse: write the inverse direction ``m -> T^-1 m + v(T^-1 m)``; else the forward ``x -> T(x + u(x))``.
        block_voxels: the field is converted and written about this many voxels at a time (whole ``z`` planes); the
            file does not depend on it.

    Returns:
        ``path``.

    Raises:
        ValueError: a sheared fixed grid (ITK cannot represent it) or a non-finite displacement; ``path`` is left as it
            was (the temporary file is removed).
    """
    import h5py

    affine = sitk_affine(np.eye(4) if transform_ras is None else transform_ras)
    affine = affine.GetInverse() if inverse else affine
    field = None
    if ddf_voxels is not None:
        fixed_affine = as_matrix4(fixed_affine, "fixed_affine")
        field = as_channel_first(ddf_voxels, dtype=None)  # float32 stays float32: the blocks convert it
        geometry = itk_geometry(fixed_affine)  # refuses a sheared grid before anything is written
    # the last transform of the list is applied to a point first (see the module docstring for the two orders)
    parts = ["field", "affine"] if inverse else ["affine", "field"]
    if field is None:
        parts.remove("field")
    # the oldest HDF5 file format that holds this (readable by HDF5 >= 1.8, whichever one an ITK or ANTs build bundles)
    with atomic_path(path) as tmp, h5py.File(tmp, "w", libver=("earliest", "v108")) as file:
        for name, text in (
            ("HDFVersion", f"HDF5 library version: {h5py.version.hdf5_version}"),
            ("ITKVersion", _itk_version()),
            ("OSName", platform.system()),
            ("OSVersion", platform.release()),
        ):
            _write_string(file, name, text)
        _write_string(file, "TransformGroup/0/TransformType", COMPOSITE_TYPE)
        for index, part in enumerate(parts, start=1):
            group = file.create_group(f"TransformGroup/{index}")
            if part == "affine":
                _write_string(group, "TransformType", AFFINE_TYPE)
                group.create_dataset("TransformFixedParameters", data=np.asarray(affine.GetFixedParameters()))
                group.create_dataset("TransformParameters", data=np.asarray(affine.GetParameters()))
            else:
                _write_string(group, "TransformType", DISPLACEMENT_TYPE)
                origin, spacing, direction = geometry
                size = tuple(float(n) for n in field.shape[1:])  # ITK index (i, j, k) = the NIfTI array axes
                group.create_dataset("TransformFixedParameters", data=np.array(size + origin + spacing + direction))
                _write_field(group, field, fixed_affine, block_voxels)
    return Path(path)


def _write_field(group, field: np.ndarray, fixed_affine: np.ndarray, block_voxels: int) -> None:
    """``TransformParameters`` of a displacement field: float64 LPS vectors in ITK buffer order, a block at a time.

    Args:
        group: the h5py group of the field's transform.
        field: (3, X, Y, Z) voxel displacement on the grid of ``fixed_affine``.
    """
    dataset = group.create_dataset("TransformParameters", shape=(field.size,), dtype=np.float64)
    start = 0
    for block in lps_displacement_itk_blocks(field, fixed_affine, block_voxels):
        # the float32 vectors warp.nii.gz stores, widened exactly: the values SimpleITK's float64 field held
        dataset[start : start + block.size] = block.reshape(-1).astype(np.float64)
        start += block.size


def _write_string(parent, name: str, text: str) -> None:
    """A (1,) variable-length ASCII string dataset, the type ITK writes for its names and versions."""
    import h5py

    parent.create_dataset(name, data=[text.encode("ascii", "replace")], dtype=h5py.string_dtype(encoding="ascii"))


def _itk_version() -> str:
    """``ITKVersion``: the ITK whose file layout this is and whose readers the tests check it with (SimpleITK's)."""
    import SimpleITK as sitk

    version = sitk.Version
    return f"{version.ITKMajorVersion()}.{version.ITKMinorVersion()}.{version.ITKPatchVersion()}"
