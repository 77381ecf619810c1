# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""Checks of one volume (file, shape, affine, spacing, size, values): each problem is one clear message.

Every message says what was wrong, what was expected and which file (``docs/troubleshooting.md`` lists them all).
Policy choices, all overridable by arguments:

- ``MAX_SPACING_RATIO = 5``: largest/smallest voxel spacing above 5 (e.g. 1 x 1 x 6 mm) is refused, because the network
  works in voxel units and its 3x3x3 kernels and smoothness penalty then mean very different things along each axis.
- ``MIN_SPATIAL_SIZE = 16``: the encoder pools four times, so its coarsest level works at 1/16 resolution; an axis with
  fewer than 16 voxels has no voxel of image content there (only padding).
- ``MIN_FOV_OVERLAP = 0.1``: moving and fixed are assumed affinely pre-aligned; when their fields of view (world-space
  bounding boxes) share less than 10 % of the smaller one, they are not, and registration cannot recover that.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch

from scripts.io.errors import RegistrationInputError

__all__ = [
    "MAX_SPACING_RATIO",
    "MIN_SPATIAL_SIZE",
    "MIN_FOV_OVERLAP",
    "NIFTI_HINT",
    "voxel_spacing",
    "describe_grid",
    "check_file_exists",
    "check_spatial_dims",
    "check_affine",
    "check_spacing",
    "check_min_size",
    "check_finite",
    "check_not_constant",
    "check_label_values",
    "load_volume",
    "validate_image",
    "validate_label",
    "check_same_grid",
    "stored_shape_problem",
]

MAX_SPACING_RATIO = 5.0
MIN_SPATIAL_SIZE = 16
MIN_FOV_OVERLAP = 0.1
NIFTI_HINT = "a readable 3-D NIfTI file (.nii or .nii.gz)"


def _describe(role: str, source: Any) -> str:
    return f"{role} '{source}'"


def voxel_spacing(affine: np.ndarray) -> np.ndarray:
    """Voxel size (mm) along each array axis: the lengths of the affine's first three columns (works when oblique)."""
    return np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)


def describe_grid(shape: Sequence[int], affine: np.ndarray) -> str:
    spacing = "x".join(f"{s:.3g}" for s in voxel_spacing(affine))
    codes = "".join(nib.aff2axcodes(affine))
    return f"{'x'.join(str(int(s)) for s in shape)} voxels, {spacing} mm, {codes}"


def check_file_exists(path: str | os.PathLike, role: str = "image") -> Path:
    """Raise unless ``path`` names an existing regular file; return it as a ``Path``."""
    path = Path(path)
    if not path.exists():
        raise RegistrationInputError(f"{_describe(role, path)} does not exist; expected {NIFTI_HINT}. Check the path.")
    if not path.is_file():
        raise RegistrationInputError(f"{_describe(role, path)} is not a file; expected {NIFTI_HINT}.")
    return path


def stored_shape_problem(shape: tuple[int, ...]) -> str | None:
    """What is wrong with a stored shape for a 3-D registration input (None when fine)."""
    if len(shape) < 3 or min(shape[:3]) == 1:
        return f"is 2-D (shape {shape}); expected a 3-D volume. SACB-Net registers 3-D images only"
    if len(shape) == 4 and shape[3] != 1:
        return (
            f"is 4-D with {shape[3]} volumes (shape {shape}); expected a single 3-D volume. Extract one volume first "
            "(e.g. the first time point)"
        )
    if len(shape) > 4:
        return f"has {len(shape)} axes (shape {shape}); expected a single 3-D volume"
    return None


def check_spatial_dims(shape: Sequence[int], source: Any, role: str = "image") -> tuple[int, int, int]:
    """Return the 3-D spatial shape of a stored volume, accepting a 4-D volume with exactly one time point/channel.

    Args:
        shape: shape as stored in the file (nibabel order).
        source: file name (or description) for the message.
        role: e.g. "moving image", for the message.

    Raises:
        RegistrationInputError: 2-D data (fewer than 3 axes, or a single-voxel spatial axis), 4-D data with more than
            one volume, or anything with more axes.
    """
    shape = tuple(int(s) for s in shape)
    problem = stored_shape_problem(shape)
    if problem:
        raise RegistrationInputError(f"{_describe(role, source)} {problem}.")
    return shape[0], shape[1], shape[2]


def check_affine(affine: np.ndarray, source: Any, role: str = "image") -> np.ndarray:
    """Raise unless the voxel-to-world affine is finite and invertible (its voxels have a size and a place)."""
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise RegistrationInputError(
            f"{_describe(role, source)} has an invalid voxel-to-world affine (not finite or singular); expected a "
            "header with valid voxel sizes and orientation (qform/sform). Fix the header."
        )
    return affine


def check_spacing(affine: np.ndarray, source: Any, role: str = "image", max_ratio: float = MAX_SPACING_RATIO) -> None:
    """Raise when the largest voxel spacing exceeds ``max_ratio`` times the smallest.

    The network works in voxel units: with very anisotropic voxels its 3x3x3 kernels, its ~30-voxel reach and the
    smoothness penalty mean very different physical distances along each axis.
    """
    spacing = voxel_spacing(affine)
    ratio = float(spacing.max() / spacing.min())
    if ratio > max_ratio:
        text = " x ".join(f"{s:.3g}" for s in spacing)
        raise RegistrationInputError(
            f"{_describe(role, source)} has extremely anisotropic voxels ({text} mm, ratio {ratio:.1f}); expected a "
            f"largest/smallest spacing ratio <= {max_ratio:g}. Resample it to near-isotropic voxels first (or raise "
            "max_spacing_ratio if you accept the risk)."
        )


def check_min_size(
    spatial_shape: Sequence[int], source: Any, role: str = "image", min_size: int = MIN_SPATIAL_SIZE
) -> None:
    """Raise when an axis is shorter than ``min_size`` voxels (the network's coarsest level is 1/16 resolution)."""
    if min(int(s) for s in spatial_shape) < min_size:
        raise RegistrationInputError(
            f"{_describe(role, source)} is too small for the network ({'x'.join(str(int(s)) for s in spatial_shape)} "
            f"voxels); expected at least {min_size} voxels along every axis (the encoder pools 4 times, so its coarsest "
            "level works at 1/16 resolution). Use the full volume, not a crop or a thumbnail."
        )


def check_finite(array: np.ndarray | torch.Tensor, source: Any, role: str = "image") -> None:
    """Raise when any voxel is NaN or +-Inf (they spread through every convolution and make the output NaN)."""
    values = torch.as_tensor(array)
    if values.is_floating_point():
        bad = int((~torch.isfinite(values)).sum())
        if bad:
            raise RegistrationInputError(
                f"{_describe(role, source)} contains {bad} NaN/Inf voxels ({100.0 * bad / values.numel():.3g} % of "
                f"{values.numel()}); expected finite values everywhere. Replace them (e.g. by 0) before registering."
            )


def check_not_constant(array: np.ndarray | torch.Tensor, source: Any, role: str = "image") -> None:
    """Raise when every voxel has the same value: there is nothing to align (and intensity scaling would divide by 0)."""
    values = torch.as_tensor(array)
    if values.numel() and bool((values == values.reshape(-1)[0]).all()):
        raise RegistrationInputError(
            f"{_describe(role, source)} is constant (every voxel = {values.reshape(-1)[0].item():g}); expected an image "
            "with contrast. Check that the right file was given (not an empty mask or a blank export)."
        )


def check_label_values(array: np.ndarray | torch.Tensor, source: Any, role: str = "label map") -> None:
    """Raise unless every voxel of a label map is a finite integer value (a label map is warped by nearest neighbour)."""
    values = torch.as_tensor(array)
    if not values.is_floating_point():
        return
    check_finite(values, source, role)
    non_integer = int((values != torch.round(values)).sum())
    if non_integer:
        example = values[values != torch.round(values)].reshape(-1)[0].item()
        raise RegistrationInputError(
            f"{_describe(role, source)} is not integer-valued ({non_integer} voxels such as {example:g}); expected a "
            "label map with integer label ids. Did you pass an intensity image (or a resampled, interpolated label map)?"
        )


def check_same_grid(
    label_shape: Sequence[int],
    label_affine: np.ndarray,
    image_shape: Sequence[int],
    image_affine: np.ndarray,
    label_source: Any,
    image_source: Any,
    label_role: str = "label map",
    atol_mm: float = 1e-3,
) -> None:
    """Raise unless a label map lies on exactly the same voxel grid (shape and affine) as its image."""
    same_shape = tuple(int(s) for s in label_shape) == tuple(int(s) for s in image_shape)
    same_affine = np.allclose(np.asarray(label_affine, float), np.asarray(image_affine, float), rtol=0.0, atol=atol_mm)
    if not (same_shape and same_affine):
        raise RegistrationInputError(
            f"{_describe(label_role, label_source)} is on a different grid ({describe_grid(label_shape, label_affine)}) "
            f"than its image '{image_source}' ({describe_grid(image_shape, image_affine)}); expected the same shape and "
            "affine. Resample the label map onto its image with nearest-neighbour interpolation."
        )


def load_volume(path: str | os.PathLike, role: str = "image") -> tuple[np.ndarray, np.ndarray]:
    """Read a NIfTI volume completely and return ``(array (X, Y, Z), affine (4, 4))``.

    A 4-D file holding one volume is squeezed to 3-D. The whole voxel stream is decompressed, so a truncated file is
    caught here rather than half-way through a run.

    Raises:
        RegistrationInputError: missing file, not a NIfTI / unreadable / truncated, not 3-D, invalid affine.
    """
    path = check_file_exists(path, role)
    try:
        image = nib.load(str(path))
    except Exception as error:  # nibabel raises ImageFileError, OSError, EOFError, ... depending on the damage
        raise RegistrationInputError(
            f"{_describe(role, path)} could not be read ({type(error).__name__}: {error}); expected {NIFTI_HINT}."
        ) from error
    shape = check_spatial_dims(image.shape, path, role)
    affine = check_affine(image.affine, path, role)
    try:
        data = np.asanyarray(image.dataobj)
    except Exception as error:
        raise RegistrationInputError(
            f"{_describe(role, path)} could not be read ({type(error).__name__}: {error}); expected {NIFTI_HINT}. The "
            "file is probably truncated or corrupt (an incomplete download or copy): copy it again."
        ) from error
    return data.reshape(shape), affine


def validate_image(
    path: str | os.PathLike,
    role: str = "image",
    max_spacing_ratio: float = MAX_SPACING_RATIO,
    min_size: int = MIN_SPATIAL_SIZE,
) -> tuple[tuple[int, int, int], np.ndarray]:
    """Run every single-image check on an intensity image file; return its ``(spatial shape, affine)``."""
    data, affine = load_volume(path, role)
    check_spacing(affine, path, role, max_spacing_ratio)
    check_min_size(data.shape, path, role, min_size)
    check_finite(data, path, role)
    check_not_constant(data, path, role)
    return tuple(data.shape), affine  # type: ignore[return-value]


def validate_label(
    path: str | os.PathLike,
    image_shape: Sequence[int],
    image_affine: np.ndarray,
    image_path: Any,
    role: str = "label map",
) -> None:
    """Check a label map file: readable 3-D, integer-valued and on the same grid as its image."""
    data, affine = load_volume(path, role)
    check_same_grid(data.shape, affine, image_shape, image_affine, path, image_path, role)
    check_label_values(data, path, role)

