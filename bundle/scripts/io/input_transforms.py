# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""The three steps that turn a pair of file names into checked volumes, each done once per pair:

1. :class:`CheckRegistrationHeadersd`: every check that needs only the headers (``scripts.io.input_checks``), before
   anything is decoded, so a bad header, a label on the wrong grid or a pair that does not overlap is refused in a
   fraction of a second, before any work or any output;
2. :class:`LoadRegistrationInputsd`: decodes each file once; a file that the previous pair also used under the same key
   (an atlas shared by a datalist) is not decoded again; a file that cannot be decoded (truncated, corrupt) is named;
3. :class:`CheckRegistrationContentd`: the checks that need the voxels (finite, contrast, integer labels), on the
   loaded MetaTensors.

The configs' ``loading_transforms`` chain them (with ``EnsureChannelFirstd`` and ``Orientationd`` between 2 and 3). A
pair that fails any step raises a ``RegistrationInputError``; a datalist run records it and goes on
(``scripts.workflow.CohortDataset``).
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import LoadImage, MapTransform

from scripts.io.errors import RegistrationInputError
from scripts.io.input_checks import (
    MAX_SPACING_RATIO,
    MIN_FOV_OVERLAP,
    MIN_SPATIAL_SIZE,
    NIFTI_HINT,
    ROLES,
    check_affine,
    check_finite,
    check_label_grid,
    check_label_values,
    check_mask_values,
    check_min_size,
    check_not_constant,
    check_not_sheared,
    check_qform_sform,
    check_spacing,
    check_spatial_dims,
    compare_pair_grids,
    describe_grid,
    fov_overlap_fraction,
    read_header,
)

__all__ = ["CheckRegistrationHeadersd", "LoadRegistrationInputsd", "CheckRegistrationContentd", "is_given"]

logger = logging.getLogger(__name__)


def is_given(value: Any) -> bool:
    """True for an input that was given: not None and not an empty path (optional label maps may be either)."""
    return value is not None and not (isinstance(value, (str, os.PathLike)) and not str(value))


def _is_path(value: Any) -> bool:
    return isinstance(value, (str, os.PathLike))


def _role(key: Hashable) -> str:
    return ROLES.get(str(key), f"input '{key}'")


class CheckRegistrationHeadersd(MapTransform):
    """Check a pair from its headers only (no voxel decoded); the data dict passes through unchanged.

    For file paths the NIfTI headers are read; for volumes already loaded (channel-first arrays or MetaTensors, as an
    app may feed them) their shape and ``affine`` metadata stand in for the header. Checked: both images given (a fixed
    label map needs a moving one), 3-D, a finite, invertible, unsheared affine agreed on by qform and sform, spacing
    ratio, size, label maps on their images' grids, and world overlap of moving and fixed.

    Args:
        keys: ``(moving image key, fixed image key)``.
        label_keys: ``(moving label key, fixed label key)``; each is checked against its image when given.
        mask_keys: ``(moving mask key, fixed mask key)``; each is checked against its image when given.
        max_spacing_ratio: largest allowed ratio of voxel spacings within one image.
        min_size: smallest allowed number of voxels along every axis.
        min_overlap: smallest allowed field-of-view overlap of moving and fixed (fraction of the smaller one).
        allow_missing_keys: pass a dict without the image keys through unchecked instead of raising.
    """

    def __init__(
        self,
        keys: KeysCollection = ("moving_image", "fixed_image"),
        label_keys: KeysCollection = ("moving_label", "fixed_label"),
        max_spacing_ratio: float = MAX_SPACING_RATIO,
        min_size: int = MIN_SPATIAL_SIZE,
        min_overlap: float = MIN_FOV_OVERLAP,
        allow_missing_keys: bool = False,
        mask_keys: KeysCollection = ("moving_mask", "fixed_mask"),
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.mask_keys = (mask_keys,) if isinstance(mask_keys, str) else tuple(mask_keys)
        if len(self.mask_keys) != 2:
            raise ValueError(f"mask_keys must be (moving mask key, fixed mask key), got {self.mask_keys}.")
        if len(self.keys) != 2:
            raise ValueError(f"keys must be (moving image key, fixed image key), got {self.keys}.")
        self.label_keys = (label_keys,) if isinstance(label_keys, str) else tuple(label_keys)
        if len(self.label_keys) != 2:
            raise ValueError(f"label_keys must be (moving label key, fixed label key), got {self.label_keys}.")
        if max_spacing_ratio < 1 or min_size < 1 or not 0 <= min_overlap <= 1:
            raise ValueError(
                f"expected max_spacing_ratio >= 1, min_size >= 1 and 0 <= min_overlap <= 1, got {max_spacing_ratio}, "
                f"{min_size}, {min_overlap}."
            )
        self.max_spacing_ratio = max_spacing_ratio
        self.min_size = min_size
        self.min_overlap = min_overlap

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        moving_key, fixed_key = self.keys
        missing = [k for k in self.keys if not is_given(d.get(k))]
        if missing:
            if self.allow_missing_keys and all(k not in d for k in self.keys):
                return d
            raise RegistrationInputError(
                f"the pair has no {' and no '.join(_role(k) for k in missing)}; expected both images."
            )
        moving_label_key, fixed_label_key = self.label_keys
        if is_given(d.get(fixed_label_key)) and not is_given(d.get(moving_label_key)):
            raise RegistrationInputError(
                f"fixed label map '{d[fixed_label_key]}' was given without a moving label map; expected both "
                "(Dice compares the warped moving labels with the fixed ones) or only the moving one."
            )
        grids = {}
        sides = ((moving_key, moving_label_key, self.mask_keys[0]), (fixed_key, fixed_label_key, self.mask_keys[1]))
        for image_key, *companion_keys in sides:
            grids[image_key] = self._grid(d[image_key], _role(image_key), label=False)
            for key in companion_keys:  # a label map or a mask belongs to its image's voxels
                if is_given(d.get(key)):
                    grid = self._grid(d[key], _role(key), label=True)
                    check_label_grid(*grid, *grids[image_key], _source(d[key]), _source(d[image_key]), _role(key))
        moving, fixed = grids[moving_key], grids[fixed_key]
        if compare_pair_grids(*moving, *fixed, _source(d[moving_key]), _source(d[fixed_key]), self.min_overlap):
            logger.info(
                "moving image '%s' (%s) is on a different grid than fixed image '%s' (%s): resampling it onto the fixed "
                "grid (field-of-view overlap %.0f %%).", _source(d[moving_key]), describe_grid(*moving),
                _source(d[fixed_key]), describe_grid(*fixed), 100 * fov_overlap_fraction(*moving, *fixed),
            )
        return d

    def _grid(self, value: Any, role: str, label: bool) -> tuple[tuple[int, int, int], np.ndarray]:
        """(spatial shape, affine) of one input from its header (file) or its array and metadata (loaded volume)."""
        source = _source(value)
        if _is_path(value):
            image = read_header(value, role)
            shape = check_spatial_dims(image.shape, source, role)
            affine = check_affine(image.affine, source, role)
            check_qform_sform(image.header, source, role)
        else:
            array = value if isinstance(value, torch.Tensor) else torch.as_tensor(np.asarray(value))
            shape = check_spatial_dims(tuple(array.shape[1:]) if array.ndim == 4 else tuple(array.shape), source, role)
            affine = check_affine(_meta_affine(value), source, role)
        check_not_sheared(affine, source, role)
        if not label:
            check_spacing(affine, source, role, self.max_spacing_ratio)
            check_min_size(shape, source, role, self.min_size)
        return shape, affine


class LoadRegistrationInputsd(MapTransform):
    """Decode each given input file into a MetaTensor (MONAI's ``LoadImage`` with nibabel), once per pair.

    With ``keep_decoded``, the last volume loaded under each key is kept with its file's identity (path, size,
    modification time): when the next pair names the same file under that key, as a datalist with one atlas does for
    every pair, a copy of it is returned instead of decoding the file again. Optional keys that are absent or empty
    are skipped. A file that cannot be decoded (truncated or corrupt) raises a ``RegistrationInputError`` naming it.

    Args:
        keys: data keys holding file paths (moving/fixed image and label keys).
        reader: MONAI image reader (name or instance); the bundle reads NIfTI with ``"NibabelReader"``.
        allow_missing_keys: skip absent keys (labels are optional).
        label_keys: keys of label maps, decoded in their file's own type (uint8 / int16 label ids stay integers: a
            quarter or half of the float32 copy every later step would otherwise hold; nearest-neighbour resampling,
            warping and the metrics keep integer maps as they are). Other keys are decoded as float32.
        keep_decoded: keep the last volume of each key for the next pair. False for a run of one pair
            (``configs/inference.json``: ``len(@pairs) > 1``): there is no next pair, and the kept float32 copies of a
            CT-sized pair (images and labels) would stay in memory through the whole registration, 1.7 GB at
            512 x 512 x 400.

    Attributes:
        decoded: file path -> how many times it was decoded by this transform (a datalist's atlas: 1).
    """

    def __init__(
        self,
        keys: KeysCollection,
        reader: Any = "NibabelReader",
        allow_missing_keys: bool = True,
        label_keys: KeysCollection = ("moving_label", "fixed_label"),
        keep_decoded: bool = True,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.loader = LoadImage(reader=reader, image_only=True)
        self.label_loader = LoadImage(reader=reader, image_only=True, dtype=None)
        self.label_keys = {label_keys} if isinstance(label_keys, str) else set(label_keys)
        self.keep_decoded = bool(keep_decoded)
        self._last: dict[Hashable, tuple[tuple[str, int, int], Any]] = {}
        self.decoded: dict[str, int] = {}

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            value = d[key]
            if not is_given(value) or not _is_path(value):
                continue  # optional input not given, or a volume already loaded
            identity = _file_identity(value)
            last = self._last.get(key)
            if last is not None and last[0] == identity:
                d[key] = copy.deepcopy(last[1])
                continue
            d[key] = self._decode(value, _role(key), self.label_loader if key in self.label_keys else self.loader)
            if self.keep_decoded:
                self._last[key] = (identity, d[key])
                d[key] = copy.deepcopy(d[key])  # later transforms may change it in place; the kept copy stays as read
        return d

    def _decode(self, path: str | os.PathLike, role: str, loader: LoadImage) -> Any:
        self.decoded[str(path)] = self.decoded.get(str(path), 0) + 1
        try:
            return loader(str(path))
        except Exception as error:  # nibabel/zlib/gzip raise EOFError, OSError, zlib.error ... on damaged files
            cause = error
            while cause.__cause__ is not None:  # MONAI wraps the reader's error (with tracebacks in its text)
                cause = cause.__cause__
            detail = (str(cause).splitlines() or [""])[0]
            raise RegistrationInputError(
                f"{role} '{path}' could not be read ({type(cause).__name__}: {detail}); expected "
                f"{NIFTI_HINT}. The file is probably truncated or corrupt (an incomplete download or copy): copy it "
                "again."
            ) from error


class CheckRegistrationContentd(MapTransform):
    """The checks that need the voxels, on loaded (channel-first) volumes; the data dict passes through unchanged.

    Images: finite everywhere, not constant. Label maps: finite integer label ids. Masks: finite, not empty. Absent or
    empty keys are skipped.

    Args:
        keys: intensity image keys.
        label_keys: label map keys.
        allow_missing_keys: skip absent keys (labels and masks are optional).
        mask_keys: mask keys.
    """

    def __init__(
        self,
        keys: KeysCollection = ("moving_image", "fixed_image"),
        label_keys: KeysCollection = ("moving_label", "fixed_label"),
        allow_missing_keys: bool = True,
        mask_keys: KeysCollection = ("moving_mask", "fixed_mask"),
    ) -> None:
        label_keys = (label_keys,) if isinstance(label_keys, str) else tuple(label_keys)
        mask_keys = (mask_keys,) if isinstance(mask_keys, str) else tuple(mask_keys)
        image_keys = tuple(keys if not isinstance(keys, str) else (keys,))
        super().__init__(image_keys + label_keys + mask_keys, allow_missing_keys)
        self.label_keys, self.mask_keys = set(label_keys), set(mask_keys)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            value = d[key]
            if not is_given(value):
                continue
            if _is_path(value):
                raise ValueError(f"CheckRegistrationContentd needs loaded volumes; data['{key}'] is the path {value}.")
            source, role = _source(value, key), _role(key)
            if key in self.label_keys:
                check_label_values(value, source, role)
            elif key in self.mask_keys:
                check_mask_values(value, source, role)
            else:
                check_finite(value, source, role)
                check_not_constant(value, source, role)
        return d


def _file_identity(path: str | os.PathLike) -> tuple[str, int, int]:
    """(resolved path, size, mtime): a file rewritten between two pairs is decoded again."""
    stat = os.stat(path)
    return str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns


def _meta_affine(value: Any) -> np.ndarray:
    """The voxel-to-world affine of a loaded volume (MetaTensor ``affine``; identity when it carries none)."""
    affine = getattr(value, "affine", None)  # a MetaTensor's affine is its meta["affine"]
    return np.eye(4) if affine is None else np.asarray(torch.as_tensor(affine).cpu(), dtype=np.float64)


def _source(value: Any, key: Hashable | None = None) -> str:
    """How messages name an input: its path, or the file a loaded volume came from."""
    if _is_path(value):
        return str(value)
    meta = getattr(value, "meta", None) or {}
    return str(meta.get("filename_or_obj") or (f"data['{key}']" if key is not None else "a loaded volume"))

