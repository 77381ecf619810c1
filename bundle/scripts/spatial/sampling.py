# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""
Sampling a volume at continuous voxel coordinates with ``torch.nn.functional.grid_sample``.

The coordinate normalisation is the bundle warp's (``scripts.layers.warp.warp_image``): voxel centres at -1 and 1
(``align_corners=True``), ``2 p / (size - 1) - 1``, last axis first. So sampling at ``p + ddf(p)`` here reproduces the
bundle's own warp bit for bit, and a coordinate map from world matrices (:func:`apply_matrix`) samples the same way.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["apply_matrix", "sample_at_voxels", "voxel_grid", "warp_voxels"]

_MODES = ("bilinear", "nearest")
_PADDING = ("zeros", "border", "reflection")


def voxel_grid(shape: Sequence[int], device: torch.device | str | None = None, dtype: torch.dtype = torch.float32):
    """(3, X, Y, Z) voxel indices of a grid: channel i holds the index along array axis i."""
    if len(shape) != 3 or min(int(s) for s in shape) < 1:
        raise ValueError(f"shape must list three positive sizes, got {tuple(shape)}.")
    axes = [torch.arange(int(s), device=device, dtype=dtype) for s in shape]
    return torch.stack(torch.meshgrid(axes, indexing="ij"), dim=0)


def apply_matrix(matrix: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Map voxel coordinates through a homogeneous matrix.

    Args:
        matrix: (4, 4) or (B, 4, 4).
        coords: (B, 3, ...) points, channel i = coordinate i.

    Returns:
        (B, 3, ...) ``matrix[:3, :3] @ c + matrix[:3, 3]`` for every point, in the dtype of ``coords``.
    """
    if coords.ndim < 2 or coords.shape[1] != 3:
        raise ValueError(f"coords must have shape (B, 3, ...), got {list(coords.shape)}.")
    matrix = matrix.to(device=coords.device, dtype=coords.dtype)
    if matrix.shape == (4, 4):
        matrix = matrix.expand(coords.shape[0], 4, 4)
    if matrix.shape != (coords.shape[0], 4, 4):
        raise ValueError(f"matrix must be (4, 4) or ({coords.shape[0]}, 4, 4), got {list(matrix.shape)}.")
    flat = coords.reshape(coords.shape[0], 3, -1)
    mapped = torch.bmm(matrix[:, :3, :3], flat) + matrix[:, :3, 3:]
    return mapped.reshape(coords.shape)


def sample_at_voxels(
    image: torch.Tensor, coords: torch.Tensor, mode: str = "bilinear", padding_mode: str = "zeros"
) -> torch.Tensor:
    """Sample ``image`` at continuous voxel coordinates (trilinear or nearest, ``align_corners=True``).

    Args:
        image: (B, C, X, Y, Z) volume. Integer label maps come back in their own dtype (sampled in float32, or
            float64 for ids of 2**24 and more).
        coords: (B, 3, X', Y', Z') voxel coordinates in ``image``'s index space (channel i = index along axis i).
        mode: "bilinear" (trilinear) or "nearest".
        padding_mode: value outside the volume: "zeros" (as the bundle warps), "border" or "reflection".

    Returns:
        (B, C, X', Y', Z') samples.
    """
    if mode not in _MODES or padding_mode not in _PADDING:
        raise ValueError(
            f"mode must be one of {_MODES} and padding_mode one of {_PADDING}, got {mode!r}, {padding_mode!r}."
        )
    if image.ndim != 5 or coords.ndim != 5 or coords.shape[1] != 3 or image.shape[0] != coords.shape[0]:
        raise ValueError(
            f"expected image (B, C, X, Y, Z) and coords (B, 3, X', Y', Z') with the same B, got "
            f"{list(image.shape)} and {list(coords.shape)}."
        )
    values = image
    if not image.is_floating_point():  # labels: float32 holds ids below 2**24 exactly (as the bundle's warp samples)
        exact32 = image.numel() == 0 or (-(2**24) < int(image.min()) and int(image.max()) < 2**24)
        values = image.to(torch.float32 if exact32 else torch.float64)
    grid = coords.to(values.dtype)
    scale = torch.tensor([max(int(s) - 1, 1) for s in image.shape[2:]], device=grid.device, dtype=grid.dtype)
    grid = 2.0 * grid / scale.view(1, 3, 1, 1, 1) - 1.0
    grid = grid.permute(0, 2, 3, 4, 1).flip(-1)
    sampled = F.grid_sample(values, grid, mode=mode, padding_mode=padding_mode, align_corners=True)
    if image.is_floating_point():
        return sampled
    return torch.round(sampled).to(image.dtype)


def warp_voxels(image: torch.Tensor, ddf: torch.Tensor, mode: str = "bilinear", padding_mode: str = "zeros"):
    """Backward warp on the image's own grid: ``out(p) = image(p + ddf(p))`` (the bundle's ``Warp`` convention).

    Args:
        image: (B, C, X, Y, Z) volume.
        ddf: (B, 3, X, Y, Z) displacement in voxels; channel i moves along array axis i.

    Returns:
        (B, C, X, Y, Z) warped volume.
    """
    if ddf.ndim != 5 or ddf.shape[1] != 3 or image.ndim != 5 or image.shape[2:] != ddf.shape[2:]:
        raise ValueError(
            f"expected image (B, C, X, Y, Z) and ddf (B, 3, X, Y, Z) on one grid, got {list(image.shape)} and "
            f"{list(ddf.shape)}."
        )
    coords = voxel_grid(ddf.shape[2:], ddf.device, ddf.dtype).unsqueeze(0) + ddf
    return sample_at_voxels(image, coords, mode, padding_mode)
