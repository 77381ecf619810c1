# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""Scaling and squaring: turn a stationary velocity field into a (diffeomorphic) displacement field."""

from __future__ import annotations

import torch
from torch import nn

from scripts.layers.warp import warp_image

__all__ = ["VelocityIntegration"]


class VelocityIntegration(nn.Module):
    """
    Integrate a stationary velocity field by scaling and squaring.

    Same algorithm as :py:class:`monai.networks.blocks.DVF2DDF` (``ddf = v / 2**n``, then ``n`` times
    ``ddf = ddf + warp(ddf, ddf)``, trilinear, zero padding), built on the scriptable warp so it exports with the network.

    Args:
        num_steps: number of squaring steps n (7 as in VoxelMorph/MONAI).

    Shapes:
        velocity (B, 3, D, H, W) in voxels -> displacement (B, 3, D, H, W) in voxels.
    """

    def __init__(self, num_steps: int = 7) -> None:
        super().__init__()
        if num_steps < 0:
            raise ValueError(f"num_steps must be >= 0, got {num_steps}.")
        self.num_steps = num_steps

    def forward(self, velocity: torch.Tensor) -> torch.Tensor:
        if velocity.dim() != 5 or velocity.shape[1] != 3:
            raise ValueError(f"velocity must be (B, 3, D, H, W), got shape {list(velocity.shape)}.")
        ddf = velocity / (2.0**self.num_steps)
        for _ in range(self.num_steps):
            ddf = ddf + warp_image(ddf, ddf, "bilinear", "zeros")
        return ddf
