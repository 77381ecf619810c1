# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""When a pair's outputs are complete, so that a cohort run can be killed at any moment and started again.

Every output file is written atomically (``scripts.io.atomic``): it either exists complete under its final name or not at
all. A pair of a datalist run is therefore *complete* when every file of ``output_names`` that the run writes for it
exists (:func:`expected_pair_outputs`: the label-dependent files only when the pair has that label, run-level files such
as ``summary.json`` never) and no :data:`IN_PROGRESS_MARKER` is left in its folder. The marker is created before a pair
is registered and removed once its outputs are complete, so a folder that still holds it was being written when a run
stopped (its files may even be a mix of an older and a newer result): such a pair is *interrupted* and is registered
again after :func:`clear_interrupted_outputs` removed what that run wrote. Output files without the marker that do not
make a complete set came from elsewhere; they are never touched (the pair is refused unless ``overwrite``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "IN_PROGRESS_MARKER",
    "LABEL_OUTPUTS",
    "RUN_OUTPUTS",
    "VIEW_OUTPUTS",
    "ABSENT",
    "COMPLETE",
    "INTERRUPTED",
    "FOREIGN",
    "expected_pair_outputs",
    "pair_output_state",
    "pair_outputs_complete",
    "mark_in_progress",
    "clear_in_progress",
    "clear_interrupted_outputs",
]

#: hidden file in a pair folder while the pair is being registered.
IN_PROGRESS_MARKER = ".pair_in_progress"

#: output file -> the pair key it needs: written only when the pair has that input (configs: ``label_output_names``).
LABEL_OUTPUTS = {"warped_label.nii.gz": "moving_label", "metrics.json": "fixed_label", "metrics.csv": "fixed_label"}

#: files written once per run into ``output_dir``, not into pair folders (configs: ``run_output_names``).
RUN_OUTPUTS = ("summary.json", "summary.csv", "failed_pairs.json", "cohort.json", "cohort.csv", "cohort.md")

#: pictures of a pair's result, not part of it: a folder with every other output and no marker is complete without
#: them, so an OUT written with ``--qc false`` or by a version without ``qc.png`` resumes as it is.
VIEW_OUTPUTS = ("qc.png",)
#: states of a pair folder (see :func:`pair_output_state`).
ABSENT, COMPLETE, INTERRUPTED, FOREIGN = "absent", "complete", "interrupted", "foreign"


def expected_pair_outputs(
    pair: Mapping[str, Any],
    output_names: Sequence[str],
    label_outputs: Mapping[str, str] | None = None,
    run_outputs: Sequence[str] | None = None,
) -> list[str]:
    """The files of ``output_names`` that a run writes into this pair's folder.

    Args:
        pair: pair dict (``moving_image``, ``fixed_image``, optional ``moving_label``/``fixed_label``).
        output_names: every output file name of the run (configs: ``@output_names``; new outputs join there).
        label_outputs: file name -> pair key it needs (default :data:`LABEL_OUTPUTS`).
        run_outputs: run-level file names, never in a pair folder (default :data:`RUN_OUTPUTS`).

    Returns:
        file names in ``output_names`` order, without duplicates.
    """
    if isinstance(output_names, (str, os.PathLike)):
        raise TypeError(f"output_names must be a list of file names, got the single name {output_names!r}.")
    label_outputs = LABEL_OUTPUTS if label_outputs is None else label_outputs
    run_outputs = set(RUN_OUTPUTS if run_outputs is None else run_outputs)
    names: list[str] = []
    for name in output_names:
        needs = label_outputs.get(name)
        if name in run_outputs or name in names or (needs is not None and not pair.get(needs)):
            continue
        names.append(str(name))
    return names


def pair_output_state(
    folder: str | os.PathLike, expected: Sequence[str], known: Sequence[str] | None = None
) -> tuple[str, list[str]]:
    """State of one pair folder and the output files found in it.

    Args:
        folder: the pair's output folder.
        expected: files the run writes for this pair (:func:`expected_pair_outputs`).
        known: every file name the run may write into pair folders (default ``expected``); used to find leftovers.

    Returns:
        ``(state, existing)``: :data:`COMPLETE` (all expected files but :data:`VIEW_OUTPUTS` at least, no marker), :data:`INTERRUPTED` (marker present),
        :data:`FOREIGN` (some output files but not all, no marker) or :data:`ABSENT` (none); ``existing`` lists the
        files of ``known`` that exist.
    """
    if not expected:
        raise ValueError("expected must name at least one output file of the pair.")
    folder = Path(folder)
    names = list(dict.fromkeys([*expected, *(known or ())]))
    existing = [n for n in names if (folder / n).is_file()]
    if (folder / IN_PROGRESS_MARKER).exists():
        return INTERRUPTED, existing
    if all(n in existing for n in expected if n not in VIEW_OUTPUTS):
        return COMPLETE, existing
    return (FOREIGN if existing else ABSENT), existing


def pair_outputs_complete(
    folder: str | os.PathLike,
    pair: Mapping[str, Any],
    output_names: Sequence[str],
    label_outputs: Mapping[str, str] | None = None,
    run_outputs: Sequence[str] | None = None,
) -> bool:
    """THE definition of a finished pair: every file of ``output_names`` that the run writes for ``pair`` exists in
    ``folder`` (``metrics.json``, written last, included when the pair has labels) and no run is marked as writing it.
    """
    expected = expected_pair_outputs(pair, output_names, label_outputs, run_outputs)
    return pair_output_state(folder, expected)[0] == COMPLETE


def mark_in_progress(folder: str | os.PathLike, note: str = "") -> Path:
    """Create the folder's :data:`IN_PROGRESS_MARKER` before its pair is registered.

    Written in place, not through a temporary file: only its existence matters, and a run killed while writing it
    leaves the marker (the safe side: the pair counts as interrupted) rather than a stray temporary file.
    """
    marker = Path(folder) / IN_PROGRESS_MARKER
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(note or "registration in progress\n")
    return marker


def clear_in_progress(folder: str | os.PathLike) -> None:
    """Remove the folder's marker once its outputs are complete."""
    (Path(folder) / IN_PROGRESS_MARKER).unlink(missing_ok=True)


def clear_interrupted_outputs(folder: str | os.PathLike, names: Sequence[str]) -> list[str]:
    """Remove what an interrupted run wrote into a pair folder that holds the marker: the files of ``names`` and the
    hidden temporary files of an atomic write that was cut short (``.<stem>.tmp-<hex><suffix>``).

    Returns:
        the names removed (the marker itself stays until the pair is complete again).

    Raises:
        ValueError: the folder holds no marker (its files were not written by an interrupted run).
    """
    folder = Path(folder)
    if not (folder / IN_PROGRESS_MARKER).exists():
        raise ValueError(f"{folder} holds no {IN_PROGRESS_MARKER}: refusing to remove its files.")
    removed = []
    for name in names:
        suffix = ".nii.gz" if name.endswith(".nii.gz") else Path(name).suffix
        stem = name[: len(name) - len(suffix)] if suffix else name
        for path in [folder / name, *folder.glob(f".{stem}.tmp-*{suffix}")]:
            if path.is_file():
                path.unlink()
                removed.append(path.name)
    return removed
