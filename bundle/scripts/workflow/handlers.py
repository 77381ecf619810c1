# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""Ignite handlers that keep training results safe: :class:`NonFiniteLossGuard` stops training with one clear message
as soon as the loss is NaN/Inf (instead of hours of NaN weights overwriting good checkpoints), and
:class:`AtomicCheckpointSaver` never leaves a truncated or NaN checkpoint behind."""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events
from ignite.handlers.checkpoint import BaseSaveHandler
from monai.handlers import CheckpointSaver

from scripts.io.atomic import save_torch
from scripts.io.errors import NonFiniteLossError

__all__ = ["NonFiniteLossError", "NonFiniteLossGuard", "AtomicCheckpointSaver", "all_finite", "loss_from_output"]


def loss_from_output(output: Any) -> float:
    """The scalar loss in an engine output: a number/tensor, a dict with ``loss``, or a list of such dicts."""
    if isinstance(output, (list, tuple)) and output:
        output = output[0]
    if isinstance(output, Mapping):
        output = output["loss"]
    return float(torch.as_tensor(output).detach().float().sum())


def all_finite(obj: Any) -> bool:
    """True when every floating-point tensor nested in ``obj`` (dicts, lists, modules' state dicts) is finite."""
    if isinstance(obj, torch.Tensor):
        return not obj.is_floating_point() or bool(torch.isfinite(obj).all())
    if isinstance(obj, Mapping):
        return all(all_finite(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return all(all_finite(v) for v in obj)
    if hasattr(obj, "state_dict") and callable(obj.state_dict):
        return all_finite(obj.state_dict())
    return True


class NonFiniteLossGuard:
    """Raise :class:`NonFiniteLossError` at the first ``ITERATION_COMPLETED`` whose loss is NaN or Inf. Its optimiser
    step has made the weights NaN already: :class:`AtomicCheckpointSaver` refuses them, so the checkpoint of the last
    completed epoch stays the newest one.

    Args:
        output_transform: maps ``engine.state.output`` to the loss (default :func:`loss_from_output`).
        ckpt_dir: checkpoint folder, named in the message so the user knows where the last good weights are.
    """

    def __init__(self, output_transform: Callable[[Any], Any] = loss_from_output, ckpt_dir: str | None = None) -> None:
        self.output_transform = output_transform
        self.ckpt_dir = ckpt_dir

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        loss = float(self.output_transform(engine.state.output))
        if math.isfinite(loss):
            return
        where = f" in '{self.ckpt_dir}'" if self.ckpt_dir else ""
        raise NonFiniteLossError(
            f"training stopped: the loss became {loss} at epoch {engine.state.epoch}, iteration "
            f"{engine.state.iteration}; expected a finite loss. The last good checkpoint{where} was kept (nothing was "
            "saved after this iteration). Check the inputs for NaN/constant images, lower the learning rate, then "
            "resume from that checkpoint."
        )


class _AtomicSaveHandler(BaseSaveHandler):
    """Wraps a MONAI/ignite DiskSaver: atomic writes, deferred deletion, no non-finite weights."""

    def __init__(
        self,
        dirname: str | os.PathLike,
        fixed_filename: str | None,
        logger: logging.Logger,
        keep_pattern: re.Pattern | None = None,
        n_keep: int | None = None,
    ) -> None:
        self.dirname = Path(dirname)
        self.fixed_filename = fixed_filename
        self.logger = logger
        self.keep_pattern = keep_pattern
        self.n_keep = n_keep
        self._pending_removal: list[Path] = []

    def _prune_earlier_runs(self) -> None:
        """Keep only the ``n_keep`` newest numbered checkpoints on disk, including those of runs before a restart
        (ignite only counts the files its own process wrote, so every resume would otherwise leave one behind)."""
        if self.keep_pattern is None or not self.n_keep:
            return
        numbered = []
        for path in self.dirname.iterdir():
            match = self.keep_pattern.fullmatch(path.name)
            if match:
                numbered.append((int(match.group(1)), path))
        for _, path in sorted(numbered)[: -self.n_keep]:
            path.unlink(missing_ok=True)

    def _path(self, filename: str) -> Path:
        return self.dirname / (self.fixed_filename or filename)

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        path = self._path(filename)
        if not all_finite(checkpoint):
            self.logger.error("not saving checkpoint %s: its weights are not finite (NaN/Inf); keeping the old ones.",
                              path)
            self._pending_removal.clear()  # the files ignite wanted to replace are the last good ones: keep them
            return
        save_torch(dict(checkpoint), path)
        for old in self._pending_removal:
            if old != path:
                old.unlink(missing_ok=True)
        self._pending_removal.clear()
        self._prune_earlier_runs()

    def remove(self, filename: str) -> None:
        # ignite deletes the old checkpoint before writing the new one; delete it only once the new one is complete.
        self._pending_removal.append(self._path(filename))


class AtomicCheckpointSaver(CheckpointSaver):
    """``monai.handlers.CheckpointSaver`` (same arguments) that writes atomically (``scripts.io.atomic.save_torch``: a
    ``kill -9`` during a save leaves no truncated ``.pt``), deletes an old file only after its replacement is complete
    (ignite deletes it first), never writes non-finite weights, and applies ``n_saved`` to the numbered checkpoints
    already on disk from before a restart too."""

    def __init__(self, save_dir: str, save_dict: dict, name: str | None = None, **kwargs: Any) -> None:
        super().__init__(save_dir=save_dir, save_dict=save_dict, name=name, **kwargs)
        os.makedirs(save_dir, exist_ok=True)
        fixed = {
            "_final_checkpoint": kwargs.get("final_filename"),
            "_key_metric_checkpoint": kwargs.get("key_metric_filename"),
            "_interval_checkpoint": None,
        }
        for attribute, filename in fixed.items():
            checkpoint = getattr(self, attribute)
            if checkpoint is not None:
                checkpoint.save_handler = _AtomicSaveHandler(save_dir, filename, self.logger)
        if self._interval_checkpoint is not None:
            # ignite names them "[<file_prefix>_]<name>_<epoch|iteration>=<n>.pt", name = the single key or "checkpoint"
            score_name = "epoch" if self.epoch_level else "iteration"
            prefix = f"{kwargs['file_prefix']}_" if kwargs.get("file_prefix") else ""
            name = next(iter(save_dict)) if len(save_dict) == 1 else "checkpoint"
            handler = self._interval_checkpoint.save_handler
            handler.keep_pattern = re.compile(rf"{re.escape(prefix + name)}_{score_name}=(\d+)\.pt")
            handler.n_keep = kwargs.get("n_saved")

    def attach(self, engine: Engine) -> None:
        super().attach(engine)
        for attribute in ("_final_checkpoint", "_key_metric_checkpoint", "_interval_checkpoint"):
            checkpoint = getattr(self, attribute)
            if checkpoint is not None:
                checkpoint.save_handler.logger = self.logger
