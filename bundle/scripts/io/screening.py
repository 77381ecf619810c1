# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""Batch runs go on past a bad pair: each pair is checked as it comes, bad ones are skipped and reported at the end.

A batch over thousands of scans must not stop at pair 517 because one file is truncated, must not silently drop it, and
must not spend its first hour decoding every file before it registers anything. :class:`PairScreen` holds the pairs
(cheap dicts) and checks one pair when the run reaches it (:meth:`PairScreen.check`): the headers of its files first
(exists, readable, 3-D: no voxel decoded), then every check of :func:`scripts.io.pair_checks.validate_pair`, which reads
the voxels, right before the pair is loaded for the run. Each distinct file is fully read once per run: an atlas shared
by every pair is checked the first time only (results are kept per file, with its size and modification time). A bad
pair is logged and kept in :attr:`PairScreen.bad`; :meth:`PairScreen.report` (called when the run ends) writes
``failed_pairs.json`` and raises one error listing them, so the command exits non-zero and the user knows what to fix.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from scripts.io.atomic import write_json
from scripts.io.datalist_checks import header_problem
from scripts.io.errors import BundleUserError, RegistrationInputError
from scripts.io.pair_checks import VALIDATED_KEY, compare_pair_grids
from scripts.io.sharding import distributed_context
from scripts.io.volume_checks import (
    MAX_SPACING_RATIO,
    MIN_FOV_OVERLAP,
    MIN_SPATIAL_SIZE,
    NIFTI_HINT,
    check_file_exists,
    validate_image,
    validate_label,
)

__all__ = ["VALIDATED_KEY", "FAILED_PAIRS_FILE", "PairScreen"]

logger = logging.getLogger(__name__)

FAILED_PAIRS_FILE = "failed_pairs.json"

_ROLES = (
    ("moving_image", "moving image"),
    ("fixed_image", "fixed image"),
    ("moving_label", "moving label map"),
    ("fixed_label", "fixed label map"),
)


def _file_key(path: str | os.PathLike) -> tuple[str, int, int] | None:
    """Identity of a file's content for the check cache (path, size, mtime); None when it cannot be stat'ed."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns


class PairScreen:
    """The pairs of a run, each checked when the run reaches it; bad ones (with why) collect in :attr:`bad`.

    Args:
        pairs: pair dicts with ``moving_image``, ``fixed_image`` and optional ``moving_label``/``fixed_label``,
            ``pair_id`` (as made by ``scripts.io.datalist.inference_pairs``). Nothing is read here.
        max_spacing_ratio, min_size, min_overlap: passed to the checks of ``scripts.io.volume_checks``.

    Attributes:
        pairs: the pair dicts (copies), in run order.
        total: number of pairs.
        bad: ``{"pair_id", <files>, "error"}`` of every pair skipped so far.
        full_reads: file path -> how many times its voxels were read for checking (1 per distinct file).
    """

    def __init__(
        self,
        pairs: Sequence[Mapping[str, Any]],
        max_spacing_ratio: float = MAX_SPACING_RATIO,
        min_size: int = MIN_SPATIAL_SIZE,
        min_overlap: float = MIN_FOV_OVERLAP,
    ) -> None:
        self.pairs = [dict(p) for p in pairs]
        self.total = len(self.pairs)
        self.max_spacing_ratio = max_spacing_ratio
        self.min_size = min_size
        self.min_overlap = min_overlap
        self.bad: list[dict[str, Any]] = []
        self.full_reads: Counter[str] = Counter()
        self._images: dict[Any, Any] = {}  # file key -> (shape, affine) or the error, per role for errors
        self._labels: dict[Any, Any] = {}  # (label key, image grid) -> None or the error

    def __len__(self) -> int:
        return self.total

    def iter_good(self) -> Iterator[dict[str, Any]]:
        """Check the pairs one after the other, yielding each good one (marked with ``VALIDATED_KEY``)."""
        for index, pair in enumerate(self.pairs):
            checked = self.check(pair, index)
            if checked is not None:
                yield checked

    def check(self, pair: Mapping[str, Any], index: int | None = None) -> dict[str, Any] | None:
        """Check one pair now: headers first, then the full checks (each distinct file read once per run).

        Args:
            pair: the pair dict.
            index: its position in the run (for messages and default ids).

        Returns:
            the pair marked with ``VALIDATED_KEY`` (so ``ValidateRegistrationInputsd`` does not read it again), or None
            when it is bad (logged and added to :attr:`bad`).

        Raises:
            RegistrationInputError: for a run of a single pair (nothing else to do), naming the problem.
        """
        try:
            self._check_entries(pair)
            self._check_headers(pair)
            self._check_contents(pair)
        except RegistrationInputError as error:
            self.reject(pair, error, index)
            return None
        return {**pair, VALIDATED_KEY: True}

    def reject(self, pair: Mapping[str, Any], error: Exception, index: int | None = None) -> None:
        """Record a pair as skipped because of ``error`` (re-raised when the run has a single pair)."""
        if self.total == 1:
            raise error
        name = pair.get("pair_id") or str(index if index is not None else len(self.bad))
        position = f" ({index + 1} of {self.total})" if index is not None else ""
        logger.error("skipping pair %s%s: %s", name, position, error)
        files = {k: v for k, v in pair.items() if k not in ("pair_id", VALIDATED_KEY)}
        self.bad.append({"pair_id": name, **files, "error": str(error)})

    @staticmethod
    def _check_entries(pair: Mapping[str, Any]) -> None:
        if not pair.get("moving_image") or not pair.get("fixed_image"):
            missing = [k for k in ("moving_image", "fixed_image") if not pair.get(k)]
            raise RegistrationInputError(f"pair has no {' and no '.join(missing)}; expected both images.")
        if pair.get("fixed_label") and not pair.get("moving_label"):
            raise RegistrationInputError(
                f"fixed label map '{pair['fixed_label']}' was given without a moving label map; expected both "
                "(Dice compares the warped moving labels with the fixed ones) or only the moving one."
            )

    @staticmethod
    def _check_headers(pair: Mapping[str, Any]) -> None:
        """Header-only checks of every file of the pair, so a missing label is found before any image is decoded."""
        for key, role in _ROLES:
            if pair.get(key):
                path = check_file_exists(pair[key], role)
                problem = header_problem(path)
                if problem:
                    hint = "" if "expected" in problem else f"; expected {NIFTI_HINT}"
                    raise RegistrationInputError(f"{role} '{path}' {problem}{hint}.")

    def _image(self, path: str, role: str) -> tuple[tuple[int, int, int], np.ndarray]:
        key = _file_key(path)
        found = self._images.get(key, self._images.get((key, role)))
        if found is None:
            try:
                self.full_reads[str(path)] += 1
                found = self._images[key] = validate_image(path, role, self.max_spacing_ratio, self.min_size)
            except RegistrationInputError as error:
                found = self._images[(key, role)] = error
        if isinstance(found, Exception):
            raise found
        return found

    def _label(self, path: str, image_grid: tuple, image_path: str, role: str) -> None:
        shape, affine = image_grid
        key = (_file_key(path), tuple(shape), np.asarray(affine, float).round(6).tobytes(), role)
        if key not in self._labels:
            try:
                self.full_reads[str(path)] += 1
                validate_label(path, shape, affine, image_path, role)
                self._labels[key] = None
            except RegistrationInputError as error:
                self._labels[key] = error
        if self._labels[key] is not None:
            raise self._labels[key]

    def _check_contents(self, pair: Mapping[str, Any]) -> None:
        moving = self._image(pair["moving_image"], "moving image")
        fixed = self._image(pair["fixed_image"], "fixed image")
        if pair.get("moving_label"):
            self._label(pair["moving_label"], moving, pair["moving_image"], "moving label map")
        if pair.get("fixed_label"):
            self._label(pair["fixed_label"], fixed, pair["fixed_image"], "fixed label map")
        compare_pair_grids(*moving, *fixed, pair["moving_image"], pair["fixed_image"], self.min_overlap)

    def report(self, output_dir: str | os.PathLike | None = None) -> None:
        """Call when the run ends: write ``failed_pairs.json`` into ``output_dir`` and raise when pairs were skipped
        (a stale ``failed_pairs.json`` of an earlier run is removed when none were). Only rank 0 of a multi-rank run
        reports (for every rank).

        Raises:
            BundleUserError: listing every skipped pair and why (the good pairs' outputs are already written).
        """
        if distributed_context()[0] != 0:
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
