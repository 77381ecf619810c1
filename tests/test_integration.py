"""Scaling and squaring equals MONAI's DVF2DDF and stays scriptable."""

import pytest
import torch
from monai.networks.blocks import DVF2DDF

from scripts.layers.velocity_integration import VelocityIntegration


def _smooth_field(shape, magnitude, seed=0):
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.randn(shape[0], 3, 4, 4, 4, generator=generator) * magnitude
    return torch.nn.functional.interpolate(coarse, size=shape[2:], mode="trilinear", align_corners=True)


@pytest.mark.parametrize("steps", [1, 3, 7])
def test_equals_monai_dvf2ddf(steps):
    velocity = _smooth_field((2, 3, 12, 14, 10), magnitude=2.0)
    ours = VelocityIntegration(steps)(velocity)
    reference = DVF2DDF(num_steps=steps, mode="bilinear", padding_mode="zeros")(velocity)
    assert torch.allclose(ours, reference, atol=1e-5)


def test_constant_velocity_integrates_to_translation_inside():
    velocity = torch.zeros(1, 3, 16, 16, 16)
    velocity[:, 1] = 1.5
    ddf = VelocityIntegration(7)(velocity)
    assert torch.allclose(ddf[:, :, 4:-4, 4:-4, 4:-4], velocity[:, :, 4:-4, 4:-4, 4:-4], atol=1e-4)


def test_scriptable_and_validates():
    scripted = torch.jit.script(VelocityIntegration(4))
    velocity = _smooth_field((1, 3, 9, 11, 13), magnitude=1.0)
    assert torch.allclose(scripted(velocity), VelocityIntegration(4)(velocity), atol=1e-6)
    with pytest.raises(ValueError, match="num_steps"):
        VelocityIntegration(-1)
    with pytest.raises(ValueError, match=r"\(B, 3, D, H, W\)"):
        VelocityIntegration()(torch.rand(1, 2, 4, 4, 4))
