# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""Dictionary transforms that score a registered pair: one-hot labels for MONAI metrics, per-pair metrics files."""

from __future__ import annotations

import logging
import os
from typing import Any, Hashable, Mapping, Sequence

import torch
from monai.data import MetaTensor
from monai.transforms import MapTransform

from scripts.io.atomic import check_outputs_writable, write_csv, write_json
from scripts.io.label_names import label_names_for, read_label_names
from scripts.io.input_checks import voxel_spacing
from scripts.io.outputs import METRICS_CSV, METRICS_JSON, pair_output_dir
from scripts.workflow.metrics import label_one_hot, registration_metrics

__all__ = ["OneHotLabelsd", "RegistrationMetricsd"]

logger = logging.getLogger(__name__)


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
