# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""Slab-wise post-processing (what keeps a 512 x 512 x 400 CT within RAM) equals the whole-volume path bit for bit:
the warp of full-resolution outputs, the Jacobian determinant (differences across slab edges) and the resampling
through ``affine.mat`` + ``warp.nii.gz`` (float64 point maps), on real data with slabs forced small and uneven."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from spatial_cases import make_case

from scripts.layers import Warp
from scripts.layers.jacobian import jacobian_determinant
from scripts.layers.sampling import SLAB_VOXELS, sample_at_voxels, slab_ranges, warp_image
from scripts.spatial import SavedTransforms, resample_with_transforms, voxel_point_map


def _smooth_field(shape, magnitude, seed=1):
    """A smooth random displacement of a few voxels, like a registration output: (1, 3, *shape)."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.randn(1, 3, 5, 6, 5, generator=generator) * magnitude
    return torch.nn.functional.interpolate(coarse, size=shape, mode="trilinear", align_corners=True)


def _slab_sizes(shape):
    """One plane per slab, uneven slabs (the last one shorter) and one slab for everything."""
    plane = shape[0] * shape[1]
    return [1, 3 * plane - 1, 10**9]


@pytest.mark.parametrize("shape,max_voxels", [((4, 5, 11), 1), ((4, 5, 11), 41), ((4, 5, 11), 220), ((3, 2, 1), 5)])
def test_slab_ranges_cover_the_last_axis_once_within_the_budget(shape, max_voxels):
    ranges = slab_ranges(list(shape), max_voxels)
    assert [start for start, _ in ranges] == [0] + [stop for _, stop in ranges[:-1]]  # contiguous, in order
    assert ranges[-1][1] == shape[2]
    depths = [stop - start for start, stop in ranges]
    assert min(depths) >= 1 and max(depths) == max(1, min(shape[2], max_voxels // (shape[0] * shape[1])))


def test_default_slab_keeps_a_ct_point_map_small():
    ranges = slab_ranges([512, 512, 400])  # a 512 x 512 x 400 CT: 8 planes per slab, 50 slabs
    assert max(stop - start for start, stop in ranges) * 512 * 512 <= SLAB_VOXELS and len(ranges) == 50


def test_warp_in_slabs_equals_the_whole_warp(sample_pair_small):
    image, label = sample_pair_small["moving"], sample_pair_small["moving_label"].to(torch.int16)
    ddf = _smooth_field(image.shape[2:], 4.0)
    for max_voxels in _slab_sizes(image.shape[2:]):
        for mode, padding_mode in (("bilinear", "zeros"), ("bilinear", "border"), ("nearest", "zeros")):
            warp = Warp(mode, padding_mode)
            assert torch.equal(warp.in_slabs(image, ddf, max_voxels), warp(image, ddf))
        warped_label = Warp("nearest").in_slabs(label, ddf, max_voxels)
        assert warped_label.dtype == torch.int16 and torch.equal(warped_label, warp_image(label, ddf, "nearest"))


@pytest.mark.parametrize("rough", [False, True])
def test_jacobian_in_slabs_equals_the_whole_map(sample_pair_small, rough):
    shape = sample_pair_small["moving"].shape[2:]
    ddf = _smooth_field(shape, 3.0)
    if rough:  # voxel-to-voxel noise: a slab that lost its neighbour plane would differ at once
        ddf = ddf + torch.randn(ddf.shape, generator=torch.Generator().manual_seed(2))
    whole = jacobian_determinant(ddf)
    assert not rough or (whole <= 0).any()  # the rough field folds: the sign at slab edges is tested too
    for max_voxels in _slab_sizes(shape):
        assert torch.equal(jacobian_determinant(ddf, slab_voxels=max_voxels), whole)


def test_jacobian_of_a_field_with_gradient_stays_whole_and_differentiable():
    ddf = _smooth_field((6, 7, 5), 1.0).requires_grad_()
    det = jacobian_determinant(ddf, slab_voxels=1)
    det.sum().backward()
    assert ddf.grad is not None and torch.isfinite(ddf.grad).all()


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """The shipped pair at 3 mm, moving on another grid, with a rotation and a smooth field on the fixed grid."""
    return make_case(tmp_path_factory.mktemp("slabs"))


@pytest.mark.parametrize("with_affine", [True, False])
@pytest.mark.parametrize("inverse", [False, True])
def test_resampling_through_transforms_in_slabs_equals_the_whole_map(case, with_affine, inverse):
    fixed, moving = nib.load(str(case["fixed"])), nib.load(str(case["moving"]))
    fixed_grid, moving_grid = (fixed.shape, fixed.affine), (moving.shape, moving.affine)
    transforms = SavedTransforms(case["rotation"] if with_affine else None, case["ddf"], fixed.affine, None, None)
    source = fixed if inverse else moving
    label_source = nib.load(str(case["fixed_label" if inverse else "moving_label"]))
    image = torch.as_tensor(np.asarray(source.dataobj, dtype=np.float32))[None, None]
    label = torch.as_tensor(np.asarray(label_source.dataobj).astype(np.int64))[None, None]
    reference_shape = moving.shape if inverse else fixed.shape
    whole_map = voxel_point_map(transforms, fixed_grid, moving_grid, inverse)(0, reference_shape[2])
    assert whole_map.dtype == torch.float64  # the grids differ: a matrix maps the points, in float64
    for volume, mode, padding in ((image, "bilinear", float(image.min()) - 5.0), (label, "nearest", 0.0)):
        whole = sample_at_voxels(volume, whole_map, mode, "zeros", padding)
        for max_voxels in _slab_sizes(reference_shape):
            slabs = resample_with_transforms(volume, transforms, fixed_grid, moving_grid, mode, padding, inverse,
                                             max_voxels=max_voxels)
            assert slabs.dtype == volume.dtype and torch.equal(slabs, whole)


def test_resample_moving_in_slabs_equals_one_piece(sample_pair_small):
    """Resampling onto the fixed grid through a world matrix (preprocessing), slab-wise as without gradient, equals
    the one-piece path the affine stage differentiates through."""
    from spatial_cases import rotation_ras

    from scripts.layers.sampling import resample_moving

    image, label = sample_pair_small["moving"], sample_pair_small["moving_label"]
    moving_affine = np.diag([1.1, 0.9, 1.2, 1.0])
    fixed_shape, fixed_affine = (37, 50, 43), np.diag([1.0, 1.0, 1.1, 1.0])
    matrix = torch.as_tensor(rotation_ras((20.0, 22.0, 24.0)), dtype=torch.float64).requires_grad_()
    for volume, mode, padding in ((image, "bilinear", -0.5), (label, "nearest", 0.0)):
        one_piece = resample_moving(volume, moving_affine, fixed_shape, fixed_affine, matrix, mode,
                                    padding_value=padding)
        assert one_piece.requires_grad == (mode == "bilinear")  # the gradient reaches the matrix
        with torch.no_grad():
            for max_voxels in _slab_sizes(fixed_shape):
                slabs = resample_moving(volume, moving_affine, fixed_shape, fixed_affine, matrix, mode,
                                        padding_value=padding, max_voxels=max_voxels)
                assert slabs.dtype == volume.dtype and torch.equal(slabs, one_piece.detach())


def test_affine_pyramid_blur_in_slabs_equals_monai_gaussian_filter(sample_pair_small):
    """The affine stage blurs full-resolution images slab by slab (MONAI's filter holds a copy per kernel tap):
    the same image up to float rounding, with a long kernel across the slabs' axis and a short one along it."""
    from monai.networks.layers import GaussianFilter

    from scripts.engines.affine_registration import _gaussian_blur

    image = sample_pair_small["moving"]
    sigma = [0.9, 2.5, 4.0]  # slabs along the first axis (smallest sigma): 4 sigma + 1 voxels of context each side
    whole = GaussianFilter(3, sigma)(image)
    plane = image.shape[3] * image.shape[4]
    for max_voxels in (plane, 3 * plane - 1, 10**9):
        torch.testing.assert_close(_gaussian_blur(image, sigma, max_voxels), whole, rtol=0, atol=1e-6)
    # the context matters: a slab blurred without its neighbours differs
    assert not torch.allclose(GaussianFilter(3, sigma)(image[:, :, :10]), whole[:, :, :10], atol=1e-4)


def test_refinement_correction_joins_a_full_resolution_field_in_slabs_bit_for_bit():
    """The refinement's last step, ``ddf ∘ exp(c)`` on the full-resolution grid, is composed slab by slab (two slabs at
    the default size here, :func:`compose_displacements_in_slabs`) and equals :func:`compose_displacements` of the
    whole grid bit for bit; the in-place
    scaling of :func:`resize_displacement` equals the out-of-place one."""
    from scripts.engines.field_refinement import _Correction
    from scripts.engines.resolution_inferer import resize_displacement
    from scripts.layers.sampling import compose_displacements

    shape = (136, 136, 136)  # 2.5 M voxels: more than one SLAB_VOXELS slab
    assert len(slab_ranges(list(shape))) > 1
    ddf = _smooth_field(shape, 4.0, seed=3)
    correction = _Correction(torch.zeros(1, 3, 34, 34, 34), "velocity", 4)
    with torch.no_grad():
        correction.field.copy_(_smooth_field((34, 34, 34), 2.0, seed=4))
        joined = correction.apply_to(ddf)
        velocity_exp = correction._exp()
        inner = torch.nn.functional.interpolate(velocity_exp, size=shape, mode="trilinear", align_corners=True)
        inner = inner * torch.tensor([135 / 33] * 3).view(1, 3, 1, 1, 1)
        assert torch.equal(resize_displacement(velocity_exp, shape), inner)
        assert torch.equal(joined, compose_displacements(ddf, inner, "border"))
