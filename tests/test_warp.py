"""Warp: identity, integer shifts, equality with MONAI's Warp on real data, labels, TorchScript at several sizes."""

import pytest
import torch
from monai.networks.blocks import Warp as MonaiWarp

from scripts.layers import Warp


def test_zero_field_leaves_real_image_unchanged(sample_pair_small):
    image = sample_pair_small["moving"]
    ddf = torch.zeros(1, 3, *image.shape[2:])
    # Float32 grid normalisation rounds coordinates by ~1e-6 voxel; values stay within 1e-5.
    assert torch.allclose(Warp()(image, ddf), image, atol=1e-5)
    label = sample_pair_small["moving_label"]
    assert torch.equal(Warp("nearest")(label, ddf), label)


@pytest.mark.parametrize("axis,shift", [(0, 2), (1, -3), (2, 1)])
def test_integer_shift_matches_roll_in_interior(axis, shift):
    image = torch.rand(1, 2, 12, 14, 16)
    ddf = torch.zeros(1, 3, 12, 14, 16)
    ddf[:, axis] = shift
    warped = Warp()(image, ddf)
    expected = torch.roll(image, shifts=-shift, dims=axis + 2)
    interior = [slice(None), slice(None)] + [slice(3, -3)] * 3
    assert torch.allclose(warped[interior], expected[interior], atol=1e-5)


@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
@pytest.mark.parametrize("padding_mode", ["zeros", "border"])
def test_equals_monai_warp_on_real_data(sample_pair_small, mode, padding_mode):
    image = sample_pair_small["moving"] if mode == "bilinear" else sample_pair_small["moving_label"].float()
    generator = torch.Generator().manual_seed(1)
    # A smooth random field of a few voxels, like a registration output.
    coarse = torch.randn(1, 3, 5, 6, 5, generator=generator) * 3.0
    ddf = torch.nn.functional.interpolate(coarse, size=image.shape[2:], mode="trilinear", align_corners=True)
    ours = Warp(mode, padding_mode)(image, ddf)
    reference = MonaiWarp(mode=mode, padding_mode=padding_mode)(image, ddf)
    assert torch.allclose(ours, reference, atol=1e-5)


def test_label_dtype_preserved(sample_pair_small):
    label = sample_pair_small["moving_label"].to(torch.uint8)
    ddf = torch.full((1, 3, *label.shape[2:]), 0.4)
    warped = Warp("nearest")(label, ddf)
    assert warped.dtype == torch.uint8
    assert set(torch.unique(warped).tolist()) <= set(torch.unique(label).tolist())


def test_scripted_warp_runs_at_two_sizes():
    scripted = torch.jit.script(Warp())
    for shape in [(1, 1, 8, 10, 12), (2, 3, 13, 7, 9)]:
        image = torch.rand(shape)
        ddf = torch.randn(shape[0], 3, *shape[2:])
        assert torch.allclose(scripted(image, ddf), Warp()(image, ddf), atol=1e-6)


def test_bad_arguments_and_shapes_raise():
    with pytest.raises(ValueError, match="mode"):
        Warp(mode="cubic")
    with pytest.raises(ValueError, match="padding_mode"):
        Warp(padding_mode="wrap")
    with pytest.raises(ValueError, match="3 channels"):
        Warp()(torch.rand(1, 1, 4, 4, 4), torch.rand(1, 2, 4, 4, 4))
    with pytest.raises(ValueError, match="spatial shape"):
        Warp()(torch.rand(1, 1, 4, 4, 4), torch.rand(1, 3, 4, 4, 5))
    with pytest.raises(ValueError, match=r"\(B, C, D, H, W\)"):
        Warp()(torch.rand(4, 4, 4), torch.rand(1, 3, 4, 4, 4))


def test_composed_displacement_warps_like_the_two_warps_in_turn():
    from scripts.layers import compose_displacements, voxel_grid, warp_image

    shape = (20, 24, 22)
    generator = torch.Generator().manual_seed(0)
    # smooth fields of a few voxels: random values on a coarse grid, upsampled (trilinear)
    outer, inner = (
        torch.nn.functional.interpolate(torch.randn(1, 3, 4, 4, 4, generator=generator) * 2, size=shape, mode="trilinear")
        for _ in range(2)
    )
    # the voxel coordinates as a 3-channel image: trilinear sampling reproduces them exactly, so warping in turn and
    # warping once by the composition agree to rounding wherever no sample leaves the volume
    coordinates = voxel_grid(list(shape)).unsqueeze(0)
    in_turn = warp_image(warp_image(coordinates, outer), inner)
    interior = [slice(None), slice(None)] + [slice(7, -7)] * 3
    composed = warp_image(coordinates, compose_displacements(outer, inner, "border"))
    assert torch.allclose(composed[interior], in_turn[interior], atol=1e-4)
    assert torch.allclose(composed[interior], (coordinates + compose_displacements(outer, inner, "border"))[interior], atol=1e-4)
    wrong_order = warp_image(coordinates, compose_displacements(inner, outer, "border"))
    assert (wrong_order - in_turn)[interior].abs().max() > 0.1
    with pytest.raises(ValueError, match="displacements of one shape"):
        compose_displacements(outer, inner[..., :-1], "border")
