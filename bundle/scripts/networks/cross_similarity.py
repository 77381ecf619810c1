# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""SACB-Net's parameter-free flow head: a soft arg-max over feature similarity in a 3x3x3 neighbourhood."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CrossSimilarityFlow"]


class CrossSimilarityFlow(nn.Module):
    """
    Estimate a sub-voxel displacement from the similarity of fixed and moving features.

    For every voxel p the 27 neighbours ``p + o`` with ``o`` in {-1, 0, 1}^3 (array-axis order) are scored with the
    plain dot product ``<fixed(p), moving(p + o)>`` (zero padding outside the volume, no temperature), the scores are
    turned into weights with a softmax, and the flow is the expected offset ``sum_o softmax(s)_o * o``. Each component
    therefore lies in (-1, 1) voxel, and ``moving(p + flow(p))`` approximates ``fixed(p)`` (backward-warping convention).
    The head has no parameters.

    Shapes:
        fixed, moving: (B, C, D, H, W) -> flow (B, 3, D, H, W), channel i = shift along array axis i; float32 for
        half-precision features (the scores and the flow are computed in float32, also under ``torch.autocast``).
    """

    def __init__(self) -> None:
        super().__init__()
        offsets = [[a, b, c] for a in (-1, 0, 1) for b in (-1, 0, 1) for c in (-1, 0, 1)]
        self.register_buffer("offsets", torch.tensor(offsets, dtype=torch.float32), persistent=False)

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
        if fixed.dim() != 5 or fixed.shape != moving.shape:
            raise ValueError(
                f"fixed and moving features must both be (B, C, D, H, W) of one shape, "
                f"got {list(fixed.shape)} and {list(moving.shape)}."
            )
        if torch.jit.is_scripting():
            return self._flow(fixed, moving)
        return self._flow_without_autocast(fixed, moving)

    @torch.jit.unused
    def _flow_without_autocast(self, fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
        """:py:meth:`_flow` with autocast off: in float16 the channel sums of the scores can overflow and the offset
        average (an einsum, i.e. a matrix product autocast would lower) keeps only ~3 digits of the flow."""
        with torch.autocast(device_type=fixed.device.type, enabled=False):
            return self._flow(fixed, moving)

    def _flow(self, fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
        """The flow of :py:meth:`forward`, computed in at least float32 (half-precision features are upcast)."""
        if fixed.dtype in (torch.float16, torch.bfloat16):
            fixed = fixed.float()
        if moving.dtype in (torch.float16, torch.bfloat16):
            moving = moving.float()
        depth, height, width = fixed.shape[2], fixed.shape[3], fixed.shape[4]
        padded = F.pad(moving, (1, 1, 1, 1, 1, 1))
        scores = []
        for a in range(3):
            for b in range(3):
                for c in range(3):
                    neighbour = padded[:, :, a : a + depth, b : b + height, c : c + width]
                    scores.append((fixed * neighbour).sum(dim=1))
        weights = torch.softmax(torch.stack(scores, dim=1), dim=1)  # (B, 27, D, H, W)
        offsets = self.offsets.to(weights.dtype)
        return torch.einsum("bjdhw,jk->bkdhw", weights, offsets)
