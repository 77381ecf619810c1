# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""
Physical-space transforms: world conventions (RAS vs LPS), ITK/ANTs transform files, field inversion, and applying a
registration's saved transforms to any image or label map.

Sits above ``scripts.io`` and ``scripts.layers`` and below ``scripts.engines``; imports only those two from the bundle
(every resampling is ``scripts.layers.sampling``'s). Conventions in one place:

* nibabel/MONAI affines map voxels to RAS mm; ITK/ANTs work in LPS mm (``T_LPS = F T_RAS F``, ``F = diag(-1,-1,1,1)``).
* Every transform maps a point of the output (FIXED) space to the input (MOVING) space it samples.
* ``ddf.nii.gz`` (bundle): voxels of the fixed grid, (X, Y, Z, 3). ``warp.nii.gz`` (ITK/ANTs): LPS mm, (X, Y, Z, 1, 3),
  intent 1007, same grid and affine.
* Forward point map ``x -> T(x + u(x))``: ANTs ``-t warp.nii.gz -t affine.mat``, SimpleITK
  ``CompositeTransform([affine, warp])``. Inverse ``m -> y + v(y)``, ``y = T^-1 m``: ANTs
  ``-t [affine.mat,1] -t inverse_warp.nii.gz`` (``inverse_warp`` on the fixed grid, like ANTs' 1InverseWarp).
* ``transform.h5`` / ``inverse_transform.h5``: each direction as one ITK CompositeTransform file (``-t transform.h5``).
"""

from __future__ import annotations

from .apply import INTERPOLATIONS, apply_transforms, resample_with_transforms, voxel_point_map
from .composite import write_itk_composite
from .inversion import (
    InverseField,
    inverse_consistency_error,
    invert_displacement,
    invert_velocity,
    inverse_warp_field,
    write_inverse_warp,
)
from .itk_files import (
    NIFTI_INTENT_DISPVECT,
    NIFTI_INTENT_VECTOR,
    TransformFileError,
    read_itk_affine,
    read_itk_displacement,
    sitk_affine,
    write_itk_affine,
    write_itk_displacement,
)
from .transform_set import (
    AFFINE_FILE,
    COMPOSITE_FILE,
    INVERSE_COMPOSITE_FILE,
    INVERSE_WARP_FILE,
    WARP_FILE,
    SavedTransforms,
    load_transforms,
    save_transforms,
    transform_file_names,
)
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
    "AFFINE_FILE",
    "COMPOSITE_FILE",
    "INTERPOLATIONS",
    "INVERSE_COMPOSITE_FILE",
    "INVERSE_WARP_FILE",
    "NIFTI_INTENT_DISPVECT",
    "NIFTI_INTENT_VECTOR",
    "RAS_LPS_FLIP",
    "WARP_FILE",
    "InverseField",
    "SavedTransforms",
    "TransformFileError",
    "apply_transforms",
    "as_channel_first",
    "as_matrix4",
    "inverse_consistency_error",
    "invert_displacement",
    "invert_velocity",
    "inverse_warp_field",
    "itk_geometry",
    "load_transforms",
    "lps_to_voxel_ddf",
    "ras_lps_transform",
    "read_itk_affine",
    "read_itk_displacement",
    "resample_with_transforms",
    "save_transforms",
    "sitk_affine",
    "transform_file_names",
    "voxel_ddf_to_lps",
    "voxel_point_map",
    "write_inverse_warp",
    "write_itk_composite",
    "write_itk_affine",
    "write_itk_displacement",
]
