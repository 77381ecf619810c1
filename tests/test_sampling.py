# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""The one sampling module (``scripts.layers.sampling``) against MONAI as reference on real data: backward warping
equals ``monai.networks.blocks.Warp``, scaling and squaring equals ``DVF2DDF``, resampling between two grids of one
world space lands on the voxel float64 arithmetic picks; and its entry points agree with each other where the bundle
relies on it (the network's composition, the matrix path vs the voxel path, integer label maps)."""

import numpy as np
import pytest
import torch
from monai.networks.blocks import DVF2DDF
from monai.networks.blocks import Warp as MonaiWarp

from scripts.layers.sampling import (
    apply_matrix,
    compose_displacements,
    integrate_velocity,
    resample_moving,
    sample_at_voxels,
    voxel_grid,
    warp_image,
)


def _smooth_field(shape, magnitude, seed=1):
    """A smooth random displacement of a few voxels, like a registration output: (1, 3, *shape)."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.randn(1, 3, 5, 6, 5, generator=generator) * magnitude
    return torch.nn.functional.interpolate(coarse, size=shape, mode="trilinear", align_corners=True)


@pytest.mark.parametrize("padding_mode", ["zeros", "border", "reflection"])
def test_warp_image_equals_monai_warp_on_real_data(sample_pair_small, padding_mode):
    image, label = sample_pair_small["moving"], sample_pair_small["moving_label"]
    ddf = _smooth_field(image.shape[2:], 3.0)
    reference = MonaiWarp(mode="bilinear", padding_mode=padding_mode)(image, ddf)
    torch.testing.assert_close(warp_image(image, ddf, "bilinear", padding_mode), reference, rtol=0, atol=1e-5)
    reference = MonaiWarp(mode="nearest", padding_mode=padding_mode)(label.float(), ddf)
    warped = warp_image(label.to(torch.int16), ddf, "nearest", padding_mode)
    assert warped.dtype == torch.int16  # labels keep their dtype, with MONAI's values
    assert (warped.float() != reference).float().mean() < 1e-3  # at most a few coordinate ties resolved otherwise


def test_sample_at_voxels_is_the_warp_at_p_plus_ddf(sample_pair_small):
    image = sample_pair_small["moving"]
    ddf = _smooth_field(image.shape[2:], 3.0)
    coords = voxel_grid(list(image.shape[2:])).unsqueeze(0) + ddf
    assert torch.equal(sample_at_voxels(image, coords), warp_image(image, ddf))
    # float64 coordinates (from world matrices) are sampled in the image's precision
    assert torch.equal(sample_at_voxels(image, coords.double()), warp_image(image, ddf))


@pytest.mark.parametrize("steps", [0, 3, 7])
def test_integrate_velocity_equals_monai_dvf2ddf(steps):
    velocity = _smooth_field((14, 12, 10), 2.0, seed=3)
    reference = DVF2DDF(num_steps=steps, mode="bilinear", padding_mode="zeros")(velocity) if steps else velocity
    torch.testing.assert_close(integrate_velocity(velocity, steps, "zeros"), reference, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="steps"):
        integrate_velocity(velocity, -1, "zeros")


def test_network_composition_is_the_zero_padded_composition():
    """SACB-Net composes ``U <- U(p + d) + d`` with zero padding (as the reference); the refinement with border
    padding. Both are one function, and the padding decides only what happens next to the edge."""
    flow, residual = _smooth_field((16, 18, 14), 2.0, seed=4), _smooth_field((16, 18, 14), 0.8, seed=5)
    network_formula = MonaiWarp(mode="bilinear", padding_mode="zeros")(flow, residual) + residual
    zeros = compose_displacements(flow, residual, "zeros")
    torch.testing.assert_close(zeros, network_formula, rtol=0, atol=1e-5)
    border = compose_displacements(flow, residual, "border")
    interior = (slice(None), slice(None)) + (slice(4, -4),) * 3
    torch.testing.assert_close(border[interior], zeros[interior], rtol=0, atol=1e-6)
    assert (border - zeros).abs().max() > 1e-2  # the edge: border keeps the nearest displacement, zeros drops it


def test_resample_between_grids_picks_the_float64_voxel():
    """Resampling a label map between two grids of one world space (identity matrix) through the matrix path gives
    the voxel that float64 coordinates round to (MONAI's ResampleToMatch, which this replaced, missed ties)."""
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 9, (1, 1, 20, 22, 18), generator=generator, dtype=torch.int16)
    source = np.diag([1.5, 1.5, 1.5, 1.0])
    angle = np.deg2rad(7.0)
    target = np.eye(4)
    target[:3, :3] = [[1, 0, 0], [0, np.cos(angle), -np.sin(angle)], [0, np.sin(angle), np.cos(angle)]]
    target[:3, 3] = [1.0, -2.0, 0.5]
    shape = (24, 26, 20)
    out = resample_moving(labels, source, shape, target, np.eye(4), mode="nearest")
    assert out.dtype == torch.int16
    voxel = np.linalg.inv(source) @ target
    coords = apply_matrix(torch.as_tensor(voxel), voxel_grid(list(shape), dtype=torch.float64).unsqueeze(0))[0]
    index = torch.round(coords).long()
    inside = ((index >= 0) & (index < torch.tensor(labels.shape[2:]).view(3, 1, 1, 1))).all(0)
    expected = torch.zeros(shape, dtype=torch.int16)
    expected[inside] = labels[0, 0][tuple(index[:, inside])]
    assert torch.equal(out[0, 0], expected)


def test_matrix_path_agrees_with_voxel_path(sample_pair_small):
    """``resample_moving`` (normalisation folded into the matrix) and ``sample_at_voxels`` at the same mapped
    coordinates (normalised elementwise) are one sampler reached two ways: equal to float32 rounding."""
    image = sample_pair_small["moving"]
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    world = np.eye(4)
    world[:3, 3] = [1.3, -0.7, 2.1]
    by_matrix = resample_moving(image, affine, image.shape[2:], affine, world)
    voxel = torch.as_tensor(np.linalg.inv(affine) @ world @ affine)
    coords = apply_matrix(voxel, voxel_grid(list(image.shape[2:]), dtype=torch.float64).unsqueeze(0))
    torch.testing.assert_close(by_matrix, sample_at_voxels(image, coords), rtol=0, atol=1e-5)


def test_every_resampling_of_the_bundle_goes_through_this_module():
    """No other module of ``bundle/scripts`` calls ``grid_sample`` or MONAI's resamplers."""
    from conftest import BUNDLE_ROOT

    offenders = []
    for path in sorted((BUNDLE_ROOT / "scripts").rglob("*.py")):
        text = path.read_text()
        if path.name != "sampling.py" and any(n in text for n in ("grid_sample(", "ResampleToMatch", "SpatialResample")):
            offenders.append(path.name)
    assert offenders == []
