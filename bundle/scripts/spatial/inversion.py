# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""
Inverting the deformable part of a registration, on the fixed grid.

The deformable part maps a fixed-space point to ``W(p) = p + u(p)`` (voxels of the fixed grid), and the affine ``T``
then maps it to the moving space: the full fixed -> moving point map is ``x -> T(W(x))``. Its inverse maps a moving
point ``m`` to ``W^-1(T^-1 m)``: ``T^-1`` first, which lands in the fixed space, then ``W^-1(y) = y + v(y)``. So the
inverse field ``v`` lives on the **fixed** grid, like ANTs' ``1InverseWarp.nii.gz``, and is applied after the inverted
affine: ``ants.apply_transforms(moving, fixed, [affine.mat, inverse_warp.nii.gz], whichtoinvert=[True, False])``.

``v`` solves ``v(y) = -u(y + v(y))``, found by the fixed-point iteration ``v <- -u(p + v)`` (trilinear sampling of
``u``, border padding); it converges when ``u`` is a contraction (``|grad u| < 1``, true for smooth, fold-free
fields). For a stationary velocity field ``s`` the inverse of ``exp(s)`` is ``exp(-s)``, both integrated by scaling
and squaring with the network's own function (``scripts.layers.sampling.integrate_velocity``, zero padding).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from scripts.layers.sampling import integrate_velocity, voxel_grid, warp_image

from .itk_files import write_itk_displacement
from .world import as_channel_first, as_matrix4

__all__ = [
    "InverseField",
    "inverse_consistency_error",
    "invert_displacement",
    "invert_velocity",
    "write_inverse_warp",
]

logger = logging.getLogger(__name__)


class InverseField(NamedTuple):
    """Result of :func:`invert_displacement`.

    Attributes:
        ddf: (B, 3, X, Y, Z) inverse displacement ``v`` in voxels, on the same grid as the input.
        error_mean: (B,) mean inverse-consistency error ``|u(p) + v(p + u(p))|`` in voxels.
        error_max: (B,) its maximum.
        iterations: fixed-point iterations run.
        converged: whether the last update moved no voxel by more than the tolerance.
    """

    ddf: torch.Tensor
    error_mean: torch.Tensor
    error_max: torch.Tensor
    iterations: int
    converged: bool


def _check_ddf(ddf: torch.Tensor, name: str = "ddf") -> None:
    if not isinstance(ddf, torch.Tensor) or ddf.ndim != 5 or ddf.shape[1] != 3 or not ddf.is_floating_point():
        raise ValueError(f"{name} must be a floating (B, 3, X, Y, Z) tensor, got {getattr(ddf, 'shape', type(ddf))}.")


def inverse_consistency_error(
    ddf: torch.Tensor, inverse: torch.Tensor, affine=None, margin: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and max of ``|u(p) + v(p + u(p))|``: how far ``p -> W(p) -> W^-1(W(p))`` lands from ``p``.

    Only voxels with ``p + u(p)`` inside the grid count (outside it the inverse is not defined).

    Args:
        ddf: (B, 3, X, Y, Z) forward displacement ``u`` in voxels.
        inverse: (B, 3, X, Y, Z) inverse displacement ``v`` in voxels, same grid.
        affine: optional (4, 4) voxel-to-world matrix of the grid: the error is then measured in mm, else in voxels.
        margin: also leave out this many voxels at each face (where zero-padded integration bends the fields).

    Returns:
        ``(mean, max)``, each (B,).
    """
    _check_ddf(ddf)
    _check_ddf(inverse, "inverse")
    if inverse.shape != ddf.shape:
        raise ValueError(f"ddf {list(ddf.shape)} and inverse {list(inverse.shape)} must have the same shape.")
    grid = voxel_grid(ddf.shape[2:], ddf.device, ddf.dtype).unsqueeze(0)
    residual = ddf + warp_image(inverse, ddf, "bilinear", "border")
    if affine is not None:
        linear = torch.as_tensor(as_matrix4(affine, "affine")[:3, :3], dtype=ddf.dtype, device=ddf.device)
        residual = torch.einsum("ij,bj...->bi...", linear, residual)
    norm = residual.norm(dim=1)
    upper = torch.tensor([s - 1 for s in ddf.shape[2:]], dtype=ddf.dtype, device=ddf.device).view(1, 3, 1, 1, 1)
    target = grid + ddf
    inside = ((target >= 0) & (target <= upper)).all(dim=1)
    if margin > 0:
        core = torch.zeros_like(inside)
        core[:, margin:-margin, margin:-margin, margin:-margin] = True
        inside = inside & core
    count = inside.sum(dim=(1, 2, 3)).clamp(min=1)
    mean = (norm * inside).sum(dim=(1, 2, 3)) / count
    maximum = torch.where(inside, norm, torch.zeros_like(norm)).amax(dim=(1, 2, 3))
    return mean, maximum


def invert_displacement(ddf: torch.Tensor, iterations: int = 50, tolerance: float = 1e-4) -> InverseField:
    """Invert a voxel displacement field on its own grid by the fixed-point iteration ``v <- -u(p + v)``.

    Args:
        ddf: (B, 3, X, Y, Z) displacement ``u`` in voxels (channel i along array axis i), any device.
        iterations: at most this many updates.
        tolerance: stop when no voxel of ``v`` moved by more than this (voxels) in one update.

    Returns:
        :class:`InverseField` with the inverse ``v`` (same shape, dtype and device) and its inverse-consistency error.
    """
    _check_ddf(ddf)
    if iterations < 1 or tolerance <= 0:
        raise ValueError(f"iterations must be >= 1 and tolerance > 0, got {iterations} and {tolerance}.")
    inverse, converged, done = -ddf, False, 0
    for done in range(1, iterations + 1):
        update = -warp_image(ddf, inverse, "bilinear", "border")
        change = float((update - inverse).abs().max())
        inverse = update
        if change < tolerance:
            converged = True
            break
    if not converged:
        logger.warning("displacement inversion stopped after %d iterations (last change %.3g voxels).", done, change)
    error_mean, error_max = inverse_consistency_error(ddf, inverse)
    return InverseField(inverse, error_mean, error_max, done, converged)


def invert_velocity(velocity: torch.Tensor, steps: int = 7, padding_mode: str = "zeros"):
    """Forward and inverse displacement of a stationary velocity field: ``(exp(s), exp(-s))`` (the inverse by negation).

    Args:
        velocity: (B, 3, X, Y, Z) in voxels.
        steps: scaling-and-squaring steps, as the network used.
        padding_mode: as :func:`scripts.layers.sampling.integrate_velocity` ("zeros" as the network integrates).

    Returns:
        ``(forward, inverse)``, each (B, 3, X, Y, Z) in voxels.
    """
    return integrate_velocity(velocity, steps, padding_mode), integrate_velocity(-velocity, steps, padding_mode)


def write_inverse_warp(
    ddf_voxels,
    fixed_affine,
    path: str | os.PathLike,
    iterations: int = 50,
    tolerance: float = 1e-4,
    inverse_voxels=None,
) -> tuple[Path, dict]:
    """Write ``inverse_warp.nii.gz`` (same ITK/ANTs format and fixed grid as ``warp.nii.gz``).

    Args:
        ddf_voxels: forward voxel displacement (3, X, Y, Z), (X, Y, Z, 3) or (1, 3, X, Y, Z), numpy or torch.
        fixed_affine: (4, 4) RAS voxel-to-world matrix of the fixed image.
        path: destination; written atomically.
        iterations, tolerance: passed to :func:`invert_displacement`.
        inverse_voxels: an inverse already known (e.g. ``exp(-s)`` of a velocity field); skips the iteration.

    Returns:
        ``(path, stats)`` with the inverse-consistency error in voxels and mm (``mean_voxels``, ``max_voxels``,
        ``mean_mm``, ``max_mm``), ``iterations`` and ``converged``.
    """
    fixed_affine = as_matrix4(fixed_affine, "fixed_affine")
    ddf = torch.as_tensor(as_channel_first(ddf_voxels), dtype=torch.float32)[None]
    if inverse_voxels is None:
        result = invert_displacement(ddf, iterations, tolerance)
        inverse, stats = result.ddf, {"iterations": result.iterations, "converged": result.converged}
    else:
        inverse = torch.as_tensor(as_channel_first(inverse_voxels), dtype=torch.float32)[None]
        stats = {"iterations": 0, "converged": True}
    mean_vox, max_vox = inverse_consistency_error(ddf, inverse)
    mean_mm, max_mm = inverse_consistency_error(ddf, inverse, fixed_affine)
    stats.update(
        mean_voxels=float(mean_vox[0]), max_voxels=float(max_vox[0]), mean_mm=float(mean_mm[0]), max_mm=float(max_mm[0])
    )
    write_itk_displacement(inverse[0].numpy().astype(np.float64), fixed_affine, path, channel_first=True)
    return Path(path), stats
