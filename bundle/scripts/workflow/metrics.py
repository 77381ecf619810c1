# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""Registration quality metrics of one pair: per-label Dice and HD95 (MONAI metrics), folding and SSIM."""

from __future__ import annotations

import logging
import math
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from monai.metrics import SSIMMetric, compute_dice, compute_hausdorff_distance

__all__ = ["dice_per_label", "hd95_per_label", "label_one_hot", "present_labels", "registration_metrics"]

logger = logging.getLogger(__name__)


def present_labels(*labels: torch.Tensor) -> list[int]:
    """Sorted non-zero label ids present in any of the given label maps."""
    ids: set[int] = set()
    for label in labels:
        if label is not None:
            ids.update(int(v) for v in torch.unique(torch.as_tensor(label)).tolist())
    ids.discard(0)
    return sorted(ids)


def label_one_hot(label: torch.Tensor, label_ids: Sequence[int]) -> torch.Tensor:
    """
    Args:
        label: (1, D, H, W) integer label map.
        label_ids: ids to encode, one channel each (background is not a channel).

    Returns:
        (1, len(label_ids), D, H, W) float one-hot tensor.
    """
    label = torch.as_tensor(label)
    if label.ndim != 4 or label.shape[0] != 1:
        raise ValueError(f"label must have shape (1, D, H, W), got {tuple(label.shape)}.")
    if not label_ids:
        raise ValueError("label_ids is empty: no structure to evaluate.")
    rounded = torch.round(label.float())
    return torch.cat([(rounded == float(i)) for i in label_ids], dim=0)[None].float()


def dice_per_label(pred: torch.Tensor, reference: torch.Tensor, label_ids: Sequence[int]) -> list[float]:
    """
    Dice of each label id between two (1, D, H, W) label maps (MONAI ``compute_dice``); NaN where the label is
    absent from both maps.
    """
    p, r = label_one_hot(pred, label_ids), label_one_hot(reference, label_ids)
    dice = compute_dice(p, r, include_background=True, ignore_empty=False)[0]
    absent = (p.sum(dim=(0, 2, 3, 4)) == 0) & (r.sum(dim=(0, 2, 3, 4)) == 0)
    dice[absent] = float("nan")
    return [float(v) for v in dice]


def hd95_per_label(
    pred: torch.Tensor, reference: torch.Tensor, label_ids: Sequence[int], spacing: Sequence[float] | None = None
) -> list[float]:
    """95th-percentile symmetric Hausdorff distance (mm when ``spacing`` is given) per label; NaN if a map lacks it."""
    p, r = label_one_hot(pred, label_ids), label_one_hot(reference, label_ids)
    hd = compute_hausdorff_distance(p, r, include_background=True, percentile=95, spacing=spacing)[0]
    missing = (p.sum(dim=(0, 2, 3, 4)) == 0) | (r.sum(dim=(0, 2, 3, 4)) == 0)
    hd[missing] = float("nan")
    return [float(v) for v in hd]


def _nanmean(values: Sequence[float]) -> float:
    finite = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(finite)) if finite else float("nan")


def registration_metrics(
    fixed_label: torch.Tensor,
    warped_label: torch.Tensor,
    moving_label: torch.Tensor | None = None,
    label_ids: Sequence[int] | None = None,
    label_names: Mapping[Any, str] | None = None,
    jacobian_det: torch.Tensor | None = None,
    warped_image: torch.Tensor | None = None,
    fixed_image: torch.Tensor | None = None,
    spacing: Sequence[float] | None = None,
    hd95: bool = False,
    ssim: bool = False,
) -> dict[str, Any]:
    """
    Metrics of one registered pair, all on the fixed image's grid.

    Args:
        fixed_label: (1, D, H, W) fixed label map.
        warped_label: (1, D, H, W) moving label map warped by the field (nearest).
        moving_label: (1, D, H, W) moving label map on the fixed grid before warping, for the identity ("before")
            Dice; optional.
        label_ids: ids to evaluate (default: non-zero ids present in the fixed or moving label map).
        label_names: optional id -> name for reports.
        jacobian_det: (1, D, H, W) Jacobian determinant of the transform; adds the % of voxels with det <= 0.
        warped_image, fixed_image: (1, D, H, W) intensity images in [0, 1]; with ``ssim`` adds their SSIM.
        spacing: voxel size in mm, for HD95.
        hd95: compute per-label HD95 (slower).
        ssim: compute SSIM of the warped vs the fixed image.

    Returns:
        dict with ``labels`` (per-label rows), ``mean_dice``, optionally ``mean_dice_identity``, ``mean_hd95``,
        ``percent_non_positive_jacobian``, ``ssim``.
    """
    ids = list(label_ids) if label_ids else present_labels(fixed_label, moving_label if moving_label is not None else warped_label)
    names = {str(k): v for k, v in (label_names or {}).items()}
    dice = dice_per_label(warped_label, fixed_label, ids)
    rows: list[dict[str, Any]] = [{"label": i, "name": names.get(str(i), str(i)), "dice": dv} for i, dv in zip(ids, dice)]
    result: dict[str, Any] = {"label_ids": ids, "mean_dice": _nanmean(dice)}
    if moving_label is not None:
        before = dice_per_label(moving_label, fixed_label, ids)
        for row, value in zip(rows, before):
            row["dice_identity"] = value
        result["mean_dice_identity"] = _nanmean(before)
    if hd95:
        distances = hd95_per_label(warped_label, fixed_label, ids, spacing)
        for row, value in zip(rows, distances):
            row["hd95"] = value
        result["mean_hd95"] = _nanmean(distances)
    if jacobian_det is not None:
        det = torch.as_tensor(jacobian_det)
        result["percent_non_positive_jacobian"] = float((det <= 0).float().mean() * 100.0)
    if ssim:
        if warped_image is None or fixed_image is None:
            raise ValueError("ssim=True needs warped_image and fixed_image.")
        metric = SSIMMetric(spatial_dims=3, data_range=1.0)
        result["ssim"] = float(metric(torch.as_tensor(warped_image)[None].float(), torch.as_tensor(fixed_image)[None].float()).mean())
    result["labels"] = rows
    return result
