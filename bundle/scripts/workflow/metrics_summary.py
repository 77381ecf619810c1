# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""Summary of an evaluation run over many pairs (mean, standard deviation, per-pair rows), written when it ends."""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from scripts.io.atomic import check_outputs_writable, write_csv, write_json
from scripts.io.outputs import SUMMARY_CSV, SUMMARY_JSON

__all__ = ["MetricsSummaryHandler"]

logger = logging.getLogger(__name__)


class MetricsSummaryHandler:
    """
    Ignite handler that gathers the per-pair ``metrics`` of an evaluation run (set by :py:class:`RegistrationMetricsd`)
    and, when the run completes, writes ``summary.json`` (mean and standard deviation over pairs of each metric, and
    the mean Dice per label) and ``summary.csv`` (one row per pair) into ``output_dir``, atomically.

    Args:
        output_dir: folder of the summary files.
        overwrite: replace existing summary files.
        metrics_key: key of the per-pair metrics in the engine output.
    """

    SCALARS = ("mean_dice_identity", "mean_dice", "mean_hd95", "percent_non_positive_jacobian", "ssim")

    def __init__(self, output_dir: str | os.PathLike, overwrite: bool = False, metrics_key: str = "metrics") -> None:
        self.output_dir = output_dir
        self.overwrite = overwrite
        self.metrics_key = metrics_key
        self.rows: list[dict[str, Any]] = []

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.COMPLETED, lambda _: self.write())

    def _reset(self, engine: Any) -> None:
        self.rows = []

    def _collect(self, engine: Any) -> None:
        outputs = engine.state.output if isinstance(engine.state.output, list) else [engine.state.output]
        for output in outputs:
            metrics = output.get(self.metrics_key) if isinstance(output, Mapping) else None
            if metrics:
                self.rows.append(metrics)

    def summary(self) -> dict[str, Any]:
        """Mean/std over pairs of the scalar metrics and mean Dice per label id."""
        result: dict[str, Any] = {"num_pairs": len(self.rows)}
        for name in self.SCALARS:
            values = [r[name] for r in self.rows if r.get(name) is not None and not math.isnan(r[name])]
            if values:
                result[name] = {"mean": float(np.mean(values)), "std": float(np.std(values))}
        per_label: dict[str, list[float]] = {}
        for r in self.rows:
            for row in r["labels"]:
                if row.get("dice") is not None and not math.isnan(row["dice"]):
                    per_label.setdefault(str(row["label"]), []).append(row["dice"])
        result["dice_per_label"] = {k: float(np.mean(v)) for k, v in per_label.items()}
        return result

    def write(self, rows: Sequence[Mapping[str, Any]] | None = None) -> None:
        """Write the summary files over ``rows`` (default: the pairs of this run; a cohort run rewrites them over every
        pair of its datalist, ``scripts.workflow.CohortRecord.finalize``)."""
        if rows is not None:
            self.rows = [dict(r) for r in rows]
        if not self.rows:
            logger.info("no pair had labels: no evaluation summary written.")
            return
        folder = Path(self.output_dir)
        check_outputs_writable([folder / SUMMARY_JSON, folder / SUMMARY_CSV], self.overwrite)
        summary = self.summary()
        write_json(summary, folder / SUMMARY_JSON, indent=4)
        table = [
            {"pair_id": r.get("pair_id", str(i)), **{name: r.get(name) for name in self.SCALARS}}
            for i, r in enumerate(self.rows)
        ]
        write_csv(table, folder / SUMMARY_CSV)
        logger.info(
            "evaluation of %d pair(s): mean Dice %.4f (identity %s); summary in %s",
            len(self.rows),
            summary["mean_dice"]["mean"],
            f"{summary['mean_dice_identity']['mean']:.4f}" if "mean_dice_identity" in summary else "n/a",
            folder / SUMMARY_JSON,
        )
