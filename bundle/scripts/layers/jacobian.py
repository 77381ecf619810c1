# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""Jacobian determinant of a displacement field and the share of folded voxels (det <= 0)."""

from __future__ import annotations

from typing import Optional

import torch

from scripts.layers.sampling import slab_ranges

__all__ = ["jacobian_determinant", "folding_percentage"]


def jacobian_determinant(ddf: torch.Tensor, slab_voxels: Optional[int] = None) -> torch.Tensor:
    """
    Determinant of the Jacobian ``I + ∇u`` of the transform ``x ↦ x + u(x)``, at every voxel.

    Derivatives are taken like ``np.gradient`` (``torch.gradient``): central differences inside, one-sided first-order
    differences at the borders, unit voxel spacing. Channel ``i`` of ``ddf`` is the displacement along array axis ``i``
    (the bundle's convention), so ``J[i][j] = δ_ij + ∂u_i/∂x_j``.

    Args:
        ddf: (B, 3, D, H, W) displacement field in voxels, every spatial size >= 2.
        slab_voxels: None: the whole field at once. A number: one slab of about that many voxels along the last axis
            at a time, each with one neighbouring plane on either side, so every difference (central inside,
            one-sided at the field's own borders) is the whole-field one and the map is equal bit for bit, while the
            nine derivative volumes exist for one slab only (a 512 x 512 x 400 field needs ~6 GB of them at once).
            For outputs without gradient; a field that requires one is always done whole.

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
        if slab_voxels is None or (ddf.requires_grad and torch.is_grad_enabled()):
            return _determinant(ddf)
        depth = ddf.shape[-1]
        det = ddf.new_empty((ddf.shape[0], 1, *ddf.shape[2:]))
        for start, stop in slab_ranges(list(ddf.shape[2:]), slab_voxels):
            # one plane of context each side (where the field has one), so a slab never sees a false border; the
            # slab with its context always spans >= 2 planes, as the field's depth is >= 2
            lo, hi = max(start - 1, 0), min(stop + 1, depth)
            det[..., start:stop] = _determinant(ddf[..., lo:hi])[..., start - lo : stop - lo]
        return det


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
