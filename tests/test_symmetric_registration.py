# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""Symmetric registration (``register --inverse``, ``symmetric_registration``): the network run both ways gives an
inverse-consistent field. That fixed labels mapped back onto the moving scan then score as well as the forward is
checked end to end by ``tests/test_spatial_ants.py`` (``register --inverse``, ANTs applying the inverse) and measured
on native 1 mm pairs by ``bench/accuracy/inverse_gap.py`` (docs/usage.md, "Forward vs inverse Dice"): on this small
pair the one-way field's gap is already small."""

from __future__ import annotations

import pytest
import torch
from conftest import BUNDLE_ROOT, load_sample_pair
from monai.bundle import ConfigParser

from scripts.engines import ResolutionInferer
from scripts.engines.resolution_inferer import symmetric_network_fields
from scripts.layers import jacobian_determinant, warp_image

SHIPPED = BUNDLE_ROOT / "models" / "model.pt"
INTERIOR = (slice(4, -4),) * 3  # an inverse samples outside the grid next to the border


def _network(diffeomorphic: bool = False):
    parser = ConfigParser()
    parser.read_config(str(BUNDLE_ROOT / "configs" / "inference.json"))
    parser["network_def"]["diffeomorphic"] = diffeomorphic
    net = parser.get_parsed_content("network_def", instantiate=True).eval()
    if not SHIPPED.is_file():
        pytest.skip("no shipped weights (bundle/models/model.pt)")
    net.load_state_dict(torch.load(SHIPPED, map_location="cpu", weights_only=True), strict=True)
    return net


@pytest.fixture(scope="module")
def real_pair():
    """The shipped Colin27 -> MNI152 pair at 64x76x64 (about 2.5 mm) as (1, 2, D, H, W) in [0, 1]."""
    pair = load_sample_pair((64, 76, 64))
    return torch.cat([pair["moving"], pair["fixed"]], dim=1)


def _consistency(forward: torch.Tensor, backward: torch.Tensor) -> float:
    """Mean |u(p) + w(p + u(p))| in voxels inside the grid: 0 when ``w`` inverts ``u``."""
    return float((forward + warp_image(backward, forward, "bilinear", "border")).norm(dim=1)[0][INTERIOR].mean())


def test_the_pair_swapped_gives_the_inverse_field(real_pair):
    """exp((a - b) / 2) for the pair and exp((b - a) / 2) for the pair swapped invert each other (to the integration's
    accuracy), which the one-way fields of the shipped network, each trained for its own direction, do not."""
    images = real_pair
    net = _network()
    errors = {}
    for symmetric in (False, True):
        inferer = ResolutionInferer(network_scale=0.5, symmetric=symmetric)
        with torch.no_grad():
            forward, backward = inferer(images, net), inferer(images.flip(1), net)
        assert forward.shape == (1, 3, 64, 76, 64) and forward.norm(dim=1).max() > 1.0  # a real deformation
        errors[symmetric] = _consistency(forward, backward)
        if symmetric:
            assert jacobian_determinant(forward).min() > 0  # integrated: no folds on this pair
    assert errors[True] < 0.05 and errors[True] < 0.25 * errors[False], errors


def test_a_diffeomorphic_network_averages_its_velocities(real_pair):
    """A diffeomorphic network's two velocities are averaged exactly: the field is its own ``integrate`` of the
    returned velocity, and the velocity of the swapped pair is its negative."""
    images = real_pair
    net = _network(diffeomorphic=True)
    small = torch.nn.functional.interpolate(images, size=(32, 38, 32), mode="trilinear", align_corners=True)
    with torch.no_grad():
        ddf, velocity = symmetric_network_fields(net, small)
        _, swapped = symmetric_network_fields(net, small.flip(1))
        _, forward_velocity = net(small, return_velocity=True)
        _, backward_velocity = net(small.flip(1), return_velocity=True)
    torch.testing.assert_close(ddf, net.integrate(velocity), atol=1e-6, rtol=0)
    torch.testing.assert_close(swapped, -velocity, atol=1e-4, rtol=0)  # two forward passes: float summation order
    torch.testing.assert_close(velocity, 0.5 * (forward_velocity - backward_velocity), atol=1e-4, rtol=0)


def test_asking_for_the_inverse_runs_both_stages_symmetric():
    """``write_inverse`` (``register --inverse``) switches the network and the refinement to their symmetric form;
    ``symmetric_registration`` sets it on its own."""
    for overrides, expected in (({}, False), ({"write_inverse": True}, True),
                                ({"symmetric_registration": True}, True),
                                ({"write_inverse": True, "symmetric_registration": False}, False)):
        parser = ConfigParser()
        parser.read_config(str(BUNDLE_ROOT / "configs" / "inference.json"))
        parser.update(overrides)
        assert parser.get_parsed_content("network_inferer").symmetric is expected, overrides
        assert parser.get_parsed_content("refinement").settings["symmetric"] is expected, overrides
    with pytest.raises(ValueError, match="symmetric"):
        ResolutionInferer(symmetric="false")
