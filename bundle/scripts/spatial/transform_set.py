# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""
A registration's saved transforms: one folder with ``affine.mat``, ``warp.nii.gz`` and ``inverse_warp.nii.gz``, and
the same in one file per direction, ``transform.h5`` and ``inverse_transform.h5`` (``scripts.spatial.composite``).

Any of the files may be absent (affine-only or deformable-only registration). Forward (fixed -> moving point map, used
to resample moving-space images onto the fixed grid): ``x -> T(x + u(x))``, ANTs ``-t warp.nii.gz -t affine.mat`` or
``-t transform.h5``. Inverse (moving -> fixed point map, to bring fixed-space images onto the moving grid):
``m -> y + v(y)`` with ``y = T^-1 m``, ANTs ``-t [affine.mat,1] -t inverse_warp.nii.gz`` or
``-t inverse_transform.h5``. Both fields are on the fixed grid.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from scripts.io.outputs import AFFINE_MAT, INVERSE_TRANSFORM_H5, INVERSE_WARP, TRANSFORM_H5, WARP, transform_file_names
from scripts.io.writer import DEFAULT_WRITE_WORKERS, ConcurrentWriter, write_workers

from .composite import write_itk_composite
from .inversion import invert_displacement, inverse_warp_field
from .itk_files import (
    TransformFileError,
    read_itk_affine,
    read_itk_displacement,
    write_itk_affine,
    write_itk_displacement,
)
from .world import as_matrix4

__all__ = [
    "AFFINE_FILE",
    "COMPOSITE_FILE",
    "INVERSE_COMPOSITE_FILE",
    "INVERSE_WARP_FILE",
    "WARP_FILE",
    "SavedTransforms",
    "load_transforms",
    "save_transforms",
    "transform_file_names",
]

# the file names are declared once, in scripts.io.outputs (transform_file_names: what save_transforms writes)
AFFINE_FILE, WARP_FILE, COMPOSITE_FILE = AFFINE_MAT, WARP, TRANSFORM_H5
INVERSE_WARP_FILE, INVERSE_COMPOSITE_FILE = INVERSE_WARP, INVERSE_TRANSFORM_H5

logger = logging.getLogger(__name__)


class SavedTransforms(NamedTuple):
    """Transforms of one direction read from a folder.

    Attributes:
        affine: (4, 4) RAS matrix mapping FIXED world points to MOVING world points, or None (no ``affine.mat``).
        field: (3, X, Y, Z) float32 voxel displacement on the fixed grid (forward ``u`` or inverse ``v``), or None.
        field_affine: (4, 4) RAS voxel-to-world matrix of the field's grid, or None.
        field_path: the file the field came from (for the inverse possibly ``warp.nii.gz``, inverted on the fly).
        affine_path: the affine file, or None.
    """

    affine: np.ndarray | None
    field: np.ndarray | None
    field_affine: np.ndarray | None
    field_path: Path | None
    affine_path: Path | None


def save_transforms(
    transform_dir: str | os.PathLike,
    fixed_affine,
    transform_ras=None,
    ddf_voxels=None,
    inverse: bool = True,
    iterations: int = 50,
    tolerance: float = 1e-4,
    max_workers: int = DEFAULT_WRITE_WORKERS,
) -> dict:
    """Write a registration's transforms in ITK/ANTs formats (each file atomically).

    The files are written on writer threads (:class:`scripts.io.writer.ConcurrentWriter`) while the inverse field,
    when asked for, is computed in the calling thread; the files are the same as when written one after the other,
    as they are for a field of more than :py:data:`scripts.io.writer.PARALLEL_WRITE_MAX_VOXELS` voxels.

    Args:
        transform_dir: destination folder (created when missing).
        fixed_affine: (4, 4) RAS voxel-to-world matrix of the fixed image.
        transform_ras: optional (4, 4) affine stage (FIXED world -> MOVING world, RAS) -> ``affine.mat``.
        ddf_voxels: optional bundle ``ddf`` on the fixed grid, (X, Y, Z, 3) or (3, X, Y, Z) -> ``warp.nii.gz``.
        inverse: also write ``inverse_warp.nii.gz`` and ``inverse_transform.h5`` (inversion of ``ddf_voxels``).
        iterations, tolerance: of the inversion (:func:`scripts.spatial.invert_displacement`).
        max_workers: writer threads (1: every file in turn in the calling thread; 1 for a CT-sized field).

    Returns:
        ``{"affine": path, "warp": path, "transform": path, "inverse_warp": path, "inverse_transform": path,
        "inverse_consistency": stats}`` for what was written (``transform.h5`` always; the identity stands in for a
        missing affine, a missing field leaves the affine alone in it).
    """
    if transform_ras is None and ddf_voxels is None:
        raise ValueError("nothing to save: give transform_ras, ddf_voxels or both.")
    folder = Path(transform_dir)
    fixed_affine = as_matrix4(fixed_affine, "fixed_affine")
    written: dict = {}
    voxels = 0 if ddf_voxels is None else int(np.prod(tuple(ddf_voxels.shape))) // 3
    with ConcurrentWriter(write_workers(voxels, max_workers)) as writer:
        if transform_ras is not None:
            written["affine"] = folder / AFFINE_FILE
            writer.submit(written["affine"], write_itk_affine, transform_ras, written["affine"])
        if ddf_voxels is not None:
            written["warp"] = folder / WARP_FILE
            writer.submit(written["warp"], write_itk_displacement, ddf_voxels, fixed_affine, written["warp"])
        written["transform"] = folder / COMPOSITE_FILE
        writer.submit(
            written["transform"], write_itk_composite, written["transform"], fixed_affine, transform_ras, ddf_voxels
        )
        if ddf_voxels is not None and inverse:
            field, written["inverse_consistency"] = inverse_warp_field(ddf_voxels, fixed_affine, iterations, tolerance)
            written["inverse_warp"] = folder / INVERSE_WARP_FILE
            writer.submit(
                written["inverse_warp"], write_itk_displacement, field, fixed_affine, written["inverse_warp"],
                channel_first=True,
            )
            written["inverse_transform"] = folder / INVERSE_COMPOSITE_FILE
            writer.submit(
                written["inverse_transform"], write_itk_composite, written["inverse_transform"], fixed_affine,
                transform_ras, field, True,
            )
    return written


def load_transforms(transform_dir: str | os.PathLike, inverse: bool = False) -> SavedTransforms:
    """Read the transforms of one direction from a folder written by :func:`save_transforms` (or renamed ANTs files).

    Args:
        transform_dir: folder holding ``affine.mat`` and/or ``warp.nii.gz`` / ``inverse_warp.nii.gz``.
        inverse: read the inverse field (``inverse_warp.nii.gz``; when only ``warp.nii.gz`` exists it is inverted here).

    Raises:
        TransformFileError: the folder is missing or holds none of the files, or a file is unreadable.
    """
    folder = Path(transform_dir)
    if not folder.is_dir():
        raise TransformFileError(f"transform folder '{folder}' does not exist.")
    affine_path = folder / AFFINE_FILE
    warp_path, inverse_path = folder / WARP_FILE, folder / INVERSE_WARP_FILE
    if not (affine_path.exists() or warp_path.exists() or (inverse and inverse_path.exists())):
        raise TransformFileError(
            f"transform folder '{folder}' holds none of {AFFINE_FILE}, {WARP_FILE}"
            f"{', ' + INVERSE_WARP_FILE if inverse else ''}; expected the output folder of a registration."
        )
    affine = read_itk_affine(affine_path) if affine_path.exists() else None
    field = field_affine = field_path = None
    if inverse and inverse_path.exists():
        field_path = inverse_path
        field, field_affine = read_itk_displacement(inverse_path)
    elif warp_path.exists():
        field_path = warp_path
        field, field_affine = read_itk_displacement(warp_path)
        if inverse:
            logger.info("%s not found: inverting %s on the fly.", inverse_path, warp_path)
            result = invert_displacement(torch.as_tensor(field)[None])
            field = result.ddf[0].numpy()
    return SavedTransforms(affine, field, field_affine, field_path, affine_path if affine is not None else None)
