# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""The summary of a cohort run (a datalist registered pair after pair, possibly on many ranks, possibly resumed).

:class:`CohortSummary` keeps one row per pair (:func:`scripts.workflow.cohort_rows.pair_row`) and rewrites it as each
pair finishes, atomically: ``cohort.json`` (run facts, counts, every pair's row, ``pending`` for pairs not reached yet)
and ``cohort.csv`` (the rows) in a single-process run; ``cohort.rank<r>.json`` (that rank's rows) on each rank of a
``torchrun`` launch. When the run ends, :meth:`CohortSummary.finalize` gathers every rank's rows on rank 0, which
writes the merged ``cohort.json``/``cohort.csv`` and the short report ``cohort.md``, removes the rank files and, for an
evaluation run, rewrites ``summary.json``/``summary.csv`` over every pair of the datalist (also those registered by an
earlier, interrupted run). A resumed run starts from the rows of the earlier one, so no pair's time or scores are lost.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from scripts.io.atomic import write_csv, write_json, write_text
from scripts.io.label_names import label_names_for
from scripts.io.sharding import gather_to_main
from scripts.workflow.cohort_rows import STATUSES, markdown_report, pair_row, read_pair_metrics, table_columns
from scripts.workflow.metrics_summary import MetricsSummaryHandler

__all__ = ["COHORT_JSON", "COHORT_CSV", "COHORT_MD", "CohortSummary", "cohort_console_summary"]

logger = logging.getLogger(__name__)

COHORT_JSON, COHORT_CSV, COHORT_MD = "cohort.json", "cohort.csv", "cohort.md"
_RANK_FILE = "cohort.rank{}.json"
_DONE = ("registered", "already_complete")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class CohortSummary:
    """Rows of a cohort run, written as pairs finish and merged over ranks at the end.

    Args:
        output_dir: the run's output folder (summary files go here, pair outputs into its sub-folders).
        label_names: label id -> name (or a lookup-table file, ``scripts.io.label_names``) for the Dice and volume
            column names; default: the lookup table beside the pair's label map (``X.tsv``), else the numbers.
        metrics_summaries: the run's handlers (e.g. ``@extra_handlers``); its ``MetricsSummaryHandler`` s get their
            summary rewritten over every pair of the datalist when the run ends.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        label_names: Mapping[Any, str] | str | os.PathLike | None = None,
        metrics_summaries: Sequence[Any] | None = None,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.label_names = label_names or None
        self.metrics_summaries = [h for h in (metrics_summaries or []) if isinstance(h, MetricsSummaryHandler)]
        self.active = False
        self.order: list[str] = []
        self.rows: dict[str, dict[str, Any]] = {}
        self.previous: dict[str, dict[str, Any]] = {}
        self.metrics: dict[str, dict[str, Any]] = {}
        self.rank, self.world_size = 0, 1
        self._clock = time.perf_counter()
        self._started = _now()

    def start(self, pair_ids: Sequence[str], rank: int = 0, world_size: int = 1) -> None:
        """Begin a cohort run over ``pair_ids`` (datalist order) as ``rank`` of ``world_size``; reads earlier rows."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank {rank} of {world_size}.")
        self.active, self.order, self.rank, self.world_size = True, list(pair_ids), rank, world_size
        self.rows, self.metrics = {}, {}
        self.previous = self._load_previous()
        self._clock, self._started = time.perf_counter(), _now()
        for handler in self.metrics_summaries:
            handler.overwrite = True  # its file is rewritten over every pair by finalize(); a rerun must not refuse it

    def _load_previous(self) -> dict[str, dict[str, Any]]:
        """Rows of earlier runs: ``cohort.json``, then rank files left by a multi-rank run that was stopped."""
        rows: dict[str, dict[str, Any]] = {}
        for path in [self.output_dir / COHORT_JSON, *sorted(self.output_dir.glob(_RANK_FILE.format("*")))]:
            try:
                content = json.loads(path.read_text())
            except (OSError, ValueError):
                continue  # absent, or not ours: the rows are rebuilt from the pair folders
            for row in content.get("pairs", []) if isinstance(content, Mapping) else []:
                if isinstance(row, Mapping) and row.get("pair_id") and row.get("status") in STATUSES:
                    rows[str(row["pair_id"])] = dict(row)
        return rows

    def record(
        self,
        pair_id: str,
        status: str,
        folder: str | os.PathLike | None = None,
        seconds: float | None = None,
        error: str | None = None,
        write: bool = True,
        label_files: Sequence[str | None] = (),
    ) -> dict[str, Any]:
        """Add (or replace) the row of one pair and, with ``write``, rewrite this process's summary file.

        A pair found ``already_complete`` keeps the row of the run that registered it (time, rank, scores) when there
        is one; otherwise its row is read from its folder. ``label_files`` (fixed label first) give the lookup table
        of the label names when the run has none.
        """
        earlier = self.previous.get(pair_id)
        if status == "already_complete" and earlier and earlier.get("status") in _DONE:
            row = {**earlier, "status": status}
        else:
            rank = self.rank if status == "registered" else None
            names = label_names_for(self.label_names, *label_files) if folder is not None else None
            row = pair_row(pair_id, status, folder, names, seconds, rank, error)
        self.rows[pair_id] = row
        if self.metrics_summaries and folder is not None and status in _DONE:
            metrics = read_pair_metrics(folder)
            if metrics:
                self.metrics[pair_id] = metrics
        if write:
            self._write_progress()
        return row

    def _ordered(self, rows: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
        """One row per pair in datalist order: this run's, else an earlier run's, else ``pending``."""
        fallback = {"status": "pending"}
        return [dict(rows.get(i) or self.previous.get(i) or {"pair_id": i, **fallback}) for i in self.order]

    def _document(self, rows: list[dict[str, Any]], finished: bool, registered: int, wall: float) -> dict[str, Any]:
        return {
            "total": len(rows),
            "world_size": self.world_size,
            "started": self._started,
            "updated": _now(),
            "finished": finished,
            "registered_this_run": registered,
            "wall_seconds": round(wall, 3),
            "counts": {s: sum(r["status"] == s for r in rows) for s in STATUSES},
            "pairs": rows,
        }

    def _write_tables(self, rows: list[dict[str, Any]], finished: bool, registered: int) -> dict[str, Any]:
        document = self._document(rows, finished, registered, time.perf_counter() - self._clock)
        columns = table_columns(rows)
        write_csv([{c: r.get(c) for c in columns} for r in rows], self.output_dir / COHORT_CSV)
        write_json(document, self.output_dir / COHORT_JSON)
        return document

    def _write_progress(self) -> None:
        registered = sum(r["status"] == "registered" for r in self.rows.values())
        if self.world_size == 1:
            self._write_tables(self._ordered(self.rows), False, registered)
        else:
            own = [self.rows[i] for i in self.order if i in self.rows]
            write_json({"rank": self.rank, "world_size": self.world_size, "updated": _now(), "pairs": own},
                       self.output_dir / _RANK_FILE.format(self.rank))

    def finalize(self, screen: Any = None) -> dict[str, Any] | None:
        """End the run: gather every rank's rows (and the screen's skipped pairs) on rank 0, which writes the merged
        ``cohort.json``, ``cohort.csv``, ``cohort.md`` (and the evaluation summary). Every rank must call it.

        Args:
            screen: the run's ``scripts.io.PairScreen``; it gets the gather's result (``PairScreen.merge_ranks``):
                on rank 0 the pairs skipped on any rank (so its ``report`` lists them all), on the other ranks nothing
                to report (so their ``report`` neither writes nor removes ``failed_pairs.json``).

        Returns:
            the merged ``cohort.json`` content on rank 0, None elsewhere or when no datalist was run.
        """
        if not self.active:
            return None
        payload = {"rows": self.rows, "metrics": self.metrics, "bad": list(getattr(screen, "bad", []) or [])}
        gathered = gather_to_main(payload)
        self.active = False
        if gathered is None:  # not rank 0: rank 0 writes everything
            (self.output_dir / _RANK_FILE.format(self.rank)).unlink(missing_ok=True)
            if screen is not None:
                screen.merge_ranks(None)
            return None
        rows: dict[str, dict[str, Any]] = {}
        bad: list[dict[str, Any]] = []
        for part in gathered:
            rows.update(part["rows"])
            self.metrics.update(part["metrics"])
            bad += part["bad"]
        position = {pair_id: i for i, pair_id in enumerate(self.order)}
        if screen is not None:
            screen.merge_ranks(sorted(bad, key=lambda b: position.get(b.get("pair_id"), len(position))))
        ordered = self._ordered(rows)
        registered = sum(r["status"] == "registered" for r in rows.values())
        document = self._write_tables(ordered, True, registered)
        write_text(markdown_report(ordered, document), self.output_dir / COHORT_MD)
        for path in [*self.output_dir.glob(_RANK_FILE.format("*")), *self.output_dir.glob(".cohort*.tmp-*")]:
            path.unlink(missing_ok=True)  # rank files are merged now; temporary files of writes cut short by a kill
        self._rewrite_metrics_summaries()
        counts = document["counts"]
        logger.info(
            "cohort of %d pair(s): %d registered now, %d complete from earlier runs, %d failed, %d pending; "
            "summary in %s", len(ordered), counts["registered"], counts["already_complete"], counts["failed"],
            counts["pending"], self.output_dir / COHORT_MD,
        )
        return document

    def _rewrite_metrics_summaries(self) -> None:
        """The evaluation summary (``summary.json``/``summary.csv``) over every pair with metrics, datalist order."""
        metrics = [self.metrics[i] for i in self.order if i in self.metrics]
        for handler in self.metrics_summaries:
            if metrics:
                handler.rows = list(metrics)
                handler._write(None)  # the handler's own writer (same files and layout as at the end of a plain run)


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
