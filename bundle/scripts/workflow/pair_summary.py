# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""The console report of one registered pair (what ``scripts.cli register`` prints when it finishes): the outputs
written and, with both label maps, Dice before and after per label from ``metrics.json``."""

from __future__ import annotations

import json
import os
from pathlib import Path

__all__ = ["OUTPUT_FILES", "pair_console_summary"]

#: the files of one pair's output folder, in the order the report lists them
OUTPUT_FILES = (
    "warped_image.nii.gz", "ddf.nii.gz", "warped_label.nii.gz", "jacobian_det.nii.gz", "affine.mat", "warp.nii.gz",
    "transform.h5", "inverse_warp.nii.gz", "inverse_transform.h5", "metrics.json", "qc.png",
)


def _cell(value: float | None) -> str:
    return f"{value:12.4f}" if value is not None else f"{'n/a':>12}"


def pair_console_summary(out: str | os.PathLike, seconds: float) -> str:
    """
    Human-readable report of one registration.

    Args:
        out: the pair's output folder.
        seconds: how long the registration took (wall).

    Returns:
        the report: the outputs present in ``out``, then (when ``metrics.json`` has labels) one line per label with
        Dice before (identity) and after, the mean, and the share of voxels with det J <= 0.
    """
    folder = Path(out)
    lines = [f"Registration finished in {seconds:.0f} s. Outputs in {folder}:"]
    lines += [f"  {name}" for name in OUTPUT_FILES if (folder / name).exists()]
    metrics_file = folder / "metrics.json"
    if metrics_file.exists():
        metrics = json.loads(metrics_file.read_text())
        lines.append(f"{'label':<20}{'Dice before':>12}{'Dice after':>12}")
        for row in metrics["labels"]:
            name = str(row["label"]) if row.get("name") in (None, str(row["label"])) else f"{row['label']} {row['name']}"
            lines.append(f"{name:<20}{_cell(row.get('dice_identity'))}{_cell(row.get('dice'))}")
        lines.append(
            f"{'mean':<20}{metrics.get('mean_dice_identity', float('nan')):12.4f}{metrics['mean_dice']:12.4f}"
        )
        if "percent_non_positive_jacobian" in metrics:
            lines.append(f"voxels with det J <= 0: {metrics['percent_non_positive_jacobian']:.4f} %")
    return "\n".join(lines)
