"""LocalNCCLoss: equal to MONAI's rectangular LNCC (values and gradients) on the real pair, properties, validation."""

import pytest
import torch
from monai.losses import LocalNormalizedCrossCorrelationLoss as MonaiLNCC

from conftest import load_sample_pair
from scripts.losses.ncc import LocalNCCLoss, _box_sum_gemm, _box_sum_shift, box_sum


@pytest.fixture(scope="module")
def real_pair():
    """Real Colin27/MNI152 T1 at about 2.5 mm (64x76x64): textured brain with zero background."""
    pair = load_sample_pair((64, 76, 64))
    return pair["moving"], pair["fixed"]


def _monai(kernel_size, reduction="mean"):
    return MonaiLNCC(spatial_dims=3, kernel_size=kernel_size, kernel_type="rectangular", reduction=reduction)


@pytest.mark.parametrize("kernel_size", [3, 5, 9])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_reduced_value_equals_monai_on_real_brain_pair(real_pair, kernel_size, reduction):
    moving, fixed = real_pair
    ours = LocalNCCLoss(kernel_size=kernel_size, reduction=reduction)(moving, fixed)
    reference = _monai(kernel_size, reduction)(moving, fixed)
    assert ours.shape == reference.shape == ()
    scale = 1 if reduction == "mean" else moving.numel()  # a sum over 311k voxels: compare per voxel
    assert abs(ours.item() - reference.item()) <= 1e-4 * scale
    assert ours.item() < -0.05 * scale  # there is real correlation to measure


def _relative_variance(image, kernel_size):
    """float64 window variance / window sum of squares (0 for all-zero windows) of a (1, 1, D, H, W) image."""
    x = image.double()[0]
    sums = box_sum(torch.cat((x, x * x)), kernel_size)
    variance = sums[1] - sums[0] * sums[0] / kernel_size**3
    return torch.where(sums[1] > 0, variance / sums[1].clamp_min(1e-300), 0.0)


@pytest.mark.parametrize("kernel_size", [3, 5, 9])
def test_voxelwise_map_equals_monai_on_real_brain_pair(real_pair, kernel_size):
    moving, fixed = real_pair
    # Same definition: in float64 the maps agree to rounding.
    truth = _monai(kernel_size, "none")(moving.double(), fixed.double())
    ours64 = LocalNCCLoss(kernel_size, "none")(moving.double(), fixed.double())
    assert ours64.dtype == torch.float64
    assert torch.allclose(ours64, truth, atol=1e-8, rtol=0)
    # In float32 Σx² − (Σx)²/N cancels in nearly flat windows. Windows below the rounding floor count as flat (0);
    # the floor may only flatten windows that ARE nearly flat (float64 relative variance within 10x the floor) ...
    floor = 4.0 * kernel_size * torch.finfo(torch.float32).eps
    ours = LocalNCCLoss(kernel_size, "none")(moving, fixed)
    reference = _monai(kernel_size, "none")(moving, fixed)
    assert ours.shape == reference.shape == moving.shape
    flattened = (ours == 0) & (truth.abs() > 1e-4)
    nearly_flat = torch.minimum(_relative_variance(moving, kernel_size), _relative_variance(fixed, kernel_size))
    assert (nearly_flat[None, None][flattened] < 10 * floor).all()
    assert flattened.float().mean() < 2e-3
    # ... and everywhere else ours is as accurate as MONAI's own float32 map, measured against the float64 truth.
    ours_error = (ours.double() - truth).abs()[~flattened]
    reference_error = (reference.double() - truth).abs()[~flattened]
    assert ours_error.max() <= 2.0 * reference_error.max() + 1e-5
    assert ours_error.mean() <= 2.0 * reference_error.mean() + 1e-7


def test_equals_monai_on_two_channel_batch_and_odd_sizes():
    generator = torch.Generator().manual_seed(3)
    pred = torch.rand(2, 2, 11, 7, 13, generator=generator)
    target = pred + 0.3 * torch.rand(2, 2, 11, 7, 13, generator=generator)
    for kernel_size in (1, 7, 15, 25):  # 15 and 25 exceed the volume: windows are clipped by zero padding
        ours = LocalNCCLoss(kernel_size, "none")(pred, target)
        reference = _monai(kernel_size, "none")(pred, target)
        assert torch.allclose(ours, reference, atol=1e-4, rtol=0), kernel_size


def test_batch_items_are_independent(real_pair):
    moving, fixed = real_pair
    loss = LocalNCCLoss(reduction="none")
    batched = loss(torch.cat((moving, fixed)), torch.cat((fixed, fixed)))
    assert torch.allclose(batched[:1], loss(moving, fixed), atol=1e-6)
    assert torch.allclose(batched[1:], loss(fixed, fixed), atol=1e-6)


def test_identical_images_give_minus_one_inside_the_brain(real_pair):
    _, fixed = real_pair
    crop = fixed[:, :, 20:44, 24:52, 20:44]  # central block, inside the brain: every window has texture
    assert (LocalNCCLoss(reduction="none")(crop, crop) < -0.999).all()
    assert abs(LocalNCCLoss()(crop, crop).item() + 1.0) < 1e-3


def test_whole_skull_stripped_scan_scores_its_brain_fraction(real_pair):
    _, fixed = real_pair
    ours = LocalNCCLoss()(fixed, fixed).item()
    reference = _monai(9)(fixed, fixed).item()
    # Background windows have no variance and count 0, so the mean is about minus the textured fraction.
    assert -0.7 < ours < -0.3
    assert abs(ours - reference) < 1e-4


@pytest.mark.parametrize("value", [0.0, 0.7, 0.9, 1000.0])
def test_constant_images_score_their_exact_value_with_finite_gradients(value):
    pred = torch.full((1, 1, 32, 32, 32), value, requires_grad=True)
    target = torch.full((1, 1, 32, 32, 32), value, requires_grad=True)
    loss = LocalNCCLoss()(pred, target)
    loss.backward()
    # Exact arithmetic (MONAI's definition in float64): interior windows are flat and count 0; the windows that reach
    # the zero padding see an edge and correlate perfectly, 1 - (24/32)^3 of them. float32 without the rounding floor
    # gave -16.3 here (MONAI's float32 LNCC too).
    exact = 0.0 if value == 0.0 else -(1.0 - (24 / 32) ** 3)
    reference = _monai(9)(pred.detach().double(), target.detach().double()).item()
    assert abs(reference - exact) < 1e-12
    assert abs(loss.item() - exact) < 1e-6
    assert torch.isfinite(pred.grad).all() and torch.isfinite(target.grad).all()


@pytest.mark.parametrize("noise", [0.02, 0.005, 0.003])
def test_nearly_flat_noisy_bright_images_match_float64(noise):
    generator = torch.Generator().manual_seed(11)
    target = 0.9 + noise * torch.randn(1, 1, 32, 32, 32, generator=generator, dtype=torch.float64)
    pred = 0.5 * target + 0.5 * (0.9 + noise * torch.randn(1, 1, 32, 32, 32, generator=generator, dtype=torch.float64))
    truth = _monai(9)(pred, target).item()
    ours = LocalNCCLoss()(pred.float(), target.float()).item()
    assert truth < -0.7  # correlated texture to measure, not a flat image
    assert abs(ours - truth) <= 0.01 * abs(truth)


def test_values_never_leave_the_exact_range():
    # Bright plateaus with faint texture, the windows where float32 rounding used to score beyond a perfect match.
    generator = torch.Generator().manual_seed(12)
    base = 500.0 + torch.rand(1, 1, 24, 28, 20, generator=generator).cumsum(2) * 1e-3
    pred = base + 1e-3 * torch.rand(base.shape, generator=generator)
    for squared, low in ((True, 0.0), (False, -1.0)):
        ncc = -LocalNCCLoss(reduction="none", squared=squared)(pred, base)
        assert torch.isfinite(ncc).all()
        assert ncc.min() >= low and ncc.max() <= 1.0


def test_gradients_equal_monai_autograd(real_pair):
    moving, fixed = real_pair
    moving = moving[:, :, 8:40, 10:50, 8:40]
    fixed = fixed[:, :, 8:40, 10:50, 8:40]
    grads = []
    for loss in (LocalNCCLoss(), _monai(9)):
        pred, target = moving.clone().requires_grad_(), fixed.clone().requires_grad_()
        loss(pred, target).backward()
        grads.append((pred.grad, target.grad))
    for ours, reference in zip(grads[0], grads[1]):
        scale = reference.abs().max()
        assert scale > 0
        assert torch.allclose(ours, reference, atol=1e-3 * scale, rtol=0)


def test_gradcheck_in_double_precision():
    generator = torch.Generator().manual_seed(5)
    pred = torch.rand(2, 1, 3, 4, 5, dtype=torch.float64, generator=generator, requires_grad=True)
    target = torch.rand(2, 1, 3, 4, 5, dtype=torch.float64, generator=generator, requires_grad=True)
    weights = torch.rand(2, 1, 3, 4, 5, dtype=torch.float64, generator=generator)
    loss = LocalNCCLoss(3, "none")
    assert torch.autograd.gradcheck(lambda p, t: (loss(p, t) * weights).sum(), (pred, target), fast_mode=True)


def test_only_pred_gradient_when_target_is_fixed(real_pair):
    moving, fixed = real_pair
    pred = moving.clone().requires_grad_()
    LocalNCCLoss()(pred, fixed).backward()
    assert fixed.grad is None and torch.isfinite(pred.grad).all() and pred.grad.abs().sum() > 0


def test_half_precision_input_is_computed_in_float32(real_pair):
    moving, fixed = real_pair
    ours = LocalNCCLoss()(moving.bfloat16(), fixed.bfloat16())
    reference = _monai(9)(moving.bfloat16().float(), fixed.bfloat16().float())
    assert ours.dtype == torch.bfloat16
    assert abs(ours.float().item() - reference.item()) < 1e-2  # bfloat16 output rounding only


def test_box_sum_paths_agree_and_match_a_direct_sum():
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(2, 6, 9, 11, dtype=torch.float64, generator=generator)
    for kernel_size in (1, 3, 9, 13):
        radius = kernel_size // 2
        padded = torch.nn.functional.pad(x, [radius] * 6)
        direct = padded.unfold(1, kernel_size, 1).unfold(2, kernel_size, 1).unfold(3, kernel_size, 1).sum((-1, -2, -3))
        assert torch.allclose(_box_sum_gemm(x, radius), direct)
        assert torch.allclose(_box_sum_shift(x, radius), direct)
        assert torch.allclose(box_sum(x, kernel_size), direct)


@pytest.mark.parametrize(
    "kwargs", [{"kernel_size": 8}, {"kernel_size": 0}, {"kernel_size": 9.0}, {"reduction": "max"}, {"smooth_dr": 0.0}]
)
def test_bad_arguments_raise(kwargs):
    with pytest.raises(ValueError):
        LocalNCCLoss(**kwargs)


def test_bad_shapes_raise_naming_the_shape():
    loss = LocalNCCLoss()
    with pytest.raises(ValueError, match=r"\(1, 8, 8, 8\)"):
        loss(torch.rand(1, 8, 8, 8), torch.rand(1, 8, 8, 8))
    with pytest.raises(ValueError, match=r"\(1, 1, 8, 8, 9\)"):
        loss(torch.rand(1, 1, 8, 8, 8), torch.rand(1, 1, 8, 8, 9))


def _eq1_direct(fixed, warped, window):
    """Eq. (1) of the SACB-Net supplementary material, written out window by window with zero padding:
    ncc(p) = sum_i (f_i - mean_f)(m_i - mean_m) / sqrt(sum_i (f_i - mean_f)^2 * sum_i (m_i - mean_m)^2)."""
    r = window // 2
    f = torch.nn.functional.pad(fixed[0, 0], (r,) * 6)
    m = torch.nn.functional.pad(warped[0, 0], (r,) * 6)
    f_windows = f.unfold(0, window, 1).unfold(1, window, 1).unfold(2, window, 1).reshape(*fixed.shape[2:], -1)
    m_windows = m.unfold(0, window, 1).unfold(1, window, 1).unfold(2, window, 1).reshape(*fixed.shape[2:], -1)
    fc = f_windows - f_windows.mean(-1, keepdim=True)
    mc = m_windows - m_windows.mean(-1, keepdim=True)
    var_f = (fc * fc).sum(-1).clamp_min(1e-5)
    var_m = (mc * mc).sum(-1).clamp_min(1e-5)
    return (fc * mc).sum(-1) / torch.sqrt(var_f * var_m)


def test_unsquared_option_is_equation_1_in_value_and_gradient(real_pair):
    """``squared=False`` computes the paper's Eq. (1) (w = 9) on a real pair: value and gradient equal a direct,
    window-by-window implementation of the formula; it differs from the squared form (signs of correlation count)."""
    moving, fixed = (image[..., 24:40, 28:46, 24:40].double() for image in real_pair)  # a 16x18x16 brain block
    moving.requires_grad_(True)
    loss = LocalNCCLoss(kernel_size=9, squared=False)(moving, fixed)
    reference = -_eq1_direct(fixed, moving, 9).mean()
    assert loss.item() == pytest.approx(reference.item(), rel=1e-9, abs=1e-12)
    (grad,) = torch.autograd.grad(loss, moving)
    (grad_ref,) = torch.autograd.grad(reference, moving)
    assert torch.allclose(grad, grad_ref, rtol=1e-7, atol=1e-12)
    squared = LocalNCCLoss(kernel_size=9)(moving.detach(), fixed)
    assert abs(squared.item() - loss.item()) > 1e-3
    negated = -moving.detach()  # a contrast-inverted image: Eq. (1) flips sign, the squared form cannot tell
    assert LocalNCCLoss(kernel_size=9, squared=False)(negated, fixed).item() == pytest.approx(-loss.item(), rel=1e-9)
    assert LocalNCCLoss(kernel_size=9)(negated, fixed).item() == pytest.approx(squared.item(), rel=1e-9)
