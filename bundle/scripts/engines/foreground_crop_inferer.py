# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""Run the deformable registration on the pair's foreground box only, then extend the field to the whole grid."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.inferers import Inferer

__all__ = ["ForegroundCropInferer", "crop_to_box", "extend_from_box", "foreground_box"]


def _check_box_settings(margin: int, min_size: int) -> None:
    if int(margin) < 0 or int(min_size) < 1:
        raise ValueError(f"need margin >= 0 and min_size >= 1, got {margin} and {min_size}.")


def foreground_box(
    inputs: torch.Tensor, margin: int = 8, threshold: float = 0.0, min_size: int = 32
) -> tuple[slice, slice, slice]:
    """
    Bounding box of the voxels above ``threshold`` in any channel and batch item, widened by ``margin`` voxels on every
    side and to at least ``min_size`` voxels per axis (centred, clipped to the grid). An empty foreground gives the
    whole grid.

    Args:
        inputs: (B, C, D, H, W) images.
        margin: voxels added on each side of the box (>= 0).
        threshold: intensity above which a voxel is foreground.
        min_size: smallest box side (the network needs a few resolution levels); the grid size where that is smaller.

    Returns:
        one slice per spatial axis.
    """
    if inputs.ndim != 5:
        raise ValueError(f"inputs must be (B, C, D, H, W), got {tuple(inputs.shape)}.")
    _check_box_settings(margin, min_size)
    occupied = (inputs > threshold).flatten(0, 1).any(0)  # (D, H, W)
    box = []
    for axis, size in enumerate(occupied.shape):
        other = tuple(a for a in range(3) if a != axis)
        where = torch.nonzero(occupied.any(dim=other)).flatten()
        if where.numel() == 0:
            return (slice(0, occupied.shape[0]), slice(0, occupied.shape[1]), slice(0, occupied.shape[2]))
        low, high = max(int(where[0]) - int(margin), 0), min(int(where[-1]) + 1 + int(margin), size)
        missing = min(int(min_size), size) - (high - low)
        if missing > 0:  # widen around the centre, then shift back inside the grid
            low = max(low - (missing + 1) // 2, 0)
            high = min(low + min(int(min_size), size), size)
            low = high - min(int(min_size), size)
        box.append(slice(low, high))
    return tuple(box)


class ForegroundCropInferer(Inferer):
    """
    Run ``base_inferer`` on the bounding box of the pair's foreground (:func:`foreground_box`) and extend the resulting
    displacement to the whole fixed grid by repeating its border values.

    Scans in a large, mostly empty grid (e.g. skull-stripped brains in FreeSurfer's conformed 256³ space) otherwise
    show the network a background share it never saw in training, which degrades its field (measured on a FreeSurfer
    pair in docs/results.md); the box also saves time. On scans whose foreground fills the grid it changes nothing.
    Displacements are in voxels, which cropping leaves unchanged; outside the box there is only background, where a
    field continued from the box's faces keeps the map smooth (no folding at the box's faces). A MetaTensor pair is
    cropped into a MetaTensor on the box's grid (same voxel spacing, origin at the box), so the inferers below still
    know the spacing they pick their grid from.

    Args:
        base_inferer: inferer producing a (B, 3, d, h, w) displacement for a (B, 2, d, h, w) pair.
        margin, threshold, min_size: see :func:`foreground_box`.

    Call:
        inputs: (B, 2, D, H, W) moving + fixed (intensity-scaled, background at 0); network: passed to ``base_inferer``.
        Returns (B, 3, D, H, W). One box serves the whole batch.
    """

    def __init__(self, base_inferer: Inferer, margin: int = 8, threshold: float = 0.0, min_size: int = 32) -> None:
        super().__init__()
        if not callable(base_inferer):
            raise ValueError(f"base_inferer must be an inferer (callable), got {type(base_inferer).__name__}.")
        _check_box_settings(margin, min_size)
        self.base_inferer = base_inferer
        self.margin, self.threshold, self.min_size = int(margin), float(threshold), int(min_size)

    def __call__(self, inputs: torch.Tensor, network: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        if inputs.ndim != 5 or inputs.shape[1] != 2:
            raise ValueError(f"inputs must be (B, 2, D, H, W) moving + fixed, got {tuple(inputs.shape)}.")
        plain = inputs.as_tensor() if isinstance(inputs, MetaTensor) else inputs
        box = foreground_box(plain, self.margin, self.threshold, self.min_size)
        if all(b.stop - b.start == s for b, s in zip(box, plain.shape[2:])):
            return self.base_inferer(inputs, network, *args, **kwargs)
        ddf = self.base_inferer(crop_to_box(inputs, box), network, *args, **kwargs)
        return extend_from_box(ddf, box, plain.shape[2:])


def crop_to_box(inputs: torch.Tensor, box: Sequence[slice]) -> torch.Tensor:
    """(B, C, D, H, W) -> the box, contiguous; a MetaTensor's affine (4, 4) or (B, 4, 4) moves its origin to the box's
    first voxel (the spacing, which the inferers read, is kept)."""
    plain = inputs.as_tensor() if isinstance(inputs, MetaTensor) else inputs
    crop = plain[(slice(None), slice(None), *box)].contiguous()
    if not isinstance(inputs, MetaTensor):
        return crop
    affine = inputs.affine.clone()
    start = torch.tensor([float(b.start) for b in box], dtype=affine.dtype, device=affine.device)
    affine[..., :3, 3] = affine[..., :3, 3] + affine[..., :3, :3] @ start
    return MetaTensor(crop, affine=affine)


def extend_from_box(ddf: torch.Tensor, box: Sequence[slice], shape: Sequence[int]) -> torch.Tensor:
    """A (B, 3, d, h, w) displacement found on ``box`` -> (B, 3, *shape) on the whole grid, its border values repeated
    outside the box (a plain tensor)."""
    ddf = ddf.as_tensor() if isinstance(ddf, MetaTensor) else ddf
    return F.pad(ddf, _padding(box, shape), mode="replicate")


def _padding(box: Sequence[slice], shape: Sequence[int]) -> list[int]:
    """``F.pad`` widths (last axis first) that bring a crop at ``box`` back to ``shape``."""
    widths: list[int] = []
    for b, size in reversed(list(zip(box, shape))):
        widths += [b.start, int(size) - b.stop]
    return widths
