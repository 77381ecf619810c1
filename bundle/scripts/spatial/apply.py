# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""
Applying a registration's saved transforms to any image or label map, like ``antsApplyTransforms``.

* Forward (``inverse=False``): a MOVING-space image resampled on the FIXED grid. For a fixed voxel ``p`` the sampled
  moving voxel is ``M^-1 T F (p + ddf(p))`` (``F``, ``M``: voxel-to-world matrices of fixed and moving image; first the
  warp, then the affine). Same as ``ants.apply_transforms(fixed, moving, [warp, affine])``.
* Inverse (``inverse=True``): a FIXED-space image resampled on the MOVING grid: for a moving voxel ``q``,
  ``y = F^-1 T^-1 M q`` (fixed voxels), then the fixed image is sampled at ``y + v(y)`` (``v`` = inverse warp, on the
  fixed grid). Same as ``ants.apply_transforms(moving, fixed, [affine, inverse_warp], whichtoinvert=[True, False])``.

The whole map is composed first and the image interpolated once, in torch (``grid_sample``, ``align_corners=True``,
nearest for labels, which keep their integer dtype), one slab of the reference grid at a time: a CT-sized output never
holds its whole (float64) point map. Outside the source's field of view an image gets its background
(its minimum unless given: a CT reads air there, not 0 HU soft tissue), a label map 0. With no affine and a moving
image on the fixed grid whose minimum is 0 the result equals the bundle's own warp (``warp(moving, ddf)``) bit for bit.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np
import torch

from scripts.io.atomic import save_nifti
from scripts.io.errors import RegistrationInputError
from scripts.io.input_checks import describe_grid, same_grid
from scripts.layers.intensity import background_per_key, resolve_background
from scripts.layers.sampling import SLAB_VOXELS, apply_matrix, sample_at_voxels, sample_in_slabs, voxel_grid

from .itk_files import TransformFileError
from .transform_set import SavedTransforms, load_transforms
from .world import as_matrix4

__all__ = ["INTERPOLATIONS", "apply_transforms", "resample_with_transforms", "voxel_point_map"]

INTERPOLATIONS = {"linear": "bilinear", "nearest": "nearest"}


def _open(image, role: str) -> tuple[nib.spatialimages.SpatialImage, str]:
    """A nibabel image and a name for messages, from a path or an image."""
    if isinstance(image, nib.spatialimages.SpatialImage):
        return image, f"{role} (in-memory image)"
    path = Path(image)
    if not path.is_file():
        raise RegistrationInputError(f"{role} '{path}' does not exist (or is not a file).")
    try:
        return nib.load(str(path)), f"{role} '{path}'"
    except Exception as error:  # ImageFileError, OSError, EOFError, ...
        raise RegistrationInputError(f"{role} '{path}' could not be read ({type(error).__name__}: {error}).") from error


def _grid(image: nib.spatialimages.SpatialImage, name: str) -> tuple[tuple[int, int, int], np.ndarray]:
    if len(image.shape) not in (3, 4):
        raise RegistrationInputError(f"{name} must be 3-D (X, Y, Z) or 4-D (X, Y, Z, C), got shape {image.shape}.")
    return tuple(int(s) for s in image.shape[:3]), as_matrix4(image.affine, f"affine of {name}")


def _data(image: nib.spatialimages.SpatialImage, name: str) -> np.ndarray:
    try:
        data = np.asanyarray(image.dataobj)
    except Exception as error:  # truncated / corrupt voxel stream
        raise RegistrationInputError(f"{name} could not be read ({type(error).__name__}: {error}).") from error
    return data if data.ndim == 4 else data[..., None]


def _is_identity(matrix: np.ndarray) -> bool:
    return bool(np.allclose(matrix, np.eye(4), rtol=0.0, atol=1e-9))


def _check_field_grid(transforms: SavedTransforms, shape, affine, fixed_name: str) -> None:
    if transforms.field is not None and not same_grid(
        transforms.field.shape[1:], transforms.field_affine, shape, affine
    ):
        raise TransformFileError(
            f"the displacement field '{transforms.field_path}' is on the grid "
            f"{describe_grid(transforms.field.shape[1:], transforms.field_affine)}, but the {fixed_name} is on "
            f"{describe_grid(shape, affine)}; expected the fixed image the registration was computed for."
        )


def voxel_point_map(
    transforms: SavedTransforms, fixed_grid, moving_grid, inverse: bool = False, device: torch.device | str = "cpu"
) -> Callable[[int, int], torch.Tensor]:
    """Where reference voxels sample the source image, one slab of the reference grid at a time.

    Args:
        transforms: from :func:`scripts.spatial.transform_set.load_transforms` (its field on the fixed grid).
        fixed_grid, moving_grid: ``(shape, affine)`` of the fixed and moving image.
        inverse: False: reference = fixed grid, source = moving image; True: the other way round.
        device: where to compute.

    Returns:
        ``coords_of_slab(start, stop)`` -> (1, 3, X, Y, stop - start) source voxel indices of the reference voxels
        ``[..., start:stop]``: float32 when only a field moves the points (so that they match the bundle's warp
        exactly), float64 when a matrix does (world matrices compose voxel, mm and affine scales; sampling rounds the
        points to float32 once, at the end). Each point is computed alone, so slabs give the whole map's values.
    """
    (fixed_shape, fixed_affine), (moving_shape, moving_affine) = fixed_grid, moving_grid
    world = transforms.affine if transforms.affine is not None else np.eye(4)
    field = None
    if transforms.field is not None:
        field = torch.as_tensor(transforms.field, device=device)[None]
    if not inverse:  # fixed voxel -> (+ u) -> fixed world -> T -> moving world -> moving voxel
        post = np.linalg.inv(moving_affine) @ world @ fixed_affine
        dtype = torch.float32 if field is not None and _is_identity(post) else torch.float64
        post_matrix = None if _is_identity(post) else torch.as_tensor(post)

        def forward_slab(start: int, stop: int) -> torch.Tensor:
            coords = _slab_grid(fixed_shape, start, stop, device, dtype)
            if field is not None:
                coords = coords + field[..., start:stop].to(dtype)
            return coords if post_matrix is None else apply_matrix(post_matrix, coords)

        return forward_slab
    pre = np.linalg.inv(fixed_affine) @ np.linalg.inv(world) @ moving_affine  # moving voxel -> fixed voxel
    dtype = torch.float32 if field is not None and _is_identity(pre) else torch.float64
    pre_matrix = None if _is_identity(pre) else torch.as_tensor(pre)
    field = None if field is None else field.to(dtype)  # sampled by every slab: converted once

    def inverse_slab(start: int, stop: int) -> torch.Tensor:
        coords = _slab_grid(moving_shape, start, stop, device, dtype)
        if pre_matrix is not None:
            coords = apply_matrix(pre_matrix, coords)
        if field is not None:  # then y -> y + v(y), v interpolated on the fixed grid
            coords = coords + sample_at_voxels(field, coords, "bilinear", "border")
        return coords

    return inverse_slab


def _slab_grid(shape, start: int, stop: int, device, dtype: torch.dtype) -> torch.Tensor:
    """(1, 3, X, Y, stop - start) voxel indices of the slab ``[..., start:stop]`` of a grid of spatial ``shape``."""
    grid = voxel_grid([int(shape[0]), int(shape[1]), stop - start], device, dtype)
    grid[2] += start  # integers: exact in float32 and float64
    return grid.unsqueeze(0)


def resample_with_transforms(
    volume: torch.Tensor, transforms: SavedTransforms, fixed_grid, moving_grid, mode: str, padding_value: float,
    inverse: bool = False, device: torch.device | str = "cpu", max_voxels: int = SLAB_VOXELS,
) -> torch.Tensor:
    """The source volume sampled on the reference grid through the transforms, one slab of the reference at a time
    (:func:`scripts.layers.sampling.sample_in_slabs`: equal to the whole map's result bit for bit, with one slab of
    coordinates in memory: a 512 x 512 x 400 map would take 2.5 GB per float64 copy).

    Args:
        volume: (1, C, X, Y, Z) source: the moving image (forward) or the fixed-space image (``inverse``).
        transforms, fixed_grid, moving_grid, inverse, device: as :func:`voxel_point_map`.
        mode: "bilinear" or "nearest" (integer label maps keep their dtype).
        padding_value: the value outside the source's field of view (its background; 0 for label maps).
        max_voxels: reference voxels per slab.

    Returns:
        (1, C, X', Y', Z') on the reference grid.
    """
    reference_shape = [int(s) for s in (moving_grid[0] if inverse else fixed_grid[0])]
    point_map = voxel_point_map(transforms, fixed_grid, moving_grid, inverse, device)
    return sample_in_slabs(volume, point_map, reference_shape, mode, "zeros", padding_value, max_voxels)


def _output_image(data: np.ndarray, reference: nib.spatialimages.SpatialImage, affine: np.ndarray) -> nib.Nifti1Image:
    image = nib.Nifti1Image(data, affine)
    codes = []
    for key in ("qform_code", "sform_code"):  # keep the reference's codes (scanner / aligned / MNI ...); 1 when unset
        try:
            codes.append(int(reference.header[key]) or 1)
        except (KeyError, TypeError, ValueError):  # not a NIfTI reference
            codes.append(1)
    image.set_qform(affine, code=codes[0])
    image.set_sform(affine, code=codes[1])
    image.header.set_xyzt_units("mm")
    return image


def apply_transforms(
    fixed,
    moving,
    transform_dir: str | os.PathLike,
    interpolation: str = "linear",
    inverse: bool = False,
    out_path: str | os.PathLike | None = None,
    device: torch.device | str = "cpu",
    background: float | str | None = None,
) -> nib.Nifti1Image:
    """Warp an image or label map with the transforms saved in ``transform_dir`` (``affine.mat``, ``warp.nii.gz``).

    Args:
        fixed: the fixed image (path or nibabel image): the reference grid of the forward direction, and the image
            that is warped when ``inverse`` is True.
        moving: the moving-space image (path or nibabel image): warped in the forward direction, the reference grid
            when ``inverse`` is True. 3-D, or 4-D with channels last.
        transform_dir: folder of the registration's transforms (any of them may be absent, not all).
        interpolation: "linear" (trilinear; output float32) or "nearest" (label maps keep their integer dtype).
        inverse: map the fixed-space image onto the moving grid (uses ``inverse_warp.nii.gz``, or inverts
            ``warp.nii.gz`` on the fly when that is missing).
        out_path: optional NIfTI file to write atomically.
        device: torch device for the resampling.
        background: value outside the source's field of view: ``"auto"`` (its minimum) or a number (e.g. -1024 for
            CT); None: ``"auto"`` for "linear", 0 for "nearest" (what ``register`` writes into ``warped_image`` /
            ``warped_label``).

    Returns:
        The warped image on the reference grid, with the reference's affine.

    Raises:
        TransformFileError: missing or corrupt transform files, or a field on a grid other than the fixed image's.
        RegistrationInputError: unreadable images.
    """
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {sorted(INTERPOLATIONS)}, got {interpolation!r}.")
    fixed_image, fixed_name = _open(fixed, "fixed image")
    moving_image, moving_name = _open(moving, "moving image")
    fixed_grid, moving_grid = _grid(fixed_image, fixed_name), _grid(moving_image, moving_name)
    transforms = load_transforms(transform_dir, inverse=inverse)
    _check_field_grid(transforms, *fixed_grid, fixed_name)
    source, source_name = (fixed_image, fixed_name) if inverse else (moving_image, moving_name)
    reference, reference_affine = (moving_image, moving_grid[1]) if inverse else (fixed_image, fixed_grid[1])
    data = _data(source, source_name)
    keep_integer = interpolation == "nearest" and np.issubdtype(data.dtype, np.integer)
    channels = np.ascontiguousarray(np.moveaxis(data, -1, 0))
    channels = channels.astype(np.int64 if keep_integer else np.float32, copy=False)  # torch lacks most uint ops
    volume = torch.as_tensor(channels, device=device)[None]
    padding = resolve_background(volume, background_per_key(background, [INTERPOLATIONS[interpolation]])[0])
    mode = INTERPOLATIONS[interpolation]
    warped = resample_with_transforms(volume, transforms, fixed_grid, moving_grid, mode, padding, inverse, device)[0]
    out = np.moveaxis(warped.cpu().numpy(), 0, -1)
    out = out.astype(data.dtype) if keep_integer else out
    out = out[..., 0] if out.shape[-1] == 1 and len(source.shape) == 3 else out
    result = _output_image(out, reference, reference_affine)
    if out_path is not None:
        save_nifti(result, out_path)
    return result
