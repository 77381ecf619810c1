# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""Jacobian determinant of a displacement field and the share of folded voxels (det <= 0)."""

from __future__ import annotations

import torch

__all__ = ["jacobian_determinant", "folding_percentage"]


def jacobian_determinant(ddf: torch.Tensor) -> torch.Tensor:
    """
    Determinant of the Jacobian ``I + ∇u`` of the transform ``x ↦ x + u(x)``, at every voxel.

    Derivatives are taken like ``np.gradient`` (``torch.gradient``): central differences inside, one-sided first-order
    differences at the borders, unit voxel spacing. Channel ``i`` of ``ddf`` is the displacement along array axis ``i``
    (the bundle's convention), so ``J[i][j] = δ_ij + ∂u_i/∂x_j``.

    Args:
        ddf: (B, 3, D, H, W) displacement field in voxels, every spatial size >= 2.

    Returns:
        (B, 1, D, H, W) determinant map (values <= 0 mark folding), in the dtype of ``ddf`` or float32 for
        half-precision fields: the products of derivatives are always taken in at least float32, also under
        ``torch.autocast`` (float16 keeps ~3 digits, too few to tell det = 0.001 from 0).
    """
    if ddf.ndim != 5 or ddf.shape[1] != 3:
        raise ValueError(f"ddf must have shape (B, 3, D, H, W), got {tuple(ddf.shape)}")
    if min(ddf.shape[2:]) < 2:
        raise ValueError(f"every spatial size of ddf must be >= 2 for finite differences, got {tuple(ddf.shape)}")
    if not ddf.is_floating_point():
        raise ValueError(f"ddf must be floating point, got {ddf.dtype}")
    if ddf.dtype in (torch.float16, torch.bfloat16):
        ddf = ddf.float()
    with torch.autocast(device_type=ddf.device.type, enabled=False):
        return _determinant(ddf)


def _determinant(ddf: torch.Tensor) -> torch.Tensor:
    """det(I + ∇u) of a checked (B, 3, D, H, W) field; see :func:`jacobian_determinant`."""
    # derivative[j][:, i] = ∂u_i/∂x_j, each (B, 3, D, H, W)
    derivative = torch.gradient(ddf, dim=(2, 3, 4))
    jac = [[derivative[j][:, i] + (1.0 if i == j else 0.0) for j in range(3)] for i in range(3)]
    det = (
        jac[0][0] * (jac[1][1] * jac[2][2] - jac[1][2] * jac[2][1])
        - jac[0][1] * (jac[1][0] * jac[2][2] - jac[1][2] * jac[2][0])
        + jac[0][2] * (jac[1][0] * jac[2][1] - jac[1][1] * jac[2][0])
    )
    return det.unsqueeze(1)


def folding_percentage(det: torch.Tensor) -> torch.Tensor:
    """
    Percentage of voxels whose Jacobian determinant is <= 0, per batch item.

    Args:
        det: (B, 1, D, H, W) determinant map, e.g. from :func:`jacobian_determinant`.

    Returns:
        (B,) float tensor of percentages in [0, 100].
    """
    if det.ndim != 5 or det.shape[1] != 1:
        raise ValueError(f"det must have shape (B, 1, D, H, W), got {tuple(det.shape)}")
    return (det <= 0).flatten(1).float().mean(1) * 100.0
