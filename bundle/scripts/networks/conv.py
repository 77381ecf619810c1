# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""3-D convolution that runs in the channels-last layout on CPU, where few-channel conv3d is much faster that way."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ChannelsLastConv3d"]


class ChannelsLastConv3d(nn.Conv3d):
    """
    ``torch.nn.Conv3d`` that converts its CPU input to ``torch.channels_last_3d`` and its output back to contiguous.

    Why: SACB-Net's full- and half-resolution layers have only 4-16 channels. For such layers oneDNN's default
    (NCDHW) 3-D convolution is slow on CPU, most of all in the backward pass: on 80x96x112 voxels an 8->8 layer takes
    ~0.32 s backward in NCDHW and ~0.08 s in channels-last (``bench/conv_layout.py`` measures it on your machine). The
    result is the same convolution (equal to ``nn.Conv3d`` up to float rounding, see the tests); parameters, state-dict
    keys and TorchScript support are unchanged. On other devices the layer is a plain ``nn.Conv3d``.

    Shapes:
        input (B, C_in, D, H, W) -> output (B, C_out, D', H', W'), as ``nn.Conv3d``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            return self._conv_forward(x, self.weight, self.bias)
        y = self._conv_forward(x.contiguous(memory_format=torch.channels_last_3d), self.weight, self.bias)
        return y.contiguous()
