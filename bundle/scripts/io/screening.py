# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""Batch runs go on past a bad pair: every pair is checked before the batch starts, bad ones are skipped and reported.

A batch over thousands of scans must not stop at pair 517 because one file is truncated, and must not silently drop it
either. :class:`PairScreen` runs :func:`scripts.io.pair_checks.validate_pair` on every pair, keeps the good ones for the
run, logs each bad one, and :meth:`PairScreen.report` (called when the run ends) writes ``failed_pairs.json`` and
raises one error listing them, so the command exits non-zero and the user knows exactly what to fix.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from scripts.io.atomic import write_json
from scripts.io.errors import BundleUserError, RegistrationInputError
from scripts.io.pair_checks import VALIDATED_KEY, validate_pair
from scripts.io.volume_checks import (
    MAX_SPACING_RATIO,
    MIN_FOV_OVERLAP,
    MIN_SPATIAL_SIZE,
)

__all__ = ["VALIDATED_KEY", "FAILED_PAIRS_FILE", "PairScreen"]

logger = logging.getLogger(__name__)

FAILED_PAIRS_FILE = "failed_pairs.json"


class PairScreen:
    """Check every pair of a run up front; keep the good ones in :attr:`good`, the bad ones (with why) in :attr:`bad`.

    Args:
        pairs: pair dicts with ``moving_image``, ``fixed_image`` and optional ``moving_label``/``fixed_label``,
            ``pair_id`` (as made by ``scripts.io.datalist.inference_pairs``).
        max_spacing_ratio, min_size, min_overlap: passed to :func:`scripts.io.pair_checks.validate_pair`.

    Raises:
        RegistrationInputError: at once for a single pair (nothing else to do), naming the problem.
    """

    def __init__(
        self,
        pairs: Sequence[Mapping[str, Any]],
        max_spacing_ratio: float = MAX_SPACING_RATIO,
        min_size: int = MIN_SPATIAL_SIZE,
        min_overlap: float = MIN_FOV_OVERLAP,
    ) -> None:
        self.total = len(pairs)
        self.good: list[dict[str, Any]] = []
        self.bad: list[dict[str, Any]] = []
        for index, pair in enumerate(pairs):
            try:
                if not pair.get("moving_image") or not pair.get("fixed_image"):
                    missing = [k for k in ("moving_image", "fixed_image") if not pair.get(k)]
                    raise RegistrationInputError(f"pair has no {' and no '.join(missing)}; expected both images.")
                if pair.get("fixed_label") and not pair.get("moving_label"):
                    raise RegistrationInputError(
                        f"fixed label map '{pair['fixed_label']}' was given without a moving label map; expected both "
                        "(Dice compares the warped moving labels with the fixed ones) or only the moving one."
                    )
                validate_pair(
                    pair["moving_image"],
                    pair["fixed_image"],
                    pair.get("moving_label") or None,
                    pair.get("fixed_label") or None,
                    max_spacing_ratio,
                    min_size,
                    min_overlap,
                )
            except RegistrationInputError as error:
                if self.total == 1:
                    raise
                name = pair.get("pair_id") or str(index)
                logger.error("skipping pair %s (%d of %d): %s", name, index + 1, self.total, error)
                files = {k: v for k, v in pair.items() if k != "pair_id"}
                self.bad.append({"pair_id": name, **files, "error": str(error)})
            else:
                self.good.append({**pair, VALIDATED_KEY: True})

    def report(self, output_dir: str | os.PathLike | None = None) -> None:
        """Call when the run ends: write ``failed_pairs.json`` into ``output_dir`` and raise when pairs were skipped.

        Raises:
            BundleUserError: listing every skipped pair and why (the good pairs' outputs are already written).
        """
        if not self.bad:
            logger.info("all %d pair(s) passed the input checks.", self.total)
            return
        where = ""
        if output_dir is not None:
            path = write_json({"total": self.total, "failed": self.bad}, Path(output_dir) / FAILED_PAIRS_FILE)
            where = f" (details in {path})"
        lines = "\n  ".join(f"{item['pair_id']}: {item['error']}" for item in self.bad)
        raise BundleUserError(
            f"{len(self.bad)} of {self.total} pairs were skipped because of bad inputs{where}; the other "
            f"{self.total - len(self.bad)} were registered. Fix these and run them again:\n  {lines}"
        )
