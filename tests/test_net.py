"""SACBNet: parameter count, any-size shapes, determinism, batch equivalence, gradients, TorchScript, diffeomorphic mode."""

import pytest
import torch

from scripts.layers.jacobian import folding_percentage, jacobian_determinant
from scripts.networks.sacb_net import SACBNet

SMALL = dict(base_channels=2, num_clusters=3, kmeans_iterations=5)


def test_parameter_count_matches_paper():
    count = sum(p.numel() for p in SACBNet().parameters())
    assert count == 1_105_591  # 1.11 M in the paper
    assert abs(count - 1.11e6) / 1.11e6 < 0.02


@pytest.mark.parametrize("shape", [(1, 2, 33, 17, 40), (2, 2, 5, 6, 7), (1, 2, 48, 32, 16)])
def test_output_shape_for_any_size(shape):
    with torch.no_grad():
        ddf = SACBNet(**SMALL)(torch.rand(shape))
    assert ddf.shape == (shape[0], 3, *shape[2:])
    assert torch.isfinite(ddf).all()


def test_deterministic_on_real_pair(sample_pair_small):
    image = torch.cat([sample_pair_small["moving"], sample_pair_small["fixed"]], dim=1)
    net = SACBNet().eval()
    with torch.no_grad():
        assert torch.equal(net(image), net(image))
    reloaded = SACBNet().eval()
    reloaded.load_state_dict(net.state_dict())
    torch.manual_seed(123)  # the global RNG must not matter: clustering has no random draw
    with torch.no_grad():
        assert torch.equal(reloaded(image), net(image))


def test_batch_equals_items_alone(sample_pair_small):
    pair = torch.cat([sample_pair_small["moving"], sample_pair_small["fixed"]], dim=1)
    swapped = pair.flip(1)
    net = SACBNet(**SMALL).eval()
    with torch.no_grad():
        together = net(torch.cat([pair, swapped]))
        assert torch.equal(together[0:1], net(pair))
        assert torch.equal(together[1:2], net(swapped))


def test_every_trainable_parameter_gets_a_gradient():
    net = SACBNet(**SMALL)
    image = torch.rand(1, 2, 32, 32, 32)
    net(image).square().mean().backward()
    missing = [name for name, p in net.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing


def test_scripted_network_matches_eager_at_two_sizes():
    net = SACBNet(**SMALL).eval()
    scripted = torch.jit.script(net)
    for shape in [(1, 2, 20, 24, 28), (1, 2, 33, 17, 40)]:
        image = torch.rand(shape)
        with torch.no_grad():
            assert torch.allclose(scripted(image), net(image), atol=1e-5)


def test_diffeomorphic_mode_integrates_the_velocity():
    """The output is exp(velocity) of the velocity the network returns with return_velocity (tests/test_diffeomorphic.py
    checks invertibility and det J on real pairs); the plain call returns the same field alone."""
    torch.manual_seed(0)
    plain = SACBNet(**SMALL).eval()
    diffeo = SACBNet(**SMALL, diffeomorphic=True).eval()
    diffeo.load_state_dict(plain.state_dict())
    image = torch.rand(2, 2, 32, 32, 32)
    with torch.no_grad():
        displacement = plain(image)
        ddf = diffeo(image)
        returned, velocity = diffeo(image, return_velocity=True)
    assert velocity.shape == ddf.shape == displacement.shape
    assert torch.equal(returned, ddf)
    assert torch.allclose(ddf, diffeo.integrate(velocity), atol=1e-5)
    assert not torch.allclose(ddf, velocity)
    assert folding_percentage(jacobian_determinant(ddf)).max().item() == 0.0  # both pairs of the batch
    with pytest.raises(ValueError, match="diffeomorphic"):
        plain(image, return_velocity=True)


def test_scripted_diffeomorphic_network_returns_its_velocity():
    """The TorchScript export keeps the switch: the plain call returns the field, return_velocity the typed tuple."""
    net = SACBNet(**SMALL, diffeomorphic=True).eval()
    scripted = torch.jit.script(net)
    image = torch.rand(1, 2, 20, 24, 28)
    with torch.no_grad():
        ddf, velocity = net(image, return_velocity=True)
        scripted_ddf = scripted(image)
        scripted_pair = scripted(image, return_velocity=True)
    assert isinstance(scripted_ddf, torch.Tensor) and isinstance(scripted_pair, tuple)
    torch.testing.assert_close(scripted_ddf, ddf, atol=1e-5, rtol=0)
    torch.testing.assert_close(scripted_pair[0], ddf, atol=1e-5, rtol=0)
    torch.testing.assert_close(scripted_pair[1], velocity, atol=1e-5, rtol=0)


def test_bad_input_raises():
    with pytest.raises(ValueError, match=r"\(B, 2, D, H, W\)"):
        SACBNet(**SMALL)(torch.rand(1, 1, 16, 16, 16))
    with pytest.raises(ValueError, match="num_clusters"):
        SACBNet(num_clusters=(3, 3))
