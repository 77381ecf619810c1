# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""Batch runs go on past a bad pair: bad pairs are skipped, collected and reported at the end.

A batch over thousands of scans must not stop at pair 517 because one file is truncated, and must not silently drop
it. Each pair is checked when the run reaches it, by the ``loading_transforms`` of the config
(``scripts.io.input_transforms``: headers, then the decoded voxels); :class:`PairScreen` holds the run's pairs and the
ledger of the skipped ones: ``scripts.workflow.CohortDataset`` records a pair that failed with :meth:`PairScreen.reject`,
and :meth:`PairScreen.report` (called when the run ends) writes ``failed_pairs.json`` and raises one error listing
them, so the command exits non-zero and the user knows what to fix.

On a ``torchrun`` launch, ``CohortSummary.finalize`` gathers the skipped pairs of every rank and hands them to rank 0's
screen with :meth:`PairScreen.merge_ranks`; the other ranks' screens are told there that they report nothing. That duty
is fixed at the gather, not read from the process group when :meth:`report` runs: the configs close the group before
the report (the report raises, so it must come last), and a closed group makes every rank look like rank 0.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from scripts.io.atomic import write_json
from scripts.io.errors import BundleUserError
from scripts.io.sharding import distributed_context

__all__ = ["FAILED_PAIRS_FILE", "PairScreen"]

logger = logging.getLogger(__name__)

FAILED_PAIRS_FILE = "failed_pairs.json"


class PairScreen:
    """The pairs of a run and the ones skipped because of bad inputs (with why).

    Args:
        pairs: pair dicts with ``moving_image``, ``fixed_image`` and optional ``moving_label``/``fixed_label``,
            ``pair_id`` (as made by ``scripts.io.datalist.inference_pairs``). Nothing is read here.

    Attributes:
        pairs: the pair dicts (copies), in run order.
        total: number of pairs.
        bad: ``{"pair_id", <files>, "error"}`` of every pair skipped so far.
    """

    def __init__(self, pairs: Sequence[Mapping[str, Any]]) -> None:
        self.pairs = [dict(p) for p in pairs]
        self.total = len(self.pairs)
        self.bad: list[dict[str, Any]] = []
        self._reports: bool | None = None  # None: decided by the process group when report() runs (no gather yet)

    def __len__(self) -> int:
        return self.total

    def reject(self, pair: Mapping[str, Any], error: Exception, index: int | None = None) -> None:
        """Record a pair as skipped because of ``error`` (:meth:`report` lists it when the run ends)."""
        name = pair.get("pair_id") or str(index if index is not None else len(self.bad))
        position = f" ({index + 1} of {self.total})" if index is not None else ""
        logger.error("skipping pair %s%s: %s", name, position, error)
        files = {k: v for k, v in pair.items() if k != "pair_id"}
        self.bad.append({"pair_id": name, **files, "error": str(error)})

    def merge_ranks(self, bad: Sequence[Mapping[str, Any]] | None) -> None:
        """Take the result of the final gather over the ranks: on rank 0 ``bad`` is the skipped pairs of every rank
        (it replaces this rank's and :meth:`report` lists them all); on the other ranks it is None, their pairs are
        reported by rank 0 and :meth:`report` does nothing, whatever the state of the process group by then."""
        self._reports = bad is not None
        self.bad = [dict(item) for item in bad or []]

    def report(self, output_dir: str | os.PathLike | None = None) -> None:
        """Call when the run ends: write ``failed_pairs.json`` into ``output_dir`` and raise when pairs were skipped
        (a stale ``failed_pairs.json`` of an earlier run is removed when none were). Only rank 0 of a multi-rank run
        reports (for every rank, after :meth:`merge_ranks`); another rank writes, removes and raises nothing.

        Raises:
            BundleUserError: listing every skipped pair and why (the good pairs' outputs are already written).
        """
        reports = self._reports if self._reports is not None else distributed_context()[0] == 0
        if not reports:
            return  # rank 0 reports the skipped pairs of every rank (CohortSummary.finalize gathered them)
        target = Path(output_dir) / FAILED_PAIRS_FILE if output_dir is not None else None
        if not self.bad:
            logger.info("no pair of %d was skipped for bad inputs.", self.total)
            if target is not None and self.total > 1:
                target.unlink(missing_ok=True)
            return
        where = ""
        if target is not None:
            where = f" (details in {write_json({'total': self.total, 'failed': self.bad}, target)})"
        lines = "\n  ".join(f"{item['pair_id']}: {item['error']}" for item in self.bad)
        raise BundleUserError(
            f"{len(self.bad)} of {self.total} pairs were skipped because of bad inputs{where}; the other "
            f"{self.total - len(self.bad)} were registered. Fix these and run them again:\n  {lines}"
        )
