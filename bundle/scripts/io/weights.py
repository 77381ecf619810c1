# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""The network's weights on disk: checkpoints (find the newest, read one safely, check it fits the network, install
it) and the record of the resolution they were trained at.

SACB-Net runs at ``network_scale`` of the image resolution (``scripts.engines.ResolutionInferer``); weights trained at
one scale see differently sized structures at another and give worse fields without any error. Training therefore
records its ``network_scale`` next to its best model (``model.pt`` -> ``model.json``, e.g. ``{"network_scale": 0.5}``;
other keys are allowed and ignored here), and inference warns when it runs at another scale. The record may also hold
``spacing_mm``, the voxel spacing of the training images: together they give the voxel size the network was trained on
(:func:`trained_network_spacing`), which each pair is checked against (:func:`check_network_spacing`): a 3 mm scan at
``network_scale`` 0.5 shows the network 6 mm voxels, three times coarser than 1 mm training images at 0.5, although the
scale matches.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from scripts.io.atomic import atomic_path, write_json
from scripts.io.errors import RegistrationInputError
from scripts.io.input_checks import check_file_exists, read_header, voxel_spacing

logger = logging.getLogger(__name__)

#: the record's key of the training ``network_scale``
NETWORK_SCALE_KEY = "network_scale"
#: the record's key of the voxel spacing (mm) of the training images
SPACING_KEY = "spacing_mm"
#: a pair's network voxel more than this factor larger or smaller than the trained one is warned about (1.5: a 3 mm
#: scan at the trained scale, 3x, is; a 0.9 mm or 1.2 mm scan is not)
MAX_NETWORK_SPACING_RATIO = 1.5
#: per-axis tolerance when comparing the inference scale with the trained one
_TOLERANCE = 1e-6
_IN_UNIT_RANGE = "a number or 3 numbers in (0, 1]"
_POSITIVE = "a positive number or 3 positive numbers"
_COUNTER = re.compile(r"(epoch|iteration)=(\d+)")
# the first encoder convolution of scripts.networks.SACBNet: (base_channels, 1, 3, 3, 3)
_FIRST_CONV = "encoder.0.convs.0.conv.weight"


# --- checkpoints


def latest_checkpoint(ckpt_dir: str | os.PathLike, prefix: str = "checkpoint") -> str | None:
    """The newest ``<prefix>*.pt`` in ``ckpt_dir`` (``CheckpointSaver``'s ``checkpoint_epoch=12.pt``) by the
    epoch/iteration number in its name, then by modification time; None when there is none. Hidden temporary files of
    interrupted saves are ignored."""
    folder = Path(ckpt_dir)
    candidates = [p for p in folder.glob(f"{prefix}*.pt") if p.is_file() and not p.name.startswith(".")]
    if not candidates:  # also when the folder does not exist (yet)
        return None

    def rank(path: Path) -> tuple[int, float]:
        match = _COUNTER.search(path.name)
        return (int(match.group(2)) if match else -1, path.stat().st_mtime)

    return str(max(candidates, key=rank))


def check_state_dict(
    expected: Mapping[str, torch.Tensor], found: Mapping[str, torch.Tensor], source: Any, show: int = 5
) -> None:
    """Raise when a checkpoint's keys or shapes differ from the network's, listing the first ``show`` of each kind."""
    problems = {
        "missing": [k for k in expected if k not in found],
        "unexpected": [k for k in found if k not in expected],
        "shape-mismatched": [
            f"{k}: checkpoint {tuple(found[k].shape)} vs network {tuple(expected[k].shape)}"
            for k in expected
            if k in found and tuple(found[k].shape) != tuple(expected[k].shape)
        ],
    }
    parts = []
    for kind, items in problems.items():
        if items:
            more = f", ... ({len(items) - show} more)" if len(items) > show else ""
            parts.append(f"{len(items)} {kind} keys ({', '.join(items[:show])}{more})")
    if not parts:
        return
    width = ""  # the one SACBNet setting that changes the weights, named when both are SACB-Net weights
    if _FIRST_CONV in expected and _FIRST_CONV in found:
        theirs, ours = int(found[_FIRST_CONV].shape[0]), int(expected[_FIRST_CONV].shape[0])
        width = f" (the checkpoint has base_channels={theirs}, network_def {ours})" if theirs != ours else ""
    raise RegistrationInputError(
        f"checkpoint '{source}' does not match the network: {'; '.join(parts)}. Expected weights saved from the same "
        f"architecture as network_def{width}: scripts.networks.SACBNet with the same base_channels, the only SACBNet "
        "setting that changes the weights (num_clusters, kmeans_iterations, diffeomorphic and integration_steps do "
        "not). Use a checkpoint trained with this bundle's configs or fix network_def."
    )


def read_checkpoint_state(
    path: str | os.PathLike, map_location: str | torch.device = "cpu"
) -> Mapping[str, torch.Tensor]:
    """The network weights in a checkpoint file: a plain state dict, or one under ``model``/``network``/``state_dict``
    (MONAI CheckpointSaver and common trainers), without the ``module.`` prefix of DataParallel. RegistrationInputError
    when the file is missing, unreadable/truncated, or holds no state dict of tensors."""
    path = check_file_exists(path, "checkpoint")
    try:
        checkpoint = torch.load(str(path), map_location=map_location, weights_only=True)
    except Exception as error:
        raise RegistrationInputError(
            f"checkpoint '{path}' could not be read ({type(error).__name__}: {str(error).splitlines()[0]}); expected a "
            "PyTorch file saved with torch.save. The file may be truncated (interrupted copy or save)."
        ) from error
    if isinstance(checkpoint, Mapping):
        key = next((k for k in ("model", "network", "state_dict") if isinstance(checkpoint.get(k), Mapping)), None)
        checkpoint = checkpoint if key is None else checkpoint[key]
    if not isinstance(checkpoint, Mapping) or not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise RegistrationInputError(
            f"checkpoint '{path}': checkpoint does not hold a state dict of tensors; expected a file written by "
            "torch.save(model.state_dict()) or by the bundle's training (key 'model')."
        )
    if checkpoint and all(k.startswith("module.") for k in checkpoint):
        checkpoint = {k[len("module.") :]: v for k, v in checkpoint.items()}
    return checkpoint


def check_checkpoint(network: torch.nn.Module, path: str | os.PathLike | None) -> None:
    """Check (without loading) that a checkpoint file fits ``network``; nothing when ``path`` is empty or absent.

    For a workflow's ``initialize`` step, before MONAI's ``CheckpointLoader`` loads the file: a mismatch then becomes
    one message naming the differing keys instead of PyTorch's wall of key names.
    """
    if path and os.path.exists(path):
        check_state_dict(network.state_dict(), read_checkpoint_state(path), path)


def load_network_weights(
    network: torch.nn.Module, path: str | os.PathLike, map_location: str | torch.device = "cpu"
) -> torch.nn.Module:
    """Load a checkpoint into ``network`` (strictly) after checking it exists, is readable and fits; returns
    ``network``, so that a config can write ``$scripts.io.load_network_weights(...)``."""
    state = read_checkpoint_state(path, map_location)
    check_state_dict(network.state_dict(), state, path)
    network.load_state_dict(state, strict=True)
    return network


def install_weights(
    source: str | os.PathLike, target: str | os.PathLike, network: torch.nn.Module | None = None
) -> str:
    """
    Copy a training run's best model (``source``, e.g. ``runs/train/model.pt``) over the bundle's weights (``target``,
    e.g. ``models/model.pt``): the explicit step that replaces them, as training only writes into its run folder.
    Returns ``target`` as a string.

    The source is checked first (readable, a state dict, fitting ``network`` when given, a valid record), so a missing
    (no validation ran yet) or bad one raises RegistrationInputError before anything is replaced; it is then copied
    atomically. The record follows the weights: the target's is removed just before its weights are replaced, and the
    source's is then copied beside them. A source without a record leaves the target without one (logged), never with
    the record of the weights it replaced.
    """
    state = read_checkpoint_state(source)
    if network is not None:
        check_state_dict(network.state_dict(), state, source)
    if os.path.exists(target) and os.path.samefile(source, target):
        return str(target)
    source_info, target_info = weights_info_path(source), weights_info_path(target)
    trained_scale = read_trained_network_scale(source)  # an invalid record fails here, before anything is replaced
    with atomic_path(target) as tmp:
        shutil.copyfile(source, tmp)
        target_info.unlink(missing_ok=True)  # it describes the weights about to be replaced
    logger.info("installed the weights of %s as %s (the previous file was replaced)", source, target)
    if source_info.is_file():
        with atomic_path(target_info) as tmp:
            shutil.copyfile(source_info, tmp)
        logger.info("copied their record %s as %s (network_scale %s)", source_info, target_info, trained_scale)
    else:
        logger.warning(
            "%s has no record %s of the network_scale it was trained at: %s is installed without one, so inference "
            "cannot check its scale; use the network_scale of its training.", source, source_info.name, target,
        )
    return str(target)


# --- the record of the training resolution


def weights_info_path(weights_path: str | os.PathLike) -> Path:
    """The record beside a weights file: ``models/model.pt`` -> ``models/model.json``; ValueError for weights whose
    own name ends with ``.json``."""
    path = Path(weights_path)
    if path.suffix == ".json":
        raise ValueError(f"weights file '{path}' ends with .json, the suffix of its own record; rename the weights.")
    return path.with_suffix(".json")


def _triplet(value: Any, upper: float | None = 1.0) -> tuple[float, float, float] | None:
    """``value`` (a number or 3 numbers) as three floats when each is finite, > 0 and <= ``upper``; else None."""
    items = list(value) if isinstance(value, Sequence) and not isinstance(value, (str, bytes)) else [value] * 3
    if len(items) != 3 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in items):
        return None
    floats = tuple(float(v) for v in items)
    valid = all(math.isfinite(v) and v > 0 and (upper is None or v <= upper) for v in floats)
    return floats if valid else None  # type: ignore[return-value]


def write_weights_info(weights_path: str | os.PathLike, network_scale: float | Sequence[float], **extra: Any) -> Path:
    """Write (atomically) and return the record ``{"network_scale": network_scale, **extra}`` of the weights at
    ``weights_path``, which need not exist yet (training writes the record when it starts, its best model later).
    ``network_scale`` is a number or one per axis in (0, 1]; ``extra`` may give ``spacing_mm``, the training images'
    voxel spacing (a positive number or 3; None, unknown for volumes given in memory, writes no entry)."""
    if _triplet(network_scale) is None:
        raise ValueError(f"network_scale must be {_IN_UNIT_RANGE}, got {network_scale!r}.")
    if extra.get(SPACING_KEY) is not None and _triplet(extra[SPACING_KEY], upper=None) is None:
        raise ValueError(f"{SPACING_KEY} must be {_POSITIVE}, got {extra[SPACING_KEY]!r}.")
    value = [float(v) for v in network_scale] if isinstance(network_scale, Sequence) else float(network_scale)
    if SPACING_KEY in extra and extra[SPACING_KEY] is None:
        extra.pop(SPACING_KEY)
    return write_json({NETWORK_SCALE_KEY: value, **extra}, weights_info_path(weights_path))


def _record_entry(
    weights_path: str | os.PathLike, key: str, upper: float | None, expected: str
) -> tuple[float, float, float] | None:
    """One entry of the record beside the weights as 3 floats; None without a record or without (or with a null)
    entry. RegistrationInputError naming the file: the record is unreadable, not an object, or the entry invalid."""
    path = weights_info_path(weights_path)
    if not path.is_file():
        return None
    object_hint = f'expected a JSON object such as {{"{NETWORK_SCALE_KEY}": 0.5}} describing \'{weights_path}\''
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise RegistrationInputError(
            f"weights record '{path}' could not be read ({type(error).__name__}: {(str(error).splitlines() or [''])[0]}"
            f"); {object_hint}. Fix or delete it (without it the training resolution of the weights is not checked)."
        ) from error
    if not isinstance(record, Mapping):
        raise RegistrationInputError(f"weights record '{path}' holds {type(record).__name__}; {object_hint}.")
    value = record.get(key)
    if value is None:
        return None
    triplet = _triplet(value, upper)
    if triplet is None:
        raise RegistrationInputError(f"weights record '{path}': {key} must be {expected}, got {value!r}.")
    return triplet


def read_trained_network_scale(weights_path: str | os.PathLike) -> tuple[float, float, float] | None:
    """The ``network_scale`` (per axis) recorded beside the weights; None when unknown (see :func:`_record_entry`)."""
    return _record_entry(weights_path, NETWORK_SCALE_KEY, 1.0, _IN_UNIT_RANGE)


def read_trained_spacing(weights_path: str | os.PathLike) -> tuple[float, float, float] | None:
    """The voxel spacing (mm per axis) of the training images, recorded beside the weights; None when unknown."""
    expected = f"{_POSITIVE} (the training images' voxel size in mm, e.g. 1.0)"
    return _record_entry(weights_path, SPACING_KEY, None, expected)


def training_spacing(
    pairs: Sequence[Mapping[str, Any]], keys: Sequence[str] = ("moving_image", "fixed_image")
) -> float | None:
    """The voxel size (mm) of a training set's ``pairs``, for its record (``spacing_mm``): the median over the distinct
    image files under ``keys`` of each file's finest voxel spacing, from the headers (the finest axis is the one the
    network grid follows, :py:func:`scripts.engines.resolution_inferer.isotropic_network_scale`). None when no entry
    is a file path (volumes given in memory)."""
    paths = sorted({str(pair[key]) for pair in pairs for key in keys if isinstance(pair.get(key), (str, os.PathLike))})
    if not paths:
        return None
    finest = [float(voxel_spacing(read_header(path, "training image").affine).min()) for path in paths]
    return round(float(np.median(finest)), 6)


def trained_network_spacing(weights_path: str | os.PathLike | None) -> tuple[float, float, float] | None:
    """The voxel size (mm per axis) of the grid the network was trained on: the record's ``spacing_mm`` over its
    ``network_scale`` (1 mm images at 0.5: 2 mm). None when either is unknown or there are no weights (``weights_path``
    None, empty or missing), so nothing is checked."""
    if not weights_path or not os.path.isfile(weights_path):
        return None
    spacing, scale = read_trained_spacing(weights_path), read_trained_network_scale(weights_path)
    if spacing is None or scale is None:
        return None
    return spacing[0] / scale[0], spacing[1] / scale[1], spacing[2] / scale[2]


def _scale_text(scale: Sequence[float]) -> str:
    """``0.5`` for an isotropic scale, ``[0.5, 0.5, 1]`` for one per axis."""
    if max(scale) - min(scale) <= _TOLERANCE:
        return f"{scale[0]:g}"
    return "[" + ", ".join(f"{v:g}" for v in scale) + "]"


def check_network_scale(network_scale: float | Sequence[float], weights_path: str | os.PathLike | None) -> bool:
    """
    Log one warning, and return False, when inference runs at another ``network_scale`` (per axis, by more than 1e-6)
    than the weights at ``weights_path`` (``ckpt_path``; None, empty or missing: nothing to check) were trained at.
    For a workflow's ``initialize`` step, next to :func:`check_checkpoint`.

    A record that also gives ``spacing_mm`` is not compared here: what matters is the voxel size the network sees,
    which depends on each pair's spacing too (3 mm scans at 1.5 show it what 1 mm scans at 0.5 did), and is checked
    per pair instead (:func:`check_network_spacing`).
    """
    if not weights_path or not os.path.isfile(weights_path):
        return True
    trained = read_trained_network_scale(weights_path)
    if trained is None:
        return True
    used = _triplet(network_scale, upper=None)
    if used is None:
        raise ValueError(f"network_scale must be {_POSITIVE}, got {network_scale!r}.")
    if all(abs(a - b) <= _TOLERANCE for a, b in zip(used, trained)) or read_trained_spacing(weights_path) is not None:
        return True
    quoted = [f'"{t}"' if t.startswith("[") else t for t in (_scale_text(trained), _scale_text(used))]  # shell values
    logger.warning(
        "inference runs at network_scale %s, but the weights '%s' were trained at network_scale %s (recorded in "
        "'%s'): the network sees the images at another resolution than in training, which usually gives a worse "
        "field. Run at the trained scale (--network_scale %s) or retrain at this one (configs/train.json with "
        "--network_scale %s).",
        _scale_text(used), weights_path, _scale_text(trained), weights_info_path(weights_path), *quoted,
    )
    return False


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
    Warn, naming the fixed image ``source``, and return False when the network grid of a pair (``network_spacing``, mm
    per axis: ``spacing / scale``) is more than ``max_ratio`` times coarser or finer, on the finest axes, than the grid
    the weights were trained on (``trained_spacing``, :func:`trained_network_spacing`; None: nothing is checked): the
    network then sees structures at another size in voxels than in training, which usually gives a worse field without
    any error. ``image_spacing``, the fixed image's, gives the message the scale to use instead.
    """
    if trained_spacing is None:
        return True
    used, trained = min(float(v) for v in network_spacing), min(float(v) for v in trained_spacing)
    ratio = used / trained
    if 1.0 / max_ratio <= ratio <= max_ratio:
        return True
    logger.warning(
        "fixed image '%s' (voxels of %s): the network works on %s voxels here, but its weights were trained on %s "
        "voxels (%.2gx %s), so it sees every structure at another size than in training, which usually gives a worse "
        "field. Run at --network_scale %.3g (the network then works on %s voxels) or resample the scans.",
        source, _mm(image_spacing), _mm(network_spacing), _mm(trained_spacing), max(ratio, 1.0 / ratio),
        "coarser" if ratio > 1 else "finer", min(float(v) for v in image_spacing) / trained, _mm([trained]),
    )
    return False
