# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""
Rigid (6 parameters) or affine (12 parameters) registration of a moving image onto a fixed one in physical space.

Everything happens in world coordinates (RAS mm, as nibabel/MONAI give the voxel-to-world affines), so the two images
may differ in shape, spacing and orientation (LIA vs RAS). The result ``T`` maps a fixed-space world point to the
moving-space world point it should sample (ITK/ANTs convention): ``resampled(x) = moving(T x)``. Sampling goes through
:mod:`scripts.layers.sampling` (``grid_sample``, ``align_corners=True``), on the inputs' device.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import product

import torch
import torch.nn.functional as F
from monai.losses import GlobalMutualInformationLoss, LocalNormalizedCrossCorrelationLoss
from monai.networks.layers.convutils import gaussian_1d

from scripts.engines.field_refinement import loss_has_converged
from scripts.io.progress import Progress
from scripts.layers.intensity import AUTO_BACKGROUND, check_background, check_intensity_window, resolve_background
from scripts.layers.intensity import window_intensity
# resample_moving is imported from here by scripts.workflow.alignment; it lives in the sampling module
from scripts.layers.sampling import SLAB_VOXELS, batch_matrices, grid_sample_matrix, sample_points

__all__ = ["AffineRegistration", "check_affine_result", "normalize_intensity"]


def normalize_intensity(image: torch.Tensor, lower: float = 1.0, upper: float = 99.0) -> torch.Tensor:
    """Scale each item of ``image`` (B, C, ...) so its ``lower``/``upper`` percentiles map to 0/1, clamped to [0, 1].

    Raises ValueError for an image whose percentiles coincide (constant or nearly empty image)."""
    flat = image.reshape(image.shape[0], -1).float()
    lo, hi = (flat.kthvalue(round(q / 100 * (flat.shape[1] - 1)) + 1, dim=1).values for q in (lower, upper))
    if (hi - lo <= 1e-12 * hi.abs().clamp_min(1.0)).any():
        raise ValueError(f"image intensities are constant between percentiles {lower} and {upper}: {lo.tolist()}")
    shape = (-1,) + (1,) * (image.ndim - 1)
    return ((image.float() - lo.view(shape)) / (hi - lo).view(shape)).clamp(0.0, 1.0)


def _index_points(shape: Sequence[int], affine: torch.Tensor, dtype=torch.float64) -> torch.Tensor:
    """World points (X, Y, Z, 3) of every voxel of a grid with voxel-to-world ``affine`` (4, 4)."""
    axes = [torch.arange(int(k), dtype=dtype, device=affine.device) for k in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), -1) @ affine[:3, :3].T.to(dtype) + affine[:3, 3].to(dtype)


def check_affine_result(matrix, min_scale: float = 0.5, max_scale: float = 2.0) -> torch.Tensor:
    """Raise ValueError for a degenerate result ``matrix`` (4, 4) or (B, 4, 4): non-finite, determinant <= 0, or a
    singular value of the linear part (scaling along any axis) outside [min_scale, max_scale]; else return it."""
    matrix = torch.as_tensor(matrix, dtype=torch.float64)
    if matrix.shape[-2:] != (4, 4) or not torch.isfinite(matrix).all():
        raise ValueError(f"affine result must be a finite (..., 4, 4) matrix, got shape {tuple(matrix.shape)}")
    det = torch.linalg.det(matrix[..., :3, :3])
    if (det <= 0).any():
        raise ValueError(f"degenerate affine result: determinant {det.tolist()} <= 0 (a reflection or collapse)")
    scales = torch.linalg.svdvals(matrix[..., :3, :3])
    if (scales < min_scale).any() or (scales > max_scale).any():
        raise ValueError(f"degenerate affine result: axis scalings {scales.tolist()} not in [{min_scale}, {max_scale}]")
    return matrix


def _blur_axis(image: torch.Tensor, kernel: Sequence[float], axis: int) -> torch.Tensor:
    """Convolve ``image`` (1, C, X, Y, Z) along spatial ``axis`` (0-2) with an odd, centred 1-D ``kernel``, zeros
    outside the image (as MONAI's ``separable_filtering``): a weighted sum of the ``len(kernel)`` shifted copies.

    The same values as the convolution up to float rounding, at a fraction of its CPU time: a depthwise ``conv3d``
    with a (k, 1, 1) kernel runs on PyTorch's slow generic path on CPU (1.3 s for a 155 x 205 x 166 brain with
    9 taps, one thread), while k fused multiply-adds over the volume take 0.03 s."""
    reach, size, dim = len(kernel) // 2, image.shape[2 + axis], 2 + axis
    pad = [0, 0] * 3
    pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = reach
    padded = F.pad(image, pad)
    out = padded.narrow(dim, 0, size) * kernel[0]
    for shift in range(1, len(kernel)):
        out.add_(padded.narrow(dim, shift, size), alpha=kernel[shift])
    return out


def _gaussian_blur(image: torch.Tensor, sigma: Sequence[float], max_voxels: int = 4 * SLAB_VOXELS):
    """MONAI's ``GaussianFilter(3, sigma)`` of ``image`` (1, C, X, Y, Z) (its ``gaussian_1d`` kernels, "erf",
    truncated at 4 sigma, zeros outside), one axis at a time by :func:`_blur_axis`, and one slab at a time along the
    axis of the smallest sigma, each slab with its kernel's reach of neighbouring data either side.

    Slabs bound the memory on large volumes (each axis holds a padded copy and the output: about 3 copies of a slab);
    they give the same values up to float rounding (differences ~1e-7 on [0, 1] images)."""
    kernels = [gaussian_1d(torch.tensor(float(s)), truncated=4.0, approx="erf").tolist() for s in sigma]

    def blur(part: torch.Tensor) -> torch.Tensor:
        for axis, kernel in enumerate(kernels):
            part = _blur_axis(part, kernel, axis)
        return part

    axis = 2 + min(range(3), key=lambda i: sigma[i])
    size, plane = image.shape[axis], image[0, 0].numel() // max(image.shape[axis], 1)
    depth = max(max_voxels // max(plane, 1), 1)
    if depth >= size:
        return blur(image)
    reach = len(kernels[axis - 2]) // 2
    out = torch.empty_like(image)
    for start in range(0, size, depth):
        stop = min(start + depth, size)
        lo, hi = max(start - reach, 0), min(stop + reach, size)
        blurred = blur(image.narrow(axis, lo, hi - lo))
        out.narrow(axis, start, stop - start).copy_(blurred.narrow(axis, start - lo, stop - start))
    return out


def _interpolate_axis(image: torch.Tensor, positions: torch.Tensor, axis: int) -> torch.Tensor:
    """Linear interpolation of ``image`` (1, C, X, Y, Z) along spatial ``axis`` (0-2) at voxel ``positions`` (n,)
    float64, clamped to the image (``grid_sample``'s border padding, ``align_corners=True``); (1, C, ..., n, ...)."""
    size, dim = image.shape[2 + axis], 2 + axis
    positions = positions.clamp(0, size - 1)
    own = torch.arange(size, dtype=positions.dtype, device=positions.device)
    if len(positions) == size and torch.equal(positions, own):
        return image  # the level grid is the image's own along this axis (a 1 mm scan's 1 mm level): nothing to do
    lower = positions.floor().clamp(max=max(size - 2, 0)).long()
    weight = (positions - lower).to(image.dtype).view([-1 if d == dim else 1 for d in range(image.ndim)])
    upper = (lower + 1).clamp(max=size - 1)
    below = image.index_select(dim, lower)
    return below + weight * (image.index_select(dim, upper) - below)


def _resample_level(image: torch.Tensor, affine: torch.Tensor, spacing: float, blur_mm: float, done_mm):
    """Blur ``image`` (1, 1, X, Y, Z) to a Gaussian sigma of ``blur_mm`` (it has ``done_mm`` already, per axis) and
    sample it on an isotropic grid of ``spacing`` mm along its own axes, centred on and covering its field of view.

    The level grid's axes are the image's, so trilinear sampling is three 1-D linear interpolations, one axis at a
    time (:func:`_interpolate_axis`): the values of ``grid_sample`` at every grid point up to float rounding, without
    a coordinate per point (the moving image's finest level has as many points as the image).

    Returns (values (1, 1, n0, n1, n2), the level's voxel-to-world affine (4, 4) float64)."""
    voxel_mm = affine[:3, :3].norm(dim=0)
    sigma = (blur_mm**2 - torch.as_tensor(done_mm, device=affine.device) ** 2).clamp_min(0.0).sqrt() / voxel_mm
    values = image if sigma.max() < 0.2 else _gaussian_blur(image, sigma.clamp_min(0.05).tolist())
    shape = torch.tensor(image.shape[2:], dtype=torch.float64, device=image.device)
    n, step = (shape * voxel_mm / spacing).round().clamp_min(2), spacing / voxel_mm
    index_to_voxel = torch.eye(4, dtype=torch.float64, device=image.device)
    index_to_voxel[:3, :3], index_to_voxel[:3, 3] = torch.diag(step), (shape - 1) / 2 - step * (n - 1) / 2
    for axis in range(3):
        index = torch.arange(int(n[axis]), dtype=torch.float64, device=image.device)
        values = _interpolate_axis(values, index_to_voxel[axis, 3] + step[axis] * index, axis)
    return values, affine @ index_to_voxel


def _pyramid_images(image: torch.Tensor, affine: torch.Tensor, levels_mm: Sequence[float], oversample: int) -> dict:
    """{spacing: (values, level affine)}: blurred to sigma = spacing / 2 mm, sampled every spacing / oversample mm;
    each level is made from the next finer one, so the large blurs run on small images."""
    out, source, done = {}, (image, affine), 0.5 * affine[:3, :3].norm(dim=0)
    for spacing in sorted(set(levels_mm)):
        out[spacing] = source = _resample_level(*source, spacing / oversample, 0.5 * spacing, done)
        done = 0.5 * spacing
    return out


def _moments(values: torch.Tensor, world: torch.Tensor):
    """Centre (3,) and covariance (3, 3) of world points (..., 3) weighted by intensities ``values`` (same size)."""
    w, x = values.reshape(-1, 1).double(), world.reshape(-1, 3)
    centre = (w * x).sum(0) / w.sum()
    return centre, ((x - centre) * w).T @ (x - centre) / w.sum()


def _rotation_candidates(cov_fixed: torch.Tensor, cov_moving: torch.Tensor) -> list[torch.Tensor]:
    """Identity plus the 4 proper rotations mapping fixed principal axes (3, 3) onto moving ones (axis signs)."""
    (_, e_f), (_, e_m) = torch.linalg.eigh(cov_fixed), torch.linalg.eigh(cov_moving)
    rotations = [e_m @ torch.diag(e_m.new_tensor(signs)) @ e_f.T for signs in product((1.0, -1.0), repeat=3)]
    return [torch.eye(3, dtype=e_m.dtype, device=e_m.device)] + [r for r in rotations if torch.linalg.det(r) > 0]


class AffineRegistration(torch.nn.Module):
    """
    Multi-resolution rigid/affine registration in world space with Adam (no randomness).

    Per level the fixed image is blurred (Gaussian sigma = spacing / 2) and resampled on an isotropic grid of that
    spacing along its own axes covering its field of view; the moving image, blurred alike on a grid twice as fine,
    is sampled at ``T x`` for those points, and where ``T x`` leaves the moving field of view it reads the moving
    image's background. Intensities are scaled per image by their 1st-99th percentiles (values below a numeric
    ``background`` clipped to it first), or clipped to ``intensity_window`` and scaled linearly.
    ``last_report`` (after ``forward``): losses (lower is better) at the finest level for the centre-of-mass start
    (``initial_loss``), T = identity (``identity_loss``) and the result (``final_loss``), batch means; per item
    under ``"items"`` with ``candidate_losses`` and ``levels`` (per level its planned ``iterations``, the ``steps``
    taken, its fixed ``points`` and its start/end losses).

    Args:
        transform: ``"rigid"`` (rotation about the fixed centre of mass + translation) or ``"affine"`` (12 parameters).
        levels_mm: grid spacings, coarse to fine. iterations: Adam steps per level (learning rate decays linearly to
            10 % within a level), at most: see ``tolerance``. Halving them (50, 30, 15) kept the Dice of brain pairs
            but lowered a whole head's (docs/benchmarks.md, "The affine stage tuned for time").
        learning_rate: at the first level, times spacing / first spacing after it;
            rotations and the linear part are in radians / unitless, translations in units of the fixed image's
            radius of gyration, so one step moves the brain surface by about ``learning_rate`` * radius mm.
        similarity: ``"ncc"`` global NCC (one contrast), ``"lncc"`` MONAI's local NCC (``lncc_kernel`` grid voxels),
            ``"mi"`` MONAI's ``GlobalMutualInformationLoss`` (``mi_bins`` bins; two contrasts).
        init: ``"moments"``: centres of mass, then the best (loss after ``search_iterations`` steps at the first
            level) of the identity rotation and the 4 principal-axes rotations, which covers the eigenvectors' sign
            ambiguity; ``"com"``: centres of mass only; ``"identity"``: start from T = identity.
        intensity_window: ``(low, high)`` raw values scaled to [0, 1] instead of percentiles (e.g. (-1000, 1000) for
            CT in HU), or None. background: the raw background, ``"auto"`` (each image's minimum) or a number (-1024
            for CT); see :mod:`scripts.layers.intensity`.
        tolerance: early stop within each level: end it once the mean loss of the last ``tolerance_window`` steps
            improved on the window before by less than this fraction of its magnitude
            (:py:func:`scripts.engines.loss_has_converged`, as the field refinement); 0 runs every step. The NCC loss
            is near -1 at the coarse levels, so useful values are small (1e-5: the mean loss moved by 0.001 %).
            The start search always runs its ``search_iterations`` (its candidates are compared after equal work).
        tolerance_window: steps per window of the early stop (>= 1).
    """

    def __init__(self, transform: str = "affine", levels_mm: Sequence[float] = (6.0, 4.0, 2.0),
                 iterations: Sequence[int] = (100, 60, 30), learning_rate: float = 0.02, similarity: str = "ncc",
                 init: str = "moments", search_iterations: int = 20, lncc_kernel: int = 5, mi_bins: int = 32,
                 intensity_window: Sequence[float] | None = None, background: float | str = AUTO_BACKGROUND,
                 tolerance: float = 0.0, tolerance_window: int = 10):
        super().__init__()
        self.intensity_window, self.background = check_intensity_window(intensity_window), check_background(background)
        levels_mm, iterations = tuple(float(v) for v in levels_mm), tuple(int(v) for v in iterations)
        for name, allowed in (("transform", ("rigid", "affine")), ("init", ("moments", "com", "identity")),
                              ("similarity", ("ncc", "lncc", "mi"))):
            if locals()[name] not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {locals()[name]!r}")
        for name, bad, need in (
            ("levels_mm", not levels_mm or min(levels_mm) <= 0, "a non-empty sequence of spacings > 0"),
            ("iterations", len(iterations) != len(levels_mm) or min(iterations, default=0) < 0,
             f"one count >= 0 per level ({len(levels_mm)} levels)"),
            ("learning_rate", not learning_rate > 0, "> 0"), ("search_iterations", search_iterations < 0, ">= 0"),
            ("lncc_kernel", lncc_kernel < 3 or lncc_kernel % 2 == 0, "odd and >= 3"), ("mi_bins", mi_bins < 4, ">= 4"),
            ("tolerance", not tolerance >= 0, ">= 0 (0: no early stop)"),
            ("tolerance_window", tolerance_window < 1, ">= 1"),
        ):
            if bad:
                raise ValueError(f"{name} must be {need}, got {locals()[name]!r}")
        self.transform, self.levels_mm, self.iterations, self.init = transform, levels_mm, iterations, init
        self.learning_rate, self.search_iterations, self.similarity = learning_rate, search_iterations, similarity
        self.tolerance, self.tolerance_window = float(tolerance), int(tolerance_window)
        self.loss_fn = {"ncc": None, "lncc": LocalNormalizedCrossCorrelationLoss(3, kernel_size=lncc_kernel),
                        "mi": GlobalMutualInformationLoss(num_bins=mi_bins)}[similarity]
        self.last_report: dict = {}

    def _level_points(self, fixed_l: torch.Tensor, world: torch.Tensor) -> dict:
        """The fixed level's foreground (dilated by 2 grid voxels) as (1, 1, N) values and (1, N, 3) world points
        (for MI every k-th, at most 2^16: its histograms are costly); for LNCC the foreground's bounding box."""
        mask = F.max_pool3d((fixed_l > 0.01).float(), 5, stride=1, padding=2)[0, 0] > 0
        if self.similarity == "lncc":
            box = tuple(slice(int(i.min()), int(i.max()) + 1) for i in mask.nonzero().unbind(1))
            return {"fixed": fixed_l[(..., *box)], "world": world[box].reshape(1, -1, 3).float()}
        index = mask.reshape(-1).nonzero()[:, 0]
        index = index[:: -(-len(index) // 2**16)] if self.similarity == "mi" else index
        return {"fixed": fixed_l.reshape(1, 1, -1)[..., index], "world": world.reshape(1, -1, 3)[:, index].float()}

    def _loss(self, warped: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        """Similarity loss (lower is better) of two (1, 1, n0, n1, n2) level images or (1, 1, N) point values."""
        if self.loss_fn is not None:
            return self.loss_fn(warped, fixed)
        a, b = warped.reshape(-1) - warped.mean(), fixed.reshape(-1) - fixed.mean()
        return -(a * b).sum() / ((a * a).sum() * (b * b).sum()).clamp_min(1e-12).sqrt()

    def _matrix(self, params: torch.Tensor, frame: dict) -> torch.Tensor:
        """(4, 4) world matrix in the dtype of ``params``: T x = L R0 (x - c_f) + c_m + radius * t."""
        dtype, device, rot0 = params.dtype, params.device, frame["rotation"].to(params.dtype)
        if self.transform == "rigid":
            w, zero = params[:3], torch.zeros((), dtype=dtype, device=device)
            skew = torch.stack([zero, -w[2], w[1], w[2], zero, -w[0], -w[1], w[0], zero]).view(3, 3)
            linear = torch.linalg.matrix_exp(skew) @ rot0
        else:
            linear = (torch.eye(3, dtype=dtype, device=device) + params[:9].view(3, 3)) @ rot0
        shift = frame["c_m"].to(dtype) + frame["radius"] * params[-3:] - linear @ frame["c_f"].to(dtype)
        bottom = torch.tensor([[0, 0, 0, 1]], dtype=dtype, device=device)
        return torch.cat([torch.cat([linear, shift[:, None]], 1), bottom], 0)

    def _level_loss(self, matrix: torch.Tensor, level: dict) -> torch.Tensor:
        """Loss of the moving level image sampled at ``matrix`` x for the level's fixed points x."""
        to_grid = (level["to_grid"].to(matrix.dtype) @ matrix)[None]
        warped = sample_points(level["moving"], level["world"], to_grid, padding_value=level["fill"])
        return self._loss(warped.reshape(level["fixed"].shape), level["fixed"])

    @torch.no_grad()
    def _score(self, matrix: torch.Tensor, level: dict) -> float:
        """The loss of ``matrix`` at ``level`` as a float (no gradient)."""
        return float(self._level_loss(matrix, level))

    def _optimize(self, params: torch.Tensor, frame: dict, level: dict, steps: int, lr: float,
                  progress: Progress | None = None, tolerance: float = 0.0) -> tuple[torch.Tensor, int]:
        """Up to ``steps`` Adam steps with a linearly decaying learning rate (to 10 % at ``steps``), ending early by
        :py:func:`loss_has_converged` (``tolerance``, ``self.tolerance_window``); returns (new parameters, steps)."""
        params = params.detach().clone().requires_grad_(True)
        opt, losses = torch.optim.Adam([params], lr=lr), []
        for k in range(steps):
            opt.param_groups[0]["lr"] = lr * (1.0 - 0.9 * k / steps)
            opt.zero_grad(set_to_none=True)
            loss = self._level_loss(self._matrix(params, frame), level)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            if progress is not None and progress.active:
                progress.update(1, loss=losses[-1])
            if loss_has_converged(losses, tolerance, self.tolerance_window):
                if progress is not None and progress.active:
                    progress.update(steps - k - 1)  # the bar counts the level's planned steps
                break
        return params.detach(), len(losses)

    def scaled_intensity(self, image: torch.Tensor) -> tuple[torch.Tensor, float]:
        """A (1, 1, X, Y, Z) raw image -> (its intensities on the stage's [0, 1] scale, its background on that scale:
        the value the moving image reads outside its field of view)."""
        background = resolve_background(image, self.background)
        if self.intensity_window is not None:
            low, high = self.intensity_window
            return window_intensity(image, self.intensity_window), min(max((background - low) / (high - low), 0.0), 1.0)
        # scanner padding below a numeric background is background: clipped, it no longer sets the percentiles
        clipped = image if self.background == AUTO_BACKGROUND else image.clamp_min(background)
        return normalize_intensity(clipped), 0.0  # the clipped minimum is at or below the 1st percentile: 0 scaled

    def _pyramid(self, moving, fixed, a_m, a_f):
        """Per level: fixed points/values, the moving level image, its world -> grid_sample map and its background
        (``fill``); and a frame with the centres of mass ``c_f``/``c_m`` (3,) and covariances (3, 3) of both images at
        the first level."""
        (fixed_n, _), (moving_n, fill) = self.scaled_intensity(fixed), self.scaled_intensity(moving)
        fixed_p = _pyramid_images(fixed_n, a_f, self.levels_mm, 1)
        moving_p = _pyramid_images(moving_n, a_m, self.levels_mm, 2)  # finer: interpolation
        levels = []
        for spacing in self.levels_mm:
            (fixed_l, fixed_a), (moving_l, moving_a) = fixed_p[spacing], moving_p[spacing]
            to_grid = grid_sample_matrix(moving_l.shape[2:], a_m.device) @ torch.linalg.inv(moving_a)
            points = self._level_points(fixed_l, _index_points(fixed_l.shape[2:], fixed_a))
            levels.append(points | {"moving": moving_l, "to_grid": to_grid, "fill": fill})
        (c_f, cov_f), (c_m, cov_m) = (_moments(v, _index_points(v.shape[2:], a))
                                      for v, a in (fixed_p[self.levels_mm[0]], moving_p[self.levels_mm[0]]))
        frame = {"c_f": c_f, "c_m": c_f if self.init == "identity" else c_m, "cov_f": cov_f, "cov_m": cov_m,
                 "radius": float(cov_f.trace().sqrt()), "rotation": torch.eye(3, dtype=c_f.dtype, device=c_f.device)}
        return levels, frame

    def _start_rotations(self, frame: dict) -> list[torch.Tensor]:
        """The start rotations that :meth:`_pick_start` tries (none without the moments initialisation)."""
        return _rotation_candidates(frame["cov_f"], frame["cov_m"]) if self.init == "moments" else []

    def _pick_start(self, params: torch.Tensor, frame: dict, level: dict, rotations: Sequence[torch.Tensor],
                    progress: Progress | None = None):
        """Try each start rotation for ``search_iterations`` steps at ``level``; returns (params, frame, losses)."""
        if not rotations:
            return params, frame, []
        best, scores = None, []
        for rotation in rotations:
            trial = dict(frame, rotation=rotation)
            p, _ = self._optimize(params, trial, level, self.search_iterations, self.learning_rate, progress)
            scores.append(self._score(self._matrix(p, trial), level))
            best = (p, trial) if best is None or scores[-1] < min(scores[:-1]) else best
        return *best, scores

    def _register_one(self, moving, fixed, a_m, a_f):
        """Register one pair ((1, 1, ...) images, (4, 4) float64 affines); returns ((4, 4) float64 T, report)."""
        levels, frame = self._pyramid(moving, fixed, a_m, a_f)
        params = torch.zeros(6 if self.transform == "rigid" else 12, dtype=torch.float32, device=a_m.device)
        com_matrix = self._matrix(params.double(), frame)
        rotations = self._start_rotations(frame)
        report_levels = []
        with Progress(len(rotations) * self.search_iterations + sum(self.iterations), f"{self.transform} stage") as bar:
            params, frame, scores = self._pick_start(params, frame, levels[0], rotations, bar)
            for spacing, steps, level in zip(self.levels_mm, self.iterations, levels):
                start = self._score(self._matrix(params, frame), level)
                lr = self.learning_rate * spacing / self.levels_mm[0]
                params, taken = self._optimize(params, frame, level, steps, lr, bar, self.tolerance)
                end = self._score(self._matrix(params, frame), level)
                report_levels.append({"spacing_mm": spacing, "iterations": steps, "steps": taken,
                                      "points": level["world"].shape[1], "start_loss": start, "end_loss": end})
        matrix, eye = self._matrix(params.double(), frame), torch.eye(4, dtype=torch.float64, device=a_m.device)
        losses = {key: self._score(m, levels[-1]) for key, m in
                  (("initial_loss", com_matrix), ("identity_loss", eye), ("final_loss", matrix))}
        return matrix, losses | {"candidate_losses": scores, "levels": report_levels}

    def forward(self, moving, fixed, moving_affine, fixed_affine) -> torch.Tensor:
        """
        Args:
            moving: (B, 1, X, Y, Z) moving intensities on its own voxel grid; fixed: (B, 1, X', Y', Z').
            moving_affine, fixed_affine: (B, 4, 4) or (4, 4) voxel-to-world matrices (RAS mm).

        Returns:
            (B, 4, 4) float64 T in world mm mapping a fixed-space point to the moving-space point it samples
            (ITK/ANTs convention: resampled(x) = moving(T x)), on the inputs' device. Sets ``self.last_report``.
        """
        for name, image in (("moving", moving), ("fixed", fixed)):
            if not torch.is_tensor(image) or image.ndim != 5 or image.shape[1] != 1 or len(image) != len(moving):
                shape = getattr(image, "shape", image)
                raise ValueError(f"{name} must be a (B, 1, X, Y, Z) tensor with moving's B, got {shape}")
        batch, device = moving.shape[0], moving.device
        a_m = batch_matrices(moving_affine, batch, device, "moving_affine")
        a_f = batch_matrices(fixed_affine, batch, device, "fixed_affine")
        fixed = fixed.to(device)
        results = [self._register_one(moving[b : b + 1], fixed[b : b + 1], a_m[b], a_f[b]) for b in range(batch)]
        items = [report for _, report in results]
        keys = ("initial_loss", "identity_loss", "final_loss")
        self.last_report = {k: sum(r[k] for r in items) / batch for k in keys}
        self.last_report.update(levels=items[0]["levels"], items=items)
        return torch.stack([matrix for matrix, _ in results])
