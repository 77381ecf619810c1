# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""The dataset of inference/evaluation runs: streams the pairs one at a time, skips finished ones, shards over ranks.

:class:`CohortDataset` is an iterable dataset, so nothing is read before the first pair runs and memory does not grow
with the datalist. For each pair this rank owns (``scripts.io.sharding.shard_indices``) it

1. looks at the pair's output folder (``scripts.io.completion``): a complete pair is skipped unless ``overwrite``, the
   leftovers of an interrupted run are removed, outputs from elsewhere make the pair fail (they are never replaced
   without ``overwrite``);
2. marks the folder in progress, runs ``transform`` (the config's ``preprocessing``, whose ``loading_transforms``
   check the pair: headers, then the decoded voxels) and yields the data dict; a pair whose inputs are bad is recorded
   in the run's ``scripts.io.PairScreen`` and skipped;
3. when the engine asks for the next pair (num_workers=0: after this one's outputs are written), checks that the
   outputs are complete, removes the mark and records the pair's row in the ``CohortSummary`` with its wall time.

A single pair given by ``moving_image``/``fixed_image`` (no ``pair_id``) is prepared when the dataset is built: existing
outputs (unless ``overwrite``) or bad inputs stop the run with one message before the engine starts; it writes no
cohort files. A datalist, even of one pair, records bad pairs and lists them when the run ends.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from torch.utils.data import IterableDataset, get_worker_info

from scripts.io.completion import (
    COMPLETE,
    FOREIGN,
    INTERRUPTED,
    clear_in_progress,
    clear_interrupted_outputs,
    expected_pair_outputs,
    mark_in_progress,
    pair_output_state,
)
from scripts.io.datalist import check_inputs_are_not_outputs, check_outputs_free
from scripts.io.errors import OutputExistsError, find_user_error
from scripts.io.progress import Progress
from scripts.io.screening import PairScreen
from scripts.io.sharding import check_launch, distributed_context, shard_indices
from scripts.io.writer import pair_output_dir
from scripts.workflow.cohort_summary import CohortSummary

__all__ = ["CohortDataset"]

logger = logging.getLogger(__name__)


class CohortDataset(IterableDataset):
    """Pairs of a run, checked, loaded and yielded one at a time (see the module docstring).

    Args:
        data: the run's pair dicts (``scripts.io.inference_pairs``), or a :class:`PairScreen` holding them.
        transform: applied to each pair dict (the config's ``preprocessing``: checks and loads it).
        screen: the run's :class:`PairScreen` (default: one over ``data``); ``screen.report`` lists the skipped pairs.
        output_dir: root output folder (pair ``p`` writes into ``output_dir/p``).
        output_names: every output file name of the run (configs: ``@output_names``).
        overwrite: register and replace every pair, finished or not.
        summary: the run's :class:`CohortSummary` (default: one in ``output_dir``).
        label_outputs: output name -> pair key it needs (default ``scripts.io.completion.LABEL_OUTPUTS``).
        run_outputs: run-level output names (default ``scripts.io.completion.RUN_OUTPUTS``).
    """

    def __init__(
        self,
        data: Sequence[Mapping[str, Any]] | PairScreen,
        transform: Callable[[dict[str, Any]], Any] | None,
        screen: PairScreen | None = None,
        output_dir: str | os.PathLike = ".",
        output_names: Sequence[str] = (),
        overwrite: bool = False,
        summary: CohortSummary | None = None,
        label_outputs: Mapping[str, str] | None = None,
        run_outputs: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        self.screen = screen if screen is not None else (data if isinstance(data, PairScreen) else PairScreen(data))
        self.pairs = self.screen.pairs if isinstance(data, PairScreen) else [dict(p) for p in data]
        self.transform = transform
        self.output_dir = output_dir
        if len(self.pairs) > 1 and not all(p.get("pair_id") for p in self.pairs):
            raise ValueError("every pair of a datalist needs a 'pair_id' (its output folder); see inference_pairs.")
        self.output_names = list(output_names)
        if not self.output_names:
            raise ValueError("output_names must list the run's output files (configs: @output_names).")
        self.overwrite = bool(overwrite)
        self.summary = summary if summary is not None else CohortSummary(output_dir)
        self.label_outputs = label_outputs
        self.run_outputs = run_outputs
        self._first_item: Any = None
        if len(self.pairs) == 1 and not self.pairs[0].get("pair_id"):
            # one pair: prepared now, so bad inputs or outputs stop the run with one message before the engine starts
            # (an error inside the engine would be logged with its traceback by the engine's handlers)
            check_outputs_free(self.pairs, self.output_dir, self.output_names, self.overwrite)
            self._first_item = self._transformed(self.pairs[0])

    def __iter__(self) -> Iterator[Any]:
        if get_worker_info() is not None:
            raise ValueError(
                "CohortDataset must run in the main process (dataloader num_workers=0): it records each pair when the "
                "engine has written its outputs."
            )
        check_launch()
        if len(self.pairs) == 1 and not self.pairs[0].get("pair_id"):
            yield from self._single_pair()
            return
        rank, world_size = distributed_context()
        self.summary.start([p["pair_id"] for p in self.pairs], rank, world_size)
        owned = shard_indices(len(self.pairs), rank, world_size)
        logger.info("rank %d of %d: %d of %d pair(s) of the datalist.", rank, world_size, len(owned), len(self.pairs))
        # a bar over this rank's pairs on an interactive terminal; each pair's own stages draw theirs below it
        with Progress(len(owned), "cohort", unit="pair") as bar:
            for index in owned:
                pair = self.pairs[index]
                started = time.perf_counter()
                item = self._prepare(index, pair)
                if item is not None:
                    yield item
                    self._finish(pair, time.perf_counter() - started)
                bar.update(1)

    def _single_pair(self) -> Iterator[Any]:
        item, self._first_item = self._first_item, None  # a second run prepares the pair again
        yield item if item is not None else self._transformed(self.pairs[0])

    def _transformed(self, pair: Mapping[str, Any]) -> Any:
        return self.transform(pair) if self.transform is not None else pair

    def _expected(self, pair: Mapping[str, Any]) -> list[str]:
        return expected_pair_outputs(pair, self.output_names, self.label_outputs, self.run_outputs)

    def _fail(self, index: int, pair: Mapping[str, Any], error: Exception) -> None:
        self.screen.reject(pair, error, index)
        self.summary.record(pair["pair_id"], "failed", error=str(error))

    def _prepare(self, index: int, pair: Mapping[str, Any]) -> Any:
        """Steps 1-2 of the module docstring; None when the pair is skipped."""
        folder = pair_output_dir(self.output_dir, pair["pair_id"])
        known = expected_pair_outputs({"moving_label": 1, "fixed_label": 1}, self.output_names, self.label_outputs,
                                      self.run_outputs)
        try:
            check_inputs_are_not_outputs(pair, folder, self.output_names)
        except OutputExistsError as error:
            self._fail(index, pair, error)
            return None
        state, existing = pair_output_state(folder, self._expected(pair), known)
        if state == COMPLETE and not self.overwrite:
            logger.info("pair %s (%d of %d) is complete from an earlier run: skipped.", pair["pair_id"], index + 1,
                        len(self.pairs))
            self.summary.record(pair["pair_id"], "already_complete", folder, write=False, label_files=_labels(pair))
            return None
        if state == FOREIGN and not self.overwrite:
            self._fail(index, pair, OutputExistsError(
                f"output file(s) already exist in {folder}: {', '.join(existing)}, but not all outputs of this run "
                "and not from an interrupted cohort run; expected a folder without earlier results. Pass --overwrite "
                "(config: overwrite=true) to replace them, or choose another output folder."
            ))
            return None
        if state == INTERRUPTED:
            removed = clear_interrupted_outputs(folder, known)
            logger.warning("pair %s was interrupted in an earlier run (removed its partial outputs: %s); registering "
                           "it again.", pair["pair_id"], ", ".join(removed) or "none")
        mark_in_progress(folder, f"pair {pair['pair_id']} being registered since {time.ctime()} (pid {os.getpid()})\n")
        logger.info("registering pair %s (%d of %d).", pair["pair_id"], index + 1, len(self.pairs))
        try:
            return self._transformed(pair)
        except Exception as error:
            user_error = find_user_error(error)
            if user_error is None:
                raise
            clear_in_progress(folder)
            if not any(folder.iterdir()):
                folder.rmdir()  # created for the marker only
            self._fail(index, pair, user_error)
            return None

    def _finish(self, pair: Mapping[str, Any], seconds: float) -> None:
        """Step 3: the engine wrote the pair's outputs (it asks for the next pair only then)."""
        folder = pair_output_dir(self.output_dir, pair["pair_id"])
        expected = self._expected(pair)
        existing = pair_output_state(folder, expected)[1]
        missing = [n for n in expected if n not in existing]
        if missing:  # a configuration error (a name in output_names that nothing writes): no pair would ever count
            raise ValueError(
                f"after registering pair {pair['pair_id']}, {folder} lacks {', '.join(missing)}; expected every file "
                "of output_names that the run writes for the pair. Remove names that no transform writes from "
                "output_names (or list label-dependent ones in label_output_names)."
            )
        clear_in_progress(folder)
        self.summary.record(pair["pair_id"], "registered", folder, seconds=seconds, label_files=_labels(pair))


def _labels(pair: Mapping[str, Any]) -> tuple[str | None, str | None]:
    """The pair's label maps, fixed first (their lookup tables name the labels)."""
    return pair.get("fixed_label"), pair.get("moving_label")
