# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""Diffeomorphic mode of SACBNet (our extension beyond the paper): a stationary velocity field, integrated by scaling
and squaring wherever a transform is applied. On the real shipped pair with the shipped weights the output has
det J > 0 everywhere and is inverted by negating the velocity (inverse-consistency error below 0.1 voxel), also after
instance optimisation; the decoder warps its features with the same integrated field the output is. The velocity
comes from the return values (``forward(..., return_velocity=True)``, ``inferer.displacement_and_velocity``)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import BUNDLE_ROOT, load_sample_pair
from monai.bundle import ConfigParser

import scripts.networks.sacb_net as sacb_net_module
from scripts.engines import InstanceOptimizationInferer, ResolutionInferer, resize_displacement
from scripts.layers import Warp, jacobian_determinant, warp_image
from scripts.losses import GradientLoss, LocalNCCLoss, RegistrationLoss, registration_target
from scripts.networks import SACBNet

SHIPPED = BUNDLE_ROOT / "models" / "model.pt"
MARGIN = 4  # voxels next to the grid border, where an inverse has to sample outside the volume (zeros there)
INTERIOR = (slice(MARGIN, -MARGIN),) * 3


def _network_def(diffeomorphic: bool) -> SACBNet:
    parser = ConfigParser()
    parser.read_config(str(BUNDLE_ROOT / "configs" / "inference.json"))
    parser["network_def"]["diffeomorphic"] = diffeomorphic
    return parser.get_parsed_content("network_def", instantiate=True)


def _inverse_consistency(forward: torch.Tensor, inverse: torch.Tensor, pair: torch.Tensor) -> dict[str, float]:
    """Mean |u_f(p) + u_i(p + u_f(p))| (and the other order) in voxels, over the interior of the grid and over the
    brain (voxels where either image is above 5 % of its range, dilated by one voxel)."""
    brain = (torch.nn.functional.max_pool3d(pair.amax(1, keepdim=True), 3, 1, 1) > 0.05)[0, 0]
    interior = torch.zeros_like(brain)
    interior[INTERIOR] = True
    errors = {}
    for name, first, second in (("forward_inverse", forward, inverse), ("inverse_forward", inverse, forward)):
        error = (first + warp_image(second, first, "bilinear", "border")).norm(dim=1)[0]
        errors[f"{name}_interior"] = float(error[interior].mean())
        errors[f"{name}_brain"] = float(error[brain & interior].mean())
    return errors


@pytest.fixture(scope="module")
def shipped_state():
    if not SHIPPED.is_file():
        pytest.skip("no shipped weights (bundle/models/model.pt)")
    return torch.load(SHIPPED, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def real_pair():
    """The shipped Colin27 -> MNI152 pair at 90x108x90 (about 1.8 mm), as (1, 2, D, H, W) in [0, 1]."""
    pair = load_sample_pair((90, 108, 90))
    return torch.cat([pair["moving"], pair["fixed"]], dim=1)


def test_shipped_weights_load_strictly_in_both_modes(shipped_state):
    plain, diffeo = _network_def(False), _network_def(True)
    assert not plain.diffeomorphic and diffeo.diffeomorphic
    assert list(plain.state_dict()) == list(diffeo.state_dict())  # same keys, same order: nothing added
    plain.load_state_dict(shipped_state, strict=True)
    diffeo.load_state_dict(shipped_state, strict=True)


def test_decoder_warps_with_the_integrated_field_it_outputs():
    """With the last residual switched off (zero flow head), the full-resolution moving features must be warped by
    exactly the output transform: exp(v) in diffeomorphic mode, the displacement itself in the plain mode."""
    torch.manual_seed(0)
    image = torch.rand(1, 2, 32, 32, 32)
    for diffeomorphic in (False, True):
        net = SACBNet(base_channels=2, num_clusters=3, kmeans_iterations=3, diffeomorphic=diffeomorphic).eval()
        torch.nn.init.zeros_(net.flow_out.weight)
        torch.nn.init.zeros_(net.flow_out.bias)
        feature_warps = []

        def recording_warp(volume, ddf, mode="bilinear", padding_mode="zeros"):
            if volume.shape[1] == 4:  # full-resolution features (2 * base_channels)
                feature_warps.append(ddf.clone())
            return warp_image(volume, ddf, mode, padding_mode)

        original = sacb_net_module.warp_image
        sacb_net_module.warp_image = recording_warp
        try:
            with torch.no_grad():
                ddf, velocity = net(image, return_velocity=True) if diffeomorphic else (net(image), None)
        finally:
            sacb_net_module.warp_image = original
        assert len(feature_warps) == 1 and ddf.abs().max() > 0.1
        torch.testing.assert_close(feature_warps[0], ddf, atol=1e-6, rtol=0)
        if diffeomorphic:
            torch.testing.assert_close(ddf, net.integrate(velocity), atol=1e-6, rtol=0)
            assert not torch.allclose(ddf, velocity, atol=1e-3)  # the field is integrated, not the velocity


def test_plain_inference_is_folding_free_and_inverted_by_the_negated_velocity(shipped_state, real_pair):
    net = _network_def(True).eval()
    net.load_state_dict(shipped_state, strict=True)
    inferer = ResolutionInferer(network_scale=0.5)  # the weights' training grid, as the bundle runs them
    with torch.no_grad():
        ddf, velocity = inferer.displacement_and_velocity(real_pair, net)
        inverse = net.integrate(-velocity)
        torch.testing.assert_close(inferer(real_pair, net), ddf, atol=0, rtol=0)  # the call: the same field alone
    assert velocity.shape == ddf.shape == (1, 3, 90, 108, 90)
    assert ddf.norm(dim=1).max() > 2.0  # a real deformation, not a near-identity
    det = jacobian_determinant(ddf)
    assert det.min() > 0, f"det J min {det.min().item():.4f}"
    # the inverse samples the field outside the volume next to the border (zero there): checked inside
    assert jacobian_determinant(inverse)[(slice(None), slice(None)) + INTERIOR].min() > 0
    errors = _inverse_consistency(ddf, inverse, real_pair)
    print("inverse consistency (voxels), plain inference:", errors)
    assert max(errors.values()) < 0.1, errors


def test_instance_optimisation_keeps_the_transform_invertible(shipped_state):
    pair = load_sample_pair((64, 76, 64))  # about 2.5 mm: a few seconds per step on 2 cores
    net = _network_def(True)
    net.load_state_dict(shipped_state, strict=True)
    start = copy.deepcopy(net.state_dict())
    inferer = InstanceOptimizationInferer(  # inference.json's instance-optimisation defaults, fewer steps
        LocalNCCLoss(9), GradientLoss(), Warp(), regularization_weight=1.0, iterations=3, learning_rate=2e-4,
        network_scale=0.5, log_interval=0,
    )
    image = torch.cat([pair["moving"], pair["fixed"]], dim=1)
    with torch.no_grad():  # as inside a MONAI evaluator
        ddf, velocity = inferer.displacement_and_velocity(image, net)
    # the optimisation changed the weights (that it lowers the loss: tests/test_instance_optimization.py)
    assert any(not torch.equal(start[k], v) for k, v in net.state_dict().items())
    inverse = net.integrate(-velocity)
    assert jacobian_determinant(ddf).min() > 0
    errors = _inverse_consistency(ddf, inverse, image)
    print("inverse consistency (voxels), after instance optimisation:", errors)
    assert max(errors.values()) < 0.1, errors


def test_training_at_a_reduced_grid_reaches_the_weights_through_the_returned_velocity():
    """At network_scale 0.5 the inferer integrates on the input grid the velocity the network returns, resized: the
    field and its inverse come from that value, and the loss's gradient flows through it into the weights (a velocity
    kept in an attribute was detached: a training step through the inferer updated nothing)."""
    pair = load_sample_pair((40, 48, 40))
    image = torch.cat([pair["moving"], pair["fixed"]], dim=1)
    net = SACBNet(base_channels=2, num_clusters=3, kmeans_iterations=3, diffeomorphic=True)
    inferer = ResolutionInferer(network_scale=0.5)
    ddf, velocity = inferer.displacement_and_velocity(image, net)
    _, network_velocity = net(inferer.downsample(image), return_velocity=True)  # with gradients, as the inferer ran
    network_velocity = network_velocity.detach()
    assert velocity.shape == ddf.shape == (1, 3, 40, 48, 40) and network_velocity.shape == (1, 3, 20, 24, 20)
    torch.testing.assert_close(velocity.detach(), resize_displacement(network_velocity, (40, 48, 40)), atol=1e-6, rtol=0)
    torch.testing.assert_close(ddf, net.integrate(velocity), atol=0, rtol=0)
    loss = RegistrationLoss(LocalNCCLoss(5), GradientLoss(), Warp())(ddf, registration_target(image))
    loss.backward()
    gradient = net.flow_out.weight.grad
    assert gradient is not None and gradient.abs().sum() > 0


def test_plain_networks_report_no_velocity(real_pair):
    net = SACBNet(base_channels=2, num_clusters=3, kmeans_iterations=3).eval()
    inferer = ResolutionInferer(network_scale=0.25)
    with torch.no_grad():
        ddf, velocity = inferer.displacement_and_velocity(real_pair, net)
    assert velocity is None and ddf.shape == (1, 3, 90, 108, 90)
