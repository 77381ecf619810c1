"""Small NIfTI helpers for the accuracy benchmark: atomic writes on a reference grid, and loading as arrays."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np

__all__ = ["save_like", "load_array", "write_json_atomic"]


def save_like(array: np.ndarray, reference: nib.Nifti1Image, path: str | Path) -> None:
    """Write ``array`` with ``reference``'s affine, atomically (temp file in the same folder, then ``os.replace``).

    Args:
        array: (D, H, W) or (D, H, W, C) array on the reference grid.
        reference: image whose affine (and spatial shape) the output shares.
        path: output ``.nii.gz`` path.
    """
    if array.shape[:3] != reference.shape[:3]:
        raise ValueError(f"array spatial shape {array.shape[:3]} differs from the reference grid {reference.shape[:3]}.")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".nii.gz", dir=path.parent)
    os.close(fd)
    try:
        nib.save(nib.Nifti1Image(array, reference.affine), tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_array(path: str | Path, dtype=np.float32) -> np.ndarray:
    """Load a NIfTI file as a numpy array of ``dtype`` (labels are rounded first when ``dtype`` is integer)."""
    data = np.asanyarray(nib.load(str(path)).dataobj)
    if np.issubdtype(np.dtype(dtype), np.integer):
        return np.rint(data).astype(dtype)
    return data.astype(dtype)


def write_json_atomic(obj, path: str | Path) -> None:
    """Dump ``obj`` as indented JSON to ``path`` through a temp file and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".json", dir=path.parent)
    with os.fdopen(fd, "w") as handle:
        json.dump(obj, handle, indent=2, sort_keys=False, default=str)
        handle.write("\n")
    os.replace(tmp, path)
