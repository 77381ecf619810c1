# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""ChannelsLastConv3d: the same convolution as nn.Conv3d (values and gradients), same state dict, scriptable."""

import torch
from torch import nn

from scripts.networks.conv import ChannelsLastConv3d


def _pair(in_channels: int, out_channels: int) -> tuple[nn.Conv3d, ChannelsLastConv3d]:
    torch.manual_seed(0)
    reference = nn.Conv3d(in_channels, out_channels, kernel_size=3, padding=1)
    layer = ChannelsLastConv3d(in_channels, out_channels, kernel_size=3, padding=1)
    layer.load_state_dict(reference.state_dict(), strict=True)
    return reference, layer


def test_matches_conv3d_forward_and_backward():
    reference, layer = _pair(8, 5)
    x = torch.randn(2, 8, 11, 9, 13)
    x_ref, x_cl = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ref, y_cl = reference(x_ref), layer(x_cl)
    assert y_cl.is_contiguous() and y_cl.shape == (2, 5, 11, 9, 13)
    torch.testing.assert_close(y_cl, y_ref, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(y_ref)
    y_ref.backward(grad)
    y_cl.backward(grad)
    torch.testing.assert_close(x_cl.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.weight.grad, reference.weight.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(layer.bias.grad, reference.bias.grad, rtol=1e-4, atol=1e-4)


def test_state_dict_keys_and_torchscript():
    reference, layer = _pair(3, 4)
    assert list(layer.state_dict()) == list(reference.state_dict()) == ["weight", "bias"]
    scripted = torch.jit.script(layer)
    x = torch.rand(1, 3, 6, 7, 8)
    torch.testing.assert_close(scripted(x), reference(x), rtol=1e-5, atol=1e-5)
