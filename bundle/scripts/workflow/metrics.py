# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""Registration quality metrics of one pair: per-label Dice (counted; equal to MONAI's ``compute_dice``), HD95
(MONAI, per label on its bounding box), folding and SDlogJ of the Jacobian determinant, and SSIM; and the dictionary
transforms that use them: one-hot labels for MONAI's metric handlers, the per-pair ``metrics.json``.

These are the metrics of the bundle's own evaluation and of the accuracy benchmark (``bench/accuracy``), which scores
every method through them."""

from __future__ import annotations

import logging
import math
import os
from typing import Any, Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.data import MetaTensor
from monai.metrics import SSIMMetric, compute_hausdorff_distance
from monai.transforms import MapTransform

from scripts.io.atomic import check_outputs_writable, write_csv, write_json
from scripts.io.input_checks import voxel_spacing
from scripts.io.label_names import label_names_for, read_label_names
from scripts.io.outputs import METRICS_CSV, METRICS_JSON, pair_output_dir

__all__ = [
    "OneHotLabelsd", "RegistrationMetricsd", "dice_per_label", "hd95_per_label", "jacobian_statistics", "label_confusions",
    "label_indices", "label_one_hot", "percent_non_positive", "present_labels", "registration_metrics",
]

logger = logging.getLogger(__name__)

#: label maps with values in [0, this) are counted through a table indexed by the value (``torch.bincount``, a look-up
#: table of this many entries at most); others by sorting / binary search
_MAX_COUNTED_ID = 1 << 20

#: label maps and det J are counted this many voxels at a time (:func:`present_labels`, :func:`label_confusions`,
#: :func:`percent_non_positive`): a chunk's int64 / float64 temporaries (32 MB each) instead of a whole map's (840 MB
#: each for a 512 x 512 x 400 CT; Dice alone held ~3.4 GB of them at once); every count is exact either way
COUNT_CHUNK_VOXELS = 1 << 22


def _plain(label: Any) -> torch.Tensor:
    """The label map as a plain tensor (a MetaTensor's metadata is not needed to count voxels)."""
    return label.as_tensor() if isinstance(label, MetaTensor) else torch.as_tensor(label)


def _as_array(values: Any) -> np.ndarray:
    """A tensor (on any device) or array as a numpy array."""
    return _plain(values).detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)


def present_labels(*labels: torch.Tensor) -> list[int]:
    """Sorted non-zero label ids present in any of the given label maps (``None`` entries are skipped).

    Float values count as ``int(value)`` (truncated), as a Python loop over ``torch.unique`` would; the ids are found
    from voxel counts (``torch.bincount``) when they lie in [0, 2**20), which is faster than sorting the whole map.
    """
    ids: set[int] = set()
    for label in labels:
        if label is None:
            continue
        flat = _plain(label).reshape(-1)
        for start in range(0, flat.numel(), COUNT_CHUNK_VOXELS):  # a chunk's ids depend on its values alone
            values = flat[start : start + COUNT_CHUNK_VOXELS]
            values = values.long() if values.is_floating_point() or values.dtype == torch.bool else values
            low, high = (int(v) for v in torch.aminmax(values))
            if low >= 0 and high < _MAX_COUNTED_ID:
                ids.update(torch.nonzero(torch.bincount(values)).flatten().tolist())
            else:
                ids.update(int(v) for v in torch.unique(values).tolist())
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
    _check_label_map(label, label_ids)
    rounded = torch.round(label.float())
    return torch.cat([(rounded == float(i)) for i in label_ids], dim=0)[None].float()


def _check_label_map(label: torch.Tensor, label_ids: Sequence[int]) -> None:
    if label.ndim != 4 or label.shape[0] != 1:
        raise ValueError(f"label must have shape (1, D, H, W), got {tuple(label.shape)}.")
    if len(label_ids) == 0:
        raise ValueError("label_ids is empty: no structure to evaluate.")


def label_indices(label: torch.Tensor, label_ids: Sequence[int]) -> torch.Tensor:
    """
    Index of each voxel's label among the sorted distinct ``label_ids``, the counting form of :func:`label_one_hot`.

    Args:
        label: (1, D, H, W) label map, integer or float (float values are rounded, as in :func:`label_one_hot`).
        label_ids: ids to evaluate.

    Returns:
        (D * H * W,) int64 tensor: ``1 + position`` of the voxel's id in ``sorted(set(label_ids))``, 0 for a voxel
        whose value is not one of the ids (background included).
    """
    label = _plain(label)
    _check_label_map(label, label_ids)
    return _value_indices(label.reshape(-1), _distinct_ids(label_ids))


def _distinct_ids(label_ids: Sequence[int]) -> torch.Tensor:
    return torch.tensor(sorted({int(i) for i in label_ids}), dtype=torch.long)


def _value_indices(values: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """:func:`label_indices` of flat label values ``values`` for the sorted distinct ``ids``; each voxel's index
    depends on its value alone, so a map gives the same indices whole or a chunk at a time."""
    # float maps are rounded like label_one_hot does (float32 first, so float64 maps match it exactly)
    values = torch.round(values.float()).long() if values.is_floating_point() else values.long()
    low, high = (int(v) for v in torch.aminmax(values)) if values.numel() else (0, 0)
    if low >= 0 and high < _MAX_COUNTED_ID:  # usual label maps: one table look-up per voxel
        table = torch.zeros(high + 1, dtype=torch.long)
        inside = ids <= high
        table[ids[inside]] = torch.arange(1, len(ids) + 1)[inside]
        return table[values]
    position = torch.searchsorted(ids, values).clamp_(max=len(ids) - 1)  # any ids: a binary search per voxel
    return torch.where(ids[position] == values, position + 1, 0)


def label_confusions(
    reference: torch.Tensor,
    preds: Sequence[torch.Tensor],
    label_ids: Sequence[int],
    chunk_voxels: int = COUNT_CHUNK_VOXELS,
) -> list[torch.Tensor]:
    """
    The confusion counts of each of ``preds`` against ``reference``, counted ``chunk_voxels`` voxels at a time.

    Args:
        reference: (1, D, H, W) label map, e.g. the fixed label (int or float; float values are rounded).
        preds: (1, D, H, W) label maps on the same grid, e.g. the warped and the unwarped moving label.
        label_ids: ids to count; K distinct ones.
        chunk_voxels: voxels per chunk; the counts do not depend on it (each voxel is counted once, exactly).

    Returns:
        one (K + 1, K + 1) int64 tensor per map of ``preds``: entry ``[p, r]`` counts the voxels whose
        :func:`label_indices` are ``p`` in the map and ``r`` in ``reference`` (0: not one of the ids).
    """
    if chunk_voxels < 1:
        raise ValueError(f"chunk_voxels must be >= 1, got {chunk_voxels}.")
    reference = _plain(reference)
    _check_label_map(reference, label_ids)
    flat_preds = []
    for pred in preds:
        pred = _plain(pred)
        _check_label_map(pred, label_ids)
        if pred.shape != reference.shape:
            raise ValueError(f"label maps differ in shape: {tuple(pred.shape)} vs {tuple(reference.shape)}.")
        flat_preds.append(pred.reshape(-1))
    flat_reference, ids = reference.reshape(-1), _distinct_ids(label_ids)
    bins = len(ids) + 1
    counts = [torch.zeros(bins * bins, dtype=torch.long) for _ in flat_preds]
    for start in range(0, flat_reference.numel(), chunk_voxels):
        reference_index = _value_indices(flat_reference[start : start + chunk_voxels], ids)
        for count, pred in zip(counts, flat_preds):
            codes = _value_indices(pred[start : start + chunk_voxels], ids) * bins + reference_index
            count += torch.bincount(codes, minlength=bins * bins)
    return [count.reshape(bins, bins) for count in counts]


def _dice_for_ids(confusion: torch.Tensor, label_ids: Sequence[int]) -> list[float]:
    """
    Per-id Dice in the order (and with the repeats) of ``label_ids``, from a :func:`label_confusions` count.

    Returns:
        one float per id; NaN where an id is absent from both maps.
    """
    intersection = torch.diagonal(confusion)[1:]
    denominator = confusion.sum(dim=1)[1:] + confusion.sum(dim=0)[1:]
    # float32 like MONAI's compute_dice on one-hot floats: exact counts, one correctly rounded division, same bits
    dice = (2 * intersection).float() / denominator.float()
    dice = torch.where(denominator > 0, dice, torch.tensor(float("nan")))
    position = {label_id: n for n, label_id in enumerate(sorted({int(i) for i in label_ids}))}
    return [float(dice[position[int(i)]]) for i in label_ids]


def dice_per_label(pred: torch.Tensor, reference: torch.Tensor, label_ids: Sequence[int]) -> list[float]:
    """
    Dice of each label id between two (1, D, H, W) label maps; NaN where the label is absent from both maps.

    Counted in one pass (a confusion count of the two maps, chunk by chunk, no one-hot); equal to MONAI's
    ``compute_dice(label_one_hot(pred), label_one_hot(reference), include_background=True, ignore_empty=False)``.
    """
    return _dice_for_ids(label_confusions(reference, [pred], label_ids)[0], label_ids)


def _label_boxes(index_maps: Sequence[torch.Tensor], num_ids: int, shape: Sequence[int], margin: int) -> list:
    """
    Per id 1..K of the (D * H * W,) :func:`label_indices` maps of a grid of ``shape`` (D, H, W): the union of its
    bounding boxes in the maps grown by ``margin`` voxels (clipped at the grid's edge), a tuple of 3 slices, or None
    for an id in none of the maps. One ``scipy.ndimage.find_objects`` pass per map, not a mask of the grid per id.
    """
    from scipy.ndimage import find_objects

    found = [
        find_objects(m.reshape(tuple(shape)).cpu().numpy().astype(np.int32), max_label=num_ids) for m in index_maps
    ]
    boxes = []
    for k in range(num_ids):
        parts = [f[k] for f in found if f[k] is not None]
        if not parts:
            boxes.append(None)
            continue
        starts = [max(0, min(p[d].start for p in parts) - margin) for d in range(len(shape))]
        stops = [min(size, max(p[d].stop for p in parts) + margin) for d, size in enumerate(shape)]
        boxes.append(tuple(slice(a, b) for a, b in zip(starts, stops)))
    return boxes


def hd95_per_label(
    pred: torch.Tensor,
    reference: torch.Tensor,
    label_ids: Sequence[int],
    spacing: Sequence[float] | None = None,
    crop_margin: int | None = 2,
) -> list[float]:
    """
    95th-percentile symmetric Hausdorff distance per label (MONAI ``compute_hausdorff_distance``), in mm when
    ``spacing`` is given, else in voxels.

    Each label is measured on the union of its bounding boxes in the two maps grown by ``crop_margin`` voxels: the
    same distances as on the whole grid (the surfaces lie inside the box, and a margin >= 1 keeps the box's edge from
    being taken for a surface), without one-hot encoding and distance-transforming the whole grid per label, which
    takes minutes for 14 labels at 256^3.

    Args:
        pred: (1, D, H, W) label map, e.g. the warped moving label (int or float; float values are rounded).
        reference: (1, D, H, W) label map on the same grid, e.g. the fixed label.
        label_ids: ids to evaluate, one value each in this order.
        spacing: voxel size along the three array axes (mm).
        crop_margin: the box margin (>= 1), or None to measure on the whole grid.

    Returns:
        one float per id of ``label_ids``; NaN where the label is missing from either map.
    """
    if crop_margin is not None and crop_margin < 1:
        raise ValueError(f"crop_margin must be >= 1 (or None for the whole grid), got {crop_margin}.")
    if spacing is not None and len(spacing) != 3:
        raise ValueError(f"spacing must have 3 values (one per array axis), got {list(spacing)}.")
    if _plain(pred).shape != _plain(reference).shape:
        raise ValueError(
            f"label maps differ in shape: {tuple(_plain(pred).shape)} vs {tuple(_plain(reference).shape)}."
        )
    pred_index, reference_index = label_indices(pred, label_ids), label_indices(reference, label_ids)
    shape = tuple(_plain(reference).shape[1:])
    distinct = sorted({int(i) for i in label_ids})
    if crop_margin is None:
        boxes = [tuple(slice(0, s) for s in shape)] * len(distinct)
    else:
        boxes = _label_boxes((pred_index, reference_index), len(distinct), shape, crop_margin)
    pred_grid, reference_grid = pred_index.reshape(shape), reference_index.reshape(shape)
    spacing_list = [float(v) for v in spacing] if spacing is not None else None
    distance = {}
    for k, (label_id, box) in enumerate(zip(distinct, boxes), start=1):
        p = (pred_grid[box] == k)[None, None] if box is not None else None
        r = (reference_grid[box] == k)[None, None] if box is not None else None
        if box is None or not p.any() or not r.any():
            distance[label_id] = float("nan")
            continue
        hd = compute_hausdorff_distance(p, r, include_background=True, percentile=95, spacing=spacing_list)
        distance[label_id] = float(hd.item())
    return [distance[int(i)] for i in label_ids]


#: det J is clipped to this range before its log is taken for SDlogJ (Learn2Reg): folded voxels stay finite
LOG_JACOBIAN_CLIP = (1e-9, 1e9)


def jacobian_statistics(jacobian_det: Any, mask: Any | None = None) -> dict[str, float]:
    """
    Folding and smoothness of a deformation from its Jacobian determinant, in float64.

    Args:
        jacobian_det: (D, H, W) or (1, D, H, W) determinant map (tensor or array).
        mask: optional boolean region of the same shape (e.g. the fixed brain); None = every voxel.

    Returns:
        ``percent_non_positive_jacobian`` (% of the region's voxels with det J <= 0), ``sdlogj`` (standard deviation
        of log(clip(det J, 1e-9, 1e9)) over the region, as in Learn2Reg), ``det_min`` and ``det_max`` in the region.
    """
    det = _as_array(jacobian_det)
    if mask is None:
        region = det.reshape(-1)
    else:
        mask = _as_array(mask).astype(bool)
        if mask.shape != det.shape:
            raise ValueError(f"mask {mask.shape} does not match the Jacobian determinant {det.shape}.")
        region = det[mask]
    if region.size == 0:
        raise ValueError("no voxel to evaluate: the Jacobian determinant (or its mask) is empty.")
    percent = percent_non_positive(region)
    region = region.astype(np.float64)
    return {
        "percent_non_positive_jacobian": percent,
        "sdlogj": float(np.log(np.clip(region, *LOG_JACOBIAN_CLIP)).std()),
        "det_min": float(region.min()),
        "det_max": float(region.max()),
    }


def percent_non_positive(values: Any, chunk_voxels: int = COUNT_CHUNK_VOXELS) -> float:
    """Percentage of the values that are <= 0 (det J: folded voxels), counted ``chunk_voxels`` at a time.

    Args:
        values: tensor or array of any shape (e.g. a (1, D, H, W) det J), not empty.

    Returns:
        ``100 * count / size``, the same float as ``100.0 * float((values <= 0).mean())`` (an exact count either way).
    """
    flat = _as_array(values).reshape(-1)
    if flat.size == 0:
        raise ValueError("no value to count: the array is empty.")
    chunks = (flat[start : start + chunk_voxels] for start in range(0, flat.size, chunk_voxels))
    count = sum(int(np.count_nonzero(chunk <= 0)) for chunk in chunks)
    return 100.0 * (count / flat.size)


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
    # one pass over the fixed map for the "after" and "before" counts
    compared = [warped_label] + ([] if moving_label is None else [moving_label])
    after, *before = label_confusions(fixed_label, compared, ids)
    dice = _dice_for_ids(after, ids)
    rows: list[dict[str, Any]] = [{"label": i, "name": names.get(str(i), str(i)), "dice": dv} for i, dv in zip(ids, dice)]
    result: dict[str, Any] = {"label_ids": ids, "mean_dice": _nanmean(dice)}
    if moving_label is not None:
        before = _dice_for_ids(before[0], ids)
        for row, value in zip(rows, before):
            row["dice_identity"] = value
        result["mean_dice_identity"] = _nanmean(before)
    if hd95:
        distances = hd95_per_label(warped_label, fixed_label, ids, spacing)
        for row, value in zip(rows, distances):
            row["hd95"] = value
        result["mean_hd95"] = _nanmean(distances)
    if jacobian_det is not None:
        result["percent_non_positive_jacobian"] = percent_non_positive(jacobian_det)
    if ssim:
        if warped_image is None or fixed_image is None:
            raise ValueError("ssim=True needs warped_image and fixed_image.")
        metric = SSIMMetric(spatial_dims=3, data_range=1.0)
        result["ssim"] = float(metric(torch.as_tensor(warped_image)[None].float(), torch.as_tensor(fixed_image)[None].float()).mean())
    result["labels"] = rows
    return result


class OneHotLabelsd(MapTransform):
    """
    One-hot encode label maps over a fixed list of label ids (one channel per id, no background channel), e.g. for
    MONAI's ``MeanDice`` handler during validation.

    Args:
        keys: (1, D, H, W) label maps.
        label_ids: ids to encode.
        output_keys: result keys (default ``key + "_onehot"``).
        allow_missing_keys: skip absent keys.
    """

    def __init__(
        self,
        keys: Sequence[str] | str,
        label_ids: Sequence[int],
        output_keys: Sequence[str] | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if not label_ids:
            raise ValueError("label_ids must list at least one label id.")
        self.label_ids = [int(i) for i in label_ids]
        self.output_keys = list(output_keys) if output_keys is not None else [f"{k}_onehot" for k in self.keys]

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key, out_key in self.key_iterator(d, self.output_keys):
            d[out_key] = label_one_hot(d[key], self.label_ids)[0]
        return d


def _source_file(image: Any) -> str | None:
    """The file a loaded MetaTensor was read from (None for a plain tensor)."""
    meta = getattr(image, "meta", None) or {}
    name = meta.get("filename_or_obj") if isinstance(meta, Mapping) else None
    return str(name) if isinstance(name, (str, os.PathLike)) and str(name) else None


def _spacing_of(image: torch.Tensor) -> list[float] | None:
    """Voxel size (mm) of a MetaTensor's grid, None for a plain tensor."""
    if not isinstance(image, MetaTensor):
        return None
    return [float(v) for v in voxel_spacing(image.affine)]


class RegistrationMetricsd(MapTransform):
    """
    Compute :py:func:`registration_metrics` for one pair and write ``metrics.json`` (and ``metrics.csv``) atomically.

    Does nothing for pairs without a fixed label. The result is also stored under ``metrics`` in the data dict and
    logged as one line with the mean Dice before (identity) and after registration.

    Args:
        output_dir: root output folder (pairs with a ``pair_id`` get a sub-folder).
        fixed_label_key, warped_label_key, moving_label_key: label map keys on the fixed grid.
        jacobian_key: Jacobian determinant key (optional in the data).
        warped_image_key, fixed_image_key: [0, 1] intensity images for SSIM.
        label_ids: ids to evaluate (None: ids present in the label maps).
        label_names: id -> name mapping or a lookup-table file (see :py:mod:`scripts.io.label_names`), used for every
            pair. None: each pair's names come from its label maps' own lookup tables (``X.tsv`` beside
            ``X.nii.gz``), else labels are named by their numbers.
        name_source_keys: keys whose MetaTensor ``filename_or_obj`` names a label file whose table is looked up, in
            order (the fixed label first; copies made before loading keep the name where later steps drop it).
        hd95: add per-label HD95; ssim: add SSIM; write_csv: also write the per-label ``metrics.csv``.
        overwrite: replace existing metric files.
        pair_id_key: key of the pair's sub-folder name.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        fixed_label_key: str = "fixed_label",
        warped_label_key: str = "warped_label",
        moving_label_key: str = "moving_label",
        jacobian_key: str = "jacobian_det",
        warped_image_key: str = "warped_moving_scaled",
        fixed_image_key: str = "fixed_image",
        label_ids: Sequence[int] | None = None,
        label_names: Mapping[Any, str] | str | os.PathLike | None = None,
        hd95: bool = False,
        ssim: bool = False,
        write_csv: bool = False,
        overwrite: bool = False,
        pair_id_key: str = "pair_id",
        name_source_keys: Sequence[str] = ("fixed_label", "moving_label", "moving_label_source"),
    ) -> None:
        super().__init__([fixed_label_key], allow_missing_keys=True)
        self.output_dir = output_dir
        self.fixed_label_key, self.warped_label_key, self.moving_label_key = fixed_label_key, warped_label_key, moving_label_key
        self.jacobian_key, self.warped_image_key, self.fixed_image_key = jacobian_key, warped_image_key, fixed_image_key
        self.label_ids = list(label_ids) if label_ids else None
        self.label_names = read_label_names(label_names) if label_names else None
        self.hd95, self.ssim, self.write_csv = hd95, ssim, write_csv
        self.overwrite = overwrite
        self.pair_id_key = pair_id_key
        self.name_source_keys = list(name_source_keys)

    def file_names(self) -> list[str]:
        """Names of the files this transform writes."""
        return [METRICS_JSON] + ([METRICS_CSV] if self.write_csv else [])

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        if d.get(self.fixed_label_key) is None:
            return d
        if d.get(self.warped_label_key) is None:
            raise ValueError(f"a fixed label was given but no moving label to warp ({self.warped_label_key} missing).")
        folder = pair_output_dir(self.output_dir, d.get(self.pair_id_key))
        check_outputs_writable([folder / n for n in self.file_names()], self.overwrite)
        metrics = registration_metrics(
            fixed_label=d[self.fixed_label_key],
            warped_label=d[self.warped_label_key],
            moving_label=d.get(self.moving_label_key),
            label_ids=self.label_ids,
            label_names=self.label_names or label_names_for(None, *[_source_file(d.get(k)) for k in self.name_source_keys]),
            jacobian_det=d.get(self.jacobian_key),
            warped_image=d.get(self.warped_image_key),
            fixed_image=d.get(self.fixed_image_key),
            spacing=_spacing_of(d[self.fixed_label_key]),
            hd95=self.hd95,
            ssim=self.ssim,
        )
        if d.get(self.pair_id_key):
            metrics["pair_id"] = d[self.pair_id_key]
        metrics.update(d.get("transform_metrics") or {})  # e.g. the inverse-consistency error (SaveTransformsd)
        write_json(metrics, folder / METRICS_JSON, indent=4)
        if self.write_csv:
            write_csv(metrics["labels"], folder / METRICS_CSV)
        logger.info(
            "%smean Dice before (identity) %s -> after %.4f; det J <= 0: %s %%",
            f"{d[self.pair_id_key]}: " if d.get(self.pair_id_key) else "",
            f"{metrics['mean_dice_identity']:.4f}" if "mean_dice_identity" in metrics else "n/a",
            metrics["mean_dice"],
            f"{metrics['percent_non_positive_jacobian']:.4f}" if "percent_non_positive_jacobian" in metrics else "n/a",
        )
        d["metrics"] = metrics
        return d
