# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""
Rigid (6 parameters) or affine (12 parameters) registration of a moving image onto a fixed one in physical space.

Everything happens in world coordinates (RAS mm, as nibabel/MONAI give the voxel-to-world affines), so the two images
may differ in shape, spacing and orientation (LIA vs RAS). The result ``T`` maps a fixed-space world point to the
moving-space world point it should sample (ITK/ANTs convention): ``resampled(x) = moving(T x)``. Sampling goes through
``torch.nn.functional.grid_sample`` with ``align_corners=True`` (voxel centres at -1 and 1), on the inputs' device.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.losses import GlobalMutualInformationLoss, LocalNormalizedCrossCorrelationLoss
from monai.networks.layers import GaussianFilter

__all__ = ["AffineRegistration", "check_affine_result", "normalize_intensity", "resample_moving"]


def _check_volume(image: torch.Tensor, name: str) -> None:
    if not isinstance(image, torch.Tensor) or image.ndim != 5 or image.shape[1] != 1 or min(image.shape[2:]) < 2:
        raise ValueError(f"{name} must be a (B, 1, X, Y, Z) tensor with X, Y, Z >= 2, got {getattr(image, 'shape', image)}")


def _batch_affine(affine, batch: int, device: torch.device, name: str) -> torch.Tensor:
    """(4, 4) or (B, 4, 4) voxel-to-world matrix -> (B, 4, 4) float64 on ``device``; ValueError if singular/bad shape."""
    affine = torch.as_tensor(affine, dtype=torch.float64, device=device)
    if affine.shape == (4, 4):
        affine = affine.expand(batch, 4, 4)
    if affine.shape != (batch, 4, 4) or not torch.isfinite(affine).all():
        raise ValueError(f"{name} must be a finite (4, 4) or ({batch}, 4, 4) matrix, got shape {tuple(affine.shape)}")
    if (torch.linalg.det(affine[:, :3, :3]).abs() < 1e-8).any():
        raise ValueError(f"{name} is singular: {affine.tolist()}")
    return affine


def normalize_intensity(image: torch.Tensor, lower: float = 1.0, upper: float = 99.0) -> torch.Tensor:
    """Scale each item of ``image`` (B, C, ...) so its ``lower``/``upper`` percentiles map to 0/1, clamped to [0, 1].

    Raises ValueError for an image whose percentiles coincide (constant or nearly empty image)."""
    flat = image.reshape(image.shape[0], -1).float()
    n = flat.shape[1]
    lo = flat.kthvalue(int(round(lower / 100 * (n - 1))) + 1, dim=1).values
    hi = flat.kthvalue(int(round(upper / 100 * (n - 1))) + 1, dim=1).values
    if (hi - lo <= 1e-12 * hi.abs().clamp_min(1.0)).any():
        raise ValueError(f"image intensities are constant between percentiles {lower} and {upper}: {lo.tolist()}")
    shape = (-1,) + (1,) * (image.ndim - 1)
    return ((image.float() - lo.view(shape)) / (hi - lo).view(shape)).clamp(0.0, 1.0)


def _grid_matrix(shape: Sequence[int], device: torch.device) -> torch.Tensor:
    """(4, 4) float64 map from voxel (x, y, z) to ``grid_sample`` coordinates (z, y, x) in [-1, 1] (align_corners)."""
    out = torch.zeros(4, 4, dtype=torch.float64, device=device)
    for row, axis in enumerate((2, 1, 0)):
        out[row, axis], out[row, 3] = 2.0 / max(int(shape[axis]) - 1, 1), -1.0
    out[3, 3] = 1.0
    return out


def _sample(image: torch.Tensor, points: torch.Tensor, matrix: torch.Tensor, mode: str = "bilinear",
            padding: str = "zeros") -> torch.Tensor:
    """Sample ``image`` (B, C, X, Y, Z) at ``matrix`` (B, 4, 4) applied to ``points`` (B, N, 3) -> (B, C, N).

    ``matrix`` maps the points to ``grid_sample`` coordinates (see ``_grid_matrix``)."""
    grid = points @ matrix[:, :3, :3].transpose(1, 2).to(points.dtype) + matrix[:, None, :3, 3].to(points.dtype)
    out = F.grid_sample(image, grid.to(image.dtype)[:, :, None, None], mode=mode, padding_mode=padding, align_corners=True)
    return out[..., 0, 0]


def resample_moving(moving, moving_affine, fixed_shape, fixed_affine, world_matrix, mode: str = "bilinear"):
    """
    Resample ``moving`` onto the fixed voxel grid through the world transform ``world_matrix`` (fixed -> moving world).

    Args:
        moving: (B, C, X, Y, Z) image (``mode="bilinear"``) or label map (``mode="nearest"``), any real dtype.
        moving_affine, fixed_affine: (4, 4) or (B, 4, 4) voxel-to-world matrices (RAS mm).
        fixed_shape: the fixed spatial shape (X', Y', Z').
        world_matrix: (4, 4) or (B, 4, 4) matrix T; output(i) = moving(inverse(moving_affine) T fixed_affine i).

    Returns:
        (B, C, X', Y', Z') tensor in ``moving``'s dtype (zeros outside the moving field of view), via ``grid_sample``
        with ``align_corners=True``.
    """
    if moving.ndim != 5 or len(fixed_shape) != 3 or mode not in ("bilinear", "nearest"):
        raise ValueError(f"need moving (B, C, X, Y, Z), fixed_shape of 3 ints, mode bilinear|nearest; got "
                         f"{tuple(moving.shape)}, {tuple(fixed_shape)}, {mode!r}")
    batch, device = moving.shape[0], moving.device
    a_m = _batch_affine(moving_affine, batch, device, "moving_affine")
    a_f = _batch_affine(fixed_affine, batch, device, "fixed_affine")
    voxel_map = torch.linalg.inv(a_m) @ _batch_affine(world_matrix, batch, device, "world_matrix") @ a_f
    axes = [torch.arange(int(s), dtype=torch.float32, device=device) for s in fixed_shape]
    index = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(1, -1, 3).expand(batch, -1, 3)
    dtype = moving.dtype if moving.is_floating_point() else torch.float32
    out = _sample(moving.to(dtype), index, _grid_matrix(moving.shape[2:], device) @ voxel_map, mode=mode)
    out = out.reshape(*moving.shape[:2], *[int(s) for s in fixed_shape])
    return out.round().to(moving.dtype) if not moving.is_floating_point() else out


def check_affine_result(matrix, min_scale: float = 0.5, max_scale: float = 2.0) -> torch.Tensor:
    """
    Raise ValueError for a degenerate registration result; return it (as float64) otherwise.

    Args:
        matrix: (4, 4) or (B, 4, 4) world matrix.
        min_scale, max_scale: allowed range of the linear part's singular values (scaling along any axis).
    """
    matrix = torch.as_tensor(matrix, dtype=torch.float64)
    if matrix.shape[-2:] != (4, 4) or not torch.isfinite(matrix).all():
        raise ValueError(f"affine result must be a finite (..., 4, 4) matrix, got shape {tuple(matrix.shape)}")
    linear = matrix[..., :3, :3]
    det = torch.linalg.det(linear)
    if (det <= 0).any():
        raise ValueError(f"degenerate affine result: determinant {det.tolist()} <= 0 (a reflection or collapse)")
    scales = torch.linalg.svdvals(linear)
    if (scales < min_scale).any() or (scales > max_scale).any():
        raise ValueError(f"degenerate affine result: axis scalings {scales.tolist()} outside [{min_scale}, {max_scale}]")
    return matrix


def _index_points(shape: Sequence[int], affine: torch.Tensor) -> torch.Tensor:
    """World points (X, Y, Z, 3) float64 of every voxel of a grid with voxel-to-world ``affine`` (4, 4)."""
    axes = [torch.arange(int(k), dtype=torch.float64, device=affine.device) for k in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), -1) @ affine[:3, :3].T + affine[:3, 3]


def _resample_level(image: torch.Tensor, affine: torch.Tensor, spacing: float, blur_mm: float, done_mm):
    """Smooth ``image`` (1, 1, X, Y, Z) to a Gaussian blur of ``blur_mm`` (it already has ``done_mm``, per axis) and
    sample it on an isotropic grid of ``spacing`` mm along its own axes, centred on and covering its field of view.

    Returns (values (1, 1, n0, n1, n2), the level's voxel-to-world affine (4, 4) float64)."""
    voxel_mm = affine[:3, :3].norm(dim=0)
    sigma = (blur_mm**2 - torch.as_tensor(done_mm, dtype=torch.float64, device=affine.device) ** 2).clamp_min(0.0).sqrt() / voxel_mm
    smooth = image if sigma.max() < 0.2 else GaussianFilter(3, sigma.clamp_min(0.05).tolist()).to(image.device)(image)
    shape = torch.tensor(image.shape[2:], dtype=torch.float64, device=image.device)
    n = (shape * voxel_mm / spacing).round().clamp_min(2)
    step = spacing / voxel_mm
    index_to_voxel = torch.eye(4, dtype=torch.float64, device=image.device)
    index_to_voxel[:3, :3], index_to_voxel[:3, 3] = torch.diag(step), (shape - 1) / 2 - step * (n - 1) / 2
    n = [int(k) for k in n.tolist()]
    voxels = _index_points(n, index_to_voxel).reshape(1, -1, 3)
    values = _sample(smooth, voxels, _grid_matrix(image.shape[2:], image.device)[None], padding="border")
    return values.reshape(1, 1, *n), affine @ index_to_voxel


def _pyramid_images(image: torch.Tensor, affine: torch.Tensor, levels_mm: Sequence[float], oversample: int) -> dict:
    """{spacing: (values, level affine)}: blurred by spacing / 2 mm (sigma) and sampled every spacing / oversample mm;
    each level is made from the next finer one, so the large blurs run on small images."""
    out, source, done = {}, (image, affine), (0.5 * affine[:3, :3].norm(dim=0)).cpu()
    for spacing in sorted(set(levels_mm)):
        out[spacing] = source = _resample_level(*source, spacing / oversample, 0.5 * spacing, done)
        done = 0.5 * spacing
    return out


def _moments(values: torch.Tensor, world: torch.Tensor):
    """Intensity-weighted centre (3,) and covariance (3, 3) of world points (..., 3) with weights ``values``."""
    w = values.reshape(-1).double()
    x = world.reshape(-1, 3)
    centre = (w[:, None] * x).sum(0) / w.sum()
    d = x - centre
    return centre, (w[:, None, None] * d[:, :, None] * d[:, None, :]).sum(0) / w.sum()


def _rotation_candidates(cov_fixed: torch.Tensor, cov_moving: torch.Tensor) -> list[torch.Tensor]:
    """Identity plus the 4 proper rotations matching principal axes (fixed -> moving) under the eigenvector signs."""
    e_f, e_m = torch.linalg.eigh(cov_fixed)[1], torch.linalg.eigh(cov_moving)[1]
    out = [torch.eye(3, dtype=torch.float64, device=cov_fixed.device)]
    for signs in ([1, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1], [-1, -1, -1], [-1, 1, 1], [1, -1, 1], [1, 1, -1]):
        rot = e_m @ torch.diag(torch.tensor(signs, dtype=torch.float64, device=e_m.device)) @ e_f.T
        if torch.linalg.det(rot) > 0:
            out.append(rot)
    return out


class AffineRegistration(torch.nn.Module):
    """
    Multi-resolution rigid/affine registration in world space with Adam (fixed iteration counts, no randomness).

    Per level (``levels_mm``, coarse to fine) the fixed image is smoothed and resampled on an isotropic grid of that
    spacing covering its field of view; the (equally smoothed) moving image is sampled at ``T x`` for those grid points
    through its inverse voxel affine. Intensities are scaled per image by the 1st-99th percentiles.
    ``init="moments"`` starts from the intensity centres of mass and picks, at the coarsest level after
    ``search_iterations`` steps each, the best of the identity rotation and the 4 principal-axes rotations (robust to
    the eigenvectors' sign ambiguity); ``"com"``: centres of mass only; ``"identity"``: T = identity.
    ``similarity``: ``"ncc"`` global NCC (one contrast), ``"lncc"`` MONAI local NCC, ``"mi"`` MONAI global mutual
    information (two contrasts). After ``forward``, ``last_report`` holds the similarity losses (lower is better) at
    the finest level for the centre-of-mass start (``initial_loss``), identity T (``identity_loss``) and the result
    (``final_loss``), averaged over the batch, with per-item values under ``"items"`` and per level under ``"levels"``.
    """

    def __init__(self, transform: str = "affine", levels_mm: Sequence[float] = (6.0, 4.0, 2.0),
                 iterations: Sequence[int] = (100, 60, 30), learning_rate: float = 0.02, similarity: str = "ncc",
                 init: str = "moments", search_iterations: int = 20, lncc_kernel: int = 5, mi_bins: int = 32,
                 max_points: int = 1_000_000):
        super().__init__()
        levels_mm, iterations = tuple(float(v) for v in levels_mm), tuple(int(v) for v in iterations)
        for name, value, allowed in (("transform", transform, ("rigid", "affine")),
                                     ("similarity", similarity, ("ncc", "lncc", "mi")),
                                     ("init", init, ("moments", "com", "identity"))):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        for name, bad, need in (
            ("levels_mm", not levels_mm or min(levels_mm) <= 0, "a non-empty sequence of spacings > 0"),
            ("iterations", len(iterations) != len(levels_mm) or min(iterations, default=0) < 0,
             f"one count >= 0 per level ({len(levels_mm)} levels)"),
            ("learning_rate", not learning_rate > 0, "> 0"), ("search_iterations", search_iterations < 0, ">= 0"),
            ("lncc_kernel", lncc_kernel < 3 or lncc_kernel % 2 == 0, "odd and >= 3"), ("mi_bins", mi_bins < 4, ">= 4"),
            ("max_points", max_points < 1000, ">= 1000"),
        ):
            if bad:
                raise ValueError(f"{name} must be {need}, got {locals()[name]!r}")
        self.transform, self.levels_mm, self.iterations, self.max_points = transform, levels_mm, iterations, max_points
        self.learning_rate, self.similarity, self.init, self.search_iterations = learning_rate, similarity, init, search_iterations
        if similarity == "lncc":
            self.loss_fn = LocalNormalizedCrossCorrelationLoss(spatial_dims=3, kernel_size=lncc_kernel)
        elif similarity == "mi":
            self.loss_fn = GlobalMutualInformationLoss(num_bins=mi_bins)
        self.last_report: dict = {}

    def _level_points(self, fixed_l: torch.Tensor, world: torch.Tensor) -> dict:
        """The fixed level's foreground (dilated by 2 grid voxels) as points, every k-th kept so at most
        ``max_points`` remain; for LNCC the grid cropped to the foreground's bounding box instead."""
        mask = F.max_pool3d((fixed_l > 0.01).float(), 5, stride=1, padding=2)[0, 0] > 0
        if self.similarity == "lncc":
            box = [slice(int(i.min()), int(i.max()) + 1) for i in mask.nonzero().unbind(1)] if mask.any() else [slice(None)] * 3
            return {"fixed": fixed_l[(..., *box)], "world": world[tuple(box)].reshape(1, -1, 3).float()}
        index = mask.reshape(-1).nonzero()[:, 0]
        index = index[:: max(1, -(-index.numel() // self.max_points))]
        return {"fixed": fixed_l.reshape(1, 1, -1)[..., index], "world": world.reshape(1, -1, 3)[:, index].float()}

    def _loss(self, warped: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        """Similarity loss (lower is better) of two (1, 1, n0, n1, n2) level images or (1, 1, N) point values."""
        if self.similarity != "ncc":
            return self.loss_fn(warped, fixed)
        a, b = warped.reshape(-1) - warped.mean(), fixed.reshape(-1) - fixed.mean()
        return -(a * b).sum() / ((a * a).sum() * (b * b).sum()).clamp_min(1e-12).sqrt()

    def _matrix(self, params: torch.Tensor, frame: dict) -> torch.Tensor:
        """(4, 4) world matrix in the dtype of ``params``: T x = L R0 (x - c_f) + c_m + radius * t."""
        rot0, dtype = frame["rotation"].to(params.dtype), params.dtype
        if self.transform == "rigid":
            w = params[:3]
            zero = torch.zeros((), dtype=dtype, device=params.device)
            skew = torch.stack([zero, -w[2], w[1], w[2], zero, -w[0], -w[1], w[0], zero]).view(3, 3)
            linear = torch.linalg.matrix_exp(skew) @ rot0
        else:
            linear = (torch.eye(3, dtype=dtype, device=params.device) + params[:9].view(3, 3)) @ rot0
        shift = frame["c_m"].to(dtype) + frame["radius"] * params[-3:] - linear @ frame["c_f"].to(dtype)
        top = torch.cat([linear, shift[:, None]], 1)
        return torch.cat([top, torch.tensor([[0, 0, 0, 1]], dtype=dtype, device=params.device)], 0)

    def _level_loss(self, matrix: torch.Tensor, level: dict) -> torch.Tensor:
        """Loss of the moving image sampled at ``matrix`` x for the level's fixed grid points."""
        warped = _sample(level["moving"], level["world"], (level["to_grid"].to(matrix.dtype) @ matrix)[None])
        return self._loss(warped.reshape(level["fixed"].shape), level["fixed"])

    def _optimize(self, params: torch.Tensor, frame: dict, level: dict, steps: int, lr: float) -> torch.Tensor:
        """``steps`` Adam steps with a linearly decaying learning rate (to 10 %); returns the new parameters."""
        params = params.detach().clone().requires_grad_(True)
        opt = torch.optim.Adam([params], lr=lr)
        for k in range(steps):
            for group in opt.param_groups:
                group["lr"] = lr * (1.0 - 0.9 * k / max(steps, 1))
            opt.zero_grad(set_to_none=True)
            self._level_loss(self._matrix(params, frame), level).backward()
            opt.step()
        return params.detach()

    def _pyramid(self, moving, fixed, a_m, a_f):
        """Per level: fixed points/values, the moving level image and its world -> grid_sample map; and a frame
        holding the centres of mass ``c_f``/``c_m`` (3,) and covariances (3, 3) of both images at the coarsest level."""
        fixed_p = _pyramid_images(normalize_intensity(fixed), a_f, self.levels_mm, 1)
        moving_p = _pyramid_images(normalize_intensity(moving), a_m, self.levels_mm, 2)  # finer: interpolation
        levels = []
        for spacing in self.levels_mm:
            (fixed_l, fixed_a), (moving_l, moving_a) = fixed_p[spacing], moving_p[spacing]
            to_grid = _grid_matrix(moving_l.shape[2:], a_m.device) @ torch.linalg.inv(moving_a)
            levels.append(self._level_points(fixed_l, _index_points(fixed_l.shape[2:], fixed_a))
                          | {"moving": moving_l, "to_grid": to_grid})
        (fixed_l, fixed_a), (moving_l, moving_a) = fixed_p[self.levels_mm[0]], moving_p[self.levels_mm[0]]
        c_f, cov_f = _moments(fixed_l, _index_points(fixed_l.shape[2:], fixed_a))
        c_m, cov_m = _moments(moving_l, _index_points(moving_l.shape[2:], moving_a))
        frame = {"c_f": c_f, "c_m": c_f if self.init == "identity" else c_m, "cov_f": cov_f, "cov_m": cov_m,
                 "radius": float(cov_f.trace().sqrt()), "rotation": torch.eye(3, dtype=torch.float64, device=c_f.device)}
        return levels, frame

    def _pick_start(self, params: torch.Tensor, frame: dict, level: dict):
        """Try each start rotation for ``search_iterations`` steps at ``level``; returns (params, frame, losses)."""
        candidates = _rotation_candidates(frame["cov_f"], frame["cov_m"]) if self.init == "moments" else [frame["rotation"]]
        best, scores = None, []
        for rotation in candidates:
            trial = dict(frame, rotation=rotation)
            p = self._optimize(params, trial, level, self.search_iterations, self.learning_rate) if len(candidates) > 1 else params
            with torch.no_grad():
                scores.append(float(self._level_loss(self._matrix(p, trial), level)))
            if best is None or scores[-1] < best[1]:
                best = (p, scores[-1], trial)
        return best[0], best[2], scores

    def _register_one(self, moving, fixed, a_m, a_f):
        """Register one pair ((1, 1, ...) images, (4, 4) float64 affines); returns ((4, 4) float64 T, report)."""
        levels, frame = self._pyramid(moving, fixed, a_m, a_f)
        params = torch.zeros(6 if self.transform == "rigid" else 12, dtype=torch.float32, device=a_m.device)
        com_matrix = self._matrix(params.double(), frame)
        params, frame, scores = self._pick_start(params, frame, levels[0])
        report_levels = []
        for spacing, steps, level in zip(self.levels_mm, self.iterations, levels):
            with torch.no_grad():
                start = float(self._level_loss(self._matrix(params, frame), level))
            params = self._optimize(params, frame, level, steps, self.learning_rate * spacing / self.levels_mm[0])
            with torch.no_grad():
                end = float(self._level_loss(self._matrix(params, frame), level))
            report_levels.append({"spacing_mm": spacing, "iterations": steps, "start_loss": start, "end_loss": end})
        matrix = self._matrix(params.double(), frame)
        with torch.no_grad():
            losses = {key: float(self._level_loss(m, levels[-1])) for key, m in (
                ("initial_loss", com_matrix), ("identity_loss", torch.eye(4, dtype=torch.float64, device=a_m.device)),
                ("final_loss", matrix))}
        return matrix, losses | {"candidate_losses": scores, "levels": report_levels}

    def forward(self, moving, fixed, moving_affine, fixed_affine) -> torch.Tensor:
        """
        Args:
            moving: (B, 1, X, Y, Z) moving intensities on its own voxel grid; fixed: (B, 1, X', Y', Z').
            moving_affine, fixed_affine: (B, 4, 4) or (4, 4) voxel-to-world matrices (RAS mm).

        Returns:
            (B, 4, 4) float64 T in world mm mapping a fixed-space point to the moving-space point it samples
            (ITK/ANTs convention: resampled(x) = moving(T x)). Sets ``self.last_report``.
        """
        _check_volume(moving, "moving")
        _check_volume(fixed, "fixed")
        if moving.shape[0] != fixed.shape[0]:
            raise ValueError(f"moving and fixed batch sizes differ: {moving.shape[0]} vs {fixed.shape[0]}")
        batch, device = moving.shape[0], moving.device
        a_m = _batch_affine(moving_affine, batch, device, "moving_affine")
        a_f = _batch_affine(fixed_affine, batch, device, "fixed_affine")
        results = [self._register_one(moving[b : b + 1], fixed[b : b + 1].to(device), a_m[b], a_f[b]) for b in range(batch)]
        items = [r for _, r in results]
        self.last_report = {key: sum(r[key] for r in items) / batch for key in ("initial_loss", "identity_loss", "final_loss")}
        self.last_report.update(levels=items[0]["levels"], items=items)
        return torch.stack([m for m, _ in results])
