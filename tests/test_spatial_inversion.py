# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""Inverse of the deformable part (Newton inversion, velocity negation) and the inverse direction of
``apply_transforms``, checked against SimpleITK on the shipped pair at 3 mm."""

from __future__ import annotations

import math

import nibabel as nib
import numpy as np
import pytest
import torch
from spatial_cases import make_case, mean_dice, sitk_displacement, sitk_resample, smooth_ddf

from scripts.layers import VelocityIntegration, integrate_velocity
from scripts.layers.sampling import warp_image
from scripts.spatial import (
    apply_transforms,
    inverse_consistency_error,
    invert_displacement,
    invert_velocity,
    read_itk_displacement,
    save_transforms,
    write_inverse_warp,
)

sitk = pytest.importorskip("SimpleITK")
SHAPE = (40, 48, 36)


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    case = make_case(tmp_path_factory.mktemp("spatial_inversion"))
    case["transforms"] = tmp_path_factory.mktemp("spatial_inversion_tx")
    case["written"] = save_transforms(case["transforms"], case["fixed_affine"], case["rotation"], case["ddf"])
    return case


def test_inverse_of_a_smooth_field_is_consistent_and_batched():
    ddf = torch.as_tensor(np.stack([smooth_ddf(SHAPE, 2.5), smooth_ddf(SHAPE, -1.0)]))
    result = invert_displacement(ddf, iterations=50, tolerance=1e-4)
    assert result.converged and result.ddf.shape == ddf.shape
    assert (result.error_max < 0.1).all() and (result.error_mean < 0.02).all()
    naive_mean, _ = inverse_consistency_error(ddf, -ddf)  # the negated field is not the inverse
    assert (naive_mean > 5 * result.error_mean).all()
    single = invert_displacement(ddf[1:], iterations=50, tolerance=1e-4)
    torch.testing.assert_close(single.ddf[0], result.ddf[1], rtol=0, atol=1e-4)


def test_inverse_where_the_map_stretches_threefold():
    """Where the map stretches by more than 2x (|grad u| > 1, common in real registrations) the plain fixed-point
    iteration v <- -u(p + v) oscillates (its residual stayed above 10 voxels here); the Newton inversion converges:
    W(W^-1(y)) = y to 1e-4 voxels on the whole grid, the shear along another axis included."""
    x = torch.arange(SHAPE[0], dtype=torch.float64).view(-1, 1, 1).expand(SHAPE)
    ddf = torch.zeros(1, 3, *SHAPE, dtype=torch.float64)
    ddf[0, 0] = 6.0 * torch.tanh((x - SHAPE[0] / 2) / 3.0)  # du/dx up to 2 at the centre: a threefold stretch
    ddf[0, 1] = 1.5 * torch.sin(2 * math.pi * x / SHAPE[0])
    result = invert_displacement(ddf)
    residual = (result.ddf + warp_image(ddf, result.ddf, "bilinear", "border")).norm(dim=1)
    assert result.converged and float(residual.max()) < 1e-4
    assert float(result.error_max) < 0.05  # W^-1(W(p)) = p up to the interpolation of v where W compresses


def test_inverse_of_a_translation_is_its_negation():
    ddf = torch.zeros(1, 3, *SHAPE, dtype=torch.float64)
    ddf[:, 0], ddf[:, 1], ddf[:, 2] = 1.25, -0.5, 2.0
    result = invert_displacement(ddf)
    torch.testing.assert_close(result.ddf, -ddf, rtol=0, atol=1e-12)
    assert float(result.error_max) < 1e-12


def test_velocity_inverse_by_negation():
    velocity = torch.as_tensor(smooth_ddf(SHAPE, 2.0))[None]
    forward, inverse = invert_velocity(velocity, steps=7)
    torch.testing.assert_close(forward, VelocityIntegration(7)(velocity), rtol=0, atol=1e-6)  # as the network does
    torch.testing.assert_close(inverse, integrate_velocity(-velocity, 7, "zeros"))
    mean, maximum = inverse_consistency_error(forward, inverse, margin=4)  # zero padding bends the outer voxels
    assert float(maximum) < 0.05 and float(mean) < 0.01
    iterated = invert_displacement(forward).ddf
    interior = (slice(None), slice(None), slice(4, -4), slice(4, -4), slice(4, -4))
    assert float((iterated - inverse)[interior].abs().max()) < 0.05


def test_inverse_warp_file_and_its_consistency(case, tmp_path):
    stats = case["written"]["inverse_consistency"]
    assert stats["converged"] and stats["max_voxels"] < 0.1 and stats["max_mm"] < 0.3
    _, affine = read_itk_displacement(case["transforms"] / "inverse_warp.nii.gz")
    np.testing.assert_allclose(affine, case["fixed_affine"], atol=1e-5)  # on the fixed grid, like 1InverseWarp
    given = -case["ddf"]  # writing a known inverse skips the iteration and reports its (poor) consistency
    _, poor = write_inverse_warp(
        case["ddf"], case["fixed_affine"], tmp_path / "inverse_warp.nii.gz", inverse_voxels=given
    )
    assert poor["iterations"] == 0 and poor["mean_voxels"] > 5 * stats["mean_voxels"]
    np.testing.assert_allclose(read_itk_displacement(tmp_path / "inverse_warp.nii.gz")[0], given, atol=1e-5)


def test_forward_then_inverse_returns_the_labels(case):
    moving_label = nib.load(str(case["moving_label"]))
    on_fixed = apply_transforms(case["fixed"], moving_label, case["transforms"], "nearest")
    back = apply_transforms(on_fixed, case["moving"], case["transforms"], "nearest", inverse=True)
    assert back.shape == moving_label.shape
    assert mean_dice(np.asarray(moving_label.dataobj), np.asarray(back.dataobj)) >= 0.95


def test_inverse_matches_simpleitk(case):
    """SimpleITK m -> T^-1 m -> + v: CompositeTransform([inverse_warp, affine^-1]) (last in the list applied first)."""
    affine = sitk.ReadTransform(str(case["transforms"] / "affine.mat"))
    inverse_warp = sitk_displacement(case["transforms"] / "inverse_warp.nii.gz")
    inverse = sitk.CompositeTransform([inverse_warp, affine.GetInverse()])
    ours = np.asarray(
        apply_transforms(case["fixed_label"], case["moving"], case["transforms"], "nearest", inverse=True).dataobj
    )
    theirs = sitk_resample(case["fixed_label"], case["moving"], inverse, label=True)
    assert mean_dice(theirs, ours) >= 0.97
    forward = sitk.CompositeTransform([affine, sitk_displacement(case["transforms"] / "warp.nii.gz")])
    fixed = sitk.ReadImage(str(case["fixed"]))
    for index in [(20, 30, 25), (12, 40, 30), (35, 22, 18), (27, 50, 40)]:  # fixed -> moving -> fixed
        point = np.array(fixed.TransformIndexToPhysicalPoint(index))
        there = forward.TransformPoint(tuple(point.tolist()))
        assert np.linalg.norm(np.array(inverse.TransformPoint(there)) - point) < 0.1 * 3.0  # 0.1 voxel of 3 mm


def test_inverse_on_the_fly_without_inverse_warp_file(case, tmp_path):
    save_transforms(tmp_path, case["fixed_affine"], case["rotation"], case["ddf"], inverse=False)
    assert not (tmp_path / "inverse_warp.nii.gz").exists()
    ours = apply_transforms(case["fixed"], case["moving"], tmp_path, inverse=True).get_fdata()
    stored = apply_transforms(case["fixed"], case["moving"], case["transforms"], inverse=True).get_fdata()
    np.testing.assert_allclose(ours, stored, rtol=0, atol=1e-3 * stored.max())
