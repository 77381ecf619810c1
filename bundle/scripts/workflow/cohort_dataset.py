# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""The dataset of inference/evaluation runs: this rank's share of the pairs still to register, loaded one at a time.

:class:`CohortDataset` is an iterable dataset, so nothing is read before the first pair runs and memory does not grow
with the datalist. When the engine starts iterating it asks the run's ``CohortRecord`` which pairs still need
registering (finished ones are left out up front), takes this rank's round-robin share of them
(``scripts.io.sharding.rank_share``) and runs ``transform`` on each (the config's ``preprocessing``, whose
``loading_transforms`` check the pair: headers, then the decoded voxels). A pair whose inputs are bad is recorded with
``CohortRecord.reject`` and skipped; the record, attached to the evaluator, records the others as they finish.

A single pair given by ``moving_image``/``fixed_image`` (no ``pair_id``) is prepared when the dataset is built: existing
outputs (unless ``overwrite``) or bad inputs stop the run with one message before the engine starts; it writes no
cohort files. A datalist, even of one pair, records bad pairs and lists them when the run ends.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from torch.utils.data import IterableDataset, get_worker_info

from scripts.io.outputs import check_outputs_free
from scripts.io.errors import find_user_error
from scripts.io.progress import Progress
from scripts.io.sharding import check_launch, rank_share
from scripts.workflow.cohort_record import CohortRecord

__all__ = ["CohortDataset"]

logger = logging.getLogger(__name__)


class CohortDataset(IterableDataset):
    """The pairs of a run's :class:`CohortRecord` that this rank registers, checked and loaded one at a time.

    Args:
        record: the run's record: its pairs, output folder, output names and ``overwrite``.
        transform: applied to each pair dict (the config's ``preprocessing``: checks and loads it).
    """

    def __init__(self, record: CohortRecord, transform: Callable[[dict[str, Any]], Any] | None) -> None:
        super().__init__()
        self.record = record
        self.transform = transform
        self._first_item: Any = None
        if not record.datalist:
            # one pair: prepared now, so bad inputs or outputs stop the run with one message before the engine starts
            # (an error inside the engine would be logged with its traceback by the engine's handlers)
            check_outputs_free(record.pairs, record.output_dir, record.output_names, record.overwrite)
            self._first_item = self._transformed(record.pairs[0])

    def __iter__(self) -> Iterator[Any]:
        if get_worker_info() is not None:
            raise ValueError(
                "CohortDataset must run in the main process (dataloader num_workers=0): its record marks each pair "
                "while the engine writes its outputs."
            )
        check_launch()
        if not self.record.datalist:
            item, self._first_item = self._first_item, None  # a second run prepares the pair again
            yield item if item is not None else self._transformed(self.record.pairs[0])
            return
        todo = self.record.start()
        mine = rank_share(todo, self.record.rank, self.record.world_size)
        logger.info("rank %d of %d: %d of the %d pair(s) to register (%d in the datalist).", self.record.rank,
                    self.record.world_size, len(mine), len(todo), len(self.record.pairs))
        # a bar over this rank's pairs on an interactive terminal; each pair's own stages draw theirs below it
        with Progress(len(mine), "cohort", unit="pair") as bar:
            for position, pair in enumerate(mine):
                logger.info("registering pair %s (%d of %d on rank %d).", pair["pair_id"], position + 1, len(mine),
                            self.record.rank)
                item = self._loaded(pair)
                if item is not None:
                    yield item
                bar.update(1)

    def _transformed(self, pair: Mapping[str, Any]) -> Any:
        return self.transform(pair) if self.transform is not None else dict(pair)

    def _loaded(self, pair: Mapping[str, Any]) -> Any:
        """The transformed pair, or None when its inputs are bad (recorded in the run's record)."""
        try:
            return self._transformed(pair)
        except Exception as error:
            user_error = find_user_error(error)
            if user_error is None:
                raise
            self.record.reject(pair, user_error)
            return None
