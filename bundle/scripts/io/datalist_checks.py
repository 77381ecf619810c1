# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""Checks of a whole datalist before a run starts: every bad entry is reported in one message (headers only)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from monai.config import KeysCollection

from scripts.io.errors import RegistrationInputError
from scripts.io.input_checks import check_file_exists, header_problem

__all__ = ["ENTRY_LAYOUTS", "check_datalist"]


#: accepted entry layouts of a datalist in ``check_datalist(..., keys=None)``: a pair, or one image (training sets
#: that are paired later, e.g. all ordered pairs or atlas-to-subject).
ENTRY_LAYOUTS = ((("moving_image", "fixed_image"), ("moving_label", "fixed_label")), (("image",), ("label",)))


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
            entry such as ``"atlas"`` counts as one entry), or a path to a JSON file holding either.
        keys: keys every entry must have, each naming an existing, readable 3-D NIfTI file. ``None``: each entry is
            either a pair (``moving_image``, ``fixed_image``, optional labels) or an image (``image``, optional
            ``label``), as in training datalists.
        optional_keys: keys that, when present and non-empty, must name such a file too (ignored when keys is None).
        base_dir: directory that relative paths are resolved against (default: the JSON file's folder, else CWD).
        source: name used in the message (default: the JSON path or "datalist").

    Returns:
        The datalist unchanged (the loaded JSON when a path was given), so configs can wrap it in place.

    Raises:
        RegistrationInputError: listing every bad entry (section, index, key, path, problem).
    """
    if isinstance(datalist, (str, os.PathLike)):
        json_path = check_file_exists(datalist, "datalist")
        try:
            loaded = json.loads(json_path.read_text())
        except (OSError, ValueError) as error:
            raise RegistrationInputError(
                f"datalist '{json_path}' is not valid JSON ({error}); expected a list of entries or a dict of lists."
            ) from error
        return check_datalist(
            loaded, keys, optional_keys, json_path.parent if base_dir is None else base_dir, source or str(json_path)
        )
    source = source or "datalist"
    if keys is None:
        layouts = [(list(required), list(optional)) for required, optional in ENTRY_LAYOUTS]
        expected = "a pair (moving_image, fixed_image[, labels]) or an image (image[, label])"
    else:
        layouts = [([keys] if isinstance(keys, str) else list(keys),
                     [optional_keys] if isinstance(optional_keys, str) else list(optional_keys))]
        expected = f"files for {layouts[0][0]} (and {layouts[0][1]} when given)"
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    sections = datalist.items() if isinstance(datalist, Mapping) else [("", datalist)]
    problems: list[str] = []
    total = 0
    for section, entries in sections:
        single = isinstance(entries, Mapping)
        if single:  # e.g. "atlas": {"image": ..., "label": ...}; other dicts (label names, ...) are metadata
            known = {k for required, optional in layouts for k in required + optional}
            if not known.intersection(entries):
                continue
            entries = [entries]
        if not isinstance(entries, Sequence) or isinstance(entries, str):
            continue  # non-list fields (e.g. "name", "labels") are metadata, not entries
        for index, entry in enumerate(entries):
            total += 1
            where = section if single else (f"{section}[{index}]" if section else f"entry {index}")
            if not isinstance(entry, Mapping):
                problems.append(f"{where}: expected a dict with {expected}, got {type(entry).__name__}")
                continue
            # the layout whose required keys the entry has (the first one when none fits, to name what is missing)
            required, optional = next((lay for lay in layouts if any(k in entry for k in lay[0] + lay[1])), layouts[0])
            for key in required + optional:
                value = entry.get(key)
                if not value:
                    if key in required:
                        problems.append(f"{where}: missing key '{key}'")
                    continue
                path = Path(value) if Path(value).is_absolute() else base / value
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


