# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""The dataset of inference/evaluation runs: the pairs this rank registers, checked and loaded one at a time.

:class:`CohortDataset` is an iterable dataset, so nothing is read before the first pair runs and memory does not grow
with the datalist. Its data is what the run's ``CohortRecord.start`` returns: this rank's share of the datalist's pairs
still to register (finished ones are left out before the dataset is built). It runs ``transform`` on each (the config's
``preprocessing``, whose ``loading_transforms`` check the pair: headers, then the decoded voxels); a pair whose inputs
are bad is handed to ``CohortRecord.reject`` and skipped. The record, attached to the evaluator, records the others as
their outputs are written.

A single pair given by ``moving_image``/``fixed_image`` (no ``pair_id``) is prepared when the dataset is built: existing
outputs (unless ``overwrite``) or bad inputs stop the run with one message before the engine starts; it writes no
cohort files. A datalist, even of one pair, records bad pairs and lists them when the run ends.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from torch.utils.data import IterableDataset, get_worker_info

from scripts.io.errors import find_user_error
from scripts.io.outputs import check_outputs_free
from scripts.io.progress import Progress
from scripts.workflow.cohort_record import CohortRecord

__all__ = ["CohortDataset"]

logger = logging.getLogger(__name__)


class CohortDataset(IterableDataset):
    """The pairs this rank registers, checked and loaded one at a time (see the module docstring).

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
                loaded = [self._loaded(pair)]
                if loaded[0] is not None:
                    yield loaded.pop()  # handed over, not kept (see above)
                bar.update(1)

    def _take_first(self) -> Any:
        """The single pair, prepared when the dataset was built, and forgotten here (a second run prepares it again)."""
        item, self._first_item = self._first_item, None
        return item if item is not None else self._transformed(self.data[0])

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
