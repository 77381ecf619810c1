# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""The registration as transforms other tools read (:class:`SaveTransformsd`), and the warped moving volumes made
through exactly those transforms (:class:`WarpFromSourced`: the point map of ``affine.mat`` + ``warp.nii.gz``,
``x -> T(x + u(x))``, by the same function as ``scripts.spatial.apply_transforms``), so ``cli apply`` and
``antsApplyTransforms -t warp.nii.gz -t affine.mat`` reproduce ``warped_image`` / ``warped_label``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform

from scripts.io.atomic import check_outputs_writable
from scripts.io.writer import DEFAULT_WRITE_WORKERS, pair_output_dir
from scripts.layers.intensity import background_per_key, resolve_background
from scripts.spatial import SavedTransforms, resample_with_transforms, save_transforms, transform_file_names
from scripts.workflow.alignment import AFFINE_MATRIX_KEY

__all__ = ["WarpFromSourced", "SaveTransformsd", "TRANSFORM_METRICS_KEY"]

logger = logging.getLogger(__name__)

#: data key of the transform figures (inverse consistency) that ``metrics.json`` takes over
TRANSFORM_METRICS_KEY = "transform_metrics"


def _affine(image: Any, key: str) -> np.ndarray:
    if not isinstance(image, MetaTensor):
        raise ValueError(f"'{key}' must be a MetaTensor with an affine, got {type(image).__name__}.")
    return np.asarray(image.affine, dtype=np.float64)


def _matrix(d: Mapping[Hashable, Any], key: str) -> np.ndarray:
    value = d.get(key)
    return np.eye(4) if value is None else np.asarray(torch.as_tensor(value, dtype=torch.float64).cpu())


class WarpFromSourced(MapTransform):
    """
    Warp moving-space volumes from their own grids onto the fixed grid: ``out(p) = src(inv(A_src) T A_f (p + ddf(p)))``.

    Run after :py:class:`scripts.workflow.RestoreOriginalGridd` (``ddf`` and the reference on the fixed file's grid,
    ``A_f`` its affine), on the moving image/label as loaded (``keep_source_transforms`` in ``inference.json``), so each
    voxel is interpolated once. Outside a source's field of view: its background (never 0 HU, soft tissue), labels 0.

    Args:
        keys: source keys, e.g. ``["moving_source", "moving_label_source"]``, channel-first MetaTensors.
        output_keys: one output key per source key (e.g. ``["warped_image", "warped_label"]``).
        mode: "bilinear" or "nearest" per key (nearest for label maps).
        ddf_key: displacement field (3, X, Y, Z) in voxels of the fixed grid.
        reference_key: the fixed image (its grid and affine are the output's).
        matrix_key: the affine stage's world matrix (identity when absent).
        background: value outside a source's field of view, per key or one for all: ``"auto"`` (the source's
            minimum) or a number. None: ``"auto"`` for ``"bilinear"`` keys, 0 for ``"nearest"`` (label maps).
        allow_missing_keys: skip absent sources (optional labels).
    """

    def __init__(
        self,
        keys: KeysCollection,
        output_keys: Sequence[str],
        mode: str | Sequence[str] = "bilinear",
        ddf_key: str = "pred",
        reference_key: str = "fixed_image",
        matrix_key: str = AFFINE_MATRIX_KEY,
        background: float | str | Sequence[float | str] | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.output_keys = list(output_keys)
        self.mode = [mode] * len(self.keys) if isinstance(mode, str) else list(mode)
        if len(self.output_keys) != len(self.keys) or len(self.mode) != len(self.keys):
            raise ValueError(f"need one output key and one mode per key {self.keys}, got {output_keys}, {mode}.")
        if any(m not in ("bilinear", "nearest") for m in self.mode):
            raise ValueError(f"mode must be 'bilinear' or 'nearest', got {mode!r}.")
        self.background = background_per_key(background, self.mode)
        self.ddf_key, self.reference_key, self.matrix_key = ddf_key, reference_key, matrix_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        ddf, reference = d[self.ddf_key], d[self.reference_key]
        if ddf.ndim != 4 or ddf.shape[0] != 3 or tuple(ddf.shape[1:]) != tuple(reference.shape[1:]):
            raise ValueError(f"'{self.ddf_key}' must be (3, *fixed spatial shape), got {tuple(ddf.shape)}.")
        fixed_affine = _affine(reference, self.reference_key)
        field = torch.as_tensor(ddf.as_tensor() if isinstance(ddf, MetaTensor) else ddf).detach().float().cpu()
        transforms = SavedTransforms(_matrix(d, self.matrix_key), field.numpy(), fixed_affine, None, None)
        fixed_grid = (tuple(reference.shape[1:]), fixed_affine)
        for key, out_key, mode, background in self.key_iterator(d, self.output_keys, self.mode, self.background):
            source = d[key]
            source_grid = (tuple(source.shape[1:]), _affine(source, key))
            volume = source.as_tensor().detach().cpu()
            volume = volume.float() if mode == "bilinear" or volume.is_floating_point() else volume
            # slab-wise on the fixed grid: a CT-sized output never holds the whole point map
            warped = resample_with_transforms(
                volume[None], transforms, fixed_grid, source_grid, mode, resolve_background(volume, background)
            )
            d[out_key] = MetaTensor(warped[0], affine=torch.as_tensor(fixed_affine))
        return d


class SaveTransformsd(MapTransform):
    """
    Write the registration as ITK/ANTs transform files into the pair's output folder, atomically: ``affine.mat`` (the
    affine stage, ITK LPS; identity without one), ``warp.nii.gz`` (displacement in LPS mm on the fixed grid),
    ``transform.h5`` (both as one ITK CompositeTransform); with ``inverse`` also ``inverse_warp.nii.gz``
    (:py:func:`scripts.spatial.invert_displacement`) and ``inverse_transform.h5``, and the inverse-consistency error
    under ``TRANSFORM_METRICS_KEY`` for ``metrics.json``.

    Args:
        output_dir: root output folder (pairs with a ``pair_id`` get a sub-folder).
        ddf_key: displacement (3, X, Y, Z) in voxels of the fixed file's grid (after ``RestoreOriginalGridd``).
        reference_key: the fixed image on its own grid.
        matrix_key: the affine stage's world matrix.
        inverse: also write the inverse field.
        overwrite: replace existing transform files.
        pair_id_key: key of the pair's sub-folder name.
        max_workers: threads writing the files (see :py:func:`scripts.spatial.save_transforms`; 1: one after the
            other, same files).
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        ddf_key: str = "pred",
        reference_key: str = "fixed_image",
        matrix_key: str = AFFINE_MATRIX_KEY,
        inverse: bool = False,
        overwrite: bool = False,
        pair_id_key: str = "pair_id",
        max_workers: int = DEFAULT_WRITE_WORKERS,
    ) -> None:
        super().__init__([ddf_key])
        self.output_dir = output_dir
        self.ddf_key, self.reference_key, self.matrix_key = ddf_key, reference_key, matrix_key
        self.inverse, self.overwrite, self.pair_id_key = bool(inverse), bool(overwrite), pair_id_key
        self.max_workers = max_workers

    def file_names(self) -> list[str]:
        """Names of the files this transform writes (declared in ``scripts.io.outputs``)."""
        return transform_file_names(self.inverse)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        folder = pair_output_dir(self.output_dir, d.get(self.pair_id_key))
        check_outputs_writable([folder / name for name in self.file_names()], self.overwrite)
        ddf = d[self.ddf_key]
        field = torch.as_tensor(ddf.as_tensor() if isinstance(ddf, MetaTensor) else ddf).detach().float().cpu()
        written = save_transforms(
            folder, _affine(d[self.reference_key], self.reference_key), _matrix(d, self.matrix_key), field.numpy(),
            inverse=self.inverse, max_workers=self.max_workers,
        )
        if "inverse_consistency" in written:
            stats = written["inverse_consistency"]
            d[TRANSFORM_METRICS_KEY] = {"inverse_consistency": stats}
            logger.info("inverse warp written; inverse-consistency error %s", stats)
        d.setdefault("output_files", {}).update({k: str(v) for k, v in written.items() if k != "inverse_consistency"})
        return d
