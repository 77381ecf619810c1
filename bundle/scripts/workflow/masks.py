# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""Region masks (e.g. brain masks of whole-head scans): the registration looks inside them only.

With ``moving_mask`` / ``fixed_mask``, each image is replaced by its background value outside its mask before the
affine stage, the network and the field refinement see it, so their similarity (and the network's input normalisation)
is computed on the masked region: a whole-head scan with a brain mask is registered as its skull-stripped brain would
be. The outputs stay on the full fixed grid, and ``warped_image.nii.gz`` is the whole moving scan (skull and neck
included) warped, because it is made from the unmasked copy the configs keep before masking (``moving_source``).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform

from scripts.io.input_checks import is_given

__all__ = ["MaskImagesd"]


class MaskImagesd(MapTransform):
    """Set each image to its background (its minimum) outside its mask; images without a given mask pass unchanged.

    The background is the image's own minimum, not 0: in raw units 0 may be tissue (0 HU is water), and a mask must
    not paint a slab of it around the region.

    Args:
        keys: image keys, e.g. ``("moving_image", "fixed_image")``: channel-first (C, X, Y, Z) volumes.
        mask_keys: the mask key of each image, same order (``("moving_mask", "fixed_mask")``): (1, X, Y, Z) on the
            image's grid (checked from the headers first), inside where > 0.
        allow_missing_keys: skip images that are absent.
    """

    def __init__(
        self,
        keys: KeysCollection = ("moving_image", "fixed_image"),
        mask_keys: KeysCollection = ("moving_mask", "fixed_mask"),
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.mask_keys = (mask_keys,) if isinstance(mask_keys, str) else tuple(mask_keys)
        if len(self.mask_keys) != len(self.keys):
            raise ValueError(f"mask_keys must name one mask per image key, got {self.mask_keys} for {self.keys}.")

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        masks = dict(zip(self.keys, self.mask_keys))
        for key in self.key_iterator(d):
            mask = d.get(masks[key])
            if not is_given(mask):
                continue  # no mask given for this image (a given one is loaded by now)
            image = d[key]
            inside = torch.as_tensor(mask) > 0
            if inside.shape[1:] != image.shape[1:]:
                raise ValueError(
                    f"{masks[key]} {tuple(inside.shape)} is not on the grid of {key} {tuple(image.shape)}; expected the "
                    "mask loaded and reoriented with its image."
                )
            masked = image.clone()
            masked[~inside.expand_as(image)] = image.min()
            d[key] = masked
        return d
