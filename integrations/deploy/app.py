# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""
MONAI Deploy application: SACB-Net deformable registration of a NIfTI pair with the bundle's exported TorchScript.

Run (Holoscan wants a 32 MB stack)::

    ulimit -s 32768
    python integrations/deploy/app.py -i <input folder> -o <output folder> -m <bundle>/models/model.ts

``<input folder>`` holds ``moving.nii.gz`` and ``fixed.nii.gz``, each in its own scanner space (optionally
``moving_label.nii.gz`` and ``fixed_label.nii.gz``); the output folder receives ``warped_image.nii.gz``, ``ddf.nii.gz``,
``jacobian_det.nii.gz``, ``affine.mat``, ``warp.nii.gz``, ``transform.h5``, ``metrics.json`` (and
``warped_label.nii.gz``): the outputs of ``python -m scripts.cli register`` with its defaults (affine stage, SACB-Net,
field refinement). The TorchScript file is the one written by ``python -m monai.bundle ckpt_export`` from the bundle
root with that pipeline's config::

    python -m monai.bundle ckpt_export --net_id network_def --filepath models/model.ts --ckpt_file models/model.pt \\
        --meta_file configs/metadata.json --config_file configs/inference.json

so it carries ``metadata.json`` and ``inference.json`` (``operators.REGISTER_CONFIGS``; a file exported without it is
refused with that command). The bundle's transforms and inferer come from its ``scripts`` package: the app imports it
from ``$SACB_BUNDLE_ROOT`` (default: the repository's ``bundle/`` folder).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from monai.deploy.conditions import CountCondition
from monai.deploy.core import AppContext, Application, Image, IOType
from monai.deploy.operators.monai_bundle_inference_operator import IOMapping

__all__ = ["SACBNetRegistrationApp", "bundle_root"]

APP_DIR = Path(__file__).resolve().parent
DEFAULT_BUNDLE_ROOT = APP_DIR.parents[1] / "bundle"


def bundle_root() -> Path:
    """Folder whose ``scripts`` package holds the bundle's transforms and inferer (``$SACB_BUNDLE_ROOT`` or repo's)."""
    root = Path(os.environ.get("SACB_BUNDLE_ROOT", DEFAULT_BUNDLE_ROOT)).resolve()
    if not (root / "scripts" / "__init__.py").is_file():
        raise ValueError(f"no bundle scripts package under {root}; set SACB_BUNDLE_ROOT to the bundle folder.")
    return root


class SACBNetRegistrationApp(Application):
    """Loader (bundle preprocessing) -> MonaiBundleInferenceOperator (TorchScript + bundle inferer) -> writer."""

    def compose(self) -> None:
        # imported here so that the bundle's scripts package is on sys.path first
        for folder in (str(bundle_root()), str(APP_DIR)):
            if folder not in sys.path:
                sys.path.insert(0, folder)
        from operators import (
            PairLoaderOperator,
            RegistrationBundleInferenceOperator,
            RegistrationWriterOperator,
            check_exported_configs,
            registration_config_names,
        )

        app_context: AppContext = Application.init_app_context(self.argv)
        model_path = Path(app_context.model_path).resolve()
        if not model_path.is_file():
            raise ValueError(f"-m must name the exported TorchScript file (models/model.ts), got {model_path}.")
        check_exported_configs(model_path)  # before any operator: a file without the pipeline's configs is refused

        loader = PairLoaderOperator(
            self,
            CountCondition(self, 1),  # a source operator: run once
            input_folder=Path(app_context.input_path),
            bundle_path=model_path,
            name="loader",
        )
        inference = RegistrationBundleInferenceOperator(
            self,
            app_context=app_context,
            input_mapping=[IOMapping("image", Image, IOType.IN_MEMORY)],
            output_mapping=[IOMapping("pred", Image, IOType.IN_MEMORY)],
            bundle_path=model_path,
            bundle_config_names=registration_config_names(),
            name="sacb_net",
        )
        writer = RegistrationWriterOperator(
            self, output_folder=Path(app_context.output_path), bundle_path=model_path, name="writer"
        )
        self.add_flow(loader, inference, {("image", "image")})
        self.add_flow(loader, writer, {("pair", "pair")})
        self.add_flow(inference, writer, {("pred", "pred")})
        logging.info("SACB-Net registration app composed with model %s", model_path)


if __name__ == "__main__":
    SACBNetRegistrationApp().run()
