# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""Atomic, non-overwriting NIfTI/JSON/CSV output of the registration workflows."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Hashable, Mapping, Sequence

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import MapTransform

from scripts.io.atomic import check_outputs_writable, save_nifti

__all__ = [
    "DEFAULT_OUTPUT_NAMES",
    "SaveRegistrationOutputsd",
    "pair_output_dir",
    "write_nifti",
]

logger = logging.getLogger(__name__)

#: data key -> file name of the registration outputs.
DEFAULT_OUTPUT_NAMES = {
    "warped_image": "warped_image.nii.gz",
    "pred": "ddf.nii.gz",
    "warped_label": "warped_label.nii.gz",
    "jacobian_det": "jacobian_det.nii.gz",
}


def write_nifti(
    path: str | os.PathLike,
    array: torch.Tensor | np.ndarray,
    affine: np.ndarray | torch.Tensor,
    overwrite: bool = False,
    dtype: np.dtype | type | None = None,
    vector: bool = False,
) -> Path:
    """
    Write a channel-first volume as NIfTI atomically (temporary name + ``os.replace``).

    Args:
        path: target file (``.nii`` or ``.nii.gz``).
        array: (C, D, H, W) volume; one channel is written as a 3-D image (D, H, W), several as (D, H, W, C).
        affine: 4x4 voxel-to-world affine of the grid.
        overwrite: replace an existing file; otherwise raise ``scripts.io.atomic.OutputExistsError``.
        dtype: on-disk data type (default: the array's, float64 stored as float32).
        vector: mark the file as a vector field (NIfTI intent "vector"), e.g. for displacements.
    """
    target = Path(path)
    check_outputs_writable([target], overwrite)
    data = array.detach().cpu().numpy() if isinstance(array, torch.Tensor) else np.asarray(array)
    if data.ndim != 4:
        raise ValueError(f"expected a channel-first (C, D, H, W) array for {target.name}, got shape {data.shape}.")
    data = data[0] if data.shape[0] == 1 else np.moveaxis(data, 0, -1)
    if dtype is None:
        dtype = np.float32 if data.dtype == np.float64 else data.dtype
    affine = np.asarray(affine.detach().cpu() if isinstance(affine, torch.Tensor) else affine, dtype=np.float64)
    image = nib.Nifti1Image(data.astype(dtype, copy=False), affine)
    image.header.set_qform(affine, code=1)
    image.header.set_sform(affine, code=1)
    if vector:
        image.header.set_intent("vector")
    return save_nifti(image, target)


def pair_output_dir(output_dir: str | os.PathLike, pair_id: str | None) -> Path:
    """Folder of one pair's outputs: ``output_dir`` for a single pair, ``output_dir/<pair_id>`` in batch runs."""
    return Path(output_dir) / pair_id if pair_id else Path(output_dir)


class SaveRegistrationOutputsd(MapTransform):
    """
    Save one pair's outputs (already on the fixed image's grid) into its output folder, atomically.

    All target files are checked first: if any exists and ``overwrite`` is False, nothing is written and
    ``scripts.io.atomic.OutputExistsError`` names the files. Each file is written under a temporary name and renamed.

    Args:
        output_dir: root output folder.
        names: data key -> file name (default :py:data:`DEFAULT_OUTPUT_NAMES`); missing keys are skipped.
        vector_keys: keys written as vector fields (the displacement).
        label_keys: keys written as integer label maps.
        pair_id_key: data key holding the pair's sub-folder name (empty/absent: write into ``output_dir``).
        overwrite: replace existing outputs.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        names: Mapping[str, str] | None = None,
        vector_keys: Sequence[str] = ("pred",),
        label_keys: Sequence[str] = ("warped_label",),
        pair_id_key: str = "pair_id",
        overwrite: bool = False,
    ) -> None:
        self.names = dict(names) if names is not None else dict(DEFAULT_OUTPUT_NAMES)
        super().__init__(list(self.names.keys()), allow_missing_keys=True)
        self.output_dir = output_dir
        self.vector_keys = set(vector_keys)
        self.label_keys = set(label_keys)
        self.pair_id_key = pair_id_key
        self.overwrite = overwrite

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        folder = pair_output_dir(self.output_dir, d.get(self.pair_id_key))
        keys = list(self.key_iterator(d))
        check_outputs_writable([folder / self.names[k] for k in keys], self.overwrite)
        written = {}
        for key in keys:
            value = d[key]
            affine = value.affine if isinstance(value, MetaTensor) else np.eye(4)
            if key in self.label_keys:
                value = torch.round(torch.as_tensor(value).float())
            dtype = _label_dtype(value) if key in self.label_keys else np.float32
            path = write_nifti(
                folder / self.names[key], value, affine, overwrite=True, dtype=dtype, vector=key in self.vector_keys
            )
            written[key] = str(path)
        d["output_files"] = written
        logger.info("wrote %s", ", ".join(written.values()))
        return d


def _label_dtype(value: torch.Tensor) -> type:
    """Smallest unsigned/signed integer type holding the label values."""
    array = torch.as_tensor(value)
    low, high = (int(array.min()), int(array.max())) if array.numel() else (0, 0)
    if low >= 0 and high <= 255:
        return np.uint8
    if -32768 <= low and high <= 32767:
        return np.int16
    return np.int32
