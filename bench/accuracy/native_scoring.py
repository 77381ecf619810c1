# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""Scoring of the native-pair benchmark: every method is scored by this code on the fixed image's grid.

* labels are compared on the fixed grid: Dice per seg14 class present in both (unwarped) label maps, their mean, and
  the subcortical mean (classes 1-9 and 11-13, which both label protocols draw alike), and HD95 in mm (95th
  percentile symmetric Hausdorff distance, ``bench.accuracy.metrics.hd95_per_label``: MONAI
  ``compute_hausdorff_distance`` on each class's bounding box + 2 voxels, the fixed image's voxel spacing) per class
  and its mean over the same classes (NaN for a class missing from one map, left out of the mean like a NaN Dice);
* the deformation is judged inside the fixed brain mask (fixed T1 > 0, the scans are skull-stripped): % of voxels
  with det J <= 0 and SDlogJ, the standard deviation of log(clip(det J, 1e-9, 1e9)) as in Learn2Reg;
* :func:`resample_to_grid` moves a volume onto another grid through the world (scanner) coordinates of the two
  NIfTI affines, which is how ``identity`` is scored on native pairs.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from bench.accuracy.metrics import hd95_per_label

__all__ = [
    "SEG14_CLASSES",
    "SUBCORTICAL",
    "dice_scores",
    "hd95_summary",
    "jacobian_stats",
    "resample_to_grid",
    "score_labels",
    "voxel_spacing",
]

SEG14_CLASSES = tuple(range(1, 15))
SUBCORTICAL = (1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 12, 13)
LOG_CLIP = (1e-9, 1e9)


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


def dice_scores(fixed_label: np.ndarray, warped_label: np.ndarray, labels: Sequence[int]) -> dict[int, float]:
    """Dice 2|F∩W| / (|F|+|W|) per label id on one grid.

    Args:
        fixed_label: (X, Y, Z) integer labels of the fixed image.
        warped_label: (X, Y, Z) moving labels on the fixed grid.
        labels: ids to score (a label in neither map scores NaN).

    Returns:
        ``{label: dice}``.
    """
    if fixed_label.shape != warped_label.shape:
        raise ValueError(f"label maps must share one grid, got {fixed_label.shape} and {warped_label.shape}.")
    # one pass of bincount over the joint (fixed, warped) index instead of 2 boolean masks per label
    labels = [int(lab) for lab in labels]
    top = int(max([*labels, int(fixed_label.max()), int(warped_label.max())])) + 1
    f, w = fixed_label.astype(np.int64).ravel(), warped_label.astype(np.int64).ravel()
    counts_f, counts_w = np.bincount(f, minlength=top), np.bincount(w, minlength=top)
    both = np.bincount(f[f == w], minlength=top)
    scores = {}
    for lab in labels:
        denom = counts_f[lab] + counts_w[lab]
        scores[lab] = float("nan") if denom == 0 else 2.0 * float(both[lab]) / float(denom)
    return scores


def jacobian_stats(det: np.ndarray, mask: np.ndarray | None = None) -> dict[str, float]:
    """Folding and smoothness of a deformation from its Jacobian determinant.

    Args:
        det: (X, Y, Z) det J on the fixed grid.
        mask: optional (X, Y, Z) boolean region (the fixed brain); None = the whole grid.

    Returns:
        ``fold_pct`` (% voxels with det J <= 0 in the region), ``sdlogj`` (std of log(clip(det J, 1e-9, 1e9)) in the
        region), ``fold_pct_grid`` (% over the whole grid) and ``det_min``/``det_max`` in the region.
    """
    if det.ndim != 3:
        raise ValueError(f"det must be (X, Y, Z), got shape {det.shape}.")
    if mask is not None and mask.shape != det.shape:
        raise ValueError(f"mask {mask.shape} does not match det {det.shape}.")
    region = det[mask.astype(bool)] if mask is not None else det.ravel()
    if region.size == 0:
        raise ValueError("the Jacobian mask is empty.")
    region = region.astype(np.float64)
    log_det = np.log(np.clip(region, *LOG_CLIP))
    return {
        "fold_pct": 100.0 * float((region <= 0).mean()),
        "sdlogj": float(log_det.std()),
        "fold_pct_grid": 100.0 * float((det <= 0).mean()),
        "det_min": float(region.min()),
        "det_max": float(region.max()),
    }


def _mean(values: list[float]) -> float:
    values = [v for v in values if not np.isnan(v)]
    return float(np.mean(values)) if values else float("nan")


def voxel_spacing(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel size in mm along the three array axes of a 4x4 voxel-to-world affine (its column norms, as
    nibabel's ``get_zooms`` for an image whose header matches its affine)."""
    affine = np.asarray(affine, np.float64)
    if affine.shape != (4, 4):
        raise ValueError(f"affine must be 4x4, got shape {affine.shape}.")
    return tuple(float(v) for v in np.sqrt((affine[:3, :3] ** 2).sum(axis=0)))


def hd95_summary(
    fixed_label: np.ndarray, warped_label: np.ndarray, labels: Sequence[int], spacing: Sequence[float]
) -> dict:
    """``hd95_mean`` (mm, over ``labels``, NaN classes left out) and ``hd95_per_class`` (``{"c": mm}``)."""
    per_class = hd95_per_label(fixed_label, warped_label, [int(c) for c in labels], spacing)
    return {
        "hd95_mean": _mean([per_class[int(c)] for c in labels]),
        "hd95_per_class": {str(int(c)): per_class[int(c)] for c in labels},
    }


def score_labels(
    fixed_label: np.ndarray,
    moving_label: np.ndarray,
    warped_label: np.ndarray,
    classes: Sequence[int] = SEG14_CLASSES,
    spacing: Sequence[float] | None = None,
) -> dict:
    """Dice (and HD95) of the warped moving labels against the fixed labels, over the classes present in both inputs.

    Args:
        fixed_label: (X, Y, Z) fixed labels.
        moving_label: moving labels before warping (any grid; only which classes occur is used).
        warped_label: (X, Y, Z) moving labels on the fixed grid.
        classes: candidate class ids (default the 14 seg14 classes).
        spacing: voxel size (mm) of the fixed grid along its array axes; given, HD95 is scored too.

    Returns:
        ``dice_mean`` (over the classes present in both), ``dice_subcortical`` (classes 1-9, 11-13 among them),
        ``dice_per_class`` and ``classes``; with ``spacing`` also ``hd95_mean`` and ``hd95_per_class`` (mm, the same
        classes).
    """
    present_f, present_m = set(np.unique(fixed_label).tolist()), set(np.unique(moving_label).tolist())
    labels = sorted(int(c) for c in classes if c != 0 and c in present_f and c in present_m)
    per_class = dice_scores(fixed_label, warped_label, labels)
    result = {
        "dice_mean": _mean([per_class[c] for c in labels]),
        "dice_subcortical": _mean([per_class[c] for c in labels if c in SUBCORTICAL]),
        "dice_per_class": {str(c): per_class[c] for c in labels},
        "classes": labels,
    }
    if spacing is not None:
        result.update(hd95_summary(fixed_label, warped_label, labels, spacing))
    return result
