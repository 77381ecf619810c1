"""Jacobian determinant and folding percentage: identity, scaling, folding, equality with an np.gradient computation."""

import numpy as np
import pytest
import torch

from scripts.layers.jacobian import folding_percentage, jacobian_determinant


def _coordinates(shape):
    return torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in shape], indexing="ij"))


def test_zero_field_has_unit_determinant_and_no_folding():
    det = jacobian_determinant(torch.zeros(2, 3, 6, 7, 8))
    assert det.shape == (2, 1, 6, 7, 8)
    assert torch.equal(det, torch.ones_like(det))
    assert torch.equal(folding_percentage(det), torch.zeros(2))


@pytest.mark.parametrize("scale", [0.5, 1.3, 2.0])
def test_uniform_scaling_gives_cube_of_scale(scale):
    ddf = ((scale - 1.0) * _coordinates((6, 7, 8)))[None]
    det = jacobian_determinant(ddf)
    assert torch.allclose(det, torch.full_like(det, scale**3))


def test_anisotropic_scaling_multiplies_axis_factors():
    ddf = _coordinates((5, 6, 7)) * torch.tensor([0.5, -0.2, 1.0], dtype=torch.float64).view(3, 1, 1, 1)
    det = jacobian_determinant(ddf[None])
    assert torch.allclose(det, torch.full_like(det, 1.5 * 0.8 * 2.0))


def test_folding_field_is_detected_everywhere():
    ddf = torch.zeros(1, 3, 6, 6, 6, dtype=torch.float64)
    ddf[0, 1] = -2.0 * _coordinates((6, 6, 6))[1]  # x ↦ -x along axis 1: orientation reversed
    det = jacobian_determinant(ddf)
    assert (det < 0).all()
    assert folding_percentage(det).tolist() == [100.0]


def test_folding_percentage_counts_per_batch_item():
    det = torch.ones(2, 1, 4, 5, 5)
    det[0, 0, 0, 0, :] = 0.0  # 5 of 100 voxels, det = 0 counts as folded
    det[1, 0, :2] = -1.0  # 50 of 100 voxels
    assert torch.allclose(folding_percentage(det), torch.tensor([5.0, 50.0]))


def test_matches_numpy_gradient_on_random_smooth_field():
    generator = torch.Generator().manual_seed(2)
    coarse = torch.randn(2, 3, 4, 5, 4, generator=generator, dtype=torch.float64) * 2.0
    ddf = torch.nn.functional.interpolate(coarse, size=(10, 12, 9), mode="trilinear", align_corners=True)
    det = jacobian_determinant(ddf).numpy()
    for b in range(2):
        jac = np.zeros((10, 12, 9, 3, 3))
        for i in range(3):
            for j, d_ij in enumerate(np.gradient(ddf[b, i].numpy())):
                jac[..., i, j] = d_ij + (i == j)
        assert np.allclose(det[b, 0], np.linalg.det(jac))
    assert 0.0 < folding_percentage(torch.from_numpy(det)).max() < 100.0  # this field folds in places


@pytest.mark.parametrize("shape", [(3, 6, 6, 6), (1, 2, 6, 6, 6), (1, 3, 6, 1, 6)])
def test_bad_field_shapes_raise(shape):
    with pytest.raises(ValueError, match="ddf"):
        jacobian_determinant(torch.zeros(shape))


def test_bad_det_shape_raises():
    with pytest.raises(ValueError, match=r"\(1, 3, 4, 4, 4\)"):
        folding_percentage(torch.zeros(1, 3, 4, 4, 4))
