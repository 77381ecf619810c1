"""GradientLoss: closed form on a ramp (where MONAI's DiffusionLoss agrees up to the axis sum), differences elsewhere."""

import pytest
import torch
from monai.losses import DiffusionLoss

from scripts.losses.regularization import GradientLoss


def _ramp(slopes, shape=(2, 3, 7, 8, 9)):
    """u_c(x) = Σ_j slopes[c][j] · x_j for every batch item."""
    grids = torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in shape[2:]], indexing="ij")
    field = torch.stack([sum(s * g for s, g in zip(row, grids)) for row in slopes])
    return field.expand(shape).clone()


def test_linear_ramp_closed_form_and_monai_agreement():
    slopes = torch.tensor([[0.5, -1.0, 0.0], [0.2, 0.0, 2.0], [0.0, 0.3, -0.4]], dtype=torch.float64)
    ddf = _ramp(slopes.tolist())
    # Forward differences along axis j are slopes[:, j]; each axis mean is mean_c slopes[c, j]², averaged over j.
    expected = slopes.square().mean(0).mean().item()
    assert GradientLoss()(ddf).item() == pytest.approx(expected, rel=1e-12)
    # Central differences see the same constant derivatives; MONAI sums the three axes instead of averaging them.
    assert DiffusionLoss()(ddf).item() == pytest.approx(3.0 * expected, rel=1e-12)


def test_constant_field_is_zero():
    ddf = torch.full((2, 3, 6, 7, 8), 2.5)
    assert GradientLoss()(ddf).item() == 0.0


def test_differs_from_monai_on_a_non_linear_field():
    # A checkerboard along axis 0: central differences are 0, forward differences are ±1 everywhere.
    checker = (torch.arange(8) % 2).double().view(1, 1, 8, 1, 1).expand(1, 3, 8, 6, 6).clone()
    assert DiffusionLoss()(checker).item() == 0.0
    assert GradientLoss()(checker).item() == pytest.approx(1.0 / 3.0)
    # A random smooth-ish field: not a fixed multiple of MONAI's value either.
    field = torch.randn(1, 3, 8, 8, 8, dtype=torch.float64).cumsum(2)
    assert GradientLoss()(field).item() * 3.0 != pytest.approx(DiffusionLoss()(field).item(), rel=1e-3)


def test_reductions_and_per_item_values():
    ddf = torch.randn(3, 3, 5, 6, 7)
    per_item = GradientLoss("none")(ddf)
    assert per_item.shape == (3,)
    for b in range(3):
        assert torch.allclose(per_item[b], GradientLoss()(ddf[b : b + 1]))
    assert torch.allclose(GradientLoss("mean")(ddf), per_item.mean())
    assert torch.allclose(GradientLoss("sum")(ddf), per_item.sum())


def test_gradient_flows_to_the_field():
    ddf = torch.randn(1, 3, 5, 5, 5, requires_grad=True)
    GradientLoss()(ddf).backward()
    assert torch.isfinite(ddf.grad).all() and ddf.grad.abs().sum() > 0


@pytest.mark.parametrize("shape", [(3, 8, 8, 8), (1, 2, 8, 8, 8), (1, 3, 1, 8, 8)])
def test_bad_shapes_raise(shape):
    with pytest.raises(ValueError, match=str(shape).replace("(", r"\(").replace(")", r"\)")):
        GradientLoss()(torch.zeros(shape))


def test_bad_reduction_raises():
    with pytest.raises(ValueError):
        GradientLoss("max")
