# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""What makes a registration input acceptable: each problem is one clear message naming the file.

Two kinds of checks, run at two moments of a pair (``scripts.io.input_transforms``):

- **header checks**, before any voxel is decoded (a NIfTI header is a few hundred bytes): the file exists and is a
  readable 3-D NIfTI, its voxel-to-world matrix is finite, invertible, not sheared and agreed on by qform and sform,
  its voxels are not extremely anisotropic, it is large enough for the network, a label map lies on its image's grid
  and moving and fixed overlap in world space;
- **content checks**, on the decoded volume: finite values, some contrast, integer label ids.

Every message says what was wrong, what was expected and which file (``docs/troubleshooting.md`` lists them all).
Policy choices, all overridable by arguments:

- ``MAX_SPACING_RATIO = 5``: largest/smallest voxel spacing above 5 (e.g. 1 x 1 x 6 mm) is refused, because the network
  works in voxel units and its 3x3x3 kernels and smoothness penalty then mean very different things along each axis.
- ``MIN_SPATIAL_SIZE = 16``: the encoder pools four times, so its coarsest level works at 1/16 resolution.
- ``MIN_FOV_OVERLAP = 0.1``: without the affine stage, moving and fixed must already share at least 10 % of the smaller
  field of view (world-space bounding boxes), else registration cannot recover the misplacement.
- ``HEADER_ATOL = 1e-3``: qform and sform (mm, and direction cosines, ~0.06 degrees) and label/image grids (mm) agree
  within it; float32 headers round at about 1e-5.
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
    "HEADER_ATOL",
    "NIFTI_HINT",
    "ROLES",
    "voxel_spacing",
    "describe_grid",
    "same_grid",
    "check_file_exists",
    "stored_shape_problem",
    "header_problem",
    "read_header",
    "check_spatial_dims",
    "check_affine",
    "check_qform_sform",
    "check_not_sheared",
    "check_spacing",
    "check_min_size",
    "check_label_grid",
    "fov_overlap_fraction",
    "compare_pair_grids",
    "check_finite",
    "check_not_constant",
    "check_label_values",
    "check_mask_values",
]

MAX_SPACING_RATIO = 5.0
MIN_SPATIAL_SIZE = 16
MIN_FOV_OVERLAP = 0.1
HEADER_ATOL = 1e-3
NIFTI_HINT = "a readable 3-D NIfTI file (.nii or .nii.gz)"
#: data key of a pair -> its role in messages
ROLES = {
    "moving_image": "moving image",
    "fixed_image": "fixed image",
    "moving_label": "moving label map",
    "fixed_label": "fixed label map",
    "moving_mask": "moving mask",
    "fixed_mask": "fixed mask",
}


def _describe(role: str, source: Any) -> str:
    return f"{role} '{source}'"


def voxel_spacing(affine: np.ndarray) -> np.ndarray:
    """Voxel size (mm) along each array axis: the lengths of the affine's first three columns (works when oblique)."""
    return np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)


def describe_grid(shape: Sequence[int], affine: np.ndarray) -> str:
    """One-line description of a voxel grid for messages: shape, spacing, orientation codes and origin."""
    affine = np.asarray(affine, dtype=np.float64)
    spacing = "x".join(f"{s:.4g}" for s in voxel_spacing(affine))
    codes = "".join(nib.aff2axcodes(affine))
    origin = ", ".join(f"{v:.4g}" for v in affine[:3, 3])
    return f"{'x'.join(str(int(s)) for s in shape)} voxels of {spacing} mm, {codes}, origin ({origin}) mm"


def same_grid(
    shape_a: Sequence[int], affine_a: Any, shape_b: Sequence[int], affine_b: Any, atol_mm: float = HEADER_ATOL
) -> bool:
    """True when two grids have the same shape and voxel-to-world matrices equal to ``atol_mm`` (float32 headers)."""
    if tuple(int(s) for s in shape_a) != tuple(int(s) for s in shape_b):
        return False
    return bool(np.allclose(np.asarray(affine_a, float), np.asarray(affine_b, float), rtol=0.0, atol=atol_mm))


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


def header_problem(path: Path) -> str | None:
    """What is wrong with a file as a 3-D NIfTI input, from its header only (None when fine): for datalist checks."""
    if not path.exists():
        return "does not exist"
    if not path.is_file():
        return "is not a file"
    try:
        shape = tuple(int(s) for s in nib.load(str(path)).shape)
    except Exception as error:
        return f"is not a readable NIfTI file ({type(error).__name__}: {error})"
    return stored_shape_problem(shape)


def read_header(path: str | os.PathLike, role: str = "image") -> nib.spatialimages.SpatialImage:
    """Open a NIfTI file lazily (its header only: no voxel is decoded) and refuse what cannot be one.

    Raises:
        RegistrationInputError: missing file, or not a readable NIfTI header.
    """
    path = check_file_exists(path, role)
    try:
        return nib.load(str(path))
    except Exception as error:  # nibabel raises ImageFileError, OSError, EOFError, ... depending on the damage
        raise RegistrationInputError(
            f"{_describe(role, path)} could not be read ({type(error).__name__}: {error}); expected {NIFTI_HINT}."
        ) from error


def check_spatial_dims(shape: Sequence[int], source: Any, role: str = "image") -> tuple[int, int, int]:
    """Return the 3-D spatial shape of a stored volume, accepting a 4-D volume with exactly one time point/channel.

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


def _matrix_text(matrix: np.ndarray) -> str:
    return "[" + "; ".join(" ".join(f"{v:.4g}" for v in row) for row in np.asarray(matrix)[:3]) + "]"


def check_qform_sform(header: nib.Nifti1Header, source: Any, role: str = "image", atol: float = HEADER_ATOL) -> None:
    """Raise when qform and sform are both set (codes > 0) and place the voxels differently.

    nibabel (and so MONAI and this bundle) follows the sform, ITK may follow the qform: the transforms written for such a
    file would be right here and wrong where ANTs, SimpleITK or 3D Slicer apply them. Refusing is the only answer that
    is right everywhere; the user decides which matrix is true.
    """
    if not isinstance(header, nib.Nifti1Header):
        return
    qform, qcode = header.get_qform(coded=True)
    sform, scode = header.get_sform(coded=True)
    if qform is None or sform is None or not qcode or not scode:
        return
    qspacing, sspacing = voxel_spacing(qform), voxel_spacing(sform)
    translation = float(np.abs(qform[:3, 3] - sform[:3, 3]).max())
    directions = float(np.abs(qform[:3, :3] / qspacing - sform[:3, :3] / sspacing).max())
    spacing = float(np.abs(qspacing - sspacing).max())
    if max(translation, spacing) > atol or directions > atol:
        raise RegistrationInputError(
            f"{_describe(role, source)} has a qform {_matrix_text(qform)} (code {int(qcode)}) and an sform "
            f"{_matrix_text(sform)} (code {int(scode)}) that disagree (by up to {max(translation, spacing):.3g} mm, "
            f"{directions:.3g} in direction cosines); expected one voxel-to-world placement, because tools differ in "
            "which one they follow (nibabel/MONAI the sform, ITK/ANTs often the qform). Decide which is right and "
            "re-save the file with both equal, e.g. in Python: img.set_qform(img.get_sform(), code=1) then "
            "nib.save(img, path) (or FSL: fslorient -copysform2qform)."
        )


def check_not_sheared(affine: np.ndarray, source: Any, role: str = "image", atol: float = HEADER_ATOL) -> None:
    """Raise when the voxel axes are not perpendicular in world space (a sheared grid, e.g. a gantry-tilted CT).

    ITK images, hence every ITK/ANTs transform and resampling, have an orthonormal direction matrix: a sheared grid
    cannot be written as ``affine.mat``/``warp.nii.gz`` nor resampled by those tools as the bundle does.
    """
    affine = np.asarray(affine, dtype=np.float64)
    directions = affine[:3, :3] / voxel_spacing(affine)
    skew = float(np.abs(directions.T @ directions - np.eye(3)).max())
    if skew > atol:
        angle = float(np.degrees(np.arcsin(min(1.0, skew))))
        raise RegistrationInputError(
            f"{_describe(role, source)} has a sheared voxel grid (axes {angle:.2g} degrees from perpendicular; "
            f"affine {_matrix_text(affine)}); expected perpendicular voxel axes, as ITK/ANTs transforms require. This "
            "is typical of a CT with gantry tilt: convert it with tilt correction (dcm2niix does by default) or "
            "resample it onto a non-sheared grid first."
        )


def check_spacing(affine: np.ndarray, source: Any, role: str = "image", max_ratio: float = MAX_SPACING_RATIO) -> None:
    """Raise when the largest voxel spacing exceeds ``max_ratio`` times the smallest (see the module docstring)."""
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


def check_label_grid(
    label_shape: Sequence[int],
    label_affine: np.ndarray,
    image_shape: Sequence[int],
    image_affine: np.ndarray,
    label_source: Any,
    image_source: Any,
    label_role: str = "label map",
) -> None:
    """Raise unless a label map lies on exactly the same voxel grid (shape and affine) as its image."""
    if not same_grid(label_shape, label_affine, image_shape, image_affine):
        raise RegistrationInputError(
            f"{_describe(label_role, label_source)} is on a different grid ({describe_grid(label_shape, label_affine)}) "
            f"than its image '{image_source}' ({describe_grid(image_shape, image_affine)}); expected the same shape and "
            "affine. Resample the label map onto its image with nearest-neighbour interpolation."
        )


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
) -> bool:
    """Decide how moving and fixed relate: same grid (False), resampling onto the fixed grid needed (True), or too far
    apart in world space (raises: less than ``min_overlap`` of the smaller field of view shared)."""
    if same_grid(moving_shape, moving_affine, fixed_shape, fixed_affine):
        return False
    overlap = fov_overlap_fraction(moving_shape, moving_affine, fixed_shape, fixed_affine)
    if overlap < min_overlap:
        raise RegistrationInputError(
            f"moving image '{moving_source}' ({describe_grid(moving_shape, moving_affine)}) and fixed image "
            f"'{fixed_source}' ({describe_grid(fixed_shape, fixed_affine)}) have {'no' if overlap == 0 else 'almost no'} "
            f"physical overlap ({100 * overlap:.1f} % of the smaller field of view); expected affinely pre-aligned "
            f"images whose fields of view overlap by at least {100 * min_overlap:g} %. Keep the affine stage on "
            "(--affine affine), align them first (ANTs, FSL flirt) or check the headers' origins."
        )
    return True


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


def check_mask_values(array: np.ndarray | torch.Tensor, source: Any, role: str = "mask") -> None:
    """Raise unless a mask is finite and marks at least one voxel (values > 0 are inside)."""
    values = torch.as_tensor(array)
    check_finite(values, source, role)
    if not bool((values > 0).any()):
        raise RegistrationInputError(
            f"{_describe(role, source)} is empty (no voxel > 0); expected a mask of the region to register (e.g. the "
            "brain), values > 0 inside. Check that the right file was given."
        )
