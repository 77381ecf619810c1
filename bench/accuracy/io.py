"""Small NIfTI helpers for the accuracy benchmark: atomic writes on a reference grid, loading as arrays, and moving a
volume onto another grid through world coordinates.

numpy, scipy and nibabel only: the ANTs worker processes import this module, and their measured time and memory should
not include torch or MONAI."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

__all__ = ["load_array", "resample_to_grid", "save_like", "write_json_atomic"]


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


def resample_to_grid(
    volume: np.ndarray,
    volume_affine: np.ndarray,
    target_shape: Sequence[int],
    target_affine: np.ndarray,
    order: int = 0,
    chunk: int = 16,
) -> np.ndarray:
    """Resample ``volume`` onto a target grid through world coordinates (no registration: identity in world space).

    Args:
        volume: (X, Y, Z) array on its own grid.
        volume_affine: its 4x4 voxel-to-world affine.
        target_shape: (X', Y', Z') of the target grid.
        target_affine: the target's 4x4 voxel-to-world affine.
        order: spline order (0 = nearest neighbour, for labels; 1 = linear).
        chunk: slices along the first target axis resampled at a time (bounds the memory of the coordinates).

    Returns:
        (X', Y', Z') array of ``volume``'s dtype; points outside ``volume`` get 0.
    """
    from scipy.ndimage import map_coordinates

    if volume.ndim != 3 or len(target_shape) != 3:
        raise ValueError(f"need a 3-D volume and a 3-D target shape, got {volume.shape} and {tuple(target_shape)}.")
    for name, aff in (("volume_affine", volume_affine), ("target_affine", target_affine)):
        if np.asarray(aff).shape != (4, 4):
            raise ValueError(f"{name} must be 4x4, got shape {np.asarray(aff).shape}.")
    target_to_source = np.linalg.inv(np.asarray(volume_affine, np.float64)) @ np.asarray(target_affine, np.float64)
    out = np.zeros(tuple(int(s) for s in target_shape), dtype=volume.dtype)
    grid_yz = np.indices(out.shape[1:], dtype=np.float64).reshape(2, -1)
    for start in range(0, out.shape[0], chunk):
        stop = min(start + chunk, out.shape[0])
        xs = np.repeat(np.arange(start, stop, dtype=np.float64), grid_yz.shape[1])
        points = np.stack([xs, np.tile(grid_yz[0], stop - start), np.tile(grid_yz[1], stop - start)])
        coords = target_to_source[:3, :3] @ points + target_to_source[:3, 3:]
        values = map_coordinates(volume, coords, order=order, mode="constant", cval=0, prefilter=False)
        out[start:stop] = values.reshape((stop - start,) + out.shape[1:])
    return out
