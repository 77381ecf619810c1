# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""
MONAI Label app serving the SACB-Net bundle (atlas registration as segmentation; training from labelled studies).

Start (in the MONAI Label venv, see setup_env.sh)::

    monailabel start_server --app integrations/monailabel --studies <folder of NIfTI studies> \\
        --conf bundle_path <bundle root> [--conf atlas_image A.nii.gz --conf atlas_label A_seg.nii.gz] \\
        [--conf pairing atlas]

Config (``--conf key value``):
    bundle_path: bundle root (default: the repository's ``bundle/``); needs ``models/model.pt`` or ``models/model.ts``.
    atlas_image, atlas_label: the labelled atlas registered onto each study (default: the bundle's Colin27 + labels).
    pairing: how training pairs are built from the labelled studies, "all_pairs" (default) or "atlas".
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Dict

from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.train import TrainTask

from lib.registration_infer import RegistrationInferTask
from lib.registration_train import RegistrationTrainTask

__all__ = ["MODEL_NAME", "SACBNetLabelApp"]

logger = logging.getLogger(__name__)

MODEL_NAME = "sacb_net_registration"
DEFAULT_BUNDLE = Path(__file__).resolve().parents[2] / "bundle"


class SACBNetLabelApp(MONAILabelApp):
    """One infer task and one train task, both named :py:data:`MODEL_NAME`."""

    def __init__(self, app_dir: str, studies: str, conf: Dict[str, str]) -> None:
        self.bundle_path = os.path.abspath(conf.get("bundle_path") or str(DEFAULT_BUNDLE))
        if not os.path.isfile(os.path.join(self.bundle_path, "configs", "inference.json")):
            raise ValueError(f"bundle_path {self.bundle_path} has no configs/inference.json.")
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="SACB-Net registration",
            description="Atlas-to-image deformable registration with the SACB-Net MONAI bundle",
            version="0.1.0",
        )

    def init_infers(self) -> Dict[str, InferTask]:
        task = RegistrationInferTask(self.bundle_path, self.conf)
        if not task.is_valid():
            logger.warning("no model.pt / model.ts in %s/models: inference disabled", self.bundle_path)
            return {}
        return {MODEL_NAME: task}

    def init_trainers(self) -> Dict[str, TrainTask]:
        task = RegistrationTrainTask(self.bundle_path, self.conf)
        return {MODEL_NAME: task} if task.is_valid() else {}
