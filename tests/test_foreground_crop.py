"""Foreground crop around the deformable registration: box, field continued outside, no change on full scans."""

import pytest
import torch
import torch.nn.functional as F
from conftest import load_sample_pair

from scripts.engines import ForegroundCropInferer, ResolutionInferer, foreground_box
from scripts.layers.jacobian import jacobian_determinant


def test_box_covers_the_foreground_of_both_images_plus_the_margin():
    inputs = torch.zeros(2, 2, 40, 50, 60)
    inputs[0, 0, 10:20, 5:15, 30:40] = 1.0  # moving of item 0
    inputs[1, 1, 12:25, 8:9, 20:35] = 0.5  # fixed of item 1
    box = foreground_box(inputs, margin=3, min_size=1)
    assert box == (slice(7, 28), slice(2, 18), slice(17, 43))
    assert foreground_box(inputs, margin=100) == (slice(0, 40), slice(0, 50), slice(0, 60))
    # a thin foreground is widened to min_size around its centre, inside the grid
    assert foreground_box(inputs, margin=0, min_size=32)[1] == slice(0, 32)
    assert foreground_box(torch.zeros(1, 2, 8, 9, 10)) == (slice(0, 8), slice(0, 9), slice(0, 10))
    with pytest.raises(ValueError, match="margin"):
        foreground_box(inputs, margin=-1)


def _embedded_pair(pad: int):
    """The shipped real pair (skull-stripped) in a grid with ``pad`` empty voxels on every side."""
    pair = load_sample_pair((40, 48, 40))
    inputs = torch.cat([pair["moving"], pair["fixed"]], 1)
    return inputs, F.pad(inputs, [pad] * 6)


def test_registration_inside_the_box_equals_the_registration_of_the_cropped_pair():
    _, embedded = _embedded_pair(12)
    calls = []

    def shift_network(pair):  # a field that depends on the grid it is given: a ramp along the first axis
        calls.append(tuple(pair.shape[2:]))
        ramp = torch.linspace(-1, 1, pair.shape[2]).view(1, 1, -1, 1, 1)
        return torch.cat([ramp.expand(pair.shape[0], 1, *pair.shape[2:])] * 3, 1) * 2

    inferer = ForegroundCropInferer(ResolutionInferer(1.0), margin=0, min_size=1)
    ddf = inferer(embedded, shift_network)
    box = foreground_box(embedded, 0, 0.0, 1)
    assert calls == [tuple(b.stop - b.start for b in box)] and calls[0][0] < embedded.shape[2]
    assert ddf.shape == (1, 3, *embedded.shape[2:])
    inside = ddf[(slice(None), slice(None), *box)]
    assert torch.allclose(inside, ResolutionInferer(1.0)(embedded[(slice(None), slice(None), *box)], shift_network))
    # outside the box the field continues its faces: constant along each axis up to the grid's edge, no folding
    before = ddf[:, :, : box[0].start, box[1], box[2]]
    assert torch.equal(before, inside[:, :, :1].expand_as(before))
    assert (jacobian_determinant(ddf) > 0).all()


def test_a_pair_that_fills_its_grid_is_passed_through_unchanged():
    inputs, _ = _embedded_pair(0)
    inputs = inputs + 0.01  # no background voxel at 0: the box is the whole grid
    seen = []
    base = lambda pair, network: seen.append(pair) or torch.zeros(1, 3, *pair.shape[2:])
    ForegroundCropInferer(base, margin=8)(inputs, None)
    assert seen[0] is inputs
    with pytest.raises(ValueError, match="moving \\+ fixed"):
        ForegroundCropInferer(base)(inputs[:, :1], None)
    with pytest.raises(ValueError, match="base_inferer"):
        ForegroundCropInferer(None)
