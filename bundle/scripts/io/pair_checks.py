# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""Checks of a registration pair: the label maps sit on their images' grids, moving and fixed overlap in world
space, and the dictionary transform that runs every check first in ``preprocessing``."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform

from scripts.io.errors import RegistrationInputError
from scripts.io.volume_checks import (
    MAX_SPACING_RATIO,
    MIN_FOV_OVERLAP,
    MIN_SPATIAL_SIZE,
    check_finite,
    check_label_values,
    check_min_size,
    check_not_constant,
    check_spatial_dims,
    describe_grid,
    load_volume,
    validate_image,
    validate_label,
)

__all__ = ["VALIDATED_KEY", "fov_overlap_fraction", "compare_pair_grids", "validate_pair", "ValidateRegistrationInputsd"]

logger = logging.getLogger(__name__)

#: set to True on a data dict whose files were already fully checked (``scripts.io.screening.PairScreen``)
VALIDATED_KEY = "inputs_validated"


def _describe(role: str, source: Any) -> str:
    return f"{role} '{source}'"


def _world_box(shape: Sequence[int], affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Axis-aligned world bounding box (mm) of a grid's field of view, voxel edges included."""
    corners = np.array(np.meshgrid(*[[-0.5, int(s) - 0.5] for s in shape[:3]], indexing="ij")).reshape(3, -1)
    world = np.asarray(affine, float)[:3, :3] @ corners + np.asarray(affine, float)[:3, 3:4]
    return world.min(axis=1), world.max(axis=1)


def fov_overlap_fraction(
    shape_a: Sequence[int], affine_a: np.ndarray, shape_b: Sequence[int], affine_b: np.ndarray
) -> float:
    """Intersection volume of two fields of view over the smaller one (0: disjoint, 1: one contains the other)."""
    low_a, high_a = _world_box(shape_a, affine_a)
    low_b, high_b = _world_box(shape_b, affine_b)
    inter = np.clip(np.minimum(high_a, high_b) - np.maximum(low_a, low_b), 0.0, None).prod()
    smaller = min((high_a - low_a).prod(), (high_b - low_b).prod())
    return float(inter / smaller) if smaller > 0 else 0.0


def compare_pair_grids(
    moving_shape: Sequence[int],
    moving_affine: np.ndarray,
    fixed_shape: Sequence[int],
    fixed_affine: np.ndarray,
    moving_source: Any,
    fixed_source: Any,
    min_overlap: float = MIN_FOV_OVERLAP,
    atol_mm: float = 1e-3,
) -> bool:
    """Decide how moving and fixed relate: same grid (returns False), resampling needed (logs it, returns True), or
    incompatible (raises).

    Inputs are assumed affinely pre-aligned, so differing grids are fine as long as both fields of view cover the same
    part of the world; the pipeline then resamples the moving image onto the fixed grid.
    """
    same = tuple(int(s) for s in moving_shape) == tuple(int(s) for s in fixed_shape) and np.allclose(
        np.asarray(moving_affine, float), np.asarray(fixed_affine, float), rtol=0.0, atol=atol_mm
    )
    if same:
        return False
    overlap = fov_overlap_fraction(moving_shape, moving_affine, fixed_shape, fixed_affine)
    if overlap < min_overlap:
        raise RegistrationInputError(
            f"moving image '{moving_source}' ({describe_grid(moving_shape, moving_affine)}) and fixed image "
            f"'{fixed_source}' ({describe_grid(fixed_shape, fixed_affine)}) have {'no' if overlap == 0 else 'almost no'} "
            f"physical overlap ({100 * overlap:.1f} % of the smaller field of view); expected affinely pre-aligned "
            f"images whose fields of view overlap by at least {100 * min_overlap:g} %. Align them affinely first (ANTs, "
            "FSL flirt) or check the headers' origins."
        )
    logger.info(
        "moving image '%s' (%s) is on a different grid than fixed image '%s' (%s): resampling it onto the fixed grid "
        "(field-of-view overlap %.0f %%).",
        moving_source,
        describe_grid(moving_shape, moving_affine),
        fixed_source,
        describe_grid(fixed_shape, fixed_affine),
        100 * overlap,
    )
    return True


def validate_pair(
    moving_image: str | os.PathLike,
    fixed_image: str | os.PathLike,
    moving_label: str | os.PathLike | None = None,
    fixed_label: str | os.PathLike | None = None,
    max_spacing_ratio: float = MAX_SPACING_RATIO,
    min_size: int = MIN_SPATIAL_SIZE,
    min_overlap: float = MIN_FOV_OVERLAP,
) -> bool:
    """Check a registration pair (and optional label maps) before any work is done.

    Returns:
        True when the moving image has to be resampled onto the fixed grid (a log line says so), False when both
        share one grid.

    Raises:
        RegistrationInputError: the first problem found, naming the file.
    """
    moving_shape, moving_affine = validate_image(moving_image, "moving image", max_spacing_ratio, min_size)
    fixed_shape, fixed_affine = validate_image(fixed_image, "fixed image", max_spacing_ratio, min_size)
    if moving_label:
        validate_label(moving_label, moving_shape, moving_affine, moving_image, "moving label map")
    if fixed_label:
        validate_label(fixed_label, fixed_shape, fixed_affine, fixed_image, "fixed label map")
    return compare_pair_grids(
        moving_shape, moving_affine, fixed_shape, fixed_affine, moving_image, fixed_image, min_overlap
    )


class ValidateRegistrationInputsd(MapTransform):
    """Check a registration pair; placed first in ``preprocessing`` (before ``LoadImaged``).

    File paths get every check of :func:`validate_pair`. Volumes that are already loaded (channel-first arrays or
    MetaTensors, as an app may feed them) get the checks that need no file: 3-D, size, finite, not constant, integer
    labels. The data dict passes through unchanged. Empty/None label entries are skipped (labels are optional); a dict
    marked with ``VALIDATED_KEY`` (by ``scripts.io.screening.PairScreen``) is not checked again.

    Args:
        keys: ``(moving image key, fixed image key)``.
        label_keys: ``(moving label key, fixed label key)``; each is checked against its image when present.
        max_spacing_ratio: largest allowed ratio of voxel spacings within one image.
        min_size: smallest allowed number of voxels along every axis.
        min_overlap: smallest allowed field-of-view overlap of moving and fixed (fraction of the smaller one).
        allow_missing_keys: skip a missing image key instead of raising.
    """

    def __init__(
        self,
        keys: KeysCollection = ("moving_image", "fixed_image"),
        label_keys: KeysCollection = ("moving_label", "fixed_label"),
        max_spacing_ratio: float = MAX_SPACING_RATIO,
        min_size: int = MIN_SPATIAL_SIZE,
        min_overlap: float = MIN_FOV_OVERLAP,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if len(self.keys) != 2:
            raise ValueError(f"keys must be (moving image key, fixed image key), got {self.keys}.")
        self.label_keys = (label_keys,) if isinstance(label_keys, str) else tuple(label_keys)
        if len(self.label_keys) != 2:
            raise ValueError(f"label_keys must be (moving label key, fixed label key), got {self.label_keys}.")
        self.max_spacing_ratio = max_spacing_ratio
        self.min_size = min_size
        self.min_overlap = min_overlap

    def __call__(self, data: Mapping[str, Any]) -> dict[str, Any]:
        d = dict(data)
        moving_key, fixed_key = self.keys
        if moving_key not in d or fixed_key not in d:
            if self.allow_missing_keys:
                return d
            missing = [k for k in self.keys if k not in d]
            raise RegistrationInputError(f"no input given for {missing}; expected file paths for {list(self.keys)}.")
        if d.get(VALIDATED_KEY):  # already checked by scripts.io.screening.PairScreen: do not read the files twice
            return d
        keys = [k for k in (moving_key, fixed_key, *self.label_keys) if d.get(k) is not None and not _is_empty(d[k])]
        if any(not isinstance(d[k], (str, os.PathLike)) for k in keys):
            self._check_loaded(d, keys)  # already loaded (e.g. a deploy/label app feeding tensors): content checks
            return d
        validate_pair(
            d[moving_key],
            d[fixed_key],
            d.get(self.label_keys[0]) or None,
            d.get(self.label_keys[1]) or None,
            self.max_spacing_ratio,
            self.min_size,
            self.min_overlap,
        )
        return d

    def _check_loaded(self, d: Mapping[str, Any], keys: Sequence[str]) -> None:
        """Checks that need no file: finite, not constant, integer labels, large enough (channel-first arrays)."""
        names = ("moving image", "fixed image", "moving label map", "fixed label map")
        roles = dict(zip((*self.keys, *self.label_keys), names))
        for key in keys:
            value = d[key]
            if isinstance(value, (str, os.PathLike)):
                value = load_volume(value, roles[key])[0]
            array = torch.as_tensor(np.asarray(value) if not isinstance(value, torch.Tensor) else value)
            spatial = array.shape[1:] if array.ndim == 4 else array.shape
            source = getattr(value, "meta", {}).get("filename_or_obj", f"data['{key}']")
            check_spatial_dims(tuple(spatial), source, roles[key])
            check_min_size(spatial, source, roles[key], self.min_size)
            if key in self.label_keys:
                check_label_values(array, source, roles[key])
            else:
                check_finite(array, source, roles[key])
                check_not_constant(array, source, roles[key])


def _is_empty(value: Any) -> bool:
    return isinstance(value, (str, os.PathLike)) and not str(value)
