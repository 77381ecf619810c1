# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""Fast local (windowed) squared normalised cross-correlation loss, as SACB-Net trains with.

The definition is exactly MONAI's ``LocalNormalizedCrossCorrelationLoss(spatial_dims=3, kernel_type="rectangular")``
(zero-padded box windows, variances clamped at ``smooth_dr``); the implementation differs for speed:

- the five window sums (of pred, target, pred², target², pred·target) are computed in ONE batched pass;
- each window sum is separable: one 1-D box sum per axis. On CPU a 1-D box sum along an axis of length n is a
  multiplication by the n×n banded 0/1 matrix ``|i - j| <= r`` (one BLAS GEMM, exact zero-padding semantics, and as
  accurate as a direct sum because the zero entries add nothing); elsewhere it is ``kernel_size`` shifted additions;
- a custom ``autograd.Function`` whose backward is again box sums (a zero-padded box sum is self-adjoint), so the
  graph does not keep the many full-size intermediates that autograd would.

Numerical safety (float32). ``Σx² − (Σx)²/n`` cancels in bright, nearly flat windows: its rounding error is a few
machine epsilons of ``Σx²`` (a constant 0.9 volume gave −16.3 per voxel, MONAI's float32 LNCC too, where the exact
value is −0.58). So:

- a window variance below ``4 k ε Σx²`` (``k`` the window width, ``ε`` the machine epsilon of the compute dtype:
  4.3e-6 for window 9 in float32, a standard deviation below 0.2 % of the window's root mean square) is rounding
  noise: the window counts as flat, with variance and cross term 0, as exact arithmetic gives for a flat window.
  Below ``smooth_dr`` the variance is clamped as in MONAI;
- the squared NCC is clamped to [0, 1] and the unsquared one to [−1, 1], their exact ranges (Cauchy–Schwarz).

Subtracting the image mean first would help bright windows near that mean and hurt windows far from it (e.g. the
near-zero background edges of a skull-stripped brain), and exact local shifts cost as much as float64 sums; measured
on the real pair, the floor alone keeps every value within MONAI's own float32 accuracy.
"""

from __future__ import annotations

import torch
from torch.nn.modules.loss import _Loss

__all__ = ["LocalNCCLoss", "box_sum"]

_REDUCTIONS = ("mean", "sum", "none")
# A window variance below (this factor x window width x machine epsilon) x the window's sum of squares is rounding
# noise of Σx² − (Σx)²/n. The rounding grows with the summation length (three passes of kernel_size terms): measured on
# constant volumes (0.0033 to 1000, float32) the residual reaches 1.9 ε, 3.6 ε and 10 ε of Σx² for windows 3, 9, 15;
# the floor (12 ε, 36 ε, 60 ε there) keeps a margin of 3 or more without flattening real texture: a window counts as
# flat below a standard deviation of 0.2 % of its root mean square (window 9, float32).
_VARIANCE_FLOOR_PER_WIDTH = 4.0
# Beyond this axis length the banded GEMM does more arithmetic than it saves in memory traffic.
_MAX_GEMM_AXIS = 512


def _band_matrix(length: int, radius: int, like: torch.Tensor) -> torch.Tensor:
    """(length, length) 0/1 matrix with ones where ``|i - j| <= radius`` (symmetric)."""
    index = torch.arange(length, device=like.device)
    return ((index[:, None] - index[None, :]).abs() <= radius).to(like.dtype)


def _box_sum_gemm(x: torch.Tensor, radius: int) -> torch.Tensor:
    """Zero-padded box sum of ``x`` (N, D, H, W) along the three last axes, one banded GEMM per axis."""
    n, d, h, w = x.shape
    x = x @ _band_matrix(w, radius, x)  # along W
    x = _band_matrix(h, radius, x) @ x  # along H, batched over (N, D)
    x = _band_matrix(d, radius, x) @ x.reshape(n, d, h * w)  # along D, batched over N
    return x.reshape(n, d, h, w)


def _box_sum_shift(x: torch.Tensor, radius: int) -> torch.Tensor:
    """Zero-padded box sum of ``x`` (N, D, H, W) along the three last axes by shifted additions."""
    for axis in (1, 2, 3):
        length = x.shape[axis]
        pad_shape = list(x.shape)
        pad_shape[axis] = length + 2 * radius
        padded = x.new_zeros(pad_shape)
        padded.narrow(axis, radius, length).copy_(x)
        out = padded.narrow(axis, 0, length).clone()
        for shift in range(1, 2 * radius + 1):
            out += padded.narrow(axis, shift, length)
        x = out
    return x


def box_sum(x: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """
    Sum of ``x`` over a cubic ``kernel_size`` window centred on every voxel, with zeros outside the volume.

    Args:
        x: (N, D, H, W) floating tensor, any device.
        kernel_size: odd window width.

    Returns:
        (N, D, H, W) tensor of window sums (same dtype and device as ``x``).
    """
    radius = kernel_size // 2
    x = x.contiguous()
    if x.device.type == "cpu" and max(x.shape[1:]) <= _MAX_GEMM_AXIS:
        return _box_sum_gemm(x, radius)
    return _box_sum_shift(x, radius)


def _window_sums(t: torch.Tensor, p: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """(M, D, H, W) target and prediction -> the stacked window sums (5, M, D, H, W) of t, p, t², p², t·p, in one
    batched box-sum pass instead of five separate filterings."""
    return box_sum(torch.cat((t, p, t * t, p * p, t * p)), kernel_size).reshape(5, *p.shape)


def _window_statistics(sums: torch.Tensor, window_volume: float, smooth_dr: float, variance_floor: float):
    """
    Cross term, clamped variances and "has variance" masks from the stacked window sums (5, M, D, H, W) of t, p, t²,
    p², t·p. A variance counts as zero below ``smooth_dr`` or below ``variance_floor`` times the window's sum of squares
    (the float32 rounding of the difference is relative to that sum).
    """
    t_sum, p_sum, t2_sum, p2_sum, tp_sum = sums.unbind(0)
    cross = tp_sum - p_sum * t_sum / window_volume
    t_var = t2_sum - t_sum * t_sum / window_volume
    p_var = p2_sum - p_sum * p_sum / window_volume
    # Below the relative floor the computed variance is rounding noise: the window is flat, and so is its cross term
    # (exactly 0 in exact arithmetic). Below smooth_dr alone the variance is clamped as MONAI does.
    t_free = t_var > variance_floor * t2_sum
    p_free = p_var > variance_floor * p2_sum
    cross.masked_fill_(~(t_free & p_free), 0.0)
    t_free &= t_var > smooth_dr
    p_free &= p_var > smooth_dr
    return t_sum, p_sum, cross, t_var.masked_fill_(~t_free, smooth_dr), p_var.masked_fill_(~p_free, smooth_dr), t_free, p_free


class _LocalSquaredNCC(torch.autograd.Function):
    """Voxel-wise squared local NCC map; backward expressed with box sums instead of an autograd graph."""

    @staticmethod
    def forward(ctx, pred, target, kernel_size: int, smooth_nr: float, smooth_dr: float, variance_floor: float):  # type: ignore[override]
        shape = pred.shape
        p = pred.reshape(-1, *shape[2:])
        t = target.reshape(-1, *shape[2:])
        sums = _window_sums(t, p, kernel_size)
        window_volume = float(kernel_size**3)
        t_sum, p_sum, cross, t_var, p_var, t_free, p_free = _window_statistics(sums, window_volume, smooth_dr, variance_floor)
        del sums
        ncc = (cross * cross + smooth_nr) / (t_var * p_var)
        if smooth_nr == 0.0:
            # Cauchy-Schwarz bounds the exact value by 1; beyond it only rounding speaks (a guard on the value: the
            # gradient is the unclamped one, continuous at the bound).
            ncc.clamp_max_(1.0)
        ctx.save_for_backward(pred, target, t_sum, p_sum, cross, t_var, p_var, t_free, p_free)
        ctx.kernel_size, ctx.smooth_nr, ctx.window_volume = kernel_size, smooth_nr, window_volume
        return ncc.reshape(shape)

    @staticmethod
    def backward(ctx, grad_ncc):  # type: ignore[override]
        with torch.autocast(device_type=grad_ncc.device.type, enabled=False):
            return _LocalSquaredNCC._backward(ctx, grad_ncc)

    @staticmethod
    def _backward(ctx, grad_ncc):
        pred, target, t_sum, p_sum, cross, t_var, p_var, t_free, p_free = ctx.saved_tensors
        need_pred, need_target = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        shape = pred.shape
        p = pred.reshape(-1, *shape[2:])
        t = target.reshape(-1, *shape[2:])
        n = ctx.window_volume
        # ncc = (c² + nr) / (tv · pv) with c = Σtp − ΣpΣt/n, tv = Σt² − (Σt)²/n (or dr where flat), pv likewise.
        ratio = grad_ncc.reshape(p.shape) / (t_var * p_var)
        scaled_ncc = (cross * cross + ctx.smooth_nr) * ratio  # grad · ncc
        d_tp = 2.0 * cross * ratio  # ∂/∂Σtp (zero where a variance is flat: the cross term is held at 0 there)
        grad_pred = grad_target = None
        if need_pred:
            # ∂/∂Σp², zero where the variance is clamped
            d_p2 = torch.where(p_free, -scaled_ncc / p_var, 0.0)
            d_p = -(t_sum * d_tp + 2.0 * p_sum * d_p2) / n  # ∂/∂Σp
            # The adjoint of a zero-padded box sum is the same box sum.
            g_p, g_p2, g_tp = box_sum(torch.cat((d_p, d_p2, d_tp)), ctx.kernel_size).reshape(3, *p.shape)
            grad_pred = (g_p + 2.0 * p * g_p2 + t * g_tp).reshape(shape)
        if need_target:
            d_t2 = torch.where(t_free, -scaled_ncc / t_var, 0.0)
            d_t = -(p_sum * d_tp + 2.0 * t_sum * d_t2) / n
            g_t, g_t2, g_tp = box_sum(torch.cat((d_t, d_t2, d_tp)), ctx.kernel_size).reshape(3, *t.shape)
            grad_target = (g_t + 2.0 * t * g_t2 + p * g_tp).reshape(shape)
        return grad_pred, grad_target, None, None, None, None


def _local_unsquared_ncc(
    pred: torch.Tensor, target: torch.Tensor, kernel_size: int, smooth_dr: float, variance_floor: float
) -> torch.Tensor:
    """Voxel-wise unsquared local NCC map ``cross / sqrt(var_t var_p)`` (autograd through the box sums)."""
    shape = pred.shape
    sums = _window_sums(target.reshape(-1, *shape[2:]), pred.reshape(-1, *shape[2:]), kernel_size)
    _, _, cross, t_var, p_var, _, _ = _window_statistics(sums, float(kernel_size**3), smooth_dr, variance_floor)
    return (cross * torch.rsqrt(t_var * p_var)).clamp(-1.0, 1.0).reshape(shape)


class LocalNCCLoss(_Loss):
    """
    Negative local normalised cross-correlation over cubic windows (the image loss SACB-Net trains with).

    ``squared=True`` (default): the squared form of SACB-Net's official code and of MONAI's LNCC, always in [0, 1] per
    window, so anti-correlated windows also count as matched. ``squared=False``: Eq. (1) of the SACB-Net supplementary
    material, ``ncc = cross / sqrt(var_t · var_p)`` in [-1, 1] per window (the sign of the correlation counts); computed
    with autograd through the same box sums.

    Same value as ``monai.losses.LocalNormalizedCrossCorrelationLoss(spatial_dims=3, kernel_type="rectangular")``:
    in each zero-padded window, ``ncc = (cross² + smooth_nr) / (max(var_t, smooth_dr) · max(var_p, smooth_dr))``
    with window sums (not means) for ``cross`` and ``var``; windows without variance (e.g. background) count 0, so
    identical textured images give −1 and a whole skull-stripped scan gives roughly −(brain fraction). A constant
    image scores minus the fraction of windows that reach the zero padding (−0.578 for 32³ voxels and window 9), as
    MONAI's definition does in exact arithmetic; in float32 the values stay in the exact range (see the module notes).
    Channels are treated independently. Half-precision inputs are computed in float32 (variance cancellation).

    Args:
        kernel_size: odd window width (voxels), >= 1. Defaults to 9 (SACB-Net).
        reduction: ``"mean"`` (over batch, channels and voxels), ``"sum"`` or ``"none"`` (the (B, C, D, H, W) map).
        smooth_nr: constant added to the squared cross term, >= 0.
        smooth_dr: lower clamp of each window variance, > 0 (keeps constant images finite).
        squared: square the correlation (MONAI LNCC, official code) or not (the paper's Eq. (1)).

    Shapes:
        pred, target: (B, C, D, H, W). Output: scalar, or (B, C, D, H, W) for ``reduction="none"``.
    """

    def __init__(
        self,
        kernel_size: int = 9,
        reduction: str = "mean",
        smooth_nr: float = 0.0,
        smooth_dr: float = 1e-5,
        squared: bool = True,
    ) -> None:
        if reduction not in _REDUCTIONS:
            raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
        super().__init__(reduction=reduction)
        if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be an odd integer >= 1, got {kernel_size!r}")
        if smooth_nr < 0:
            raise ValueError(f"smooth_nr must be >= 0, got {smooth_nr}")
        if not smooth_dr > 0:
            raise ValueError(f"smooth_dr must be > 0 (it keeps constant windows finite), got {smooth_dr}")
        self.kernel_size = kernel_size
        self.smooth_nr = float(smooth_nr)
        self.smooth_dr = float(smooth_dr)
        self.squared = bool(squared)

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """
        Args:
            pred: (B, C, D, H, W), e.g. the warped moving image.
            target: (B, C, D, H, W), e.g. the fixed image.
        """
        if pred.ndim != 5:
            raise ValueError(f"pred must be 5-D (B, C, D, H, W), got shape {tuple(pred.shape)}")
        if target.shape != pred.shape:
            raise ValueError(f"target shape {tuple(target.shape)} differs from pred shape {tuple(pred.shape)}")
        if not pred.is_floating_point() or not target.is_floating_point():
            raise ValueError(f"pred and target must be floating point, got {pred.dtype} and {target.dtype}")
        out_dtype = torch.promote_types(pred.dtype, target.dtype)
        compute_dtype = torch.promote_types(out_dtype, torch.float32)
        # Autocast would run the GEMMs in half precision; the variance cancellation needs float32.
        variance_floor = _VARIANCE_FLOOR_PER_WIDTH * self.kernel_size * torch.finfo(compute_dtype).eps
        with torch.autocast(device_type=pred.device.type, enabled=False):
            pred, target = pred.to(compute_dtype), target.to(compute_dtype)
            if self.squared:
                ncc = _LocalSquaredNCC.apply(
                    pred, target, self.kernel_size, self.smooth_nr, self.smooth_dr, variance_floor
                )
            else:
                ncc = _local_unsquared_ncc(pred, target, self.kernel_size, self.smooth_dr, variance_floor)
            if self.reduction == "mean":
                loss = ncc.mean().neg()
            elif self.reduction == "sum":
                loss = ncc.sum().neg()
            else:
                loss = ncc.neg()
        return loss.to(out_dtype)
