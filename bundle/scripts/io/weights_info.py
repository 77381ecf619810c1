# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""The resolution weights were trained at: a small JSON record beside the weights, and a check at inference.

SACB-Net runs at ``network_scale`` of the image resolution (``scripts.engines.ResolutionInferer``); weights trained at
one scale see differently sized structures at another and give worse fields without any error. Training therefore
records its ``network_scale`` next to its best model (``model.pt`` -> ``model.json``, e.g. ``{"network_scale": 0.5}``;
other keys are allowed and ignored here), and inference warns when it runs at another scale.

The record may also hold ``spacing_mm``, the voxel spacing of the training images (``{"network_scale": 0.5,
"spacing_mm": 1.0}``: the network saw 2 mm voxels). Together they give the voxel size the network was trained on
(:func:`trained_network_spacing`), and each pair is checked against it (:func:`check_network_spacing`): a 3 mm scan at
``network_scale`` 0.5 shows the network 6 mm voxels, three times coarser than in training, although the scale matches.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from scripts.io.atomic import write_json
from scripts.io.errors import RegistrationInputError
from scripts.io.input_checks import read_header, voxel_spacing

__all__ = [
    "NETWORK_SCALE_KEY",
    "weights_info_path",
    "write_weights_info",
    "read_trained_network_scale",
    "check_network_scale",
    "SPACING_KEY",
    "MAX_NETWORK_SPACING_RATIO",
    "read_trained_spacing",
    "training_spacing",
    "trained_network_spacing",
    "check_network_spacing",
]

logger = logging.getLogger(__name__)

#: the key of the record that holds the training ``network_scale``
NETWORK_SCALE_KEY = "network_scale"

#: the key of the record that holds the voxel spacing (mm) of the training images
SPACING_KEY = "spacing_mm"

#: a pair's network voxel more than this factor larger or smaller than the trained one is warned about (1.5: a 3 mm
#: scan at the trained scale, 3x, is; a 0.9 mm or 1.2 mm scan is not)
MAX_NETWORK_SPACING_RATIO = 1.5

#: per-axis tolerance when comparing the inference scale with the trained one
_TOLERANCE = 1e-6


def weights_info_path(weights_path: str | os.PathLike) -> Path:
    """
    The record beside a weights file: the same name with the suffix ``.json`` (``models/model.pt`` ->
    ``models/model.json``).

    Raises:
        ValueError: ``weights_path`` itself ends with ``.json`` (the record would be the weights file).
    """
    path = Path(weights_path)
    if path.suffix == ".json":
        raise ValueError(f"weights file '{path}' ends with .json, the suffix of its own record; rename the weights.")
    return path.with_suffix(".json")


def _scale_triplet(value: Any, upper: float | None = 1.0) -> tuple[float, float, float] | None:
    """``value`` (a number or 3 numbers) as three floats when each is finite, > 0 and <= ``upper``; else None."""
    items = list(value) if isinstance(value, Sequence) and not isinstance(value, (str, bytes)) else [value] * 3
    if len(items) != 3 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in items):
        return None
    floats = tuple(float(v) for v in items)
    if not all(math.isfinite(v) and v > 0 and (upper is None or v <= upper) for v in floats):
        return None
    return floats  # type: ignore[return-value]


def _describe(scale: Sequence[float]) -> str:
    """``0.5`` for an isotropic scale, ``[0.5, 0.5, 1]`` for one per axis."""
    if max(scale) - min(scale) <= _TOLERANCE:
        return f"{scale[0]:g}"
    return "[" + ", ".join(f"{v:g}" for v in scale) + "]"


def write_weights_info(weights_path: str | os.PathLike, network_scale: float | Sequence[float], **extra: Any) -> Path:
    """
    Write (atomically) the record of the weights at ``weights_path``: ``{"network_scale": network_scale, **extra}``.
    The weights file need not exist yet (training writes the record when it starts, its best model later); the folder
    is created when missing.

    Args:
        weights_path: the weights the record describes, e.g. ``runs/train/model.pt``.
        network_scale: the resolution they were trained at, relative to the image: a number or one per axis, in (0, 1].
        extra: further JSON-serialisable entries (kept in the file), e.g. ``spacing_mm``: the training images' voxel
            spacing (a positive number or 3), which inference compares each pair with (:func:`check_network_spacing`).

    Returns:
        the record's path (:func:`weights_info_path`).

    Raises:
        ValueError: ``network_scale`` is not a number or 3 numbers in (0, 1], or ``spacing_mm`` not positive.
    """
    if _scale_triplet(network_scale) is None:
        raise ValueError(f"network_scale must be a number or 3 numbers in (0, 1], got {network_scale!r}.")
    if extra.get(SPACING_KEY) is not None and _scale_triplet(extra[SPACING_KEY], upper=None) is None:
        raise ValueError(f"{SPACING_KEY} must be a positive number or 3 positive numbers, got {extra[SPACING_KEY]!r}.")
    value = [float(v) for v in network_scale] if isinstance(network_scale, Sequence) else float(network_scale)
    if extra.get(SPACING_KEY, 0) is None:  # unknown (training from volumes in memory): no entry rather than null
        extra.pop(SPACING_KEY)
    return write_json({NETWORK_SCALE_KEY: value, **extra}, weights_info_path(weights_path))


def _read_record(weights_path: str | os.PathLike) -> Mapping | None:
    """The record beside the weights as a mapping; None without one. RegistrationInputError: unreadable, not an
    object (the message names the file)."""
    path = weights_info_path(weights_path)
    if not path.is_file():
        return None
    expected = f'expected a JSON object such as {{"{NETWORK_SCALE_KEY}": 0.5}} describing \'{weights_path}\''
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as error:
        first_line = str(error).splitlines()[0] if str(error) else ""
        raise RegistrationInputError(
            f"weights record '{path}' could not be read ({type(error).__name__}: {first_line}); {expected}. Fix or "
            "delete it (without it the training resolution of the weights is not checked)."
        ) from error
    if not isinstance(record, Mapping):
        raise RegistrationInputError(f"weights record '{path}' holds {type(record).__name__}; {expected}.")
    return record


def read_trained_network_scale(weights_path: str | os.PathLike) -> tuple[float, float, float] | None:
    """
    The ``network_scale`` (one value per axis) recorded beside the weights at ``weights_path``.

    Returns:
        None when nothing is known: no record, or a record without (or with a null) ``network_scale``.

    Raises:
        RegistrationInputError: the record is not readable JSON, not an object, or its ``network_scale`` is not a
            number or 3 numbers in (0, 1]; the message names the file.
    """
    record = _read_record(weights_path)
    value = None if record is None else record.get(NETWORK_SCALE_KEY)
    if value is None:
        return None
    scale = _scale_triplet(value)
    if scale is None:
        raise RegistrationInputError(
            f"weights record '{weights_info_path(weights_path)}': {NETWORK_SCALE_KEY} must be a number or 3 numbers in "
            f"(0, 1], got {value!r}."
        )
    return scale


def read_trained_spacing(weights_path: str | os.PathLike) -> tuple[float, float, float] | None:
    """
    The voxel spacing (mm, one value per axis) of the images the weights at ``weights_path`` were trained on.

    Returns:
        None when nothing is known: no record, or a record without (or with a null) ``spacing_mm``.

    Raises:
        RegistrationInputError: the record is unreadable, or its ``spacing_mm`` is not a positive number or 3 positive
            numbers; the message names the file.
    """
    record = _read_record(weights_path)
    value = None if record is None else record.get(SPACING_KEY)
    if value is None:
        return None
    spacing = _scale_triplet(value, upper=None)
    if spacing is None:
        raise RegistrationInputError(
            f"weights record '{weights_info_path(weights_path)}': {SPACING_KEY} must be a positive number or 3 positive "
            f"numbers (the training images' voxel size in mm, e.g. 1.0), got {value!r}."
        )
    return spacing


def training_spacing(pairs: Sequence[Mapping[str, Any]], keys: Sequence[str] = ("moving_image", "fixed_image")) -> float | None:
    """
    The voxel size of a training set, for its weights record (``spacing_mm``): the median over its distinct image
    files of each file's finest voxel spacing (mm), read from the headers. The finest axis is the one the network grid
    follows (its other axes are resampled to it, :py:func:`scripts.engines.resolution_inferer.isotropic_network_scale`).

    Args:
        pairs: training pairs, e.g. ``scripts.io.training_pairs(...)``.
        keys: the image entries of a pair; entries that are not file paths (volumes given in memory) are skipped.

    Returns:
        the spacing in mm, or None when no entry is a file path.

    Raises:
        RegistrationInputError: a listed file is missing or not a readable NIfTI header.
    """
    paths = sorted({str(pair[key]) for pair in pairs for key in keys if isinstance(pair.get(key), (str, os.PathLike))})
    if not paths:
        return None
    finest = [float(voxel_spacing(read_header(path, "training image").affine).min()) for path in paths]
    return round(float(np.median(finest)), 6)


def trained_network_spacing(weights_path: str | os.PathLike | None) -> tuple[float, float, float] | None:
    """
    The voxel size (mm per axis) of the grid the network was trained on: the record's ``spacing_mm`` divided by its
    ``network_scale`` (1 mm images at 0.5: 2 mm). None when either is unknown or there are no weights (``weights_path``
    None, empty or missing), so nothing is checked.

    Raises:
        RegistrationInputError: the record is unreadable or invalid.
    """
    if not weights_path or not os.path.isfile(weights_path):
        return None
    spacing, scale = read_trained_spacing(weights_path), read_trained_network_scale(weights_path)
    if spacing is None or scale is None:
        return None
    values = [s / k for s, k in zip(spacing, scale)]
    return values[0], values[1], values[2]


def check_network_scale(network_scale: float | Sequence[float], weights_path: str | os.PathLike | None) -> bool:
    """
    Compare the scale inference runs at with the one the weights were trained at (their record, see
    :func:`read_trained_network_scale`) and log one warning when they differ (per axis, by more than 1e-6).

    Meant for a workflow's ``initialize`` step, next to :func:`scripts.io.check_checkpoint`. A record that also gives
    ``spacing_mm`` is not compared here: what matters is the voxel size the network sees, which depends on each
    pair's spacing too (3 mm scans at 1.5 show it what 1 mm scans at 0.5 did) and is checked per pair instead
    (:func:`check_network_spacing`).

    Args:
        network_scale: the inference ``network_scale`` (a positive number or one per axis).
        weights_path: the weights inference loads (``ckpt_path``); None, empty or a missing file: nothing to check.

    Returns:
        True when the scales match or nothing is known (no weights file, no record) or the record gives
        ``spacing_mm``; False when it warned.

    Raises:
        ValueError: ``network_scale`` is not a positive number or 3 positive numbers.
        RegistrationInputError: the record is unreadable or invalid.
    """
    if not weights_path or not os.path.isfile(weights_path):
        return True
    trained = read_trained_network_scale(weights_path)
    if trained is None:
        return True
    used = _scale_triplet(network_scale, upper=None)
    if used is None:
        raise ValueError(f"network_scale must be a positive number or 3 positive numbers, got {network_scale!r}.")
    if all(abs(a - b) <= _TOLERANCE for a, b in zip(used, trained)) or read_trained_spacing(weights_path) is not None:
        return True
    logger.warning(
        "inference runs at network_scale %s, but the weights '%s' were trained at network_scale %s (recorded in "
        "'%s'): the network sees the images at another resolution than in training, which usually gives a worse "
        "field. Run at the trained scale (--network_scale %s) or retrain at this one (configs/train.json with "
        "--network_scale %s).",
        _describe(used),
        weights_path,
        _describe(trained),
        weights_info_path(weights_path),
        _shell_value(trained),
        _shell_value(used),
    )
    return False


def _shell_value(scale: Sequence[float]) -> str:
    """The scale as a command-line value: ``0.5``, or ``"[0.5, 0.5, 1]"`` (quoted) for one per axis."""
    text = _describe(scale)
    return f'"{text}"' if text.startswith("[") else text


def _mm(values: Sequence[float]) -> str:
    """``2 mm`` for one size, ``1 x 1 x 3 mm`` for one per axis."""
    if max(values) - min(values) <= 1e-3 * max(values):
        return f"{values[0]:.3g} mm"
    return " x ".join(f"{v:.3g}" for v in values) + " mm"


def check_network_spacing(
    network_spacing: Sequence[float],
    trained_spacing: Sequence[float] | None,
    image_spacing: Sequence[float],
    source: Any,
    max_ratio: float = MAX_NETWORK_SPACING_RATIO,
) -> bool:
    """
    Warn (once, naming the image) when the network grid of a pair is much coarser or finer than the grid the weights
    were trained on: the network then sees structures at another size in voxels than in training, which usually
    gives a worse field without any error.

    Args:
        network_spacing: the voxel size (mm per axis) of the pair's network grid (``spacing / scale`` per axis).
        trained_spacing: the trained one (:func:`trained_network_spacing`); None: nothing known, nothing checked.
        image_spacing: the fixed image's voxel spacing (mm per axis), for the message and the suggested scale.
        source: the fixed image (its path), for the message.
        max_ratio: largest accepted ratio between the two sizes, either way (compared on the finest axes).

    Returns:
        True when they agree or nothing is known; False when it warned.
    """
    if trained_spacing is None:
        return True
    used, trained = min(float(v) for v in network_spacing), min(float(v) for v in trained_spacing)
    ratio = used / trained
    if 1.0 / max_ratio <= ratio <= max_ratio:
        return True
    suggested = min(float(v) for v in image_spacing) / trained
    logger.warning(
        "fixed image '%s' (voxels of %s): the network works on %s voxels here, but its weights were trained on %s "
        "voxels (%.2gx %s), so it sees every structure at another size than in training, which usually gives a worse "
        "field. Run at --network_scale %.3g (the network then works on %s voxels) or resample the scans.",
        source,
        _mm(image_spacing),
        _mm(network_spacing),
        _mm(trained_spacing),
        ratio if ratio > 1 else 1.0 / ratio,
        "coarser" if ratio > 1 else "finer",
        suggested,
        _mm([trained]),
    )
    return False
