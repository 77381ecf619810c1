# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""
MONAI Label app serving the SACB-Net bundle (atlas registration as segmentation; training from labelled studies).

Start with the MONAI Label venv's interpreter (see setup_env.sh; listens on 127.0.0.1:8000 unless told otherwise)::

    integrations/monailabel/start_server.sh --studies <folder of NIfTI studies> [--port 8000] [--host 0.0.0.0] \\
        [--conf bundle_path <bundle root>] [--conf atlas_image A.nii.gz --conf atlas_label A_seg.nii.gz] \\
        [--conf pairing atlas]

Config (``--conf key value``):
    bundle_path: bundle root (default: the repository's ``bundle/``); needs ``models/model.pt`` or ``models/model.ts``.
    atlas_image, atlas_label: the labelled atlas registered onto each study (default: the bundle's Colin27 + labels).
    pairing: how training pairs are built from the labelled studies, "all_pairs" (default) or "atlas".
    weights_dir: where the app's training writes its weights and checkpoints (default: ``model/<MODEL_NAME>`` in the
        app folder, MONAI Label's folder for an app's models, ignored by git). Once it holds ``model.pt``, inference
        serves it instead of the bundle's ``models/model.pt`` and training continues from it; the bundle itself is
        never written. Remove the folder to serve the bundle's weights again.

An inference on a datastore image also stores the registration's other outputs in the datastore, as labels of that
image under the tags of :py:data:`OUTPUT_TAGS` (the warped atlas image, the atlas-to-study ITK transform); the result
JSON names them under ``outputs`` as ``{"label": <image id>, "tag": <tag>}``, which ``GET /datastore/label?label=<image
id>&tag=<tag>`` downloads.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any, Dict, Optional

from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.train import TrainTask

from lib.registration_infer import EXTRA_OUTPUTS, OUTPUT_FILES_KEY, RegistrationInferTask
from lib.registration_train import RegistrationTrainTask

__all__ = ["MODEL_NAME", "OUTPUT_TAGS", "SACBNetLabelApp"]

logger = logging.getLogger(__name__)

MODEL_NAME = "sacb_net_registration"
DEFAULT_BUNDLE = Path(__file__).resolve().parents[2] / "bundle"
#: datastore label tag of each extra output of an inference (not "final": training reads only the final labels)
OUTPUT_TAGS = {name: f"{MODEL_NAME}_{name}" for name in EXTRA_OUTPUTS}


class SACBNetLabelApp(MONAILabelApp):
    """One infer task and one train task, both named :py:data:`MODEL_NAME`."""

    def __init__(self, app_dir: str, studies: str, conf: Dict[str, str]) -> None:
        # not "bundle_path": MONAILabelApp.bundle_path(model) is a method, which the train endpoint calls
        self.bundle_root = os.path.abspath(conf.get("bundle_path") or str(DEFAULT_BUNDLE))
        if not os.path.isfile(os.path.join(self.bundle_root, "configs", "inference.json")):
            raise ValueError(f"bundle_path {self.bundle_root} has no configs/inference.json.")
        self.weights_dir = os.path.abspath(conf.get("weights_dir") or os.path.join(app_dir, "model", MODEL_NAME))
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="SACB-Net registration",
            description="Atlas-to-image deformable registration with the SACB-Net MONAI bundle",
            version="0.1.0",
        )

    def init_infers(self) -> Dict[str, InferTask]:
        task = RegistrationInferTask(self.bundle_root, self.conf, weights_dir=self.weights_dir)
        if not task.is_valid():
            logger.warning("no model.pt / model.ts in %s/models: inference disabled", self.bundle_root)
            return {}
        return {MODEL_NAME: task}

    def init_trainers(self) -> Dict[str, TrainTask]:
        task = RegistrationTrainTask(self.bundle_root, self.conf, weights_dir=self.weights_dir)
        return {MODEL_NAME: task} if task.is_valid() else {}

    def infer(self, request: Dict[str, Any], datastore: Optional[Datastore] = None) -> Dict[str, Any]:
        """:py:meth:`MONAILabelApp.infer`, then the extra outputs of the registration (the task's temporary files)
        stored in the datastore beside the request image; the result's ``params["outputs"]`` references them."""
        result = super().infer(request, datastore)
        params = result.get("params") or {}
        files = params.pop(OUTPUT_FILES_KEY, None)
        if files:
            params["outputs"] = self._store_outputs(request.get("image"), files, datastore or self.datastore())
        return result

    @staticmethod
    def _store_outputs(image: Any, files: Dict[str, str], datastore: Datastore) -> Dict[str, Dict[str, str]]:
        """Save ``files`` (output name -> temporary path) as labels of the datastore image ``image`` and remove their
        folder. An image that is a path or an upload, not a datastore id, has nowhere to keep them: none are kept."""
        stored = {}
        try:
            # MONAILabelApp.infer reads an existing path as a file, anything else as a datastore id
            if isinstance(image, str) and not os.path.exists(image):
                for name, path in files.items():
                    datastore.save_label(image, path, OUTPUT_TAGS[name], {"model": MODEL_NAME, "output": name})
                    stored[name] = {"label": image, "tag": OUTPUT_TAGS[name]}
            else:
                logger.info("request image is not in the datastore: the registration outputs %s are not kept",
                            sorted(files))
        finally:
            for folder in {os.path.dirname(path) for path in files.values()}:
                shutil.rmtree(folder, ignore_errors=True)
        return stored
