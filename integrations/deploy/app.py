# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""
MONAI Deploy application: SACB-Net deformable registration with the bundle's exported TorchScript, of a NIfTI pair or
of an atlas onto a DICOM series (the warped atlas labels then return as a DICOM SEG).

Run (Holoscan wants a 32 MB stack)::

    ulimit -s 32768
    python integrations/deploy/app.py -i <input folder> -o <output folder> -m <bundle>/models/model.ts

``<input folder>`` holds ``moving.nii.gz`` and ``fixed.nii.gz``, each in its own scanner space (optionally
``moving_label.nii.gz`` and ``fixed_label.nii.gz``); the output folder receives ``warped_image.nii.gz``, ``ddf.nii.gz``,
``jacobian_det.nii.gz``, ``affine.mat``, ``warp.nii.gz``, ``transform.h5``, ``metrics.json`` (and
``warped_label.nii.gz``): the outputs of ``python -m scripts.cli register`` with its defaults (affine stage, SACB-Net,
field refinement).

``<input folder>`` without ``fixed.nii.gz`` must hold a DICOM study (any folder layout): the series chosen by the rules
of ``series_selection.json`` (MR or CT, the one with the most instances; ``$SACB_SERIES_RULES`` names other rules) is
the fixed image, and the atlas ``moving.nii.gz`` + ``moving_label.nii.gz`` in the input folder (else the bundle's
shipped Colin27 T1 and its 8 labels) the moving one. The output folder then receives the same files, the fixed grid
being the series' own, and ``warped_label_seg.dcm``: the warped atlas labels as a DICOM Segmentation referencing the
series, one segment per atlas label, named by the atlas label map's lookup table (``moving_label.tsv``).

The TorchScript file is the one written by ``python -m monai.bundle ckpt_export`` from the bundle
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
    """
    Loader (bundle preprocessing) -> MonaiBundleInferenceOperator (TorchScript + bundle inferer) -> writer.

    The input folder decides the loader: with ``fixed.nii.gz`` it is the NIfTI pair (:py:func:`compose_nifti`);
    otherwise it must hold a DICOM study, whose selected series is registered with an atlas and gets the warped atlas
    labels back as a DICOM SEG (:py:func:`compose_dicom`).
    """

    def compose(self) -> None:
        # imported here so that the bundle's scripts package is on sys.path first
        for folder in (str(bundle_root()), str(APP_DIR)):
            if folder not in sys.path:
                sys.path.insert(0, folder)
        from dicom_operators import holds_dicom
        from operators import PAIR_FILES, check_exported_configs

        app_context: AppContext = Application.init_app_context(self.argv)
        model_path = Path(app_context.model_path).resolve()
        if not model_path.is_file():
            raise ValueError(f"-m must name the exported TorchScript file (models/model.ts), got {model_path}.")
        check_exported_configs(model_path)  # before any operator: a file without the pipeline's configs is refused
        input_folder, output_folder = Path(app_context.input_path).resolve(), Path(app_context.output_path).resolve()
        if not input_folder.is_dir():
            raise ValueError(f"-i must name the input folder, got {input_folder}.")
        if (input_folder / PAIR_FILES["fixed_image"]).is_file():
            compose_nifti(self, input_folder, output_folder, model_path, app_context)
        elif holds_dicom(input_folder):
            compose_dicom(self, input_folder, output_folder, model_path, app_context)
        else:
            raise ValueError(
                f"input folder {input_folder} holds neither {PAIR_FILES['fixed_image']} (with "
                f"{PAIR_FILES['moving_image']}: a NIfTI pair) nor DICOM files (a study whose series is the fixed image)."
            )
        logging.info("SACB-Net registration app composed with model %s", model_path)


def _registration(app: Application, loader, output_folder: Path, model_path: Path, app_context: AppContext,
                  emit_warped_label: bool = False):
    """The inference operator and the writer after ``loader`` (outputs ``image`` and ``pair``); returns the writer."""
    from operators import RegistrationBundleInferenceOperator, RegistrationWriterOperator, registration_config_names

    inference = RegistrationBundleInferenceOperator(
        app,
        app_context=app_context,
        input_mapping=[IOMapping("image", Image, IOType.IN_MEMORY)],
        output_mapping=[IOMapping("pred", Image, IOType.IN_MEMORY)],
        bundle_path=model_path,
        bundle_config_names=registration_config_names(),
        name="sacb_net",
    )
    writer = RegistrationWriterOperator(
        app, output_folder=output_folder, bundle_path=model_path, emit_warped_label=emit_warped_label, name="writer"
    )
    app.add_flow(loader, inference, {("image", "image")})
    app.add_flow(loader, writer, {("pair", "pair")})
    app.add_flow(inference, writer, {("pred", "pred")})
    return writer


def compose_nifti(app: Application, input_folder: Path, output_folder: Path, model_path: Path,
                  app_context: AppContext) -> None:
    """NIfTI pair in (``operators.PAIR_FILES``), the bundle's NIfTI outputs and transforms out."""
    from operators import PairLoaderOperator

    loader = PairLoaderOperator(
        app,
        CountCondition(app, 1),  # a source operator: run once
        input_folder=input_folder,
        bundle_path=model_path,
        name="loader",
    )
    _registration(app, loader, output_folder, model_path, app_context)


def compose_dicom(app: Application, input_folder: Path, output_folder: Path, model_path: Path,
                  app_context: AppContext) -> None:
    """DICOM study in (the selected series is the fixed image, an atlas the moving one); the bundle's NIfTI outputs,
    the transforms and the warped atlas labels as a DICOM SEG of that series out (see ``dicom_operators``)."""
    from dicom_operators import (
        AtlasSegments,
        LabelSegmentationOperator,
        SeriesSelectorOperator,
        VolumePairLoaderOperator,
        atlas_pair,
        segmentation_writer,
    )
    from monai.deploy.operators.dicom_data_loader_operator import DICOMDataLoaderOperator
    from monai.deploy.operators.dicom_series_to_volume_operator import DICOMSeriesToVolumeOperator

    atlas = atlas_pair(input_folder, bundle_root())
    segments = AtlasSegments.from_label_map(atlas["moving_label"])
    study_loader = DICOMDataLoaderOperator(app, CountCondition(app, 1), input_folder=input_folder, name="dicom_loader")
    selector = SeriesSelectorOperator(app, name="series_selector")
    to_volume = DICOMSeriesToVolumeOperator(app, name="series_to_volume")
    loader = VolumePairLoaderOperator(app, atlas=atlas, bundle_path=model_path, name="loader")
    to_segments = LabelSegmentationOperator(app, segments=segments, name="label_segments")
    seg_writer = segmentation_writer(app, segments, model_path, output_folder, name="seg_writer")

    app.add_flow(study_loader, selector, {("dicom_study_list", "dicom_study_list")})
    app.add_flow(selector, to_volume, {("study_selected_series_list", "study_selected_series_list")})
    app.add_flow(to_volume, loader, {("image", "fixed_volume")})
    writer = _registration(app, loader, output_folder, model_path, app_context, emit_warped_label=True)
    app.add_flow(writer, to_segments, {("warped_label", "warped_label")})
    app.add_flow(to_volume, to_segments, {("image", "fixed_volume")})
    app.add_flow(to_segments, seg_writer, {("seg_image", "seg_image")})
    app.add_flow(selector, seg_writer, {("study_selected_series_list", "study_selected_series_list")})


if __name__ == "__main__":
    SACBNetRegistrationApp().run()
