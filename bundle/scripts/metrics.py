# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""Registration quality metrics: per-label Dice and HD95 (MONAI metrics), folding and SSIM, written per pair."""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any, Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.data import MetaTensor
from monai.metrics import SSIMMetric, compute_dice, compute_hausdorff_distance
from monai.transforms import MapTransform

from scripts.atomic import check_outputs_writable
from scripts.writer import pair_output_dir, write_csv_atomic, write_json_atomic

__all__ = [
    "MetricsSummaryHandler",
    "OneHotLabelsd",
    "RegistrationMetricsd",
    "dice_per_label",
    "hd95_per_label",
    "label_one_hot",
    "present_labels",
    "registration_metrics",
]

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


def _spacing(image: torch.Tensor) -> list[float] | None:
    if not isinstance(image, MetaTensor):
        return None
    affine = np.asarray(image.affine, dtype=np.float64)
    return [float(v) for v in np.linalg.norm(affine[:3, :3], axis=0)]


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
        label_names: optional id -> name mapping.
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
        label_names: Mapping[Any, str] | None = None,
        hd95: bool = False,
        ssim: bool = False,
        write_csv: bool = False,
        overwrite: bool = False,
        pair_id_key: str = "pair_id",
    ) -> None:
        super().__init__([fixed_label_key], allow_missing_keys=True)
        self.output_dir = output_dir
        self.fixed_label_key, self.warped_label_key, self.moving_label_key = fixed_label_key, warped_label_key, moving_label_key
        self.jacobian_key, self.warped_image_key, self.fixed_image_key = jacobian_key, warped_image_key, fixed_image_key
        self.label_ids = list(label_ids) if label_ids else None
        self.label_names = label_names
        self.hd95, self.ssim, self.write_csv = hd95, ssim, write_csv
        self.overwrite = overwrite
        self.pair_id_key = pair_id_key

    def file_names(self) -> list[str]:
        """Names of the files this transform writes."""
        return ["metrics.json"] + (["metrics.csv"] if self.write_csv else [])

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
            label_names=self.label_names,
            jacobian_det=d.get(self.jacobian_key),
            warped_image=d.get(self.warped_image_key),
            fixed_image=d.get(self.fixed_image_key),
            spacing=_spacing(d[self.fixed_label_key]),
            hd95=self.hd95,
            ssim=self.ssim,
        )
        if d.get(self.pair_id_key):
            metrics["pair_id"] = d[self.pair_id_key]
        write_json_atomic(folder / "metrics.json", metrics, overwrite=True)
        if self.write_csv:
            write_csv_atomic(folder / "metrics.csv", metrics["labels"], overwrite=True)
        logger.info(
            "%smean Dice before (identity) %s -> after %.4f; det J <= 0: %s %%",
            f"{d[self.pair_id_key]}: " if d.get(self.pair_id_key) else "",
            f"{metrics['mean_dice_identity']:.4f}" if "mean_dice_identity" in metrics else "n/a",
            metrics["mean_dice"],
            f"{metrics['percent_non_positive_jacobian']:.4f}" if "percent_non_positive_jacobian" in metrics else "n/a",
        )
        d["metrics"] = metrics
        return d


class MetricsSummaryHandler:
    """
    Ignite handler that gathers the per-pair ``metrics`` of an evaluation run (set by :py:class:`RegistrationMetricsd`)
    and, when the run completes, writes ``summary.json`` (mean and standard deviation over pairs of each metric, and
    the mean Dice per label) and ``summary.csv`` (one row per pair) into ``output_dir``, atomically.

    Args:
        output_dir: folder of the summary files.
        overwrite: replace existing summary files.
        metrics_key: key of the per-pair metrics in the engine output.
    """

    SCALARS = ("mean_dice_identity", "mean_dice", "mean_hd95", "percent_non_positive_jacobian", "ssim")

    def __init__(self, output_dir: str | os.PathLike, overwrite: bool = False, metrics_key: str = "metrics") -> None:
        self.output_dir = output_dir
        self.overwrite = overwrite
        self.metrics_key = metrics_key
        self.rows: list[dict[str, Any]] = []

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.COMPLETED, self._write)

    def _reset(self, engine: Any) -> None:
        self.rows = []

    def _collect(self, engine: Any) -> None:
        outputs = engine.state.output if isinstance(engine.state.output, list) else [engine.state.output]
        for output in outputs:
            metrics = output.get(self.metrics_key) if isinstance(output, Mapping) else None
            if metrics:
                self.rows.append(metrics)

    def summary(self) -> dict[str, Any]:
        """Mean/std over pairs of the scalar metrics and mean Dice per label id."""
        result: dict[str, Any] = {"num_pairs": len(self.rows)}
        for name in self.SCALARS:
            values = [r[name] for r in self.rows if r.get(name) is not None and not math.isnan(r[name])]
            if values:
                result[name] = {"mean": float(np.mean(values)), "std": float(np.std(values))}
        per_label: dict[str, list[float]] = {}
        for r in self.rows:
            for row in r["labels"]:
                if row.get("dice") is not None and not math.isnan(row["dice"]):
                    per_label.setdefault(str(row["label"]), []).append(row["dice"])
        result["dice_per_label"] = {k: float(np.mean(v)) for k, v in per_label.items()}
        return result

    def _write(self, engine: Any) -> None:
        if not self.rows:
            logger.info("no pair had labels: no evaluation summary written.")
            return
        folder = Path(self.output_dir)
        check_outputs_writable([folder / "summary.json", folder / "summary.csv"], self.overwrite)
        summary = self.summary()
        write_json_atomic(folder / "summary.json", summary, overwrite=True)
        table = [
            {"pair_id": r.get("pair_id", str(i)), **{name: r.get(name) for name in self.SCALARS}}
            for i, r in enumerate(self.rows)
        ]
        write_csv_atomic(folder / "summary.csv", table, overwrite=True)
        logger.info(
            "evaluation of %d pair(s): mean Dice %.4f (identity %s); summary in %s",
            len(self.rows),
            summary["mean_dice"]["mean"],
            f"{summary['mean_dice_identity']['mean']:.4f}" if "mean_dice_identity" in summary else "n/a",
            folder / "summary.json",
        )
