# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""
MONAI Label infer task serving the SACB-Net bundle as atlas-based segmentation by registration.

MONAI Label sends ONE image per request and overlays the returned label map on that image, so the returned volume must
lie on the request image's grid. The task therefore registers a labelled atlas onto the request image:

* fixed image = the request ``image`` (the study open in the viewer);
* moving image / label = the atlas: ``atlas_image`` / ``atlas_label`` from the request, else from the app config
  (``--conf atlas_image ... --conf atlas_label ...``), else the bundle's shipped Colin27 T1 and its 8-class labels;
* result = the atlas label warped by the predicted displacement (nearest neighbour), on the study's grid as stored
  on disk, with the bundle's label names; the JSON result adds the folding percentage of the field.

Everything else is the bundle's own default registration pipeline, ``configs/inference.json`` as
``python -m scripts.cli register`` runs it: the preprocessing with the affine stage (the atlas may lie in its own
scanner space), the network (``models/model.pt`` or ``models/model.ts``), the ``inferer`` (network and field
refinement) and the postprocessing (warping through the affine matrix and the field, Jacobian, reorientation to the
fixed file).
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from types import ModuleType
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from monai.transforms import MapTransform
from monailabel.interfaces.tasks.infer_v2 import InferType
from monailabel.tasks.infer.bundle import BundleInferTask

__all__ = [
    "DROPPED_POSTPROCESSING",
    "AtlasPaird",
    "RegistrationInferTask",
    "load_register_config",
]

logger = logging.getLogger(__name__)

#: bundle postprocessing steps that write files into the bundle's output_dir; MONAI Label writes the result itself.
DROPPED_POSTPROCESSING = ("SaveRegistrationOutputsd", "SaveTransformsd", "RegistrationMetricsd", "SaveQCFigured")
SHIPPED_ATLAS = ("sample_data/moving_colin27_t1.nii.gz", "sample_data/moving_colin27_seg8.nii.gz")


class AtlasPaird(MapTransform):
    """
    Turn a MONAI Label request into the bundle's pair keys: ``fixed_image`` = ``image`` (path of the study),
    ``moving_image`` / ``moving_label`` = the atlas.

    Args:
        atlas_image: default atlas intensity image (path); a request ``atlas_image`` overrides it.
        atlas_label: default atlas label map (path); a request ``atlas_label`` overrides it.
    """

    def __init__(self, atlas_image: str, atlas_label: str) -> None:
        super().__init__(keys=["image"])
        self.atlas_image = atlas_image
        self.atlas_label = atlas_label

    def __call__(self, data: Dict[str, Any]) -> Dict[str, Any]:
        d = dict(data)
        image = d.get("image")
        if not isinstance(image, str):
            raise ValueError(f"the registration task needs the request image as a path, got {type(image).__name__}.")
        d["fixed_image"] = image
        d["moving_image"] = d.get("atlas_image") or self.atlas_image
        d["moving_label"] = d.get("atlas_label") or self.atlas_label
        d["atlas_image_path"], d["atlas_label_path"] = d["moving_image"], d["moving_label"]
        for key in ("fixed_image", "moving_image", "moving_label"):
            if not os.path.isfile(d[key]):
                raise ValueError(f"{key} file not found: {d[key]}")
        return d


def _bundle_module(bundle_path: str, name: str) -> ModuleType:
    """Import ``name`` (``scripts.<package>.<module>``) from the bundle's own ``scripts`` package."""
    sys.path.insert(0, bundle_path)
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(bundle_path)


def _label_names(bundle_path: str, configured: Any, atlas_label: str) -> Dict[str, str]:
    """The bundle's ``label_names`` (a mapping or a lookup-table file), else the atlas label map's own lookup table
    (``X.tsv`` beside ``X.nii.gz``, as the shipped atlas has), through the bundle's ``scripts.io.label_names``."""
    if isinstance(configured, str) and configured.startswith("$"):
        configured = None  # the default expression: the names of the request's own labels, i.e. the atlas label's
    label_names = _bundle_module(bundle_path, "scripts.io.label_names")
    return label_names.label_names_for(configured, atlas_label) or {}


def load_register_config(bundle_path: str) -> ConfigParser:
    """
    The bundle's default registration pipeline (``configs/inference.json``, what ``python -m scripts.cli register``
    runs) in a parser, with ``bundle_root`` set to ``bundle_path``.

    Raises:
        ValueError: ``bundle_path/configs/inference.json`` is missing.
    """
    path = os.path.join(bundle_path, "configs", "inference.json")
    if not os.path.isfile(path):
        raise ValueError(f"bundle {bundle_path} lacks the registration config {path}.")
    parser = ConfigParser()
    parser.read_config(path)
    parser.config.update({"bundle_root": bundle_path})  # type: ignore[union-attr]
    return parser


class RegistrationInferTask(BundleInferTask):
    """
    :py:class:`BundleInferTask` for a registration bundle whose network takes the stacked ``[moving, fixed]`` pair;
    it runs the bundle's default registration pipeline (:py:func:`load_register_config`), affine stage included.

    Args:
        path: bundle root (``configs/*.json``, ``configs/metadata.json``, ``models/model.pt|ts``, ``scripts``).
        conf: MONAI Label app config; ``atlas_image`` / ``atlas_label`` set the default atlas.
        kwargs: passed on to :py:class:`BundleInferTask`.
    """

    def __init__(self, path: str, conf: Dict[str, str], **kwargs: Any) -> None:
        super().__init__(
            path,
            conf,
            type=InferType.SEGMENTATION,  # what the viewer gets: a label map of the request image
            extend_load_image=False,  # the bundle's LoadImaged reads all pair keys (labels optional)
            add_post_restore=False,  # the bundle's postprocessing already restores the fixed file's grid
            **kwargs,
        )
        if not self.valid:
            return
        atlas_image = conf.get("atlas_image") or os.path.join(path, SHIPPED_ATLAS[0])
        atlas_label = conf.get("atlas_label") or os.path.join(path, SHIPPED_ATLAS[1])
        self.atlas = AtlasPaird(atlas_image, atlas_label)
        # the labels are the atlas classes, not the channels of the network output (a displacement field)
        names = _label_names(path, self.bundle_config.get("label_names"), atlas_label)
        self.labels = {str(name): int(idx) for idx, name in names.items()}
        self._config.update({"atlas_image": atlas_image, "atlas_label": atlas_label})
        self.description = f"SACB-Net atlas registration: warps the atlas labels onto the image. {self.description}"

    def _load_bundle_config(self, path: str, config: str) -> ConfigParser:
        # configs/inference.json, its bundle_root pointing at this bundle (the shipped atlas and weights are under it)
        return load_register_config(path)

    def pre_transforms(self, data: Optional[Dict[str, Any]] = None) -> Sequence[Callable]:
        return [self.atlas] + list(super().pre_transforms(data))

    def post_transforms(self, data: Optional[Dict[str, Any]] = None) -> Sequence[Callable]:
        kept = [t for t in super().post_transforms(data) if type(t).__name__ not in DROPPED_POSTPROCESSING]
        return kept + [self._select_result]

    @staticmethod
    def _select_result(data: Dict[str, Any]) -> Dict[str, Any]:
        """``pred`` <- the warped atlas label (D, H, W) on the study grid; the field's folding goes to the JSON."""
        d = dict(data)
        det = d.get("jacobian_det")
        folding = float((torch.as_tensor(det) <= 0).float().mean() * 100) if det is not None else None
        label = d["warped_label"]
        d["ddf"] = d["pred"]
        d["pred"] = MetaTensor(torch.round(label.as_tensor()[0]).to(torch.uint8), affine=label.affine.clone())
        d["result"] = {
            "percent_non_positive_jacobian": folding,
            "atlas_image": d.get("atlas_image_path"),
            "atlas_label": d.get("atlas_label_path"),
        }
        return d

    def writer(
        self, data: Dict[str, Any], extension: Optional[str] = None, dtype: Optional[str] = None
    ) -> Tuple[Any, Any]:
        return super().writer(data, extension=".nii.gz", dtype="uint8")
