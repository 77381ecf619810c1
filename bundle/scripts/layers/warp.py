# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""``Warp``: the network layer (and config component ``scripts.layers.Warp``) over :func:`warp_image`."""

from __future__ import annotations

import torch
from torch import nn

from scripts.layers.sampling import MODES, PADDING_MODES, SLAB_VOXELS, warp_image, warp_image_in_slabs

__all__ = ["Warp"]


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
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
        if padding_mode not in PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}.")
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
        # integer label maps are sampled in float32 (float64 for ids of 2**24 and more) and keep their dtype
        return warp_image(image, ddf.to(image.dtype) if image.is_floating_point() else ddf, self.mode, self.padding_mode)

    def in_slabs(self, image: torch.Tensor, ddf: torch.Tensor, max_voxels: int = SLAB_VOXELS) -> torch.Tensor:
        """:meth:`forward`'s result bit for bit, computed one slab of the field at a time (no gradient): for
        full-resolution outputs, where the whole coordinate map of a CT-sized field takes gigabytes. Not part of a
        scripted model (TorchScript compiles ``forward`` only)."""
        if image.dim() != 5 or ddf.dim() != 5 or ddf.shape[1] != 3 or (image.shape[0], image.shape[2:]) != (
            ddf.shape[0], ddf.shape[2:]
        ):
            raise ValueError(
                f"expected image (B, C, D, H, W) and ddf (B, 3, D, H, W) of one batch size and spatial shape, got "
                f"{list(image.shape)} and {list(ddf.shape)}."
            )
        with torch.no_grad():
            field = ddf.to(image.dtype) if image.is_floating_point() else ddf
            return warp_image_in_slabs(image, field, self.mode, self.padding_mode, max_voxels)
