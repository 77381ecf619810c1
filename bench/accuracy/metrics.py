"""Registration accuracy metrics shared by every method of the accuracy benchmark.

All functions take numpy arrays on the fixed image's voxel grid, so that every method (identity, ANTs SyN, the bundle)
is scored by exactly the same code.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = [
    "ddf_from_physical_field",
    "dice_per_label",
    "folding_percentage_numpy",
    "hd95_per_label",
    "jacobian_determinant_numpy",
    "label_boxes",
    "labels_present_in_both",
]


def _check_same_shape(fixed_label: np.ndarray, warped_label: np.ndarray) -> None:
    if fixed_label.shape != warped_label.shape:
        raise ValueError(
            f"label maps must share one grid, got fixed {fixed_label.shape} and warped {warped_label.shape}."
        )


def labels_present_in_both(fixed_label: np.ndarray, moving_label: np.ndarray, candidates: Sequence[int]) -> list[int]:
    """Return the candidate label ids (never 0) that occur in both label maps, sorted.

    Args:
        fixed_label: integer label map of the fixed image, any shape.
        moving_label: integer label map of the moving image (before warping), any shape.
        candidates: label ids to consider.
    """
    in_fixed = set(np.unique(fixed_label).tolist())
    in_moving = set(np.unique(moving_label).tolist())
    return sorted(int(c) for c in candidates if c != 0 and c in in_fixed and c in in_moving)


def dice_per_label(fixed_label: np.ndarray, warped_label: np.ndarray, labels: Sequence[int]) -> dict[int, float]:
    """Dice overlap 2|A∩B| / (|A|+|B|) for each label id.

    Args:
        fixed_label: integer label map (D, H, W).
        warped_label: integer label map (D, H, W) of the moving labels warped onto the fixed grid.
        labels: label ids to score; a label absent from both maps scores NaN (undefined), absent from one scores 0.
    """
    _check_same_shape(fixed_label, warped_label)
    scores = {}
    for label in labels:
        a = fixed_label == label
        b = warped_label == label
        denom = int(a.sum()) + int(b.sum())
        scores[int(label)] = float("nan") if denom == 0 else 2.0 * float(np.logical_and(a, b).sum()) / denom
    return scores


def label_boxes(
    fixed_label: np.ndarray, warped_label: np.ndarray, labels: Sequence[int], margin: int
) -> dict[int, tuple[slice, ...] | None]:
    """Per label id, the bounding box of the label in either map (their union), grown by ``margin`` voxels.

    One ``scipy.ndimage.find_objects`` pass per map instead of two boolean masks of the whole grid per label.

    Args:
        fixed_label: non-negative integer label map (D, H, W).
        warped_label: non-negative integer label map (D, H, W) on the same grid.
        labels: label ids (> 0).
        margin: voxels added on every side, clipped at the grid's edge.

    Returns:
        ``{label: slices}``, ``None`` for a label in neither map.
    """
    from scipy.ndimage import find_objects

    _check_same_shape(fixed_label, warped_label)
    labels = [int(lab) for lab in labels]
    if any(lab <= 0 for lab in labels):
        raise ValueError(f"label ids must be > 0, got {labels}.")
    if not labels:
        return {}
    top = max(labels)
    found = []
    for volume in (fixed_label, warped_label):
        volume = np.asarray(volume)
        if volume.min() < 0:
            raise ValueError("label maps must be non-negative.")
        found.append(find_objects(volume.astype(np.int32, copy=False), max_label=top))
    boxes: dict[int, tuple[slice, ...] | None] = {}
    for lab in labels:
        parts = [f[lab - 1] for f in found if f[lab - 1] is not None]
        if not parts:
            boxes[lab] = None
            continue
        boxes[lab] = tuple(
            slice(max(0, min(p[d].start for p in parts) - margin), min(size, max(p[d].stop for p in parts) + margin))
            for d, size in enumerate(fixed_label.shape)
        )
    return boxes


def hd95_per_label(
    fixed_label: np.ndarray,
    warped_label: np.ndarray,
    labels: Sequence[int],
    spacing: Sequence[float],
    crop_margin: int | None = 2,
) -> dict[int, float]:
    """95th-percentile symmetric Hausdorff distance (in mm) per label, with MONAI's ``compute_hausdorff_distance``.

    This is the one HD95 of the bench (``run.py`` and ``native_scoring.py`` both call it).

    Args:
        fixed_label: integer label map (D, H, W).
        warped_label: integer label map (D, H, W) on the same grid.
        labels: label ids to score; a label missing from either map gives NaN.
        spacing: voxel size in mm along the three array axes.
        crop_margin: each label is scored on the union of its bounding boxes in the two maps grown by this many
            voxels (>= 1), which gives the same distances as the whole grid (MONAI crops to that union with margin
            1 itself, after converting the whole grid) at a fraction of the cost; None = the whole grid.
    """
    # imported here so the ANTs worker (which only needs the numpy helpers) does not pay for importing torch/MONAI
    import torch
    from monai.metrics import compute_hausdorff_distance

    _check_same_shape(fixed_label, warped_label)
    if len(spacing) != 3:
        raise ValueError(f"spacing must have 3 values, got {spacing}.")
    if crop_margin is not None and crop_margin < 1:
        raise ValueError(f"crop_margin must be >= 1 (or None), got {crop_margin}.")
    full = tuple(slice(0, s) for s in fixed_label.shape)
    boxes = label_boxes(fixed_label, warped_label, labels, crop_margin) if crop_margin is not None else {}
    scores = {}
    for label in labels:
        box = boxes.get(int(label)) if crop_margin is not None else full
        if box is None:  # in neither map
            scores[int(label)] = float("nan")
            continue
        a = torch.from_numpy(np.ascontiguousarray(fixed_label[box] == label))[None, None]
        b = torch.from_numpy(np.ascontiguousarray(warped_label[box] == label))[None, None]
        if not a.any() or not b.any():
            scores[int(label)] = float("nan")
            continue
        hd = compute_hausdorff_distance(b, a, include_background=True, percentile=95, spacing=list(spacing))
        scores[int(label)] = float(hd.item())
    return scores


def jacobian_determinant_numpy(ddf: np.ndarray) -> np.ndarray:
    """det(I + ∇u) of a voxel displacement field with central differences (``np.gradient``).

    This is the reference used when the bundle's ``scripts.layers.jacobian`` is not importable; it follows the same convention.

    Args:
        ddf: displacement (3, D, H, W) in voxels, channel i along array axis i.

    Returns:
        det J, shape (D, H, W).
    """
    if ddf.ndim != 4 or ddf.shape[0] != 3:
        raise ValueError(f"ddf must have shape (3, D, H, W), got {ddf.shape}.")
    # grads[i][j] = d u_i / d x_j
    grads = [np.gradient(ddf[i].astype(np.float64)) for i in range(3)]
    jac = np.empty((3, 3) + ddf.shape[1:], dtype=np.float64)
    for i in range(3):
        for j in range(3):
            jac[i, j] = grads[i][j] + (1.0 if i == j else 0.0)
    det = (
        jac[0, 0] * (jac[1, 1] * jac[2, 2] - jac[1, 2] * jac[2, 1])
        - jac[0, 1] * (jac[1, 0] * jac[2, 2] - jac[1, 2] * jac[2, 0])
        + jac[0, 2] * (jac[1, 0] * jac[2, 1] - jac[1, 1] * jac[2, 0])
    )
    return det.astype(np.float32)


def folding_percentage_numpy(det: np.ndarray) -> float:
    """Percentage of voxels whose Jacobian determinant is ≤ 0 (folded)."""
    if det.size == 0:
        raise ValueError("det must not be empty.")
    return 100.0 * float((det <= 0).sum()) / det.size


def ddf_from_physical_field(field: np.ndarray, direction: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """Convert a displacement field given in world units (ITK/ANTs, mm) to voxel units along the array axes.

    A world displacement v corresponds to the index displacement (D·diag(s))⁻¹ v, where D is the grid's direction
    matrix and s its spacing, both in the same world frame as v.

    Args:
        field: (D, H, W, 3) world displacement per voxel (ANTs' ``numpy()`` layout of a vector image).
        direction: 3×3 direction matrix of the grid.
        spacing: voxel sizes (3,).

    Returns:
        (3, D, H, W) displacement in voxels, channel i along array axis i.
    """
    if field.ndim != 4 or field.shape[-1] != 3:
        raise ValueError(f"field must have shape (D, H, W, 3), got {field.shape}.")
    to_index = np.linalg.inv(np.asarray(direction, dtype=np.float64) @ np.diag(np.asarray(spacing, dtype=np.float64)))
    ddf = np.einsum("ij,dhwj->idhw", to_index, field.astype(np.float64))
    return ddf.astype(np.float32)
