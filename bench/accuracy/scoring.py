# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""Scoring of every benchmark method on the fixed image's grid, with the bundle's own metrics.

Dice, HD95, det J, folding and SDlogJ all come from the bundle (``scripts.workflow.metrics``,
``scripts.layers.jacobian``): the benchmark measures exactly what a user of the bundle gets. This module only chooses
*which* labels are compared and collects the numbers into the rows of the results JSON:

* pre-aligned folders (:func:`score_pair`, ``bench.accuracy.run``): per :class:`~bench.accuracy.pairs.LabelGroup`,
  the mean Dice / HD95 over the group's labels present in both unwarped maps (or one merged structure); folding from
  ANTs' own det J or from the method's ``ddf.nii.gz``;
* native pairs (:func:`score_outputs`, ``bench.accuracy.native``): Dice per seg14 class present in both unwarped
  maps, their mean and the subcortical mean (classes 1-9 and 11-13, which both label protocols draw alike), HD95 per
  class and its mean (NaN for a class missing from one map, left out of the mean like a NaN Dice); the deformation
  judged inside the fixed brain mask (fixed T1 > 0): % of voxels with det J <= 0 and SDlogJ.

Label maps here are numpy arrays (X, Y, Z) as read from NIfTI; the bundle's metrics take them as (1, X, Y, Z).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from bench.accuracy.io import load_array
from bench.accuracy.pairs import NativePair, Pair
from scripts.io.input_checks import voxel_spacing
from scripts.layers.jacobian import jacobian_determinant
from scripts.workflow.metrics import dice_per_label, hd95_per_label, jacobian_statistics

__all__ = [
    "SEG14_CLASSES",
    "SUBCORTICAL",
    "det_from_ddf",
    "dice_per_class",
    "hd95_per_class",
    "hd95_summary",
    "jacobian_stats",
    "label_agreement",
    "labels_present_in_both",
    "load_ddf",
    "read_labels",
    "score_labels",
    "score_outputs",
    "score_pair",
]

SEG14_CLASSES = tuple(range(1, 15))
SUBCORTICAL = (1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 12, 13)


def _check_same_grid(fixed_label: np.ndarray, warped_label: np.ndarray) -> None:
    if fixed_label.shape != warped_label.shape:
        raise ValueError(
            f"label maps must share one grid, got fixed {fixed_label.shape} and warped {warped_label.shape}."
        )


def _channel_first(label: np.ndarray) -> torch.Tensor:
    """(X, Y, Z) array -> (1, X, Y, Z) tensor, the layout of the bundle's metrics."""
    return torch.from_numpy(np.ascontiguousarray(label))[None]


def labels_present_in_both(fixed_label: np.ndarray, moving_label: np.ndarray, candidates: Sequence[int]) -> list[int]:
    """The candidate ids (never 0) that occur in both label maps, sorted; the maps may lie on different grids."""
    in_fixed, in_moving = set(np.unique(fixed_label).tolist()), set(np.unique(moving_label).tolist())
    return sorted(int(c) for c in candidates if c != 0 and c in in_fixed and c in in_moving)


def dice_per_class(fixed_label: np.ndarray, warped_label: np.ndarray, labels: Sequence[int]) -> dict[int, float]:
    """``{label: Dice}`` of the bundle's ``dice_per_label`` (NaN for a label in neither map, 0 if in only one)."""
    _check_same_grid(fixed_label, warped_label)
    labels = [int(lab) for lab in labels]
    if not labels:
        return {}
    return dict(zip(labels, dice_per_label(_channel_first(warped_label), _channel_first(fixed_label), labels)))


def hd95_per_class(
    fixed_label: np.ndarray, warped_label: np.ndarray, labels: Sequence[int], spacing: Sequence[float]
) -> dict[int, float]:
    """``{label: HD95 in mm}`` of the bundle's ``hd95_per_label`` (NaN for a label missing from either map)."""
    _check_same_grid(fixed_label, warped_label)
    labels = [int(lab) for lab in labels]
    if not labels:
        return {}
    spacing = [float(v) for v in spacing]
    return dict(zip(labels, hd95_per_label(_channel_first(warped_label), _channel_first(fixed_label), labels, spacing)))


def _mean(values: Sequence[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return float(np.mean(values)) if values else float("nan")


def hd95_summary(
    fixed_label: np.ndarray, warped_label: np.ndarray, labels: Sequence[int], spacing: Sequence[float]
) -> dict:
    """``hd95_mean`` (mm, over ``labels``, NaN classes left out) and ``hd95_per_class`` (``{"c": mm}``)."""
    labels = [int(c) for c in labels]
    hd95 = hd95_per_class(fixed_label, warped_label, labels, spacing)
    return {"hd95_mean": _mean([hd95[c] for c in labels]), "hd95_per_class": {str(c): hd95[c] for c in labels}}


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
    labels = labels_present_in_both(fixed_label, moving_label, classes)
    dice = dice_per_class(fixed_label, warped_label, labels)
    result = {
        "dice_mean": _mean([dice[c] for c in labels]),
        "dice_subcortical": _mean([dice[c] for c in labels if c in SUBCORTICAL]),
        "dice_per_class": {str(c): dice[c] for c in labels},
        "classes": labels,
    }
    if spacing is not None:
        result.update(hd95_summary(fixed_label, warped_label, labels, spacing))
    return result


def jacobian_stats(det: np.ndarray, mask: np.ndarray | None = None) -> dict[str, float]:
    """Folding and smoothness of a deformation from its det J (the bundle's ``jacobian_statistics``), as row fields.

    Args:
        det: (X, Y, Z) det J on the fixed grid.
        mask: optional (X, Y, Z) boolean region (the fixed brain); None = the whole grid.

    Returns:
        ``fold_pct`` (% voxels with det J <= 0 in the region), ``sdlogj`` (std of log(clip(det J, 1e-9, 1e9)) in the
        region), ``fold_pct_grid`` (% over the whole grid) and ``det_min``/``det_max`` in the region.
    """
    if det.ndim != 3:
        raise ValueError(f"det must be (X, Y, Z), got shape {det.shape}.")
    region = jacobian_statistics(det, mask)
    whole = region if mask is None else jacobian_statistics(det)
    return {
        "fold_pct": region["percent_non_positive_jacobian"],
        "sdlogj": region["sdlogj"],
        "fold_pct_grid": whole["percent_non_positive_jacobian"],
        "det_min": region["det_min"],
        "det_max": region["det_max"],
    }


def _fold_pct(det: np.ndarray) -> float:
    return jacobian_statistics(det)["percent_non_positive_jacobian"]


def read_labels(path: str | Path) -> tuple[np.ndarray, nib.Nifti1Image]:
    """A label map as int16 (rounded) and its image (for the grid); how every method's labels are read."""
    image = nib.load(str(path))
    return np.rint(np.asanyarray(image.dataobj)).astype(np.int16), image


def load_ddf(path: Path) -> np.ndarray:
    """Load a displacement field saved as (D, H, W, 3), (D, H, W, 1, 3) or (3, D, H, W) and return (3, D, H, W)."""
    ddf = np.squeeze(load_array(path, np.float32))
    if ddf.ndim != 4:
        raise ValueError(f"{path}: expected a 3-channel 3D displacement field, got shape {ddf.shape}.")
    if ddf.shape[-1] == 3:
        ddf = np.moveaxis(ddf, -1, 0)
    if ddf.shape[0] != 3:
        raise ValueError(f"{path}: expected 3 displacement channels, got shape {ddf.shape}.")
    return ddf


def det_from_ddf(ddf: np.ndarray) -> np.ndarray:
    """det J (X, Y, Z) of a (3, X, Y, Z) voxel displacement with the bundle's ``jacobian_determinant``."""
    return jacobian_determinant(torch.from_numpy(np.ascontiguousarray(ddf))[None]).numpy()[0, 0]


def label_agreement(moving_label: np.ndarray, warped_label: np.ndarray, ddf: np.ndarray) -> float:
    """Fraction of foreground voxels where ``warped_label`` equals the moving label resampled (nearest) at p + ddf(p).

    A convention check of a method's outputs: a ddf in another unit, axis order or sign than the bundle convention
    (warped(p) = moving(p + ddf(p)), channel i along array axis i) gives a low value.
    """
    from scipy.ndimage import map_coordinates

    coords = np.indices(moving_label.shape, dtype=np.float32) + ddf
    resampled = map_coordinates(moving_label, coords, order=0, mode="constant", cval=0)
    foreground = (resampled != 0) | (warped_label != 0)
    return float((resampled[foreground] == warped_label[foreground]).mean()) if foreground.any() else 1.0


def _score_groups(pair: Pair, fixed: np.ndarray, moving: np.ndarray, warped: np.ndarray, spacing) -> dict:
    """Per label group of ``pair``: mean Dice / HD95 over its labels present in both maps, or one merged structure."""
    groups, per_label_dice, per_label_hd = {}, {}, {}
    for group in pair.groups:
        if group.merge:
            f, w = np.isin(fixed, group.ids).astype(np.int16), np.isin(warped, group.ids).astype(np.int16)
            dice, hd = dice_per_class(f, w, [1])[1], hd95_per_class(f, w, [1], spacing)[1]
            groups[group.name] = {"dice": dice, "hd95_mm": hd, "labels": list(group.ids), "merged": True}
            continue
        labels = labels_present_in_both(fixed, moving, group.ids or np.unique(fixed).tolist())
        todo = [lab for lab in labels if lab not in per_label_dice]
        per_label_dice.update(dice_per_class(fixed, warped, todo))
        per_label_hd.update(hd95_per_class(fixed, warped, todo, spacing))
        groups[group.name] = {
            "dice": float(np.mean([per_label_dice[lab] for lab in labels])) if labels else float("nan"),
            "hd95_mm": _mean([per_label_hd[lab] for lab in labels]),
            "labels": labels,
            "merged": False,
        }
    return {"groups": groups, "dice_per_label": per_label_dice, "hd95_per_label": per_label_hd}


def score_pair(pair: Pair, method_dir: Path | None) -> dict:
    """Score a method's outputs on a pre-aligned folder pair (``method_dir`` None = identity: moving labels unwarped,
    det J = 1).

    Returns:
        dict with per-group mean Dice / HD95, per-label Dice / HD95, the labels used, and folding percentages.
    """
    result: dict = {}
    spacing = voxel_spacing(nib.load(str(pair.fixed_image)).affine)
    if pair.labelled:
        fixed, _ = read_labels(pair.fixed_label)
        moving, _ = read_labels(pair.moving_label)
        warped = moving if method_dir is None else read_labels(method_dir / "warped_label.nii.gz")[0]
        if warped.shape != fixed.shape:
            raise ValueError(f"{pair.name}: warped label {warped.shape} is not on the fixed grid {fixed.shape}.")
        result.update(_score_groups(pair, fixed, moving, warped, spacing))
    if method_dir is None:
        result.update(fold_pct=0.0, fold_source="identity")
        return result
    ddf_path, det_path = method_dir / "ddf.nii.gz", method_dir / "jacobian_det.nii.gz"
    if (method_dir / "method.json").exists() and det_path.exists():
        # ANTs: its own Jacobian of the forward warp is the reference; the voxel ddf gives a cross-check.
        result.update(fold_pct=_fold_pct(load_array(det_path)), fold_source="ants jacobian_det")
        if ddf_path.exists():
            result["fold_pct_from_ddf"] = _fold_pct(det_from_ddf(load_ddf(ddf_path)))
    elif ddf_path.exists():
        result.update(fold_pct=_fold_pct(det_from_ddf(load_ddf(ddf_path))), fold_source="ddf")
        if det_path.exists():
            result["fold_pct_written"] = _fold_pct(load_array(det_path))
    elif det_path.exists():
        result.update(fold_pct=_fold_pct(load_array(det_path)), fold_source="jacobian_det")
    else:
        result.update(fold_pct=float("nan"), fold_source="missing")
    if pair.labelled and ddf_path.exists() and (method_dir / "warped_label.nii.gz").exists():
        result["ddf_label_agreement"] = label_agreement(moving, warped, load_ddf(ddf_path))
    return result


def score_outputs(native: NativePair, deformable: bool, method_dir: Path) -> dict:
    """Score a method's outputs on a native pair, on the fixed grid: seg14 Dice and HD95 (mm, the fixed image's
    spacing), and for a ``deformable`` method det J statistics in the fixed brain (T1 > 0)."""
    fixed_label, fixed_ref = read_labels(native.fixed_label)
    moving_label, _ = read_labels(native.moving_label)
    warped, warped_ref = read_labels(method_dir / "warped_label.nii.gz")
    if warped.shape != fixed_label.shape or not np.allclose(warped_ref.affine, fixed_ref.affine, atol=1e-3):
        raise ValueError(f"{method_dir}: warped labels {warped.shape} are not on the fixed grid {fixed_label.shape}.")
    result = score_labels(fixed_label, moving_label, warped, spacing=voxel_spacing(fixed_ref.affine))
    if deformable:
        det_path = method_dir / "jacobian_det.nii.gz"
        if not det_path.exists():
            raise ValueError(f"{method_dir}: deformable method wrote no jacobian_det.nii.gz.")
        mask = np.asanyarray(nib.load(native.fixed_image).dataobj) > 0
        det = np.squeeze(np.asanyarray(nib.load(str(det_path)).dataobj)).astype(np.float32)
        result.update(jacobian_stats(det, mask), jacobian_mask="fixed T1 > 0")
    return result
