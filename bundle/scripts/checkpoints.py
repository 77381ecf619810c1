# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""Find the newest training checkpoint to resume from."""

from __future__ import annotations

import os
import re
from pathlib import Path

__all__ = ["latest_checkpoint"]

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
