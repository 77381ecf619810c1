# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""Every file a registration run writes, declared once; whether a run may write them; when a pair's set is complete.

The writers (``SaveRegistrationOutputsd``, ``SaveTransformsd``, ``RegistrationMetricsd``, ``SaveQCFigured``, the
evaluation and cohort summaries), the configs (``output_names`` in ``inference.json`` is
:func:`registration_output_names`), the resume checks below and the console reports all take the names from here: a
new output is added in this module. :func:`check_outputs_free` refuses a run whose outputs exist (unless
``overwrite``) or would replace one of its inputs.

Every output file is written atomically (``scripts.io.atomic``): it either exists complete under its final name or not
at all. A pair of a datalist run is therefore *complete* when every file of ``output_names`` that the run writes for it
exists (:func:`expected_pair_outputs`: the label-dependent files only when the pair has that label, run-level files
never) and no :data:`IN_PROGRESS_MARKER` is left in its folder. The marker is created before a pair is registered and
removed once its outputs are complete, so a folder that still holds it was being written when a run stopped (its files
may even be a mix of an older and a newer result): such a pair is *interrupted* and is registered again after
:func:`clear_interrupted_outputs` removed what that run wrote. Output files without the marker that do not make a
complete set came from elsewhere; they are never touched (the pair is refused unless ``overwrite``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from scripts.io.atomic import check_outputs_writable, temporary_files
from scripts.io.datalist import INPUT_KEYS
from scripts.io.errors import OutputExistsError

# --- one pair's folder (``output_dir`` for a single pair, ``output_dir/<pair_id>`` in a datalist run)
WARPED_IMAGE = "warped_image.nii.gz"
DDF = "ddf.nii.gz"  # the bundle's displacement, voxels of the fixed grid
WARPED_LABEL = "warped_label.nii.gz"
JACOBIAN_DET = "jacobian_det.nii.gz"
METRICS_JSON = "metrics.json"
METRICS_CSV = "metrics.csv"
AFFINE_MAT = "affine.mat"  # ITK/ANTs transforms (scripts.spatial)
WARP = "warp.nii.gz"
TRANSFORM_H5 = "transform.h5"
INVERSE_WARP = "inverse_warp.nii.gz"
INVERSE_TRANSFORM_H5 = "inverse_transform.h5"
QC_PNG = "qc.png"

# --- once per run, in ``output_dir``
SUMMARY_JSON = "summary.json"  # the evaluation summary (MetricsSummaryHandler)
SUMMARY_CSV = "summary.csv"
FAILED_PAIRS = "failed_pairs.json"
COHORT_JSON = "cohort.json"
COHORT_CSV = "cohort.csv"
COHORT_MD = "cohort.md"
#: the rows of one rank of a torchrun launch while it runs (merged into COHORT_JSON at the end); format with the rank
COHORT_RANK_JSON = "cohort.rank{}.json"

#: hidden file in a pair folder while the pair is being registered.
IN_PROGRESS_MARKER = ".pair_in_progress"

#: data key -> file of the volumes ``SaveRegistrationOutputsd`` writes.
VOLUME_OUTPUTS = {"warped_image": WARPED_IMAGE, "pred": DDF, "warped_label": WARPED_LABEL, "jacobian_det": JACOBIAN_DET}
#: every file a pair folder may hold, in the order the console report lists them.
PAIR_OUTPUTS = (WARPED_IMAGE, DDF, WARPED_LABEL, JACOBIAN_DET, AFFINE_MAT, WARP, TRANSFORM_H5, INVERSE_WARP,
                INVERSE_TRANSFORM_H5, METRICS_JSON, METRICS_CSV, QC_PNG)
#: output file -> the pair key it needs: written only when the pair has that input.
LABEL_OUTPUTS = {WARPED_LABEL: "moving_label", METRICS_JSON: "fixed_label", METRICS_CSV: "fixed_label"}
#: files written once per run into ``output_dir``, never into pair folders.
RUN_OUTPUTS = (SUMMARY_JSON, SUMMARY_CSV, FAILED_PAIRS, COHORT_JSON, COHORT_CSV, COHORT_MD)
#: pictures of a pair's result, not part of it: a folder with every other output and no marker is complete without
#: them, so an OUT written with ``--qc false`` or by a version without ``qc.png`` resumes as it is.
VIEW_OUTPUTS = (QC_PNG,)
#: what configs/evaluate.json adds: the per-label table of each pair and the summary over the pairs.
EVALUATION_OUTPUTS = (METRICS_CSV, SUMMARY_JSON, SUMMARY_CSV)
#: states of a pair folder (see :func:`pair_output_state`).
ABSENT, COMPLETE, INTERRUPTED, FOREIGN = "absent", "complete", "interrupted", "foreign"


def transform_file_names(inverse: bool = False) -> list[str]:
    """The ITK/ANTs transform files of a registration (``scripts.spatial.save_transforms``), in writing order."""
    return [AFFINE_MAT, WARP, TRANSFORM_H5] + ([INVERSE_WARP, INVERSE_TRANSFORM_H5] if inverse else [])


def registration_output_names(inverse: bool = False, qc: bool = True, extra: Sequence[str] = ()) -> list[str]:
    """Every file an inference run writes for its pairs (``inference.json``: ``output_names``).

    Args:
        inverse: the run writes the inverse transforms too (``write_inverse``).
        qc: the run writes the QC figure (``qc``).
        extra: names that added configs write (``extra_output_names``, e.g. :data:`EVALUATION_OUTPUTS`).
    """
    names = [WARPED_IMAGE, DDF, WARPED_LABEL, JACOBIAN_DET, METRICS_JSON, *transform_file_names(inverse)]
    return names + ([QC_PNG] if qc else []) + [n for n in extra if n not in names]


def pair_output_dir(output_dir: str | os.PathLike, pair_id: str | None) -> Path:
    """Folder of one pair's outputs: ``output_dir`` for a single pair, ``output_dir/<pair_id>`` in batch runs."""
    return Path(output_dir) / pair_id if pair_id else Path(output_dir)


def check_outputs_free(
    pairs: Sequence[Mapping[str, Any]], output_dir: str | os.PathLike, names: Sequence[str], overwrite: bool = False
) -> list[Mapping[str, Any]]:
    """Fail before any computation if outputs of these pairs already exist and ``overwrite`` is False; returns ``pairs``
    unchanged so that it can wrap the datalist in a config expression."""
    targets = []
    for pair in pairs:
        folder = pair_output_dir(output_dir, pair.get("pair_id"))
        check_inputs_are_not_outputs(pair, folder, names)
        targets += [folder / n for n in names]
    check_outputs_writable(targets, overwrite)
    return list(pairs)


def check_inputs_are_not_outputs(pair: Mapping[str, Any], folder: str | os.PathLike, names: Sequence[str]) -> None:
    """Refuse a pair whose input file is one of the files the run writes for it (even with ``overwrite``): e.g. a
    moving image called ``warped_image.nii.gz`` inside the output folder would be replaced by its own result."""
    outputs = {os.path.realpath(Path(folder) / name): name for name in names}
    for key in INPUT_KEYS:
        value = pair.get(key)
        output = outputs.get(os.path.realpath(value)) if value else None
        if output is not None:
            raise OutputExistsError(
                f"{key.replace('_', ' ')} '{value}' is also the output '{output}' of this run in "
                f"{folder}; expected inputs outside the files the run writes (it would be overwritten, --overwrite or "
                "not). Move or rename the input, or choose another output folder."
            )


def expected_pair_outputs(pair: Mapping[str, Any], output_names: Sequence[str]) -> list[str]:
    """The files of ``output_names`` (configs: ``@output_names``) that a run writes into this pair's folder, in that
    order, without duplicates: without :data:`RUN_OUTPUTS`, and those of :data:`LABEL_OUTPUTS` only when the pair has
    that label."""
    if isinstance(output_names, (str, os.PathLike)):
        raise TypeError(f"output_names must be a list of file names, got the single name {output_names!r}.")
    names: list[str] = []
    for name in output_names:
        needs = LABEL_OUTPUTS.get(name)
        if name in RUN_OUTPUTS or name in names or (needs is not None and not pair.get(needs)):
            continue
        names.append(str(name))
    return names


def pair_output_state(
    folder: str | os.PathLike, expected: Sequence[str], known: Sequence[str] | None = None
) -> tuple[str, list[str]]:
    """``(state, existing)`` of one pair folder: :data:`COMPLETE` (all ``expected`` files but :data:`VIEW_OUTPUTS` at
    least, no marker), :data:`INTERRUPTED` (marker present), :data:`FOREIGN` (some output files but not all, no marker)
    or :data:`ABSENT` (none); ``existing`` lists the files of ``expected`` and ``known`` (every name the run may write
    into pair folders, to find leftovers) that exist."""
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


def pair_outputs_complete(folder: str | os.PathLike, pair: Mapping[str, Any], output_names: Sequence[str]) -> bool:
    """THE definition of a finished pair: every file of ``output_names`` that the run writes for ``pair`` exists in
    ``folder`` (``metrics.json``, written last, included when the pair has labels) and no run is marked as writing it.
    """
    return pair_output_state(folder, expected_pair_outputs(pair, output_names))[0] == COMPLETE


def mark_in_progress(folder: str | os.PathLike, note: str = "") -> Path:
    """Create the folder's :data:`IN_PROGRESS_MARKER` before its pair is registered. Written in place, not atomically:
    only its existence matters, and a run killed while writing it leaves the marker (the safe side: the pair counts as
    interrupted) rather than a stray temporary file."""
    marker = Path(folder) / IN_PROGRESS_MARKER
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(note or "registration in progress\n")
    return marker


def clear_in_progress(folder: str | os.PathLike) -> None:
    """Remove the folder's marker once its outputs are complete."""
    (Path(folder) / IN_PROGRESS_MARKER).unlink(missing_ok=True)


def clear_interrupted_outputs(folder: str | os.PathLike, names: Sequence[str]) -> list[str]:
    """Remove what an interrupted run wrote into a pair folder that holds the marker (ValueError without one): the files
    of ``names`` and the temporary files of atomic writes cut short. Returns the names removed (the marker itself stays
    until the pair is complete again)."""
    folder = Path(folder)
    if not (folder / IN_PROGRESS_MARKER).exists():
        raise ValueError(f"{folder} holds no {IN_PROGRESS_MARKER}: refusing to remove its files.")
    removed = []
    for name in names:
        for path in [folder / name, *temporary_files(folder / name)]:
            if path.is_file():
                path.unlink()
                removed.append(path.name)
    return removed
