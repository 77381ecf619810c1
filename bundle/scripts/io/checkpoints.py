# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""Checkpoints: find the newest one to resume from, read one safely and check it fits the network before loading."""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from scripts.io.atomic import atomic_path
from scripts.io.errors import RegistrationInputError
from scripts.io.input_checks import check_file_exists
from scripts.io.weights_info import read_trained_network_scale, weights_info_path

__all__ = [
    "latest_checkpoint",
    "extract_state_dict",
    "check_state_dict",
    "read_checkpoint_state",
    "check_checkpoint",
    "load_network_weights",
    "install_weights",
]

logger = logging.getLogger(__name__)

_COUNTER = re.compile(r"(epoch|iteration)=(\d+)")


def latest_checkpoint(ckpt_dir: str | os.PathLike, prefix: str = "checkpoint") -> str | None:
    """
    Path of the newest ``<prefix>*.pt`` in ``ckpt_dir`` (as written by ``CheckpointSaver``, e.g.
    ``checkpoint_epoch=12.pt``), ranked by the epoch/iteration number in its name, then by modification time;
    ``None`` when there is none. Hidden temporary files of interrupted saves are ignored.
    """
    folder = Path(ckpt_dir)
    if not folder.is_dir():
        return None
    candidates = [p for p in folder.glob(f"{prefix}*.pt") if p.is_file() and not p.name.startswith(".")]
    if not candidates:
        return None

    def rank(path: Path) -> tuple[int, float]:
        match = _COUNTER.search(path.name)
        return (int(match.group(2)) if match else -1, path.stat().st_mtime)

    return str(max(candidates, key=rank))


def extract_state_dict(checkpoint: Any) -> Mapping[str, torch.Tensor]:
    """The network weights inside a loaded checkpoint: a plain state dict, or one under ``model``/``network``/
    ``state_dict`` (MONAI CheckpointSaver and common trainers); a ``module.`` prefix from DataParallel is removed."""
    if isinstance(checkpoint, Mapping):
        for key in ("model", "network", "state_dict"):
            if isinstance(checkpoint.get(key), Mapping):
                checkpoint = checkpoint[key]
                break
    if not isinstance(checkpoint, Mapping) or not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise RegistrationInputError(
            "checkpoint does not hold a state dict of tensors; expected a file written by torch.save(model.state_dict())"
            " or by the bundle's training (key 'model')."
        )
    if checkpoint and all(k.startswith("module.") for k in checkpoint):
        checkpoint = {k[len("module.") :]: v for k, v in checkpoint.items()}
    return checkpoint


def check_state_dict(
    expected: Mapping[str, torch.Tensor], found: Mapping[str, torch.Tensor], source: Any, show: int = 5
) -> None:
    """Raise when a checkpoint's keys or shapes differ from the network's, listing the first ``show`` of each kind."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    mismatched = [
        f"{k}: checkpoint {tuple(found[k].shape)} vs network {tuple(expected[k].shape)}"
        for k in expected
        if k in found and tuple(found[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or mismatched:
        parts = []
        for name, items in (("missing", missing), ("unexpected", unexpected), ("shape-mismatched", mismatched)):
            if items:
                more = f", ... ({len(items) - show} more)" if len(items) > show else ""
                parts.append(f"{len(items)} {name} keys ({', '.join(items[:show])}{more})")
        raise RegistrationInputError(
            f"checkpoint '{source}' does not match the network: {'; '.join(parts)}. Expected weights saved from the "
            f"same architecture as network_def{_width_hint(expected, found)}: scripts.networks.SACBNet with the same "
            "base_channels, the only SACBNet setting that changes the weights (num_clusters, kmeans_iterations, "
            "diffeomorphic and integration_steps do not). Use a checkpoint trained with this bundle's configs or fix "
            "network_def."
        )


# the first encoder convolution of scripts.networks.SACBNet: (base_channels, 1, 3, 3, 3)
_FIRST_CONV = "encoder.0.convs.0.conv.weight"


def _width_hint(expected: Mapping[str, torch.Tensor], found: Mapping[str, torch.Tensor]) -> str:
    """' (the checkpoint has base_channels=8, network_def 4)' when both are SACB-Net weights of different widths."""
    if _FIRST_CONV not in expected or _FIRST_CONV not in found:
        return ""
    theirs, ours = int(found[_FIRST_CONV].shape[0]), int(expected[_FIRST_CONV].shape[0])
    return f" (the checkpoint has base_channels={theirs}, network_def {ours})" if theirs != ours else ""


def read_checkpoint_state(
    path: str | os.PathLike, map_location: str | torch.device = "cpu"
) -> Mapping[str, torch.Tensor]:
    """Read a checkpoint file and return the network state dict inside it (see :func:`extract_state_dict`).

    Raises:
        RegistrationInputError: missing, unreadable/truncated, or not holding a state dict of tensors.
    """
    path = check_file_exists(path, "checkpoint")
    try:
        checkpoint = torch.load(str(path), map_location=map_location, weights_only=True)
    except Exception as error:
        raise RegistrationInputError(
            f"checkpoint '{path}' could not be read ({type(error).__name__}: {str(error).splitlines()[0]}); expected a "
            "PyTorch file saved with torch.save. The file may be truncated (interrupted copy or save)."
        ) from error
    try:
        return extract_state_dict(checkpoint)
    except RegistrationInputError as error:
        raise RegistrationInputError(f"checkpoint '{path}': {error}") from error


def check_checkpoint(network: torch.nn.Module, path: str | os.PathLike | None) -> None:
    """Check (without loading) that a checkpoint file fits ``network``; does nothing when ``path`` is empty or absent.

    Meant for a workflow's ``initialize`` step, before MONAI's ``CheckpointLoader`` loads the file: a mismatch then
    becomes one message naming the differing keys instead of PyTorch's wall of key names.
    """
    if not path or not os.path.exists(path):
        return
    check_state_dict(network.state_dict(), read_checkpoint_state(path), path)


def load_network_weights(
    network: torch.nn.Module, path: str | os.PathLike, map_location: str | torch.device = "cpu"
) -> torch.nn.Module:
    """Load a checkpoint into ``network`` after checking it exists, is readable and matches the architecture.

    Returns:
        ``network`` with the weights loaded (so a config can write ``$scripts.io.checkpoints.load_network_weights(...)``).
    """
    state = read_checkpoint_state(path, map_location)
    check_state_dict(network.state_dict(), state, path)
    network.load_state_dict(state, strict=True)
    return network


def install_weights(
    source: str | os.PathLike, target: str | os.PathLike, network: torch.nn.Module | None = None
) -> str:
    """
    Copy a training run's best model over the bundle's weights: the explicit step that replaces ``models/model.pt``
    (training itself only writes into its run folder).

    The file is checked first (readable, a state dict, and matching ``network`` when given), then copied byte for byte
    under a temporary name and renamed, so ``target`` is always either the old or the complete new file.

    The record of the resolution the weights were trained at (``model.json`` beside ``model.pt``, see
    :mod:`scripts.io.weights_info`) follows the weights: the target's record is removed just before its weights are
    replaced, and the source's record (checked first) is then copied atomically beside them. A source without a record
    leaves the target without one (logged: its training scale is unknown and inference cannot check it), never with
    the record of the weights it replaced.

    Args:
        source: the run's ``model.pt`` (e.g. ``runs/train/model.pt``).
        target: the weights to replace (e.g. ``models/model.pt``).
        network: the network the weights must load into (``network_def``), or None to skip that check.

    Returns:
        ``target`` as a string.

    Raises:
        RegistrationInputError: ``source`` is missing (no validation ran yet), unreadable or does not fit ``network``,
            or its record is unreadable or invalid.
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
            "cannot check its scale; use the network_scale of its training.",
            source,
            source_info.name,
            target,
        )
    return str(target)
