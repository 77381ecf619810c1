# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""L2 forward-difference gradient penalty on a displacement field, as SACB-Net trains with."""

from __future__ import annotations

import torch
from torch.nn.modules.loss import _Loss

__all__ = ["GradientLoss"]

_REDUCTIONS = ("mean", "sum", "none")


class GradientLoss(_Loss):
    """
    Smoothness penalty ``(1/3) Σ_axis mean((u[i+1] − u[i])²)`` of a dense displacement field ``u``.

    For each spatial axis the squared forward differences of all three components are averaged over the
    (size − 1) valid positions; the three axis means are then averaged. This is the "Grad3d, l2" regulariser of
    SACB-Net (and TransMorph/VoxelMorph-torch) training code.

    Why not ``monai.losses.DiffusionLoss``: MONAI uses central differences ``(u[i+1] − u[i−1]) / 2`` on the
    interior ``[1:-1]`` of every axis and SUMS the three squared partial derivatives per voxel before averaging.
    On an affine field (constant derivatives) both see the same derivatives, so ``DiffusionLoss == 3 · GradientLoss``.
    On a non-linear field they differ: central differences skip the centre sample and are blind to the highest
    frequency (a checkerboard has zero central difference but maximal forward difference), and their border
    handling differs, so the trained smoothness would not be SACB-Net's.

    Args:
        reduction: ``"mean"`` (average over the batch), ``"sum"`` (sum over the batch) or ``"none"``
            (one value per batch item, shape (B,)).

    Shapes:
        ddf: (B, 3, D, H, W), every spatial size >= 2. Output: scalar, or (B,) for ``reduction="none"``.
    """

    def __init__(self, reduction: str = "mean") -> None:
        if reduction not in _REDUCTIONS:
            raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
        super().__init__(reduction=reduction)

    def forward(self, ddf: torch.Tensor) -> torch.Tensor:
        """
        Args:
            ddf: (B, 3, D, H, W) displacement field.
        """
        if ddf.ndim != 5 or ddf.shape[1] != 3:
            raise ValueError(f"ddf must have shape (B, 3, D, H, W), got {tuple(ddf.shape)}")
        if min(ddf.shape[2:]) < 2:
            raise ValueError(f"every spatial size of ddf must be >= 2 for forward differences, got {tuple(ddf.shape)}")
        per_item = ddf.new_zeros(ddf.shape[0])
        for axis in (2, 3, 4):
            step = torch.diff(ddf, dim=axis)
            per_item = per_item + step.square().flatten(1).mean(1)
        per_item = per_item / 3.0
        if self.reduction == "mean":
            return per_item.mean()
        if self.reduction == "sum":
            return per_item.sum()
        return per_item
