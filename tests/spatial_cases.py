# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""Shared cases of the ``scripts.spatial`` tests: the shipped pair at 3 mm on two different grids, a known rotation,
a smooth synthetic displacement field, and SimpleITK as the independent resampler."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
from conftest import SAMPLE_PAIR
from workflow_data import downsample_volume

__all__ = [
    "FACTOR",
    "brain_correlation",
    "make_case",
    "mean_dice",
    "rotation_ras",
    "sitk_affine",
    "sitk_displacement",
    "sitk_resample",
    "smooth_ddf",
]

FACTOR = 3  # 160x192x160 at 1 mm -> 53x64x53 at 3 mm
MOVING_PAD = (
    (4, 2),
    (3, 5),
    (2, 4),
)  # zero voxels added at (start, end) per axis: the moving grid differs from the fixed


def _pad(image: nib.Nifti1Image, pad) -> nib.Nifti1Image:
    """Zero-pad (the brain fills the shipped grid to its edges; padding keeps all of it inside the moving grid)."""
    data = np.pad(np.asarray(image.dataobj), pad)
    affine = image.affine.copy()
    affine[:3, 3] = image.affine[:3, :3] @ -np.array([a for a, _ in pad], float) + image.affine[:3, 3]
    return nib.Nifti1Image(data, affine)


def rotation_ras(centre, degrees_z: float = 7.0, degrees_x: float = -4.0, translation=(2.5, -3.0, 4.0)) -> np.ndarray:
    """A rigid RAS transform (fixed world -> moving world): rotation about ``centre`` (mm) then a translation."""
    az, ax = np.deg2rad(degrees_z), np.deg2rad(degrees_x)
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    rotation = rz @ rx
    transform = np.eye(4)
    transform[:3, :3] = rotation
    transform[:3, 3] = np.asarray(centre) - rotation @ np.asarray(centre) + np.asarray(translation)
    return transform


def smooth_ddf(shape, amplitude: float = 2.0) -> np.ndarray:
    """(3, X, Y, Z) float32 smooth displacement in voxels, up to ``amplitude`` voxels, |grad| about 0.2."""
    x, y, z = np.meshgrid(*[np.arange(s, dtype=np.float64) / s for s in shape], indexing="ij")
    u0 = amplitude * np.sin(2 * np.pi * y) * np.cos(np.pi * z)
    u1 = 0.75 * amplitude * np.sin(2 * np.pi * z + 0.5) * np.cos(np.pi * x)
    u2 = 0.9 * amplitude * np.cos(2 * np.pi * x) * np.sin(np.pi * y)
    return np.stack([u0, u1, u2]).astype(np.float32)


def make_case(folder: Path) -> dict:
    """Write the shipped pair at 3 mm into ``folder``: fixed on the downsampled grid, moving zero-padded onto another grid.

    Returns a dict of paths (``fixed``, ``fixed_label``, ``moving``, ``moving_label``) plus ``fixed_affine``,
    ``fixed_shape``, ``rotation`` (RAS, about the fixed image's centre) and ``ddf`` (3, X, Y, Z) on the fixed grid.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    case = {}
    for key, role, label in (
        ("fixed", "fixed_image", False),
        ("fixed_label", "fixed_label", True),
        ("moving", "moving_image", False),
        ("moving_label", "moving_label", True),
    ):
        image = downsample_volume(SAMPLE_PAIR[role], FACTOR, label)
        image = _pad(image, MOVING_PAD) if key.startswith("moving") else image
        case[key] = folder / f"{key}.nii.gz"
        nib.save(image, str(case[key]))
    fixed = nib.load(str(case["fixed"]))
    case["fixed_affine"], case["fixed_shape"] = fixed.affine, fixed.shape
    centre = fixed.affine[:3, :3] @ ((np.array(fixed.shape) - 1) / 2.0) + fixed.affine[:3, 3]
    case["rotation"] = rotation_ras(centre)
    case["ddf"] = smooth_ddf(fixed.shape)
    return case


def mean_dice(a: np.ndarray, b: np.ndarray) -> float:
    """Mean Dice over the foreground labels present in ``a``."""
    labels = [v for v in np.unique(a) if v != 0]
    scores = [2.0 * np.sum((a == v) & (b == v)) / (np.sum(a == v) + np.sum(b == v)) for v in labels]
    return float(np.mean(scores))


def brain_correlation(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    """Pearson correlation of two images inside ``mask``."""
    return float(np.corrcoef(np.asarray(a, float)[mask], np.asarray(b, float)[mask])[0, 1])


def sitk_affine(transform_ras: np.ndarray):
    """An independent SimpleITK AffineTransform of a RAS matrix (LPS conversion written out here, not imported)."""
    import SimpleITK as sitk

    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    lps = flip @ transform_ras @ flip
    affine = sitk.AffineTransform(3)
    affine.SetMatrix(lps[:3, :3].ravel().tolist())
    affine.SetTranslation(lps[:3, 3].tolist())
    return affine


def sitk_displacement(path):
    """A SimpleITK DisplacementFieldTransform from an ITK displacement field file."""
    import SimpleITK as sitk

    return sitk.DisplacementFieldTransform(sitk.ReadImage(str(path), sitk.sitkVectorFloat64))


def sitk_resample(image_path, reference_path, transform, label: bool = False) -> np.ndarray:
    """Resample with SimpleITK (zero outside); returns the array in nibabel's (X, Y, Z) order."""
    import SimpleITK as sitk

    image = sitk.ReadImage(str(image_path))
    reference = sitk.ReadImage(str(reference_path))
    interpolator = sitk.sitkNearestNeighbor if label else sitk.sitkLinear
    pixel = image.GetPixelID() if label else sitk.sitkFloat32
    out = sitk.Resample(image, reference, transform, interpolator, 0.0, pixel)
    return sitk.GetArrayFromImage(out).transpose(2, 1, 0)
