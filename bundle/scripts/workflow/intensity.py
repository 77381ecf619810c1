# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""What the registration sees of the inputs' intensities: scaling to [0, 1] by robust percentiles (MRI, the default) or
a fixed window (CT in HU), and region masks (e.g. brain masks of whole-head scans).

With ``moving_mask`` / ``fixed_mask`` (:class:`MaskImagesd`), each image is replaced by its background value outside
its mask before the affine stage, the network and the field refinement see it, so their similarity (and the network's
input normalisation) is computed on the masked region: a whole-head scan with a brain mask is registered as its
skull-stripped brain would be. The outputs stay on the full fixed grid, and ``warped_image.nii.gz`` is the whole moving
scan warped, because it is made from the unmasked copy the configs keep before masking (``moving_source``).
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, ScaleIntensityRange, ScaleIntensityRangePercentiles

from scripts.io.errors import RegistrationInputError
from scripts.io.input_checks import is_given
from scripts.layers.intensity import AUTO_BACKGROUND, check_background, check_intensity_window

__all__ = ["CT_HINT_BELOW", "MaskImagesd", "ScaleRegistrationIntensityd", "intensity_overrides"]

logger = logging.getLogger(__name__)

#: an input with values below this (and no window) is probably a CT in Hounsfield units: the log suggests a window
CT_HINT_BELOW = -500.0


class ScaleRegistrationIntensityd(MapTransform):
    """
    Scale each image of a pair to [0, 1] for the network, the refinement and the foreground box.

    Without ``window`` (MRI): MONAI's ``ScaleIntensityRangePercentiles`` (``percentiles`` -> 0 and 1, clipped); a
    numeric ``background`` first clips the values below it (scanner padding of -2048 HU must not set the lower
    percentile), and an image with values below ``CT_HINT_BELOW`` gets a log line suggesting a window (percentiles of
    a CT depend on how much air and padding the field of view holds). With ``window`` ``(low, high)`` (CT, e.g.
    (-1000, 1000) HU): MONAI's ``ScaleIntensityRange``, clipped, the same mapping for every scan; air and padding
    become 0, the background the network's zero padding assumes.

    Args:
        keys: image keys, each (C, X, Y, Z) in raw units (after :py:class:`scripts.workflow.ResampleToFixedGridd`).
        window: ``(low, high)`` raw values, the string ``"LOW,HIGH"``, or None for percentile scaling.
        percentiles: ``(lower, upper)`` percentiles in [0, 100] mapped to 0 and 1 without a window.
        background: ``"auto"`` (the image's minimum: nothing is clipped) or a raw number (e.g. -1024 for CT).
        allow_missing_keys: skip absent keys.
    """

    def __init__(
        self,
        keys: KeysCollection,
        window: Sequence[float] | str | None = None,
        percentiles: Sequence[float] = (0.5, 99.5),
        background: float | str = AUTO_BACKGROUND,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.window = check_intensity_window(window)
        lower, upper = (float(p) for p in percentiles)
        if not 0.0 <= lower < upper <= 100.0:
            raise ValueError(f"percentiles must be (lower, upper) with 0 <= lower < upper <= 100, got {percentiles!r}.")
        self.background = check_background(background)
        if self.window is None:
            self.scale = ScaleIntensityRangePercentiles(lower, upper, 0.0, 1.0, clip=True)
        else:
            self.scale = ScaleIntensityRange(self.window[0], self.window[1], 0.0, 1.0, clip=True)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            if self.window is None:
                lowest = float(torch.as_tensor(image).min())
                if lowest < CT_HINT_BELOW:
                    self._hint(key, image, lowest)
                if self.background != AUTO_BACKGROUND and lowest < self.background:
                    image = torch.clamp(image, min=self.background)  # a MetaTensor stays one (affine, meta kept)
            d[key] = self.scale(image)
        return d

    def _hint(self, key: Hashable, image: Any, lowest: float) -> None:
        source = getattr(image, "meta", {}).get("filename_or_obj", key)
        logger.warning(
            "%s ('%s') has intensities down to %g, below %g: a CT in Hounsfield units? Without an intensity window it "
            "is scaled by percentiles, which put air and scanner padding at scan-dependent grey levels; set "
            "--intensity_window=-1000,1000 --background=-1024 (config ids intensity_window: [-1000, 1000], "
            "background_value: -1024), as configs/presets/abdomen_ct.json does (docs/usage.md, 'CT').",
            key, source, lowest, CT_HINT_BELOW,
        )


def intensity_overrides(window: Any = None, background: Any = None) -> dict[str, Any]:
    """
    The CLI's ``--intensity_window`` / ``--background`` as run overrides of the config ids ``intensity_window`` /
    ``background_value`` (None: not given, the config's value stays). Checked here, before anything runs.

    Raises:
        RegistrationInputError: a window that is not two finite numbers LOW < HIGH, a background that is not "auto"
            or a finite number (one line, exit 2 on the CLI).
    """
    try:  # the messages start with the config id's name: "intensity_window must ...", "background must ..."
        window = None if window is None else check_intensity_window(window)
        background = None if background is None else check_background(background)
    except ValueError as error:
        raise RegistrationInputError(f"--{error}") from error
    overrides: dict[str, Any] = {} if window is None else {"intensity_window": list(window)}
    return overrides | ({} if background is None else {"background_value": background})


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
