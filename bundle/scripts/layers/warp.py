# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""Backward warping of 3-D volumes by a dense displacement field, scriptable at any size."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Warp", "compose_displacements", "identity_grid", "warp_image"]

_MODES = ("bilinear", "nearest")
_PADDING_MODES = ("zeros", "border", "reflection")


def identity_grid(spatial_shape: list[int], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Voxel coordinates of a grid, shape (3, D, H, W); channel i holds the index along array axis i."""
    axes = [torch.arange(int(s), device=device, dtype=dtype) for s in spatial_shape]
    return torch.stack(torch.meshgrid(axes, indexing="ij"), dim=0)


def warp_image(image: torch.Tensor, ddf: torch.Tensor, mode: str = "bilinear", padding_mode: str = "zeros") -> torch.Tensor:
    """
    Sample ``image`` at ``p + ddf(p)`` for every voxel ``p`` (backward warping, ``align_corners=True``).

    Args:
        image: (B, C, D, H, W) volume to resample.
        ddf: (B, 3, D, H, W) displacement in voxels; channel i moves along array axis i.
        mode: "bilinear" (trilinear in 3-D) for images, "nearest" for label maps.
        padding_mode: value outside the volume: "zeros", "border" or "reflection".

    Returns:
        (B, C, D, H, W) warped volume, same dtype as ``image`` for floating inputs.
    """
    spatial = ddf.shape[2:]
    grid = identity_grid([int(s) for s in spatial], ddf.device, ddf.dtype).unsqueeze(0) + ddf
    # grid_sample wants coordinates in [-1, 1] with the last axis first (x = W, y = H, z = D).
    scale = torch.tensor([max(int(s) - 1, 1) for s in spatial], device=ddf.device, dtype=ddf.dtype)
    grid = 2.0 * grid / scale.view(1, 3, 1, 1, 1) - 1.0
    grid = grid.permute(0, 2, 3, 4, 1).flip(-1)
    return F.grid_sample(image, grid, mode=mode, padding_mode=padding_mode, align_corners=True)


def compose_displacements(outer: torch.Tensor, inner: torch.Tensor) -> torch.Tensor:
    """
    Displacement of ``p ↦ q + outer(q)`` with ``q = p + inner(p)``: ``inner`` is followed first, then ``outer``, so
    warping an image by the result equals warping it by ``outer`` and the outcome by ``inner``.

    ``outer`` is sampled with border padding: near the volume's edge the composed map keeps the nearest displacement
    instead of dropping to zero (which would fold there).

    Args:
        outer: (B, 3, D, H, W) displacement in voxels, applied to the image first.
        inner: (B, 3, D, H, W) displacement in voxels on the same grid.

    Returns:
        (B, 3, D, H, W) composed displacement in voxels.
    """
    if outer.shape != inner.shape or outer.dim() != 5 or outer.shape[1] != 3:
        raise ValueError(f"need two (B, 3, D, H, W) displacements of one shape, got {list(outer.shape)} and {list(inner.shape)}.")
    return inner + warp_image(outer, inner, "bilinear", "border")


class Warp(nn.Module):
    """
    Warp a volume with a dense displacement field (DDF) given in voxels.

    Same convention as :py:class:`monai.networks.blocks.Warp` (``warped(p) = image(p + ddf(p))``, channel i of the DDF is
    the shift along spatial axis i, ``align_corners=True``), but built only from TorchScript-friendly operations and with
    the sampling grid created per call, so a scripted or exported model runs at any spatial size.

    Args:
        mode: "bilinear" (trilinear interpolation) for intensity images, "nearest" for label maps.
        padding_mode: "zeros" (as SACB-Net trains), "border" (MONAI's ``Warp`` default) or "reflection".

    Example::

        warp = Warp(mode="nearest")
        warped_label = warp(label, ddf)  # label (B, 1, D, H, W), ddf (B, 3, D, H, W)
    """

    def __init__(self, mode: str = "bilinear", padding_mode: str = "zeros") -> None:
        super().__init__()
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {mode!r}.")
        if padding_mode not in _PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {_PADDING_MODES}, got {padding_mode!r}.")
        self.mode = mode
        self.padding_mode = padding_mode

    def forward(self, image: torch.Tensor, ddf: torch.Tensor) -> torch.Tensor:
        """
        Args:
            image: (B, C, D, H, W) volume.
            ddf: (B, 3, D, H, W) displacement in voxels.

        Returns:
            (B, C, D, H, W) warped volume; integer label maps come back in their own dtype.
        """
        if image.dim() != 5 or ddf.dim() != 5:
            raise ValueError(
                f"expected image (B, C, D, H, W) and ddf (B, 3, D, H, W), got {list(image.shape)} and {list(ddf.shape)}."
            )
        if ddf.shape[1] != 3:
            raise ValueError(f"ddf must have 3 channels (one per spatial axis), got shape {list(ddf.shape)}.")
        if image.shape[0] != ddf.shape[0] or image.shape[2:] != ddf.shape[2:]:
            raise ValueError(
                f"image {list(image.shape)} and ddf {list(ddf.shape)} must share batch size and spatial shape."
            )
        if image.is_floating_point():
            return warp_image(image, ddf.to(image.dtype), self.mode, self.padding_mode)
        # Label maps: sample in floating point, return the caller's integer dtype.
        warped = warp_image(image.to(ddf.dtype), ddf, self.mode, self.padding_mode)
        return torch.round(warped).to(image.dtype)
