# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""Write files so that a crash, ``kill -9`` or full disk never leaves a half-written result under the final name.

Every writer here writes to a hidden temporary file in the destination folder (same file system, so the rename is
atomic), flushes it to disk and then ``os.replace``-s it onto the final name. A reader therefore sees either the old file
or the complete new one. :func:`check_outputs_writable` refuses to replace existing results unless asked.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import secrets
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from scripts.io.errors import OutputExistsError

#: ISA-L deflate level of the ``.nii.gz`` files the bundle writes (0-3): 1 compresses like nibabel's default zlib
#: level 1 (a smooth 256^3 displacement field: 167.1 vs 167.8 MB) in a tenth of the time; higher levels are slower and
#: save a few percent at most on float fields.
NIFTI_GZIP_LEVEL = 1

def _stem_and_suffix(name: str) -> tuple[str, str]:
    """``ddf.nii.gz`` -> ``("ddf", ".nii.gz")``: the suffixes writers such as nibabel pick the format from."""
    suffix = ".nii.gz" if name.endswith(".nii.gz") else Path(name).suffix
    return (name[: len(name) - len(suffix)] if suffix else name), suffix


def temporary_path(path: str | os.PathLike) -> Path:
    """A unique hidden name beside ``path`` that keeps its suffixes, where the atomic writers write first:
    ``out/ddf.nii.gz`` -> ``out/.ddf.tmp-3f9a1c2b.nii.gz``."""
    path = Path(path)
    stem, suffix = _stem_and_suffix(path.name)
    return path.with_name(f".{stem}.tmp-{secrets.token_hex(4)}{suffix}")


def temporary_files(path: str | os.PathLike) -> list[Path]:
    """The temporary files that interrupted atomic writes of ``path`` left beside it (:func:`temporary_path`)."""
    stem, suffix = _stem_and_suffix(Path(path).name)
    return list(Path(path).parent.glob(f".{stem}.tmp-*{suffix}"))


def _fsync(path: Path) -> None:
    with contextlib.suppress(OSError):  # some file systems (or directories on Windows) cannot be fsync'ed
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, durable: bool = True) -> Iterator[Path]:
    """Context manager yielding a temporary path to write; on success it replaces ``path`` atomically.

    On an exception the temporary file is removed and ``path`` is left untouched.

    Args:
        path: final file name; its folder is created when missing.
        durable: fsync the file (and its folder) so the result also survives a power loss, not only a killed process.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"nothing was written to the temporary file {tmp} for {path}.")
        if durable:
            _fsync(tmp)
        os.replace(tmp, path)
        if durable:
            _fsync(path.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def save_nifti(image: Any, path: str | os.PathLike) -> Path:
    """Save a nibabel image atomically (format from the suffix, e.g. ``.nii.gz``); every NIfTI the bundle writes
    goes through here.

    A ``.nii.gz`` is compressed with ISA-L's deflate (``python-isal``) at :data:`NIFTI_GZIP_LEVEL` instead of zlib:
    the same standard gzip stream that nibabel, ITK / SimpleITK / ANTs and FSL read, about the same size as nibabel's
    own level-1 zlib output, written about ten times faster (compressing the displacement fields was most of a run's
    writing time). The data bytes inside are exactly what ``nib.save`` writes; the gzip header carries no file name and
    no time stamp, so an equal image gives an equal file.
    """
    import nibabel as nib
    from isal import igzip

    with atomic_path(path) as tmp:
        if tmp.name.endswith(".gz") and isinstance(image, nib.Nifti1Image):  # single-file NIfTI-1 / NIfTI-2
            with open(tmp, "wb") as raw, igzip.IGzipFile(
                filename="", mode="wb", compresslevel=NIFTI_GZIP_LEVEL, fileobj=raw, mtime=0
            ) as stream:
                image.to_file_map({"image": nib.FileHolder(fileobj=stream)})
        else:
            nib.save(image, str(tmp))
    return Path(path)


def save_torch(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` atomically: a checkpoint on disk is always complete (the old one or the new one)."""
    with atomic_path(path) as tmp:
        torch.save(obj, str(tmp))
    return Path(path)


def write_text(text: str, path: str | os.PathLike) -> Path:
    """Write a text file atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def json_safe(obj: Any) -> Any:
    """Replace NaN/Inf floats by None (JSON has no NaN) and numpy/torch scalars by Python numbers, recursively."""
    if isinstance(obj, Mapping):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, (np.generic, torch.Tensor)):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_json(obj: Any, path: str | os.PathLike, indent: int = 2, overwrite: bool = True) -> Path:
    """Write ``obj`` as JSON atomically (NaN/Inf as null; serialised first, so an unserialisable object never touches
    the disk). With ``overwrite=False`` an existing file raises :class:`OutputExistsError`."""
    check_outputs_writable([path], overwrite)
    return write_text(json.dumps(json_safe(obj), indent=indent) + "\n", path)


def write_csv(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike, overwrite: bool = True) -> Path:
    """Write dict rows (columns = keys of the first row) as CSV atomically."""
    if not rows:
        raise ValueError(f"no rows to write to {path}.")
    check_outputs_writable([path], overwrite)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0].keys()), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return write_text(buffer.getvalue(), path)


def check_outputs_writable(paths: Iterable[str | os.PathLike], overwrite: bool = False) -> None:
    """Refuse to replace existing results unless ``overwrite`` is set; lists every file that would be replaced.

    Raises:
        OutputExistsError: some of ``paths`` exist and ``overwrite`` is False.
    """
    existing = [str(p) for p in paths if Path(p).exists()]
    if existing and not overwrite:
        raise OutputExistsError(
            f"output file(s) already exist: {', '.join(existing)}; expected an output folder without earlier results. "
            "Choose another output folder, or pass --overwrite (config: overwrite=true) to replace them."
        )
