# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""
Summarise the console log of a ``configs/train.json`` run: mean training loss per epoch, validation Dice per
validation, when training started and when the last logged iteration ran.

``python -m bench.training.training_log LOG [LOG ...] [--out SUMMARY.json]``

A run that was stopped and resumed has one log per segment: give them in order. Each segment is summarised on its
own (so an epoch cut by a stop and repeated after the resume counts once, from the later log) and the training time
is the sum of the segments' times, without the gaps between them.

The model card's training figures are read from such a summary (``bench/training/results/``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
from collections import defaultdict
from pathlib import Path

__all__ = ["summarise", "summarise_segments", "main"]

_STAMP = r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),\d+"
_LOSS = re.compile(_STAMP + r" - INFO - Epoch: (\d+)/(\d+), Iter: (\d+)/(\d+) -- train_loss: (-?[\d.]+(?:e-?\d+)?)")
_VAL = re.compile(_STAMP + r" - INFO - Epoch\[(\d+)\] Metrics -- (\w+): (-?[\d.]+)")


def summarise(text: str) -> dict:
    """
    Parse the StatsHandler lines of a training log.

    Returns:
        ``{"epochs": [{"epoch", "iterations", "mean_loss"}], "validation": [{"epoch", metric: value}],
        "first_iteration_utc", "last_iteration_utc", "training_minutes", "max_epochs", "epoch_length"}``; only
        epochs whose every iteration is in the log are listed (a stopped run's partial epoch is left out).
    """
    losses: dict[int, list[float]] = defaultdict(list)
    stamps, max_epochs, epoch_length = [], None, None
    for stamp, epoch, total, _, length, loss in _LOSS.findall(text):
        losses[int(epoch)].append(float(loss))
        stamps.append(datetime.datetime.fromisoformat(stamp))
        max_epochs, epoch_length = int(total), int(length)
    if not stamps:
        raise ValueError("no 'Epoch: e/E, Iter: i/N -- train_loss: x' lines found: not a training console log.")
    epochs = [
        {"epoch": e, "iterations": len(v), "mean_loss": round(sum(v) / len(v), 4)}
        for e, v in sorted(losses.items())
        if len(v) == epoch_length
    ]
    validation = [{"epoch": int(e), name: float(value)} for _, e, name, value in _VAL.findall(text)]
    return {
        "epochs": epochs,
        "validation": validation,
        "first_iteration_utc": stamps[0].isoformat(),
        "last_iteration_utc": stamps[-1].isoformat(),
        "training_minutes": round((stamps[-1] - stamps[0]).total_seconds() / 60, 1),
        "max_epochs": max_epochs,
        "epoch_length": epoch_length,
    }


def summarise_segments(texts: list[str]) -> dict:
    """
    :func:`summarise` of a resumed run's logs, in order: a later segment's epoch or validation replaces an earlier
    one of the same number; ``training_minutes`` sums the segments; ``segments`` lists each one's time span.
    """
    parts = [summarise(t) for t in texts]
    epochs = {e["epoch"]: e for part in parts for e in part["epochs"]}
    validation = {v["epoch"]: v for part in parts for v in part["validation"]}
    return {
        "epochs": [epochs[k] for k in sorted(epochs)],
        "validation": [validation[k] for k in sorted(validation)],
        "first_iteration_utc": parts[0]["first_iteration_utc"],
        "last_iteration_utc": parts[-1]["last_iteration_utc"],
        "training_minutes": round(sum(p["training_minutes"] for p in parts), 1),
        "segments": [
            {k: p[k] for k in ("first_iteration_utc", "last_iteration_utc", "training_minutes")} for p in parts
        ],
        "max_epochs": parts[-1]["max_epochs"],
        "epoch_length": parts[-1]["epoch_length"],
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    parser.add_argument("log", nargs="+", help="console log(s) of the run, in order when it was resumed")
    parser.add_argument("--out", default=None, help="write the summary as JSON here")
    args = parser.parse_args(argv)
    texts = [Path(log).read_text(errors="replace") for log in args.log]
    summary = summarise(texts[0]) if len(texts) == 1 else summarise_segments(texts)
    text = json.dumps(summary, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    print(text)
    return summary


if __name__ == "__main__":
    main()
