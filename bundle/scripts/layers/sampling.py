# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""
The bundle's one sampling module: every resampling of a volume (the network's warps, the losses, the affine stage,
the field refinement, ``apply``, the inverse and the writers) goes through these functions.

Conventions, shared by all of them:

* Voxel coordinates are channel first, (B, 3, X, Y, Z): channel i is the index along array axis i. A displacement
  field (DDF) is such an offset in voxels, and backward warping samples ``image(p + ddf(p))``.
* ``align_corners=True``: voxel centres sit at -1 and 1 of ``grid_sample``'s normalised coordinates, as in
  :py:class:`monai.networks.blocks.Warp`.
* ``padding_mode`` (the value outside the volume: "zeros", "border" or "reflection") is an argument of every function
  that samples; compositions and integrations take it without a default, because the callers differ (the network
  integrates and composes with zeros, as SACB-Net trains; the refinement composes with border padding).
* ``padding_value`` (images sampled from another grid: :func:`sample_at_voxels`, :func:`sample_points`,
  :func:`resample_moving`) is the constant that "zeros" padding puts outside the volume, 0 by default. Raw intensities
  need their background there, not 0: in Hounsfield units 0 is soft tissue, so a CT whose field of view misses part of
  the fixed one would show fake tissue (``scripts.layers.intensity.resolve_background`` gives the value). It is exact:
  ``grid_sample(image - v) + v`` gives every corner outside the volume the value ``v``, trilinear and nearest alike.

Voxel coordinates reach ``grid_sample`` in one of two ways. Warping and sampling at voxel coordinates normalise them
elementwise (``2 p / (size - 1) - 1``, in the coordinates' dtype: float32 for the network, also under autocast).
Resampling through a matrix folds the normalisation into the (float64) matrix (:func:`grid_sample_matrix`), so each
point is mapped by a single matrix product, through which the affine stage takes its gradient.
"""

from __future__ import annotations

import math
from typing import List, Optional

import torch
import torch.nn.functional as F

__all__ = [
    "MODES",
    "PADDING_MODES",
    "SLAB_VOXELS",
    "apply_matrix",
    "batch_matrices",
    "compose_displacements",
    "compose_displacements_in_slabs",
    "grid_sample_matrix",
    "integrate_velocity",
    "resample_moving",
    "sample_at_voxels",
    "sample_in_slabs",
    "sample_points",
    "slab_ranges",
    "voxel_grid",
    "warp_image",
    "warp_image_in_slabs",
]

MODES = ("bilinear", "nearest")
PADDING_MODES = ("zeros", "border", "reflection")

#: output voxels per slab of :func:`sample_in_slabs` (and the slab-wise Jacobian): 2**21 points keep a float64
#: (1, 3, ...) coordinate slab at 48 MB, where a whole 512 x 512 x 400 CT would need 2.5 GB per copy
SLAB_VOXELS = 2**21


def voxel_grid(shape: List[int], device: Optional[torch.device] = None, dtype: torch.dtype = torch.float32):
    """(3, X, Y, Z) voxel indices of a grid of spatial ``shape``: channel i holds the index along array axis i."""
    if len(shape) != 3:
        raise ValueError(f"shape must list three sizes, got {shape}.")
    axes = [torch.arange(int(s), device=device, dtype=dtype) for s in shape]
    return torch.stack(torch.meshgrid(axes, indexing="ij"), dim=0)


def _padded_grid_sample(image: torch.Tensor, grid: torch.Tensor, mode: str, padding_mode: str, padding_value: float):
    """``F.grid_sample`` (``align_corners=True``) with ``padding_value`` outside the volume under "zeros" padding."""
    padding_value = float(padding_value)
    if padding_value == 0.0:  # grid_sample's own zeros: the network's and every brain image's path, bit for bit
        return F.grid_sample(image, grid, mode=mode, padding_mode=padding_mode, align_corners=True)
    if padding_mode != "zeros" or not math.isfinite(padding_value):
        raise ValueError(f"padding_value {padding_value} needs padding_mode 'zeros' and a finite value, got "
                         f"padding_mode '{padding_mode}'.")  # no !r: TorchScript compiles this function
    # corners outside contribute 0 to the shifted image, i.e. padding_value once shifted back
    shifted = F.grid_sample(image - padding_value, grid, mode=mode, padding_mode="zeros", align_corners=True)
    return shifted + padding_value


def _grid_sample(image: torch.Tensor, coords: torch.Tensor, mode: str, padding_mode: str, padding_value: float = 0.0):
    """``image`` (B, C, X, Y, Z) sampled at voxel ``coords`` (B, 3, X', Y', Z'), normalised in the coords' dtype."""
    scale = torch.tensor([max(int(s) - 1, 1) for s in image.shape[2:]], device=coords.device, dtype=coords.dtype)
    grid = 2.0 * coords / scale.view(1, 3, 1, 1, 1) - 1.0
    # grid_sample takes the last axis first (x = W, y = H, z = D)
    grid = grid.permute(0, 2, 3, 4, 1).flip(-1)
    return _padded_grid_sample(image, grid, mode, padding_mode, padding_value)


def sample_at_voxels(
    image: torch.Tensor, coords: torch.Tensor, mode: str = "bilinear", padding_mode: str = "zeros",
    padding_value: float = 0.0,
) -> torch.Tensor:
    """
    Sample ``image`` at continuous voxel coordinates (trilinear or nearest, ``align_corners=True``).

    Args:
        image: (B, C, X, Y, Z) volume. Integer label maps come back in their own dtype (sampled in float32, which holds
            ids below 2**24 exactly, else in float64).
        coords: (B, 3, X', Y', Z') voxel coordinates in ``image``'s index space, any floating dtype (float64 when
            they come from world matrices); rounded to the sampled dtype first, as ``grid_sample`` takes one dtype.
        mode: "bilinear" (trilinear) or "nearest".
        padding_mode: "zeros", "border" or "reflection".
        padding_value: the value outside the volume with "zeros" padding (an image's background; 0 for label maps).

    Returns:
        (B, C, X', Y', Z') samples.
    """
    # an unknown mode or padding_mode is refused by grid_sample itself, with the names it takes
    if image.dim() != 5 or coords.dim() != 5 or coords.shape[1] != 3 or image.shape[0] != coords.shape[0]:
        raise ValueError(
            f"expected image (B, C, X, Y, Z) and coords (B, 3, X', Y', Z') with the same B, got "
            f"{list(image.shape)} and {list(coords.shape)}."
        )
    if image.is_floating_point():
        return _grid_sample(image, coords.to(image.dtype), mode, padding_mode, padding_value)
    exact32 = image.numel() == 0 or (-16777216 < int(image.min()) and int(image.max()) < 16777216)
    values = image.to(torch.float32 if exact32 else torch.float64)
    sampled = _grid_sample(values, coords.to(values.dtype), mode, padding_mode, padding_value)
    return torch.round(sampled).to(image.dtype)


def slab_ranges(shape: List[int], max_voxels: int = SLAB_VOXELS) -> List[List[int]]:
    """``[start, stop)`` ranges along the last axis of a grid of spatial ``shape`` (X, Y, Z), each slab of at most
    ``max_voxels`` voxels (at least one plane, whatever its size)."""
    if len(shape) != 3 or max_voxels < 1:
        raise ValueError(f"need a spatial shape of three sizes and max_voxels >= 1, got {shape} and {max_voxels}.")
    plane = max(int(shape[0]) * int(shape[1]), 1)
    depth = max(max_voxels // plane, 1)
    return [[start, min(start + depth, int(shape[2]))] for start in range(0, int(shape[2]), depth)]


def sample_in_slabs(
    image: torch.Tensor, coords_of_slab, shape: List[int], mode: str = "bilinear", padding_mode: str = "zeros",
    padding_value: float = 0.0, max_voxels: int = SLAB_VOXELS,
) -> torch.Tensor:
    """
    :func:`sample_at_voxels` over an output grid too large for one coordinate map, one slab along its last axis at a
    time. Every output voxel is sampled alone, so the result equals sampling the whole map at once bit for bit, while
    only one slab of coordinates (and of ``grid_sample``'s normalised copy) exists at a time. Meant for outputs
    without gradient (full-resolution post-processing): the output is written slab by slab.

    Args:
        image: (B, C, X, Y, Z) volume, as for :func:`sample_at_voxels`.
        coords_of_slab: ``coords_of_slab(start, stop)`` -> (B, 3, X', Y', stop - start) voxel coordinates in
            ``image``'s index space of the output voxels ``[..., start:stop]``.
        shape: the output's spatial shape (X', Y', Z').
        mode, padding_mode, padding_value: as :func:`sample_at_voxels`.
        max_voxels: output voxels per slab (:func:`slab_ranges`).

    Returns:
        (B, C, X', Y', Z') samples in the dtype :func:`sample_at_voxels` gives.
    """
    out: Optional[torch.Tensor] = None
    for start, stop in slab_ranges(shape, max_voxels):
        slab = sample_at_voxels(image, coords_of_slab(start, stop), mode, padding_mode, padding_value)
        if out is None:
            out = slab.new_empty(list(slab.shape[:2]) + [int(s) for s in shape])
        out[..., start:stop] = slab
    if out is None:  # an empty output grid
        return sample_at_voxels(image, coords_of_slab(0, 0), mode, padding_mode, padding_value)
    return out


def warp_image(image: torch.Tensor, ddf: torch.Tensor, mode: str = "bilinear", padding_mode: str = "zeros") -> torch.Tensor:
    """
    Backward warp on the field's grid: ``out(p) = image(p + ddf(p))``.

    Args:
        image: (B, C, X, Y, Z) volume on the field's grid; integer label maps keep their dtype.
        ddf: (B, 3, X, Y, Z) displacement in voxels; channel i moves along array axis i.
        mode: "bilinear" (trilinear) for images and fields, "nearest" for label maps.
        padding_mode: "zeros", "border" or "reflection".

    Returns:
        (B, C, X, Y, Z) warped volume.
    """
    coords = voxel_grid([int(s) for s in ddf.shape[2:]], ddf.device, ddf.dtype).unsqueeze(0) + ddf
    if image.is_floating_point():
        # the grid stays in the field's dtype (float32 in the network, also when autocast gives half-precision features)
        return _grid_sample(image, coords, mode, padding_mode)
    return sample_at_voxels(image, coords, mode, padding_mode)


def warp_image_in_slabs(
    image: torch.Tensor, ddf: torch.Tensor, mode: str = "bilinear", padding_mode: str = "zeros",
    max_voxels: int = SLAB_VOXELS,
) -> torch.Tensor:
    """
    :func:`warp_image` one slab of the field along its last axis at a time (:func:`sample_in_slabs`): the same values
    bit for bit, without the whole-volume coordinate map; for warping full-resolution outputs (no gradient).

    Args:
        image: (B, C, X, Y, Z) volume on the field's grid; integer label maps keep their dtype.
        ddf: (B, 3, X, Y, Z) displacement in voxels, in ``image``'s dtype for a floating image (as :func:`warp_image`
            receives it from :py:class:`scripts.layers.Warp`).
        mode, padding_mode: as :func:`warp_image`.
        max_voxels: field voxels per slab.

    Returns:
        (B, C, X, Y, Z) warped volume.
    """
    shape = [int(s) for s in ddf.shape[2:]]

    def coords_of_slab(start: int, stop: int) -> torch.Tensor:
        grid = voxel_grid([shape[0], shape[1], stop - start], ddf.device, ddf.dtype)
        grid[2] += start  # integer indices: exact, the same points as the whole grid's
        return grid.unsqueeze(0) + ddf[..., start:stop]

    # sample_at_voxels casts the coordinates to a floating image's dtype, as warp_image's callers do beforehand
    return sample_in_slabs(image, coords_of_slab, shape, mode, padding_mode, 0.0, max_voxels)


def compose_displacements(outer: torch.Tensor, inner: torch.Tensor, padding_mode: str) -> torch.Tensor:
    """
    Displacement of ``p -> q + outer(q)`` with ``q = p + inner(p)``: ``inner`` is followed first, then ``outer``, so
    warping an image by the result equals warping it by ``outer`` and the outcome by ``inner``.

    Args:
        outer: (B, 3, X, Y, Z) displacement in voxels, applied to the image first; sampled at ``p + inner(p)``.
        inner: (B, 3, X, Y, Z) displacement in voxels on the same grid.
        padding_mode: how ``outer`` continues outside the grid: "zeros" (the network, as SACB-Net trains) or "border"
            (the refinement: near the edge the composed map keeps the nearest displacement instead of dropping to
            zero, which would fold there).

    Returns:
        (B, 3, X, Y, Z) composed displacement in voxels.
    """
    if outer.shape != inner.shape or outer.dim() != 5 or outer.shape[1] != 3:
        raise ValueError(
            f"need two (B, 3, D, H, W) displacements of one shape, got {list(outer.shape)} and {list(inner.shape)}."
        )
    return inner + warp_image(outer, inner, "bilinear", padding_mode)


def compose_displacements_in_slabs(
    outer: torch.Tensor, inner: torch.Tensor, padding_mode: str, max_voxels: int = SLAB_VOXELS
) -> torch.Tensor:
    """
    :func:`compose_displacements` with ``outer`` sampled one slab at a time (:func:`warp_image_in_slabs`) and ``inner``
    added in place: the same values bit for bit, without the whole-grid coordinate map; for full-resolution fields
    (no gradient), e.g. the refinement's correction joined to a CT-sized displacement.

    Args:
        outer, inner, padding_mode: as :func:`compose_displacements`.
        max_voxels: field voxels per slab.

    Returns:
        (B, 3, X, Y, Z) composed displacement in voxels.
    """
    if outer.shape != inner.shape or outer.dim() != 5 or outer.shape[1] != 3:
        raise ValueError(
            f"need two (B, 3, D, H, W) displacements of one shape, got {list(outer.shape)} and {list(inner.shape)}."
        )
    return warp_image_in_slabs(outer, inner, "bilinear", padding_mode, max_voxels).add_(inner)


def integrate_velocity(velocity: torch.Tensor, steps: int, padding_mode: str) -> torch.Tensor:
    """
    ``exp(velocity)`` by scaling and squaring: ``ddf = v / 2**steps``, then ``steps`` times ``ddf = ddf ∘ ddf``
    (``ddf + ddf(p + ddf)``, trilinear), the algorithm of :py:class:`monai.networks.blocks.DVF2DDF`.

    Args:
        velocity: (B, 3, X, Y, Z) stationary velocity field in voxels.
        steps: number of squarings (0 returns the velocity itself).
        padding_mode: sampling outside the grid; "zeros" as the network (and MONAI's ``DVF2DDF``) integrates.

    Returns:
        (B, 3, X, Y, Z) displacement of the integrated transform, in voxels.
    """
    if velocity.dim() != 5 or velocity.shape[1] != 3 or not velocity.is_floating_point():
        raise ValueError(f"velocity must be a floating (B, 3, D, H, W) tensor, got shape {list(velocity.shape)}.")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}.")
    ddf = velocity / (2.0**steps)
    for _ in range(steps):
        ddf = compose_displacements(ddf, ddf, padding_mode)
    return ddf


def apply_matrix(matrix: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """
    Map points through a homogeneous matrix.

    Args:
        matrix: (4, 4) or (B, 4, 4).
        coords: (B, 3, ...) points, channel i = coordinate i.

    Returns:
        (B, 3, ...) ``matrix[:3, :3] @ c + matrix[:3, 3]`` for every point, in the dtype of ``coords``.
    """
    if coords.dim() < 2 or coords.shape[1] != 3:
        raise ValueError(f"coords must have shape (B, 3, ...), got {list(coords.shape)}.")
    matrix = matrix.to(device=coords.device, dtype=coords.dtype)
    if matrix.shape == (4, 4):
        matrix = matrix.expand(coords.shape[0], 4, 4)
    if matrix.shape != (coords.shape[0], 4, 4):
        raise ValueError(f"matrix must be (4, 4) or ({coords.shape[0]}, 4, 4), got {list(matrix.shape)}.")
    # points as rows, (B, N, 3) @ (B, 3, 3): the affine stage's gradient reaches the matrix through this product
    rows = coords.reshape(coords.shape[0], 3, -1).transpose(1, 2)
    mapped = rows @ matrix[:, :3, :3].transpose(1, 2) + matrix[:, None, :3, 3]
    return mapped.transpose(1, 2).reshape(coords.shape)


def batch_matrices(matrix, batch: int, device: torch.device, name: str) -> torch.Tensor:
    """(4, 4) or (B, 4, 4) matrix -> (B, 4, 4) float64 on ``device``; ValueError if non-finite, singular, misshaped."""
    matrix = torch.as_tensor(matrix, dtype=torch.float64, device=device)
    matrix = matrix.expand(batch, 4, 4) if matrix.shape == (4, 4) else matrix
    bad = matrix.shape != (batch, 4, 4) or not torch.isfinite(matrix).all()
    if bad or (matrix[:, :3, :3].det().abs() < 1e-8).any():
        raise ValueError(f"{name} must be a finite invertible (4, 4) or ({batch}, 4, 4) matrix, got {matrix.tolist()}")
    return matrix


def grid_sample_matrix(shape, device: torch.device | str | None = None) -> torch.Tensor:
    """(4, 4) float64 map from voxel indices of a grid of spatial ``shape`` to ``grid_sample``'s normalised
    coordinates (last axis first, ``align_corners=True``): ``2 p / (size - 1) - 1`` as a matrix."""
    x, y, z = (2.0 / max(int(k) - 1, 1) for k in shape)
    rows = [[0, 0, z, -1], [0, y, 0, -1], [x, 0, 0, -1], [0, 0, 0, 1]]
    return torch.tensor(rows, dtype=torch.float64, device=device)


def sample_points(
    image: torch.Tensor, points: torch.Tensor, to_grid: torch.Tensor, mode: str = "bilinear",
    padding_mode: str = "zeros", padding_value: float = 0.0,
) -> torch.Tensor:
    """
    Sample ``image`` at points mapped by a matrix that already ends in :func:`grid_sample_matrix`.

    Args:
        image: (B, C, X, Y, Z) floating volume.
        points: (B, N, 3) points (e.g. world mm or voxel indices of another grid), any floating dtype.
        to_grid: (B, 4, 4) map from the points to ``grid_sample`` coordinates of ``image``, e.g.
            ``grid_sample_matrix(image.shape[2:]) @ inv(image_affine)`` for world points; applied in the points'
            dtype (float32 points keep the affine stage's gradient cheap).
        mode, padding_mode, padding_value: as :func:`sample_at_voxels`.

    Returns:
        (B, C, N) samples.
    """
    grid = apply_matrix(to_grid, points.transpose(1, 2)).transpose(1, 2)
    grid = grid.to(image.dtype)[:, :, None, None]
    return _padded_grid_sample(image, grid, mode, padding_mode, padding_value)[..., 0, 0]


def resample_moving(
    moving, moving_affine, fixed_shape, fixed_affine, world_matrix, mode: str = "bilinear", padding_mode: str = "zeros",
    padding_value: float = 0.0, max_voxels: int = SLAB_VOXELS,
) -> torch.Tensor:
    """
    Resample ``moving`` onto the fixed voxel grid through the world transform ``world_matrix`` (fixed -> moving world).

    Args:
        moving: (B, C, X, Y, Z) image (``mode="bilinear"``) or label map (``mode="nearest"``), any real dtype.
        moving_affine, fixed_affine: (4, 4) or (B, 4, 4) voxel-to-world matrices (RAS mm).
        fixed_shape: the fixed spatial shape (X', Y', Z').
        world_matrix: (4, 4) or (B, 4, 4) matrix T; ``output(i) = moving(inverse(moving_affine) T fixed_affine i)``;
            the identity resamples between two grids of one world space.
        mode: "bilinear" or "nearest". padding_mode, padding_value: as :func:`sample_at_voxels` (where the moving
            field of view ends: the image's background, e.g. -1024 HU for a CT; 0 for label maps).
        max_voxels: fixed-grid voxels sampled per slab (:func:`slab_ranges`), when no gradient is needed.

    Returns:
        (B, C, X', Y', Z') in ``moving``'s dtype (integer label maps rounded back).
    """
    if moving.ndim != 5 or len(fixed_shape) != 3 or mode not in MODES:
        raise ValueError(f"need moving (B, C, X, Y, Z), fixed_shape of 3 ints, mode bilinear|nearest; got "
                         f"{tuple(moving.shape)}, {tuple(fixed_shape)}, {mode!r}")
    batch, device = moving.shape[0], moving.device
    a_m = batch_matrices(moving_affine, batch, device, "moving_affine")
    a_f = batch_matrices(fixed_affine, batch, device, "fixed_affine")
    to_grid = grid_sample_matrix(moving.shape[2:], device) @ torch.linalg.inv(a_m)
    to_grid = to_grid @ batch_matrices(world_matrix, batch, device, "world_matrix") @ a_f
    shape = [int(s) for s in fixed_shape]
    source = moving.to(torch.promote_types(moving.dtype, torch.float32))

    def resampled_slab(start: int, stop: int) -> torch.Tensor:
        index = voxel_grid([shape[0], shape[1], stop - start], device)
        index[2] += start  # integer indices: exact
        points = index.reshape(1, 3, -1).transpose(1, 2).expand(batch, -1, 3)
        values = sample_points(source, points, to_grid, mode, padding_mode, padding_value)
        return values.reshape(*moving.shape[:2], shape[0], shape[1], stop - start)

    if torch.is_grad_enabled() and (source.requires_grad or to_grid.requires_grad):
        out = resampled_slab(0, shape[2])  # in one piece, for the gradient
    else:  # slab by slab (every point is mapped and sampled alone: the same values), so a CT-sized grid never
        # holds its whole point list and grid_sample's copies of it (1.3 GB each at 512 x 512 x 400)
        out = source.new_empty((*moving.shape[:2], *shape))
        for start, stop in slab_ranges(shape, max_voxels):
            out[..., start:stop] = resampled_slab(start, stop)
    return out if moving.is_floating_point() else out.round().to(moving.dtype)
