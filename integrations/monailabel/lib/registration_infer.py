# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""
MONAI Label infer task serving the SACB-Net bundle as atlas-based segmentation by registration.

MONAI Label sends ONE image per request and overlays the returned label map on that image, so the returned volume must
lie on the request image's grid. The task therefore registers a labelled atlas onto the request image:

* fixed image = the request ``image`` (the study open in the viewer);
* moving image / label = the atlas: ``atlas_image`` / ``atlas_label`` from the request, else from the app config
  (``--conf atlas_image ... --conf atlas_label ...``), else the bundle's shipped Colin27 T1 and its 8-class labels;
* result = the atlas label warped by the predicted displacement (nearest neighbour), on the study's grid as stored
  on disk, with the bundle's label names; the JSON result adds the folding percentage of the field and the atlas's
  file names (never server paths);
* beside it, per request, the warped atlas image and the registration as one ITK transform file (``transform.h5``,
  as ``register`` writes it) in a temporary folder, listed under :py:data:`OUTPUT_FILES_KEY` of the JSON result:
  the app (``main.py``) moves them into the datastore, where a client downloads them.

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
import tempfile
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
    "EXTRA_OUTPUTS",
    "OUTPUT_FILES_KEY",
    "AtlasPaird",
    "RegistrationInferTask",
    "load_register_config",
]

logger = logging.getLogger(__name__)

#: bundle postprocessing steps that write files into the bundle's output_dir; MONAI Label writes the label map itself
#: and the task writes the outputs of :py:data:`EXTRA_OUTPUTS` into a folder of its own.
DROPPED_POSTPROCESSING = ("SaveRegistrationOutputsd", "SaveTransformsd", "RegistrationMetricsd", "SaveQCFigured")
#: the registration's outputs beside the label map: name in the result -> file that ``register`` writes
EXTRA_OUTPUTS = {"warped_atlas_image": "warped_image.nii.gz", "transform": "transform.h5"}
#: key of the JSON result listing the files of :py:data:`EXTRA_OUTPUTS` (server paths: the app replaces them)
OUTPUT_FILES_KEY = "output_files"
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
    # a server registers request after request against one atlas: keep its decoded volumes for the next request (a
    # one-pair run of the config keeps none)
    parser.config.update({"bundle_root": bundle_path, "keep_decoded_inputs": True})  # type: ignore[union-attr]
    return parser


class RegistrationInferTask(BundleInferTask):
    """
    :py:class:`BundleInferTask` for a registration bundle whose network takes the stacked ``[moving, fixed]`` pair;
    it runs the bundle's default registration pipeline (:py:func:`load_register_config`), affine stage included.

    Args:
        path: bundle root (``configs/*.json``, ``configs/metadata.json``, ``models/model.pt|ts``, ``scripts``).
        conf: MONAI Label app config; ``atlas_image`` / ``atlas_label`` set the default atlas.
        weights_dir: folder of the weights the app's training writes (``model.pt``); once there, they are served
            instead of the bundle's ``models/model.pt``. None: the bundle's weights only.
        kwargs: passed on to :py:class:`BundleInferTask`.
    """

    def __init__(self, path: str, conf: Dict[str, str], weights_dir: Optional[str] = None, **kwargs: Any) -> None:
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
        if weights_dir and self.network is not None:
            # BasicInferTask.get_path serves the last existing path: the trained weights once the training wrote them.
            # Its "model_filename" option would pick a file beside the bundle's weights instead, so it is not offered.
            self.path = [*self.path, os.path.join(weights_dir, "model.pt")]
            self._config.pop("model_filename", None)
        atlas_image = conf.get("atlas_image") or os.path.join(path, SHIPPED_ATLAS[0])
        atlas_label = conf.get("atlas_label") or os.path.join(path, SHIPPED_ATLAS[1])
        self.atlas = AtlasPaird(atlas_image, atlas_label)
        # the labels are the atlas classes, not the channels of the network output (a displacement field)
        names = _label_names(path, self.bundle_config.get("label_names"), atlas_label)
        self.labels = {str(name): int(idx) for idx, name in names.items()}
        # the extra outputs go to a fresh temporary folder per request (outside the app and bundle folders; the app
        # removes it): the bundle's writers put a pair's files into output_dir/<pair_id>
        outputs = _bundle_module(path, "scripts.io")
        workflow = _bundle_module(path, "scripts.workflow")
        self._save_extras = [
            workflow.SaveTransformsd(tempfile.gettempdir(), inverse=False),
            outputs.SaveRegistrationOutputsd(
                tempfile.gettempdir(), names={"warped_image": EXTRA_OUTPUTS["warped_atlas_image"]}, vector_keys=(),
                label_keys=(),
            ),
        ]
        # the atlas paths are server settings: /info (whose config a client shows and sends back) does not list them
        self.description = f"SACB-Net atlas registration: warps the atlas labels onto the image. {self.description}"

    def _load_bundle_config(self, path: str, config: str) -> ConfigParser:
        # configs/inference.json, its bundle_root pointing at this bundle (the shipped atlas and weights are under it)
        return load_register_config(path)

    def pre_transforms(self, data: Optional[Dict[str, Any]] = None) -> Sequence[Callable]:
        return [self.atlas] + list(super().pre_transforms(data))

    def post_transforms(self, data: Optional[Dict[str, Any]] = None) -> Sequence[Callable]:
        kept = [t for t in super().post_transforms(data) if type(t).__name__ not in DROPPED_POSTPROCESSING]
        return kept + [self._request_folder, *self._save_extras, self._select_result]

    @staticmethod
    def _request_folder(data: Dict[str, Any]) -> Dict[str, Any]:
        """A fresh temporary folder for this request's extra outputs, named by ``pair_id`` (its name under the
        temporary directory, the ``output_dir`` of the writers)."""
        d = dict(data)
        d["pair_id"] = os.path.basename(tempfile.mkdtemp(prefix="sacb_net_label_"))
        return d

    def _select_result(self, data: Dict[str, Any]) -> Dict[str, Any]:
        """``pred`` <- the warped atlas label (D, H, W) on the study grid; the JSON result gets the field's folding,
        the atlas's file names and the paths of the extra outputs (:py:data:`OUTPUT_FILES_KEY`)."""
        d = dict(data)
        det = d.get("jacobian_det")
        folding = float((torch.as_tensor(det) <= 0).float().mean() * 100) if det is not None else None
        label = d["warped_label"]
        d["ddf"] = d["pred"]
        d["pred"] = MetaTensor(torch.round(label.as_tensor()[0]).to(torch.uint8), affine=label.affine.clone())
        folder = os.path.join(tempfile.gettempdir(), d["pair_id"])
        d["result"] = {
            "percent_non_positive_jacobian": folding,
            "atlas_image": os.path.basename(d["atlas_image_path"]),
            "atlas_label": os.path.basename(d["atlas_label_path"]),
            OUTPUT_FILES_KEY: {name: os.path.join(folder, file) for name, file in EXTRA_OUTPUTS.items()},
        }
        return d

    def writer(
        self, data: Dict[str, Any], extension: Optional[str] = None, dtype: Optional[str] = None
    ) -> Tuple[Any, Any]:
        return super().writer(data, extension=".nii.gz", dtype="uint8")
