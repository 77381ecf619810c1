# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""``VelocityIntegration``: the network layer over :func:`scripts.layers.sampling.integrate_velocity`."""

from __future__ import annotations

import torch
from torch import nn

from scripts.layers.sampling import PADDING_MODES, integrate_velocity

__all__ = ["VelocityIntegration"]


class VelocityIntegration(nn.Module):
    """
    Integrate a stationary velocity field by scaling and squaring, as a module the network holds (and scripts).

    Same algorithm as :py:class:`monai.networks.blocks.DVF2DDF` (``ddf = v / 2**n``, then ``n`` times
    ``ddf = ddf + warp(ddf, ddf)``, trilinear, zero padding); see :func:`scripts.layers.sampling.integrate_velocity`.

    Args:
        num_steps: number of squaring steps n (7 as in VoxelMorph/MONAI).
        padding_mode: how the field continues outside the grid; "zeros" as the network trains.

    Shapes:
        velocity (B, 3, D, H, W) in voxels -> displacement (B, 3, D, H, W) in voxels.
    """

    def __init__(self, num_steps: int = 7, padding_mode: str = "zeros") -> None:
        super().__init__()
        if num_steps < 0:
            raise ValueError(f"num_steps must be >= 0, got {num_steps}.")
        if padding_mode not in PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}.")
        self.num_steps = num_steps
        self.padding_mode = padding_mode

    def forward(self, velocity: torch.Tensor) -> torch.Tensor:
        return integrate_velocity(velocity, self.num_steps, self.padding_mode)
