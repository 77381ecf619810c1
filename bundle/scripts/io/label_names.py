# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""Names of label ids in reports: from the user, else from the label map's own lookup table, else the numbers.

A lookup table is a JSON object ``{"1": "thalamus", ...}``, a BIDS ``dseg.tsv``-style table (tab- or comma-separated,
header with ``index`` and ``name`` columns, or two columns without a header), or a FreeSurfer colour table
(``FreeSurferColorLUT.txt`` lines ``id name R G B A``, ``#`` comments). A label map ``X.nii.gz`` carries its own table
as the sidecar ``X.tsv`` beside it (the BIDS convention for segmentations); the shipped sample labels have one.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from scripts.io.errors import RegistrationInputError

#: file types :func:`read_label_names` reads
LOOKUP_TABLE_SUFFIXES = (".json", ".tsv", ".csv", ".txt", ".lut", ".ctbl")
_IMAGE_SUFFIXES = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".mgz")


def _checked(pairs: list[tuple[Any, Any]], source: str) -> dict[str, str]:
    """{id: name} with ids as strings of non-negative integers and non-empty names; RegistrationInputError else."""
    names: dict[str, str] = {}
    for key, value in pairs:
        text = str(key).strip()
        if isinstance(key, bool) or not text.lstrip("+").isdigit():
            raise RegistrationInputError(f"label names {source}: label id {key!r} is not a non-negative integer.")
        if not isinstance(value, str) or not value.strip():
            raise RegistrationInputError(f"label names {source}: the name of label {text} must be non-empty text, got {value!r}.")
        names[str(int(text))] = value.strip()
    if not names:
        raise RegistrationInputError(f"label names {source}: no label id -> name entries found.")
    return names


def _read_table(path: Path) -> list[tuple[Any, Any]]:
    """(id, name) rows of a TSV/CSV table: columns ``index`` and ``name`` by header, else the first two columns."""
    text = path.read_text(encoding="utf-8-sig")
    delimiter = "\t" if "\t" in text or path.suffix == ".tsv" else ","
    rows = [r for r in csv.reader(text.splitlines(), delimiter=delimiter) if any(c.strip() for c in r)]
    if not rows:
        return []
    header = [c.strip().lower() for c in rows[0]]
    if "index" in header and "name" in header:
        i, n = header.index("index"), header.index("name")
        return [(r[i], r[n] if n < len(r) else "") for r in rows[1:]]
    if len(rows[0]) < 2 or not rows[0][0].strip().isdigit():
        raise RegistrationInputError(
            f"label names '{path}': expected a header with 'index' and 'name' columns (BIDS dseg.tsv) or rows "
            f"'<id>{delimiter}<name>', got first row {rows[0]!r}."
        )
    return [(r[0], r[1] if len(r) > 1 else "") for r in rows]


def _read_colour_table(path: Path) -> list[tuple[Any, Any]]:
    """(id, name) rows of a FreeSurfer colour table: ``id name R G B A`` per line, ``#`` starts a comment."""
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        if len(fields) < 2:
            raise RegistrationInputError(f"label names '{path}', line {number}: expected '<id> <name> [R G B A]', got {line!r}.")
        rows.append((fields[0], fields[1]))
    return rows


def read_label_names(source: Mapping[Any, Any] | str | os.PathLike) -> dict[str, str]:
    """Label id -> name (``{"1": "thalamus", ...}``, names stripped) from a mapping (ids as ints or strings) or a
    lookup-table file (formats: the module docstring); RegistrationInputError naming the file and the entry for a
    missing or unreadable file, an unknown file type, an id that is not a non-negative integer or an empty name."""
    if isinstance(source, Mapping):
        return _checked(list(source.items()), "(config)")
    path = Path(os.path.expanduser(str(source)))
    if not path.is_file():
        raise RegistrationInputError(f"label names file '{path}' does not exist; expected a lookup table "
                                     f"({', '.join(LOOKUP_TABLE_SUFFIXES)}) mapping label ids to names.")
    suffix = path.suffix.lower()
    try:
        if suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(data, Mapping):
                raise RegistrationInputError(f"label names '{path}': expected a JSON object {{\"1\": \"name\", ...}}, "
                                             f"got {type(data).__name__}.")
            rows = list(data.items())
        elif suffix in (".tsv", ".csv"):
            rows = _read_table(path)
        elif suffix in (".txt", ".lut", ".ctbl"):
            rows = _read_colour_table(path)
        else:
            raise RegistrationInputError(f"label names '{path}': unknown file type '{suffix}'; expected one of "
                                         f"{', '.join(LOOKUP_TABLE_SUFFIXES)}.")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RegistrationInputError(f"label names '{path}' could not be read ({type(error).__name__}: {error}).") from error
    return _checked(rows, f"'{path}'")


def sidecar_lookup_table(label_path: str | os.PathLike | None) -> Path | None:
    """The lookup table a label map carries: ``X.tsv`` beside ``X.nii.gz`` (BIDS), or None."""
    if not label_path:
        return None
    path = Path(str(label_path))
    name = path.name
    for suffix in _IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            candidate = path.with_name(name[: -len(suffix)] + ".tsv")
            return candidate if candidate.is_file() else None
    return None


def label_names_for(
    label_names: Mapping[Any, Any] | str | os.PathLike | None, *label_paths: str | os.PathLike | None
) -> dict[str, str] | None:
    """The names to report for a pair: ``label_names`` when given (a mapping or a file), else the lookup table of the
    first of ``label_paths`` (the pair's label maps, fixed first) that has one, else None (labels keep their
    numbers)."""
    if label_names:
        return read_label_names(label_names)
    for path in label_paths:
        table = sidecar_lookup_table(path)
        if table is not None:
            return read_label_names(table)
    return None
