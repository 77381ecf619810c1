"""Ignite handlers that keep training results safe: a NaN/Inf-loss guard and an atomic, never-NaN checkpoint saver.

- :class:`NonFiniteLossGuard` stops training with one clear message as soon as the loss is NaN/Inf, instead of letting
  the run continue for hours and overwrite good checkpoints with NaN weights.
- :class:`AtomicCheckpointSaver` is MONAI's ``CheckpointSaver`` with two fixes: files are written to a temporary name and
  renamed (MONAI writes in place, so a ``kill -9`` during a save leaves a truncated ``.pt``), and an older checkpoint is
  only deleted after its replacement is complete (ignite deletes it first). It also refuses to write weights that are
  not finite, so the last good checkpoint survives a diverged run.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events
from ignite.handlers.checkpoint import BaseSaveHandler
from monai.handlers import CheckpointSaver

from scripts.atomic import save_torch
from scripts.errors import BundleUserError

__all__ = ["NonFiniteLossError", "NonFiniteLossGuard", "AtomicCheckpointSaver", "all_finite", "loss_from_output"]


class NonFiniteLossError(BundleUserError, RuntimeError):
    """Training produced a NaN/Inf loss (diverged or bad data); shown to the user without a traceback."""


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
    """Stop training with a clear message at the first iteration whose loss is NaN or Inf.

    Raises :class:`NonFiniteLossError` from ``ITERATION_COMPLETED``. The optimiser step of that iteration has already
    made the weights NaN, so nothing must be saved afterwards: :class:`AtomicCheckpointSaver` refuses non-finite weights
    and the checkpoint of the last completed epoch stays the newest one.

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

    def __init__(self, dirname: str | os.PathLike, fixed_filename: str | None, logger: logging.Logger) -> None:
        self.dirname = Path(dirname)
        self.fixed_filename = fixed_filename
        self.logger = logger
        self._pending_removal: list[Path] = []

    def _path(self, filename: str) -> Path:
        return self.dirname / (self.fixed_filename or filename)

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        path = self._path(filename)
        if not all_finite(checkpoint):
            self.logger.error("not saving checkpoint %s: its weights are not finite (NaN/Inf); keeping the old ones.", path)
            self._pending_removal.clear()  # the files ignite wanted to replace are the last good ones: keep them
            return
        save_torch(dict(checkpoint), path)
        for old in self._pending_removal:
            if old != path:
                old.unlink(missing_ok=True)
        self._pending_removal.clear()

    def remove(self, filename: str) -> None:
        # ignite deletes the old checkpoint before writing the new one; delete it only once the new one is complete.
        self._pending_removal.append(self._path(filename))


class AtomicCheckpointSaver(CheckpointSaver):
    """``monai.handlers.CheckpointSaver`` (same arguments) that writes atomically, deletes old files only after the new
    one is complete, and never writes non-finite weights."""

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

    def attach(self, engine: Engine) -> None:
        super().attach(engine)
        for attribute in ("_final_checkpoint", "_key_metric_checkpoint", "_interval_checkpoint"):
            checkpoint = getattr(self, attribute)
            if checkpoint is not None:
                checkpoint.save_handler.logger = self.logger
