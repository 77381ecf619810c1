# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""A cohort run: a datalist registered pair after pair, possibly on many ranks, possibly resumed.

:class:`CohortRecord` is the one place that knows what became of each pair:

1. :meth:`CohortRecord.start` (every rank, before the dataset is built): rank 0 looks at every pair's output folder: a
   complete pair is left out unless ``overwrite`` (row ``already_complete``, keeping the row of the run that registered
   it), outputs from elsewhere make the pair fail, the leftovers of an interrupted run are removed. Every rank gets the
   same list of pairs still to register (``idist.broadcast``) and takes its round-robin share of it
   (``scripts.io.devices.rank_share``): the data of its :class:`CohortDataset`.
2. As an ignite handler of the evaluator it marks a pair's folder in progress when its iteration starts and, once the
   outputs are written, checks them, removes the mark and records the pair's row with its wall time.
3. Rows are rewritten atomically as pairs finish: ``cohort.json`` and ``cohort.csv`` in a single-process run,
   ``cohort.rank<r>.json`` on each rank of a ``torchrun`` launch. :meth:`CohortRecord.finalize` gathers every rank's
   rows (``idist.all_gather``); rank 0 writes the merged ``cohort.json``/``cohort.csv``, ``cohort.md`` and, for an
   evaluation run, ``summary.json``/``summary.csv`` over every pair of the datalist.
4. :meth:`CohortRecord.report` (last: it raises) writes ``failed_pairs.json`` on rank 0 and raises one error listing
   the skipped pairs. Whether this rank reports is fixed at the gather, not read from the process group: the configs
   close the group before the report, and a closed group makes every rank look like rank 0.

:class:`CohortDataset` is an iterable dataset over this rank's share, so nothing is read before the first pair runs and
memory does not grow with the datalist; a pair whose inputs are bad is handed to :meth:`CohortRecord.reject` and
skipped. A single pair given by ``moving_image``/``fixed_image`` (no ``pair_id``) is not recorded (no cohort files): it
is prepared when the dataset is built, so bad inputs or existing outputs stop the run with one message before the
engine starts.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import ignite.distributed as idist
from ignite.engine import Engine, Events
from torch.utils.data import IterableDataset, get_worker_info

from scripts.io.atomic import write_csv, write_json, write_text
from scripts.io.errors import BundleUserError, OutputExistsError, find_user_error
from scripts.io.label_names import label_names_for
from scripts.io.devices import check_launch, rank_share
from scripts.io.outputs import (
    COHORT_CSV, COHORT_JSON, COHORT_MD, COHORT_RANK_JSON, COMPLETE, FAILED_PAIRS, FOREIGN, INTERRUPTED,
    check_inputs_are_not_outputs, clear_in_progress, clear_interrupted_outputs, expected_pair_outputs,
    check_outputs_free, mark_in_progress, pair_output_dir, pair_output_state,
)
from scripts.io.progress import Progress
from scripts.workflow.reports import (
    STATUSES, MetricsSummaryHandler, markdown_report, pair_row, read_pair_metrics, table_columns,
)

__all__ = ["CohortDataset", "CohortRecord"]

logger = logging.getLogger(__name__)

_DONE = ("registered", "already_complete")
#: a pair with both labels: every output file name the run may write into a pair folder
_ALL_LABELS = {"moving_label": True, "fixed_label": True}


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _batch_pair_ids(batch: Any) -> list[str]:
    """The pair ids of an engine batch: a collated dict (``{"pair_id": [ids]}``) or a list of decollated dicts."""
    ids: list[str] = []
    for item in batch if isinstance(batch, list) else [batch]:
        value = item.get("pair_id") if isinstance(item, Mapping) else None
        ids += [value] if isinstance(value, str) else list(value or [])
    return [str(i) for i in ids if i]


class CohortRecord:
    """What became of each pair of a run: to register, registered, complete from earlier, failed (module docstring).

    Args:
        pairs: the run's pair dicts (``scripts.io.inference_pairs``); datalist pairs carry a ``pair_id``.
        output_dir: the run's output folder (pair ``p`` writes into ``output_dir/p``, the summary files into it).
        output_names: every output file name of the run (configs: ``@output_names``,
            ``scripts.io.registration_output_names``).
        overwrite: register and replace every pair, finished or not.
        label_names: label id -> name (or a lookup-table file, ``scripts.io.label_names``) for the Dice and volume
            column names; default: the lookup table beside the pair's label map (``X.tsv``), else the numbers.
        metrics_summaries: the run's handlers (e.g. ``@extra_handlers``); its ``MetricsSummaryHandler`` s get their
            summary rewritten over every pair of the datalist when the run ends (configs/evaluate.json lets them
            replace the summary of an earlier run of a datalist: this one covers its pairs too).
    """

    def __init__(
        self,
        pairs: Sequence[Mapping[str, Any]],
        output_dir: str | os.PathLike,
        output_names: Sequence[str],
        overwrite: bool = False,
        label_names: Mapping[Any, str] | str | os.PathLike | None = None,
        metrics_summaries: Sequence[Any] | None = None,
    ) -> None:
        self.pairs = [dict(p) for p in pairs]
        self.datalist = any(p.get("pair_id") for p in self.pairs)
        if self.datalist and not all(p.get("pair_id") for p in self.pairs):
            raise ValueError("every pair of a datalist needs a 'pair_id' (its output folder); see inference_pairs.")
        self.output_names = list(output_names)
        if not self.output_names:
            raise ValueError("output_names must list the run's output files (configs: @output_names).")
        self.output_dir = Path(output_dir)
        self.overwrite = bool(overwrite)
        self.label_names = label_names or None
        self.metrics_summaries = [h for h in (metrics_summaries or []) if isinstance(h, MetricsSummaryHandler)]
        self._by_id = {p["pair_id"]: p for p in self.pairs if p.get("pair_id")}  # datalist order
        self._position = {pair_id: i for i, pair_id in enumerate(self._by_id)}
        self._known = expected_pair_outputs(_ALL_LABELS, self.output_names)
        self.active = False
        self.rank, self.world_size = 0, 1
        self.rows: dict[str, dict[str, Any]] = {}
        self.previous: dict[str, dict[str, Any]] = {}
        self.metrics: dict[str, dict[str, Any]] = {}
        self.failed: list[dict[str, Any]] = []
        self._reports: bool | None = None  # fixed by finalize(); None: rank 0 of the process group reports
        self._running: dict[str, float] = {}  # pair id -> clock when the engine started fetching it
        self._fetch_started = time.perf_counter()
        self._clock, self._started = time.perf_counter(), _now()

    # -- 1. which pairs to register

    def start(self) -> list[dict[str, Any]]:
        """Begin the run; every rank calls it before any pair runs (a collective with a process group). Returns this
        rank's share of the pairs still to register (decided on rank 0), in datalist order, or the single pair of the
        run arguments as it is; a torchrun launch without a process group raises RegistrationInputError."""
        check_launch()
        if not self.datalist:
            return [dict(p) for p in self.pairs]
        self.rank, self.world_size = idist.get_rank(), idist.get_world_size()
        self.active, self.rows, self.metrics, self.failed, self._reports = True, {}, {}, [], None
        self._clock, self._started = time.perf_counter(), _now()
        todo: list[int] | None = None
        if self.rank == 0:
            self.previous = self._load_previous()
            todo = [index for index, pair in enumerate(self.pairs) if self._needs_registering(pair)]
            self._write_progress()
        if self.world_size > 1:
            todo = json.loads(idist.broadcast(json.dumps(todo) if self.rank == 0 else None, src=0, safe_mode=True))
        mine = rank_share([self.pairs[index] for index in todo], self.rank, self.world_size)
        logger.info("rank %d of %d: %d of the %d pair(s) to register (%d in the datalist).", self.rank,
                    self.world_size, len(mine), len(todo), len(self.pairs))
        return mine

    def _load_previous(self) -> dict[str, dict[str, Any]]:
        """Rows of earlier runs: ``cohort.json``, then rank files left by a multi-rank run that was stopped."""
        rows: dict[str, dict[str, Any]] = {}
        for path in [self.output_dir / COHORT_JSON, *sorted(self.output_dir.glob(COHORT_RANK_JSON.format("*")))]:
            try:
                content = json.loads(path.read_text())
            except (OSError, ValueError):
                continue  # absent, or not ours: the rows are rebuilt from the pair folders
            for row in content.get("pairs", []) if isinstance(content, Mapping) else []:
                if isinstance(row, Mapping) and row.get("pair_id") and row.get("status") in STATUSES:
                    rows[str(row["pair_id"])] = dict(row)
        return rows

    def _needs_registering(self, pair: Mapping[str, Any]) -> bool:
        """Whether the pair is registered in this run; a finished pair and one the run must not touch are recorded."""
        folder = pair_output_dir(self.output_dir, pair["pair_id"])
        try:
            check_inputs_are_not_outputs(pair, folder, self.output_names)
        except OutputExistsError as error:
            self.reject(pair, error, write=False)
            return False
        state, existing = pair_output_state(folder, expected_pair_outputs(pair, self.output_names), self._known)
        if state == COMPLETE and not self.overwrite:
            logger.info("pair %s (%d of %d) is complete from an earlier run: skipped.", pair["pair_id"],
                        self._position[pair["pair_id"]] + 1, len(self.pairs))
            self.record(pair["pair_id"], "already_complete", folder, write=False)
            return False
        if state == FOREIGN and not self.overwrite:
            self.reject(pair, OutputExistsError(
                f"output file(s) already exist in {folder}: {', '.join(existing)}, but not all outputs of this run "
                "and not from an interrupted cohort run; expected a folder without earlier results. Pass --overwrite "
                "(config: overwrite=true) to replace them, or choose another output folder."
            ), write=False)
            return False
        if state == INTERRUPTED:
            removed = clear_interrupted_outputs(folder, self._known)
            logger.warning("pair %s was interrupted in an earlier run (removed its partial outputs: %s); registering "
                           "it again.", pair["pair_id"], ", ".join(removed) or "none")
        return True

    # -- 2. each pair as the engine runs it

    def attach(self, engine: Engine) -> None:
        """Record each pair of the evaluator's iterations (a datalist run; single pairs are left alone)."""
        engine.add_event_handler(Events.GET_BATCH_STARTED, self._fetching)
        engine.add_event_handler(Events.ITERATION_STARTED, self._iteration_started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration_completed)

    def _fetching(self, engine: Engine) -> None:
        self._fetch_started = time.perf_counter()  # the pair's time includes loading and checking it

    def _iteration_started(self, engine: Engine) -> None:
        for pair_id in _batch_pair_ids(engine.state.batch) if self.active else []:
            self.started(pair_id, self._fetch_started)

    def _iteration_completed(self, engine: Engine) -> None:
        for pair_id in _batch_pair_ids(engine.state.batch) if self.active else []:
            self.finished(pair_id)

    def started(self, pair_id: str, since: float | None = None) -> None:
        """The pair's outputs are about to be written: mark its folder in progress (``since``: when its loading
        began)."""
        folder = pair_output_dir(self.output_dir, pair_id)
        mark_in_progress(folder, f"pair {pair_id} being registered since {time.ctime()} (pid {os.getpid()})\n")
        self._running[pair_id] = time.perf_counter() if since is None else since

    def finished(self, pair_id: str) -> dict[str, Any]:
        """The engine wrote the pair's outputs: check them, remove the mark and record the row. A missing file of
        ``output_names`` raises ValueError (a configuration error: no pair would ever count as complete)."""
        pair, folder = self._by_id[pair_id], pair_output_dir(self.output_dir, pair_id)
        expected = expected_pair_outputs(pair, self.output_names)
        missing = [n for n in expected if n not in pair_output_state(folder, expected)[1]]
        if missing:
            raise ValueError(
                f"after registering pair {pair_id}, {folder} lacks {', '.join(missing)}; expected every file of "
                "output_names that the run writes for the pair. Remove names that no transform writes from "
                "output_names (label-dependent ones are listed in scripts.io.outputs.LABEL_OUTPUTS)."
            )
        clear_in_progress(folder)
        seconds = time.perf_counter() - self._running.pop(pair_id, time.perf_counter())
        return self.record(pair_id, "registered", folder, seconds=seconds)

    def reject(self, pair: Mapping[str, Any], error: Exception, write: bool = True) -> None:
        """Record a pair skipped because of ``error`` (bad inputs, outputs from elsewhere); :meth:`report` lists it."""
        pair_id = pair["pair_id"]
        logger.error("skipping pair %s (%d of %d): %s", pair_id, self._position[pair_id] + 1, len(self.pairs), error)
        files = {k: v for k, v in pair.items() if k != "pair_id"}
        self.failed.append({"pair_id": pair_id, **files, "error": str(error)})
        self.record(pair_id, "failed", error=str(error), write=write)

    def record(
        self,
        pair_id: str,
        status: str,
        folder: str | os.PathLike | None = None,
        seconds: float | None = None,
        error: str | None = None,
        write: bool = True,
    ) -> dict[str, Any]:
        """Add (or replace) the row of one pair and, with ``write``, rewrite this process's summary file. A pair found
        ``already_complete`` keeps the row of the run that registered it when there is one; otherwise its row is read
        from its folder, the label names from the pair's label maps (fixed first) when the run has none."""
        earlier = self.previous.get(pair_id)
        if status == "already_complete" and earlier and earlier.get("status") in _DONE:
            row = {**earlier, "status": status}
        else:
            pair = self._by_id.get(pair_id, {})
            labels = (pair.get("fixed_label"), pair.get("moving_label"))  # fixed first: its lookup table names them
            names = label_names_for(self.label_names, *labels) if folder else None
            rank = self.rank if status == "registered" else None
            row = pair_row(pair_id, status, folder, names, seconds, rank, error)
        self.rows[pair_id] = row
        if self.metrics_summaries and folder is not None and status in _DONE:
            metrics = read_pair_metrics(folder)
            if metrics:
                self.metrics[pair_id] = metrics
        if write:
            self._write_progress()
        return row

    # -- 3. the summary files

    def _ordered(self, rows: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
        """One row per pair in datalist order: this run's, else an earlier run's, else ``pending``."""
        return [dict(rows.get(i) or self.previous.get(i) or {"pair_id": i, "status": "pending"}) for i in self._by_id]

    def _write_tables(self, rows: list[dict[str, Any]], finished: bool, registered: int) -> dict[str, Any]:
        document = {
            "total": len(rows),
            "world_size": self.world_size,
            "started": self._started,
            "updated": _now(),
            "finished": finished,
            "registered_this_run": registered,
            "wall_seconds": round(time.perf_counter() - self._clock, 3),
            "counts": {s: sum(r["status"] == s for r in rows) for s in STATUSES},
            "pairs": rows,
        }
        columns = table_columns(rows)
        write_csv([{c: r.get(c) for c in columns} for r in rows], self.output_dir / COHORT_CSV)
        write_json(document, self.output_dir / COHORT_JSON)
        return document

    def _write_progress(self) -> None:
        if self.world_size == 1:
            registered = sum(r["status"] == "registered" for r in self.rows.values())
            self._write_tables(self._ordered(self.rows), False, registered)
        else:
            own = [self.rows[i] for i in self._by_id if i in self.rows]
            write_json({"rank": self.rank, "world_size": self.world_size, "updated": _now(), "pairs": own},
                       self.output_dir / COHORT_RANK_JSON.format(self.rank))

    def finalize(self) -> dict[str, Any] | None:
        """End the run (every rank): gather every rank's rows and skipped pairs; rank 0 writes the merged
        ``cohort.json``, ``cohort.csv``, ``cohort.md`` (and the evaluation summary) and returns the ``cohort.json``
        content, the others (or a run without datalist) None."""
        if not self.active:
            return None
        self.active = False
        parts = idist.all_gather({"rows": self.rows, "metrics": self.metrics, "failed": self.failed})
        self._reports = self.rank == 0
        if self.rank != 0:  # rank 0 writes everything
            (self.output_dir / COHORT_RANK_JSON.format(self.rank)).unlink(missing_ok=True)
            return None
        rows: dict[str, dict[str, Any]] = {}
        failed: list[dict[str, Any]] = []
        for part in parts:
            rows.update(part["rows"])
            self.metrics.update(part["metrics"])
            failed += part["failed"]
        self.failed = sorted(failed, key=lambda f: self._position[f["pair_id"]])
        ordered = self._ordered(rows)
        document = self._write_tables(ordered, True, sum(r["status"] == "registered" for r in rows.values()))
        write_text(markdown_report(ordered, document), self.output_dir / COHORT_MD)
        for path in [*self.output_dir.glob(COHORT_RANK_JSON.format("*")), *self.output_dir.glob(".cohort*.tmp-*")]:
            path.unlink(missing_ok=True)  # rank files are merged now; temporary files of writes cut short by a kill
        metrics = [self.metrics[i] for i in self._by_id if i in self.metrics]
        for handler in self.metrics_summaries if metrics else []:  # the evaluation summary over every pair with metrics
            handler.write(metrics)
        counts = document["counts"]
        logger.info(
            "cohort of %d pair(s): %d registered now, %d complete from earlier runs, %d failed, %d pending; "
            "summary in %s", len(ordered), counts["registered"], counts["already_complete"], counts["failed"],
            counts["pending"], self.output_dir / COHORT_MD,
        )
        return document

    # -- 4. the skipped pairs

    def report(self) -> None:
        """Call when the run ends: write ``failed_pairs.json`` and raise one BundleUserError listing every skipped pair
        and why (a stale ``failed_pairs.json`` is removed when none were). Only rank 0 of a multi-rank run reports, for
        every rank, after :meth:`finalize`; another rank writes, removes and raises nothing."""
        reports = self._reports if self._reports is not None else idist.get_rank() == 0
        if not reports or not self.datalist:
            return
        target = self.output_dir / FAILED_PAIRS
        total = len(self.pairs)
        if not self.failed:
            logger.info("no pair of %d was skipped for bad inputs.", total)
            target.unlink(missing_ok=True)
            return
        written = write_json({"total": total, "failed": self.failed}, target)
        lines = "\n  ".join(f"{item['pair_id']}: {item['error']}" for item in self.failed)
        raise BundleUserError(
            f"{len(self.failed)} of {total} pairs were skipped because of bad inputs (details in {written}); the other "
            f"{total - len(self.failed)} were registered. Fix these and run them again:\n  {lines}"
        )


class CohortDataset(IterableDataset):
    """The pairs this rank registers, checked and loaded one at a time (module docstring).

    Args:
        data: the pairs (``CohortRecord.start()``).
        transform: applied to each pair dict (the config's ``preprocessing``: checks and loads it).
        record: the run's record: its output folder, output names and ``overwrite``; it gets the pairs with bad inputs.
    """

    def __init__(
        self,
        data: Sequence[Mapping[str, Any]],
        transform: Callable[[dict[str, Any]], Any] | None,
        record: CohortRecord,
    ) -> None:
        super().__init__()
        self.data = [dict(p) for p in data]
        self.transform = transform
        self.record = record
        self._first_item: Any = None
        if self._single_pair:
            # one pair: prepared now, so bad inputs or outputs stop the run with one message before the engine starts
            # (an error inside the engine would be logged with its traceback by the engine's handlers)
            check_outputs_free(self.data, record.output_dir, record.output_names, record.overwrite)
            self._first_item = self._transformed(self.data[0])

    @property
    def _single_pair(self) -> bool:
        return len(self.data) == 1 and not self.data[0].get("pair_id")

    def __iter__(self) -> Iterator[Any]:
        if get_worker_info() is not None:
            raise ValueError(
                "CohortDataset must run in the main process (dataloader num_workers=0): its record marks each pair "
                "while the engine writes its outputs."
            )
        # Each pair is yielded without a name bound to it here: a suspended generator keeps its locals, and the pair
        # as prepared would then stay alive beside the batch the loader collates from it (a copy of every volume)
        # until the engine asks for the next pair, i.e. through the whole registration: 2.4 GB for a CT-sized pair.
        if self._single_pair:
            yield self._take_first()
            return
        # a bar over this rank's pairs on an interactive terminal; each pair's own stages draw theirs below it
        with Progress(len(self.data), "cohort", unit="pair") as bar:
            for position, pair in enumerate(self.data):
                logger.info("registering pair %s (%d of %d on rank %d).", pair["pair_id"], position + 1,
                            len(self.data), self.record.rank)
                try:
                    loaded = [self._transformed(pair)]
                except Exception as error:
                    user_error = find_user_error(error)
                    if user_error is None:
                        raise
                    self.record.reject(pair, user_error)  # bad inputs: recorded and skipped
                else:
                    yield loaded.pop()  # handed over, not kept (see above)
                bar.update(1)

    def _take_first(self) -> Any:
        """The single pair, prepared when the dataset was built, and forgotten here (a second run prepares it again)."""
        item, self._first_item = self._first_item, None
        return item if item is not None else self._transformed(self.data[0])

    def _transformed(self, pair: Mapping[str, Any]) -> Any:
        return self.transform(pair) if self.transform is not None else dict(pair)
