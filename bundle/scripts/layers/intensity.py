# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""
What an image's background is and how a fixed intensity window scales it: the two settings that make a CT in
Hounsfield units (HU) register like a CT.

* **Background** (config id ``background_value``): the raw value that stands for "nothing here", put wherever a
  resampled image has no data (outside the moving field of view). ``"auto"`` is the image's minimum, which is 0 for
  skull-stripped MRI (so MRI results do not change) and air or the scanner's padding for CT; a number fixes it (-1024
  HU: air). Zero is wrong for CT: 0 HU is soft tissue.
* **Intensity window** (config id ``intensity_window``): ``(low, high)`` raw values clipped and scaled linearly to
  [0, 1], instead of robust percentiles, as uniGradICON scales CT (-1000 to 1000 HU). Percentiles of a CT depend on
  how much air and padding the field of view holds: with -3024 HU padding, air lands near mid-grey.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = [
    "AUTO_BACKGROUND",
    "background_per_key",
    "check_background",
    "check_intensity_window",
    "resolve_background",
    "window_intensity",
]

#: ``background_value`` that means "the image's minimum"
AUTO_BACKGROUND = "auto"


def check_background(background) -> float | str:
    """``background`` as ``"auto"`` or a finite float; ValueError naming what is accepted otherwise."""
    if isinstance(background, str) and background.strip().lower() == AUTO_BACKGROUND:
        return AUTO_BACKGROUND
    try:
        value = float(background)
    except (TypeError, ValueError):
        value = math.nan
    if isinstance(background, bool) or not math.isfinite(value):
        raise ValueError(f"background must be 'auto' (the image's minimum) or a finite number such as -1024 (HU), "
                         f"got {background!r}.")
    return value


def resolve_background(image: torch.Tensor, background=AUTO_BACKGROUND) -> float:
    """The raw background value of ``image`` (any shape): its minimum for ``"auto"``, else ``background`` itself."""
    background = check_background(background)
    if background != AUTO_BACKGROUND:
        return float(background)
    if image.numel() == 0:
        raise ValueError("cannot take the background ('auto': the minimum) of an empty image.")
    return float(image.min())


def background_per_key(background, modes: Sequence[str]) -> list[float | str]:
    """One checked background per key of a transform with one interpolation ``mode`` per key: None gives
    ``"auto"`` to ``"bilinear"`` (image) keys and 0 to ``"nearest"`` (label map) keys; one value is used for all."""
    if background is None:
        return [AUTO_BACKGROUND if m == "bilinear" else 0.0 for m in modes]
    values = [background] * len(modes) if isinstance(background, (str, int, float)) else list(background)
    if len(values) != len(modes):
        raise ValueError(f"background needs one entry per key ({len(modes)}), got {background!r}.")
    return [check_background(v) for v in values]


def check_intensity_window(window) -> tuple[float, float] | None:
    """
    ``window`` as ``(low, high)`` floats, or None for no window.

    Accepts None, ``"none"``, two numbers (list/tuple) or the string ``"LOW,HIGH"`` (the CLI's ``--intensity_window
    -1000,1000``). Raises ValueError unless both are finite and ``low < high``.
    """
    if window is None or (isinstance(window, str) and window.strip().lower() in ("", "none", "null")):
        return None
    values = window.strip().strip("[]()").split(",") if isinstance(window, str) else window
    try:
        low, high = (float(v) for v in values)  # not two numbers: TypeError or ValueError (unpacking)
    except (TypeError, ValueError):
        low, high = math.nan, math.nan
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise ValueError(f"intensity_window must be two finite numbers LOW,HIGH with LOW < HIGH (e.g. -1000,1000 for "
                         f"CT in HU), got {window!r}.")
    return low, high


def window_intensity(image: torch.Tensor, window) -> torch.Tensor:
    """``image`` clipped to ``window`` (low, high) and scaled linearly to [0, 1] (low -> 0, high -> 1), as float.

    Everything at or below ``low`` (air, scanner padding below -1024 HU) becomes 0, the background of the scaled
    image."""
    low, high = check_intensity_window(window) or (None, None)
    if low is None:
        raise ValueError("window_intensity needs a window (low, high), got None.")
    return (image.float().clamp(low, high) - low) / (high - low)
