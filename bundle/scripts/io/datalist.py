# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""Registration pairs for the workflows: from run arguments, from a JSON datalist of pairs, or built from a list of
images (all ordered pairs, or atlas-to-subject), and the check of a whole datalist before a run starts (every bad entry
reported in one message, headers only)."""

from __future__ import annotations

import itertools
import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from monai.config import KeysCollection

from scripts.io.errors import RegistrationInputError
from scripts.io.input_checks import header_problem

#: keys of a registration pair; images are required, labels optional.
PAIR_KEYS = ("moving_image", "fixed_image", "moving_label", "fixed_label")
#: optional region masks of an inference pair (e.g. brain masks of whole-head scans): the registration looks inside them
MASK_KEYS = ("moving_mask", "fixed_mask")
#: every file key an inference pair may name
INPUT_KEYS = PAIR_KEYS + MASK_KEYS
#: accepted entry layouts of a datalist in ``check_datalist(..., keys=None)``: a pair, or one image (training sets
#: that are paired later, e.g. all ordered pairs or atlas-to-subject).
ENTRY_LAYOUTS = ((("moving_image", "fixed_image"), ("moving_label", "fixed_label")), (("image",), ("label",)))


def load_json(path: str | os.PathLike) -> Any:
    """Read a JSON datalist, naming the file in the error if it is missing or malformed."""
    path = Path(path)
    if not path.is_file():
        raise RegistrationInputError(f"datalist file not found: {path}; expected a JSON file of pairs.")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise RegistrationInputError(
            f"datalist '{path}' is not valid JSON ({e}); expected a list of entries or a dict of lists."
        ) from e


def _open(datalist: Any, base_dir: str | os.PathLike | None) -> tuple[Any, str, Path | None]:
    """(content, name for messages, folder of relative paths) of a datalist file or of its content given inline."""
    if isinstance(datalist, (str, os.PathLike)):
        return load_json(datalist), str(datalist), Path(base_dir) if base_dir else Path(datalist).parent
    return datalist, "the datalist", Path(base_dir) if base_dir else None


def _resolve(value: str | None, base_dir: Path | None) -> str | None:
    if value is None or value == "":
        return None
    path = Path(os.path.expanduser(str(value)))
    return str(base_dir / path if not path.is_absolute() and base_dir is not None else path)


def _resolved(entry: Mapping[str, Any], keys: Sequence[str], base_dir: Path | None) -> dict[str, str]:
    """The given file entries of ``keys``, relative paths taken from ``base_dir``."""
    return {k: _resolve(entry[k], base_dir) for k in keys if entry.get(k)}


def _file_stem(path: str | os.PathLike) -> str:
    """File name without its image suffix (``s01.nii.gz`` -> ``s01``)."""
    return re.sub(r"(\.nii(\.gz)?|\.mgz|\.nrrd)$", "", Path(path).name)


def _subject_entries(content: Mapping[str, Any], source: str) -> list[dict[str, Any]]:
    """The pair entries of ``{"atlas": {"image", "label", "mask"}, "subjects": [...]}``: the atlas is the moving side of
    every pair, each subject (a path or ``{"image"[, "label", "mask", "id"]}``) a fixed side, its id by default its
    file name."""
    atlas = content.get("atlas")
    if not isinstance(atlas, Mapping) or not atlas.get("image"):
        raise RegistrationInputError(
            f"{source} lists 'subjects' without an atlas; expected {{'atlas': {{'image': ..., 'label': ...}}, "
            "'subjects': [...]}."
        )
    subjects = content["subjects"]
    if not isinstance(subjects, list) or not subjects:
        raise RegistrationInputError(f"'subjects' in {source} must be a non-empty list of images.")
    entries = []
    for subject in subjects:
        subject = {"image": subject} if isinstance(subject, (str, os.PathLike)) else dict(subject or {})
        entries.append({"moving_image": atlas["image"], "moving_label": atlas.get("label"),
                        "moving_mask": atlas.get("mask"), "fixed_image": subject.get("image"),
                        "fixed_label": subject.get("label"), "fixed_mask": subject.get("mask"),
                        "id": subject.get("id") or (_file_stem(subject["image"]) if subject.get("image") else None)})
    return entries


def inference_pairs(
    moving_image: str | None = None,
    fixed_image: str | None = None,
    moving_label: str | None = None,
    fixed_label: str | None = None,
    datalist: str | Sequence[Mapping[str, Any]] | Mapping[str, Any] | None = None,
    base_dir: str | None = None,
    check: bool = True,
    moving_mask: str | None = None,
    fixed_mask: str | None = None,
) -> list[dict[str, Any]]:
    """
    The pairs an inference/evaluation run processes: one pair from the run arguments (its outputs go straight into
    ``output_dir``), or every pair of a datalist, whose outputs go into ``output_dir/<pair_id>/``.

    A datalist is a JSON file (or its content) holding a list of ``{"moving_image", "fixed_image"[, "moving_label",
    "fixed_label", "moving_mask", "fixed_mask", "id"]}`` entries, such a list under ``"pairs"``, or an atlas and its
    subjects, ``{"atlas": {"image", "label", "mask"}, "subjects": [path or {"image"[, "label", "mask", "id"]}, ...]}``
    (atlas-based segmentation). Relative paths are taken from ``base_dir`` (default: the datalist's folder). Each pair
    gets a unique folder-safe ``pair_id`` (its ``id``, the subject's file name, or index + file names).

    Nothing is read but the datalist; ``check=True`` reports every missing or unreadable file at once (headers only)
    before anything runs, ``check=False`` leaves the checks to ``scripts.workflow.CohortDataset``, which checks each
    pair when the run reaches it and skips bad ones. RegistrationInputError: an empty or malformed datalist, duplicate
    pair ids, (with ``check``) missing files.
    """
    if not datalist:
        given = {"moving_image": moving_image, "fixed_image": fixed_image, "moving_label": moving_label,
                 "fixed_label": fixed_label, "moving_mask": moving_mask, "fixed_mask": fixed_mask}
        pairs = [{**_resolved(given, INPUT_KEYS, Path(base_dir) if base_dir else None), "pair_id": ""}]
        source = "the run arguments (--moving_image/--fixed_image)"
    else:
        entries, source, root = _open(datalist, base_dir)
        if isinstance(entries, Mapping):
            subjects = "subjects" in entries
            entries = _subject_entries(entries, source) if subjects else entries.get("pairs", entries.get("testing"))
        if not isinstance(entries, list) or not entries:
            raise RegistrationInputError(
                f"{source} must hold a non-empty list of pairs (or {{'pairs': [...]}}, or {{'atlas': ..., "
                "'subjects': [...]}})."
            )
        pairs, first_entry, clashes = [], {}, []
        for index, entry in enumerate(entries):
            if not isinstance(entry, Mapping):
                raise RegistrationInputError(f"{source}: entry {index} is a {type(entry).__name__}; expected a dict.")
            pair = _resolved(entry, INPUT_KEYS, root)
            pair_id = str(index)
            if pair.get("moving_image") and pair.get("fixed_image"):
                moving, fixed = _file_stem(pair["moving_image"]), _file_stem(pair["fixed_image"])
                pair_id = re.sub(r"[^A-Za-z0-9._-]+", "_", str(entry.get("id") or f"{index:04d}_{moving}_to_{fixed}"))
            if pair_id in first_entry:  # two pairs would write into one folder (and the second be taken as done)
                clashes.append(f"entries {first_entry[pair_id]} and {index} are both '{pair_id}'")
            first_entry.setdefault(pair_id, index)
            pairs.append({**pair, "pair_id": pair_id})
        if clashes:
            raise RegistrationInputError(
                f"{source}: {len(clashes)} duplicate pair id(s) ({'; '.join(clashes[:5])}); expected one id per pair "
                "(each pair writes into output_dir/<id>/). Give the entries distinct 'id' values."
            )
    if check:
        check_datalist(pairs, optional_keys=PAIR_KEYS[2:] + MASK_KEYS, source=source)
    return pairs


def cli_datalist_overrides(
    datalist: str | os.PathLike | None,
    fixed: str | None,
    moving: str | None,
    out: str | None,
    labels: Sequence[str | None] = (),
) -> dict[str, Any]:
    """The run override for ``register --datalist D`` (``{"datalist": absolute path}``; ``{}`` without one), after
    checking that the command names either one pair (``--fixed`` and ``--moving``, no labels or masks with a datalist)
    or a datalist, and an ``--out``."""
    if not out:
        raise RegistrationInputError("--out is required: the output folder (created if missing).")
    if datalist is None:
        if not fixed or not moving:
            raise RegistrationInputError(
                "give --fixed and --moving (one pair) or --datalist (a JSON datalist of pairs, docs/usage.md 'Cohorts')."
            )
        return {}
    if fixed or moving or any(labels):
        raise RegistrationInputError(
            "--datalist names every pair (and its labels and masks); expected no --fixed/--moving/--moving_label/"
            "--fixed_label/--moving_mask/--fixed_mask with it."
        )
    return {"datalist": str(Path(os.path.expanduser(str(datalist))).resolve())}


def make_pairs(
    images: Sequence[Mapping[str, Any]], mode: str = "all_pairs", atlas: Mapping[str, Any] | None = None
) -> list[dict[str, Any]]:
    """
    Pair dicts (``moving_image``, ``fixed_image`` and the labels where available) from a list of images
    ``{"image": path[, "label": path]}``. ``mode`` ``"all_pairs"``: every ordered pair (i, j), i != j (LPBA40, abdomen
    CT); ``"atlas"``: ``atlas`` (``{"image"[, "label"]}``) is the moving image of every pair and each entry a fixed
    image (IXI atlas-to-subject).
    """

    def pair(moving: Mapping[str, Any], fixed: Mapping[str, Any]) -> dict[str, Any]:
        sides = {"moving_image": moving["image"], "fixed_image": fixed["image"]}
        labels = {"moving_label": moving.get("label"), "fixed_label": fixed.get("label")}
        return {**sides, **{k: v for k, v in labels.items() if v}}

    if mode == "all_pairs":
        if len(images) < 2:
            raise ValueError(f"mode 'all_pairs' needs at least 2 images, got {len(images)}.")
        return [pair(m, f) for m, f in itertools.permutations(images, 2)]
    if mode == "atlas":
        if not atlas or not atlas.get("image"):
            raise ValueError("mode 'atlas' needs an atlas entry {'image': ..., 'label': ...}.")
        return [pair(atlas, f) for f in images]
    raise ValueError(f"mode must be 'all_pairs' or 'atlas', got {mode!r}.")


def training_pairs(
    datalist: str | os.PathLike | Mapping[str, Any],
    split: str = "training",
    mode: str = "all_pairs",
    base_dir: str | None = None,
    with_labels: bool = True,
) -> list[dict[str, Any]]:
    """
    Pairs of the ``split`` list of a training datalist, every missing file reported at once before training starts.

    The datalist (a JSON file or its content) holds ``{"atlas": {"image", "label"}, "training": [...], "validation":
    [...]}``; a split is a list of images ``{"image"[, "label"]}`` paired by :py:func:`make_pairs` in ``mode``, or
    already a list of pairs (``moving_image``/``fixed_image`` entries, used as given). Relative paths are taken from
    ``base_dir`` (default: the datalist file's folder); ``with_labels=False`` (unsupervised training) drops the labels.
    """
    content, source, root = _open(datalist, base_dir)
    if not isinstance(content, Mapping) or split not in content:
        raise RegistrationInputError(f"{source} has no '{split}' list; expected keys like 'training' and 'validation'.")
    entries = content[split]
    if not isinstance(entries, list) or not entries:
        raise RegistrationInputError(f"'{split}' in {source} must be a non-empty list.")
    if all(isinstance(e, Mapping) and "moving_image" in e for e in entries):
        pairs = [_resolved(e, PAIR_KEYS, root) for e in entries]
    else:
        atlas = _resolved(content["atlas"], ("image", "label"), root) if content.get("atlas") else None
        pairs = make_pairs([_resolved(e, ("image", "label"), root) for e in entries], mode=mode, atlas=atlas)
    if not with_labels:
        pairs = [{k: v for k, v in p.items() if k in ("moving_image", "fixed_image")} for p in pairs]
    check_datalist(pairs, optional_keys=PAIR_KEYS[2:] + MASK_KEYS, source=f"'{split}' of {source}")
    return pairs


def check_datalist(
    datalist: Sequence[Mapping[str, Any]] | Mapping[str, Any] | str | os.PathLike,
    keys: KeysCollection | None = ("moving_image", "fixed_image"),
    optional_keys: KeysCollection = ("moving_label", "fixed_label"),
    base_dir: str | os.PathLike | None = None,
    source: str | None = None,
) -> Any:
    """Check every entry of a datalist before training or a batch starts, and report ALL bad entries in one error.

    Args:
        datalist: a list of dicts, a dict of such lists (e.g. ``{"training": [...], "validation": [...]}``, a dict
            entry such as ``"atlas"`` counts as one entry; other fields are metadata), or a JSON file holding either.
        keys: keys every entry must have, each naming an existing, readable 3-D NIfTI file. ``None``: each entry is
            one of :data:`ENTRY_LAYOUTS` (a pair, or an image), as in training datalists.
        optional_keys: keys that, when present and non-empty, must name such a file too (ignored when keys is None).
        base_dir: directory that relative paths are resolved against (default: the JSON file's folder, else CWD).
        source: name used in the message (default: the JSON path or "datalist").

    Returns:
        The datalist unchanged (the loaded JSON when a path was given), so configs can wrap it in place.

    Raises:
        RegistrationInputError: listing every bad entry (section, index, key, path, problem).
    """
    named = isinstance(datalist, (str, os.PathLike))
    datalist, name, root = _open(datalist, base_dir)
    source, base = source or (name if named else "datalist"), root or Path.cwd()
    if keys is None:
        layouts = [(list(required), list(optional)) for required, optional in ENTRY_LAYOUTS]
        expected = "a pair (moving_image, fixed_image[, labels]) or an image (image[, label])"
    else:
        layouts = [([keys] if isinstance(keys, str) else list(keys),
                     [optional_keys] if isinstance(optional_keys, str) else list(optional_keys))]
        expected = f"files for {layouts[0][0]} (and {layouts[0][1]} when given)"
    known = {k for required, optional in layouts for k in required + optional}
    problems: list[str] = []
    total = 0
    for section, entries in datalist.items() if isinstance(datalist, Mapping) else [("", datalist)]:
        single = isinstance(entries, Mapping)
        if single:  # e.g. "atlas": {"image": ..., "label": ...}; other dicts (label names, ...) are metadata
            if not known.intersection(entries):
                continue
            entries = [entries]
        elif isinstance(entries, str) or not isinstance(entries, Sequence):
            continue  # non-list fields (e.g. "name") are metadata, not entries
        for index, entry in enumerate(entries):
            total += 1
            where = section if single else (f"{section}[{index}]" if section else f"entry {index}")
            if not isinstance(entry, Mapping):
                problems.append(f"{where}: expected a dict with {expected}, got {type(entry).__name__}")
                continue
            # the layout whose keys the entry has (the first one when none fits, to name what is missing)
            required, optional = next((lay for lay in layouts if any(k in entry for k in lay[0] + lay[1])), layouts[0])
            for key in required + optional:
                if not entry.get(key):
                    if key in required:
                        problems.append(f"{where}: missing key '{key}'")
                    continue
                path = Path(entry[key]) if Path(entry[key]).is_absolute() else base / entry[key]
                problem = header_problem(path)
                if problem:
                    problems.append(f"{where}: {key} '{path}' {problem}")
    if problems:
        shown = "\n  ".join(problems)
        raise RegistrationInputError(
            f"{source}: {len(problems)} problem(s) in {total} entries; expected every entry to name existing, readable "
            f"3-D NIfTI {expected}. Fix or remove these entries:\n  {shown}"
        )
    return datalist
