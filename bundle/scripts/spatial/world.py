# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""
World-space conventions of the bundle and the conversions between them.

* **Voxel grid.** An image is an array indexed by ``p = (i, j, k)`` with a 4x4 voxel-to-world matrix ``A`` (nibabel /
  MONAI). ``A`` maps to **RAS** millimetres: +x = Right, +y = Anterior, +z = Superior.
* **ITK / ANTs** (SimpleITK, ``antsApplyTransforms``) use **LPS** millimetres: ``x_LPS = F x_RAS`` with
  ``F = diag(-1, -1, 1)``. A 4x4 world transform converts as ``T_LPS = F4 T_RAS F4`` (``F4 = diag(-1, -1, 1, 1)``); the
  conversion is its own inverse. A displacement vector converts as ``d_LPS = F d_RAS``.
* **Which way transforms map.** Every transform here is a *resampling* (pull-back) transform, as in ITK: it maps a point
  of the output (reference) space to the point of the input space that is sampled there. The affine stage's ``T`` maps
  a FIXED world point to the MOVING world point (``resampled(x) = moving(T x)``).
* **Voxel ``ddf`` vs physical ``warp``.** The network's ``ddf.nii.gz`` is on the fixed grid, shape (X, Y, Z, 3), in
  voxels along the array axes: ``warped(p) = moving_on_fixed_grid(p + ddf(p))``. The same displacement in world mm is
  ``u_RAS = A[:3, :3] @ ddf(p)`` at ``x = A p``, and in ITK's convention ``u_LPS = F A[:3, :3] @ ddf(p)``
  (:func:`voxel_ddf_to_lps`), which is what ``warp.nii.gz`` stores.
"""

from __future__ import annotations


import numpy as np
import torch

from scripts.io.input_checks import voxel_spacing

__all__ = [
    "RAS_LPS_FLIP",
    "as_channel_first",
    "as_matrix4",
    "itk_geometry",
    "lps_to_voxel_ddf",
    "ras_lps_transform",
    "voxel_ddf_to_lps",
]

RAS_LPS_FLIP = np.diag([-1.0, -1.0, 1.0, 1.0])
"""``F4``: multiplies x and y by -1; converts points and 4x4 transforms between RAS and LPS (both directions)."""


def as_matrix4(matrix, name: str = "matrix") -> np.ndarray:
    """A finite, invertible 4x4 homogeneous matrix (last row 0 0 0 1) as float64.

    Raises:
        ValueError: wrong shape, non-finite values, a last row other than (0, 0, 0, 1), or a singular 3x3 part.
    """
    if isinstance(matrix, torch.Tensor):
        matrix = matrix.detach().cpu().numpy()
    matrix = np.asarray(matrix, dtype=np.float64)
    if matrix.shape != (4, 4):
        raise ValueError(f"{name} must be a 4x4 matrix, got shape {matrix.shape}.")
    if not np.isfinite(matrix).all():
        raise ValueError(f"{name} has non-finite entries: {matrix.tolist()}.")
    if not np.allclose(matrix[3], [0.0, 0.0, 0.0, 1.0]):
        raise ValueError(f"{name} must have last row (0, 0, 0, 1), got {matrix[3].tolist()}.")
    if abs(np.linalg.det(matrix[:3, :3])) < 1e-12:
        raise ValueError(f"{name} is singular: {matrix.tolist()}.")
    return matrix


def ras_lps_transform(matrix) -> np.ndarray:
    """Convert a 4x4 world transform between RAS and LPS: ``F4 @ T @ F4`` (the same call converts back).

    Args:
        matrix: (4, 4) transform acting on world points of one convention.

    Returns:
        (4, 4) float64 transform acting on world points of the other convention.
    """
    matrix = as_matrix4(matrix, "world transform")
    return RAS_LPS_FLIP @ matrix @ RAS_LPS_FLIP


def itk_geometry(affine) -> tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]]:
    """The ITK (LPS) origin, spacing and row-major 3x3 direction of a RAS voxel-to-world affine.

    Args:
        affine: (4, 4) nibabel voxel-to-world matrix (RAS). Its columns must be orthogonal: ITK images cannot shear.

    Returns:
        ``(origin, spacing, direction)`` ready for ``SetOrigin``, ``SetSpacing`` and ``SetDirection`` of SimpleITK.

    Raises:
        ValueError: the affine shears (columns not orthogonal to 1e-4 of their lengths).
    """
    affine = as_matrix4(affine, "affine")
    spacing = voxel_spacing(affine)  # the one definition, in scripts.io
    direction = RAS_LPS_FLIP[:3, :3] @ affine[:3, :3] / spacing
    gram = direction.T @ direction
    if not np.allclose(gram, np.eye(3), atol=1e-4):
        raise ValueError(f"the affine shears (its columns are not orthogonal), which ITK cannot represent: {affine}.")
    origin = RAS_LPS_FLIP[:3, :3] @ affine[:3, 3]
    return tuple(origin.tolist()), tuple(spacing.tolist()), tuple(direction.ravel().tolist())


def as_channel_first(ddf, channel_first: bool | None = None, dtype: np.dtype | type | None = np.float64) -> np.ndarray:
    """A 3-D displacement field as a (3, X, Y, Z) numpy array (float64 by default).

    Args:
        ddf: numpy array or tensor, (3, X, Y, Z), (X, Y, Z, 3), (1, 3, X, Y, Z) or (X, Y, Z, 1, 3) (the 5-D NIfTI
            vector layout).
        channel_first: layout of a 4-D ``ddf``; ``None`` guesses it and refuses when both ends have size 3.
        dtype: of the result; ``None`` keeps the input's (no float64 copy of a whole float32 field).

    Raises:
        ValueError: no axis of size 3 where the layout needs one, or an ambiguous 4-D shape without ``channel_first``.
    """
    if isinstance(ddf, torch.Tensor):
        ddf = ddf.detach().cpu().numpy()
    ddf = np.asarray(ddf, dtype=dtype)
    if ddf.ndim == 5 and ddf.shape[:2] == (1, 3):
        return ddf[0]
    if ddf.ndim == 5 and ddf.shape[3:] == (1, 3):
        return np.moveaxis(ddf[:, :, :, 0, :], -1, 0)
    if ddf.ndim != 4 or 3 not in (ddf.shape[0], ddf.shape[-1]):
        raise ValueError(
            f"expected a displacement field of shape (3, X, Y, Z), (X, Y, Z, 3), (1, 3, X, Y, Z) or (X, Y, Z, 1, 3), "
            f"got {ddf.shape}."
        )
    if channel_first is None:
        if ddf.shape[0] == 3 and ddf.shape[-1] == 3:
            raise ValueError(f"displacement field shape {ddf.shape} is ambiguous; pass channel_first=True or False.")
        channel_first = ddf.shape[0] == 3
    return ddf if channel_first else np.moveaxis(ddf, -1, 0)


def voxel_ddf_to_lps(ddf, affine) -> np.ndarray:
    """Voxel displacements on a grid -> ITK displacement vectors in LPS mm: ``d_LPS = F A[:3, :3] ddf``.

    Args:
        ddf: (3, X, Y, Z) displacement in voxels along the array axes.
        affine: (4, 4) RAS voxel-to-world matrix of the grid.

    Returns:
        (3, X, Y, Z) float64 displacement in LPS millimetres.
    """
    ddf = np.asarray(ddf, dtype=np.float64)
    if ddf.ndim != 4 or ddf.shape[0] != 3:
        raise ValueError(f"ddf must have shape (3, X, Y, Z), got {ddf.shape}.")
    to_lps = RAS_LPS_FLIP[:3, :3] @ as_matrix4(affine, "affine")[:3, :3]
    return np.einsum("ij,j...->i...", to_lps, ddf)


def lps_to_voxel_ddf(displacement_lps, affine) -> np.ndarray:
    """ITK displacement vectors in LPS mm -> voxel displacements on the grid: ``ddf = A[:3, :3]^-1 F d_LPS``.

    Args:
        displacement_lps: (3, X, Y, Z) displacement in LPS millimetres.
        affine: (4, 4) RAS voxel-to-world matrix of the grid.

    Returns:
        (3, X, Y, Z) float64 displacement in voxels along the array axes.
    """
    displacement_lps = np.asarray(displacement_lps, dtype=np.float64)
    if displacement_lps.ndim != 4 or displacement_lps.shape[0] != 3:
        raise ValueError(f"displacement must have shape (3, X, Y, Z), got {displacement_lps.shape}.")
    to_voxels = np.linalg.inv(as_matrix4(affine, "affine")[:3, :3]) @ RAS_LPS_FLIP[:3, :3]
    return np.einsum("ij,j...->i...", to_voxels, displacement_lps)
