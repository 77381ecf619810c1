"""Cross-similarity flow head: recovers known unit translations, bounded output, no parameters."""

import pytest
import torch

from scripts.networks.cross_similarity import CrossSimilarityFlow
from scripts.layers.warp import Warp


@pytest.mark.parametrize("shift", [(1, 0, 0), (0, -1, 0), (0, 0, 1), (1, -1, 1)])
def test_recovers_unit_translation(shift):
    generator = torch.Generator().manual_seed(0)
    fixed = 3.0 * torch.randn(1, 32, 10, 11, 12, generator=generator)
    # moving(q) = fixed(q - s), so moving(p + s) = fixed(p): the expected flow is s.
    moving = torch.roll(fixed, shifts=shift, dims=(2, 3, 4))
    flow = CrossSimilarityFlow()(fixed, moving)
    interior = flow[:, :, 2:-2, 2:-2, 2:-2]
    expected = torch.tensor(shift, dtype=torch.float32).view(1, 3, 1, 1, 1)
    assert torch.allclose(interior, expected.expand_as(interior), atol=1e-3)
    warped = Warp()(moving, flow)
    assert torch.allclose(warped[:, :, 2:-2, 2:-2, 2:-2], fixed[:, :, 2:-2, 2:-2, 2:-2], atol=1e-2)


def test_flow_is_bounded_and_parameter_free():
    head = CrossSimilarityFlow()
    assert sum(p.numel() for p in head.parameters()) == 0
    flow = head(torch.randn(2, 8, 5, 6, 7), torch.randn(2, 8, 5, 6, 7))
    assert flow.shape == (2, 3, 5, 6, 7)
    assert flow.abs().max() < 1.0


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="one shape"):
        CrossSimilarityFlow()(torch.randn(1, 8, 5, 6, 7), torch.randn(1, 8, 5, 6, 8))
