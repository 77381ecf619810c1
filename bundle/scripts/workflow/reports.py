# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""What a user reads about finished registrations: the console report of one pair, the row of each pair of a cohort
(read back from the pair's finished output folder), the cohort's Markdown report and its console summary, and the
evaluation summary over many pairs (:class:`MetricsSummaryHandler`).

A row holds the pair's status, rank and time, the Dice scores of its ``metrics.json``, the % of voxels with det J <= 0
and, when a label map was warped, the volume of every structure of ``warped_label.nii.gz`` in mL (atlas-based
segmentation of a subject), and its QC figure. The report shows the QC figures of the worst pairs first.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from scripts.io.atomic import check_outputs_writable, write_csv, write_json
from scripts.io.outputs import (
    COHORT_CSV, COHORT_JSON, COHORT_MD, JACOBIAN_DET, METRICS_JSON, PAIR_OUTPUTS, QC_PNG, SUMMARY_CSV, SUMMARY_JSON,
    WARPED_LABEL,
)
from scripts.workflow.metrics import jacobian_statistics

__all__ = [
    "STATUSES", "pair_row", "read_pair_metrics", "structure_volumes", "table_columns", "worst_pairs", "markdown_report",
    "cohort_console_summary", "pair_console_summary", "MetricsSummaryHandler",
]

logger = logging.getLogger(__name__)

#: row statuses: registered by this run, found complete from an earlier run, skipped (bad input), not reached yet.
STATUSES = ("registered", "already_complete", "failed", "pending")

_BASE_COLUMNS = (
    "pair_id", "status", "rank", "seconds", "mean_dice", "mean_dice_identity", "percent_non_positive_jacobian",
    "qc_png", "error",
)


def _label_name(label: Any, label_names: Mapping[Any, str] | None) -> str:
    """Column suffix of a label: ``<id>_<name>`` (``7_cerebellum``), or ``<id>`` when it has no name."""
    names = {str(k): v for k, v in (label_names or {}).items()}
    name = names.get(str(label))
    return f"{label}_{name}".replace(" ", "_") if name and str(name) != str(label) else str(label)


def read_pair_metrics(folder: str | Path) -> dict[str, Any] | None:
    """The pair's ``metrics.json`` (None when it has none)."""
    path = Path(folder) / METRICS_JSON
    return json.loads(path.read_text()) if path.is_file() else None


def structure_volumes(label_file: str | Path, label_names: Mapping[Any, str] | None = None) -> dict[str, float]:
    """Volume (mL) of every non-zero label of a label map: voxel count x voxel volume (|det| of the affine's 3x3).

    Returns:
        ``{"volume_ml_<id>_<name>": volume}`` in ascending label order.
    """
    image = nib.load(str(label_file))
    data = np.asarray(image.dataobj)
    voxel_ml = abs(float(np.linalg.det(np.asarray(image.affine, float)[:3, :3]))) / 1000.0
    ids, counts = np.unique(data[data != 0], return_counts=True)
    return {f"volume_ml_{_label_name(int(i), label_names)}": float(c) * voxel_ml for i, c in zip(ids, counts)}


def pair_row(
    pair_id: str,
    status: str,
    folder: str | Path | None = None,
    label_names: Mapping[Any, str] | None = None,
    seconds: float | None = None,
    rank: int | None = None,
    error: str | None = None,
) -> dict[str, Any]:
    """The summary row of one pair (``status``: one of :data:`STATUSES`; ``seconds``: its wall time in this run, load,
    check, register, write; ``rank``: the rank that registered it; ``error``: why a failed pair was skipped). With the
    pair's ``folder`` of finished outputs, its metrics and volumes are read from it, ``label_names`` (id -> name) naming
    their columns.

    Raises:
        ValueError: an unknown status.
    """
    if status not in STATUSES:
        raise ValueError(f"status must be one of {STATUSES}, got {status!r}.")
    row: dict[str, Any] = {"pair_id": pair_id, "status": status, "rank": rank,
                           "seconds": None if seconds is None else round(float(seconds), 3), "error": error}
    if folder is None or status not in ("registered", "already_complete"):
        return row
    folder = Path(folder)
    metrics = read_pair_metrics(folder) or {}
    label_names = {**(label_names or {}), **{str(r.get("label")): r.get("name") for r in metrics.get("labels", [])
                                             if r.get("name") and str(r.get("name")) != str(r.get("label"))}}
    for key in ("mean_dice", "mean_dice_identity", "percent_non_positive_jacobian"):
        if metrics.get(key) is not None:
            row[key] = metrics[key]
    if row.get("percent_non_positive_jacobian") is None and (folder / JACOBIAN_DET).is_file():  # from its det J map
        det = np.asarray(nib.load(str(folder / JACOBIAN_DET)).dataobj)
        row["percent_non_positive_jacobian"] = jacobian_statistics(det)["percent_non_positive_jacobian"]
    row.setdefault("percent_non_positive_jacobian", None)
    for label in metrics.get("labels", []):
        row[f"dice_{_label_name(label.get('label'), label_names)}"] = label.get("dice")
    if (folder / WARPED_LABEL).is_file():
        row.update(structure_volumes(folder / WARPED_LABEL, label_names))
    if (folder / QC_PNG).is_file():
        row["qc_png"] = f"{folder.name}/{QC_PNG}"  # the pair folder is <output_dir>/<pair id>
    return row


def _column_order(name: str) -> tuple[int, int, str]:
    """Base columns first, then ``dice_<id>...`` and ``volume_ml_<id>...`` by label id."""
    if name in _BASE_COLUMNS:
        return 0, _BASE_COLUMNS.index(name), name
    for group, prefix in ((1, "dice_"), (2, "volume_ml_")):
        if name.startswith(prefix):
            head = name[len(prefix):].split("_", 1)[0]
            return group, int(head) if head.isdigit() else 10**9, name
    return 3, 0, name


def table_columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Every column of ``rows`` (base columns, Dice per label, volumes per label), so rows can share one CSV header."""
    names = dict.fromkeys(_BASE_COLUMNS)
    for row in rows:
        names.update(dict.fromkeys(row))
    return sorted(names, key=_column_order)


def _mean_std(values: Sequence[Any]) -> tuple[float, float, int] | None:
    finite = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return (float(np.mean(finite)), float(np.std(finite)), len(finite)) if finite else None


def worst_pairs(rows: Sequence[Mapping[str, Any]], count: int = 5) -> list[Mapping[str, Any]]:
    """The ``count`` finished pairs with a QC figure to look at first: the lowest mean Dice first (pairs with labels),
    then, for pairs without labels, the most folding (% of voxels with det J <= 0)."""

    def badness(row: Mapping[str, Any]) -> tuple[int, float]:
        dice, folding = row.get("mean_dice"), row.get("percent_non_positive_jacobian")
        if dice is not None and not math.isnan(float(dice)):
            return 0, float(dice)
        return 1, -float(folding) if folding is not None else 0.0

    done = [r for r in rows if r.get("status") in ("registered", "already_complete") and r.get("qc_png")]
    return sorted(done, key=badness)[: max(int(count), 0)]


def markdown_report(rows: Sequence[Mapping[str, Any]], run: Mapping[str, Any], qc_figures: int = 5) -> str:
    """A short Markdown report of a cohort from its rows (:func:`pair_row`, datalist order) and the ``run``'s
    ``{"world_size", "wall_seconds", "registered_this_run"}``: counts, time and throughput, Dice, folding, volumes, the
    QC figures of the ``qc_figures`` worst pairs (:func:`worst_pairs`, linked relative to the report), failed pairs."""
    counts = {s: sum(r["status"] == s for r in rows) for s in STATUSES}
    lines = ["# Cohort summary", "", f"- pairs: {len(rows)} — " + ", ".join(f"{s.replace('_', ' ')} {n}" for s, n in counts.items())]
    wall, done = run.get("wall_seconds"), run.get("registered_this_run", counts["registered"])
    if wall:
        rate = f", {3600.0 * done / wall:.1f} pairs/hour" if done else ""
        lines.append(f"- this run: {done} pair(s) registered on {run.get('world_size', 1)} rank(s) in {wall:.1f} s{rate}")
    times = _mean_std([r.get("seconds") for r in rows if r["status"] == "registered"])
    if times:
        lines.append(f"- time per pair (one rank): {times[0]:.2f} ± {times[1]:.2f} s")
    for key, title in (("mean_dice", "mean Dice after"), ("mean_dice_identity", "mean Dice before (identity)")):
        stats = _mean_std([r.get(key) for r in rows])
        if stats:
            lines.append(f"- {title}: {stats[0]:.4f} ± {stats[1]:.4f} over {stats[2]} pair(s)")
    folding = [(r.get("percent_non_positive_jacobian"), r["pair_id"]) for r in rows if r.get("percent_non_positive_jacobian") is not None]
    if folding:
        worst = max(folding)
        lines.append(f"- voxels with det J <= 0: mean {np.mean([f for f, _ in folding]):.4f} %, most {worst[0]:.4f} % ({worst[1]})")
    volumes = [c for c in table_columns(rows) if c.startswith("volume_ml_")]
    if volumes:
        lines += ["", "## Structure volumes (warped labels, mL)", "", "| structure | mean | std | pairs |", "|---|---|---|---|"]
        for column in volumes:
            stats = _mean_std([r.get(column) for r in rows])
            if stats:
                lines.append(f"| {column[len('volume_ml_'):]} | {stats[0]:.2f} | {stats[1]:.2f} | {stats[2]} |")
    shown = worst_pairs(rows, qc_figures)
    if shown:
        lines += ["", "## Pairs to check first (QC figures)", "",
                  "Lowest mean Dice first, then (pairs without labels) the most folding. Each figure: fixed, moving, "
                  "warped, checkerboards before/after, differences, deformation grid, det J."]
        for row in shown:
            scores = (("mean_dice", "mean Dice"), ("mean_dice_identity", "before"))
            facts = [f"{title} {row[k]:.4f}" for k, title in scores if row.get(k) is not None]
            if row.get("percent_non_positive_jacobian") is not None:
                facts.append(f"det J <= 0: {row['percent_non_positive_jacobian']:.4f} %")
            lines += ["", f"### {row['pair_id']}" + (f" ({', '.join(facts)})" if facts else ""), "",
                      f"![QC figure of {row['pair_id']}]({row['qc_png']})"]
    failed = [r for r in rows if r["status"] == "failed"]
    if failed:
        lines += ["", "## Failed pairs", "", "| pair | error |", "|---|---|"]
        for row in failed:
            first_line = (str(row.get("error") or "").splitlines() or [""])[0].replace("|", "/")
            lines.append(f"| {row['pair_id']} | {first_line} |")
    return "\n".join(lines) + "\n"


def cohort_console_summary(output_dir: str | os.PathLike) -> str:
    """A few lines for the terminal about a finished cohort in ``output_dir`` (its ``cohort.json``)."""
    folder = Path(output_dir)
    path = folder / COHORT_JSON
    if not path.is_file():
        return f"No cohort summary in {folder}."
    document = json.loads(path.read_text())
    counts = document.get("counts", {})
    lines = [
        (f"Cohort of {document.get('total', 0)} pair(s) in {folder}: {counts.get('registered', 0)} registered in this "
         f"run, {counts.get('already_complete', 0)} complete from earlier runs, {counts.get('failed', 0)} failed, "
         f"{counts.get('pending', 0)} pending."),
        f"  per pair: {folder / COHORT_CSV}",
        f"  report:   {folder / COHORT_MD}",
    ]
    return "\n".join(lines)


def _cell(value: float | None) -> str:
    return f"{value:12.4f}" if value is not None else f"{'n/a':>12}"


def pair_console_summary(out: str | os.PathLike, seconds: float) -> str:
    """The terminal report of one registration that took ``seconds``: the outputs present in the folder ``out``, then
    (when ``metrics.json`` has labels) Dice before (identity) and after per label, the mean, and the share of voxels
    with det J <= 0."""
    folder = Path(out)
    lines = [f"Registration finished in {seconds:.0f} s. Outputs in {folder}:"]
    lines += [f"  {name}" for name in PAIR_OUTPUTS if (folder / name).exists()]
    metrics = read_pair_metrics(folder)
    if metrics:
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


class MetricsSummaryHandler:
    """
    Ignite handler that gathers the per-pair ``metrics`` (``metrics_key`` of the engine output, set by
    :py:class:`RegistrationMetricsd`) of an evaluation run and, when it completes, writes ``summary.json`` (mean and
    standard deviation over pairs of each metric, mean Dice per label) and ``summary.csv`` (one row per pair) into
    ``output_dir``, atomically (``overwrite``: replace existing ones).
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
            stats = _mean_std([r.get(name) for r in self.rows])
            if stats:
                result[name] = {"mean": stats[0], "std": stats[1]}
        per_label: dict[str, list[float]] = {}
        for r in self.rows:
            for row in r["labels"]:
                per_label.setdefault(str(row["label"]), []).append(row.get("dice"))
        result["dice_per_label"] = {k: stats[0] for k, v in per_label.items() if (stats := _mean_std(v))}
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
