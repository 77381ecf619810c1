# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""
MONAI Deploy operators that run the SACB-Net bundle's exported TorchScript on a NIfTI image pair.

``MonaiBundleInferenceOperator`` takes ONE network input (``image``) per call, while registration needs two volumes.
The pipeline therefore is::

    PairLoaderOperator --image (2-channel Image)--> RegistrationBundleInferenceOperator --pred (DDF)--> Writer
    PairLoaderOperator --pair (the preprocessed data dict)------------------------------------------> Writer
    (Writer = RegistrationWriterOperator)

All three parse the same config, stored inside the TorchScript file: ``inference.json``, the default registration
pipeline of ``python -m scripts.cli register`` (:py:data:`REGISTER_CONFIGS`). The loader runs its ``preprocessing``
(the affine stage included), the inference operator its ``inferer`` (the network's field refined on the pair), the
writer its ``postprocessing``, so the app's outputs equal those of ``register`` on the same pair. Those transforms live
in the bundle's ``scripts`` package, which must be importable (see ``app.py``).
"""

from __future__ import annotations

import logging
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

import numpy as np
import torch
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from monai.deploy.core import Fragment, Image, Operator, OperatorSpec
from monai.deploy.operators.monai_bundle_inference_operator import (
    BundleConfigNames,
    MonaiBundleInferenceOperator,
    get_bundle_config,
)

import scripts  # noqa: F401  the bundle's package (app.py puts its bundle root on sys.path): the configs' transforms

__all__ = [
    "PAIR_FILES",
    "REGISTER_CONFIGS",
    "PreprocessedPair",
    "PairLoaderOperator",
    "RegistrationBundleInferenceOperator",
    "RegistrationWriterOperator",
    "check_exported_configs",
    "registration_config_names",
]

#: the config the app parses: ``register``'s default pipeline (the affine stage, SACB-Net, the field refinement)
REGISTER_CONFIGS = ["inference"]

#: input folder layout: data key -> file name (labels optional; with them the writer also saves a warped label map and
#: label metrics).
PAIR_FILES = {
    "moving_image": "moving.nii.gz",
    "fixed_image": "fixed.nii.gz",
    "moving_label": "moving_label.nii.gz",
    "fixed_label": "fixed_label.nii.gz",
}


@dataclass
class PreprocessedPair:
    """The preprocessed data dict, boxed: Holoscan would turn an emitted dict of tensors into a TensorMap and drop the
    MetaTensor metadata (affines) that the writer needs."""

    data: Dict[str, Any]


def check_exported_configs(bundle_path: Path) -> None:
    """
    Raise ValueError unless the TorchScript file ``bundle_path`` carries every config of :py:data:`REGISTER_CONFIGS`
    as an extra file (``<stem>/extra/<name>.json``, written by ``ckpt_export --config_file "[...]"``).
    """
    try:
        with zipfile.ZipFile(bundle_path) as archive:
            stored = {Path(name).stem for name in archive.namelist() if Path(name).parent.name == "extra"}
    except (OSError, zipfile.BadZipFile) as error:
        raise ValueError(f"{bundle_path} is not a readable TorchScript file ({error}).") from error
    missing = [name for name in REGISTER_CONFIGS if name not in stored]
    if missing:
        files = ",".join(f"'configs/{name}.json'" for name in REGISTER_CONFIGS)
        raise ValueError(
            f"{bundle_path} lacks the config(s) {missing} of the registration pipeline (it carries {sorted(stored)}); "
            f'export it with: python -m monai.bundle ckpt_export ... --config_file "[{files}]"'
        )


def registration_config_names() -> BundleConfigNames:
    """The configs and the inferer the inference operator parses: :py:data:`REGISTER_CONFIGS` and its ``inferer``
    (the network's field refined on the pair, or the zero field with ``affine_only``)."""
    return BundleConfigNames(config_names=REGISTER_CONFIGS, inferer_name="inferer")


def _bundle_parser(bundle_path: Path, overrides: Optional[Mapping[str, Any]] = None) -> ConfigParser:
    """The merged :py:data:`REGISTER_CONFIGS` as stored in the TorchScript file (``<stem>/extra/<name>.json``)."""
    check_exported_configs(bundle_path)
    parser = get_bundle_config(str(bundle_path), REGISTER_CONFIGS)
    for key, value in (overrides or {}).items():
        parser[key] = value
    parser.parse()
    return parser


class PairLoaderOperator(Operator):
    """
    Load ``moving.nii.gz`` and ``fixed.nii.gz`` (+ optional labels) from ``input_folder`` and preprocess them with the
    bundle's ``preprocessing``: reorientation, the affine stage (each scan may lie in its own scanner space), resampling
    of the moving image onto the fixed grid through its result, intensity scaling to [0, 1] and stacking into the
    network input.

    Named outputs:
        image: :py:class:`Image` (2, D, H, W) float32, channel 0 moving, 1 fixed, with the fixed image's affine in its
            metadata (what ``MonaiBundleInferenceOperator`` turns into a MetaTensor).
        pair: :py:class:`PreprocessedPair`, the whole preprocessed data dict, for the writer.
    """

    def __init__(self, fragment: Fragment, *args, input_folder: Path, bundle_path: Path, **kwargs) -> None:
        self.input_folder = Path(input_folder).resolve()
        self.bundle_path = Path(bundle_path)
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.output("image")
        spec.output("pair")

    def pair_paths(self) -> Dict[str, str]:
        """Data dict of the files present; raises ValueError naming a missing moving/fixed image."""
        paths = {key: self.input_folder / name for key, name in PAIR_FILES.items()}
        for key in ("moving_image", "fixed_image"):
            if not paths[key].is_file():
                raise ValueError(f"input folder {self.input_folder} lacks {PAIR_FILES[key]} ({key}).")
        return {key: str(path) for key, path in paths.items() if path.is_file()}

    def compute(self, op_input, op_output, context) -> None:
        self.emit_preprocessed(self.pair_paths(), op_output)

    def emit_preprocessed(self, paths: Mapping[str, str], op_output) -> None:
        """Run the bundle's ``preprocessing`` on the data dict of file ``paths``; emit ``image`` and ``pair``."""
        data = _bundle_parser(self.bundle_path).get_parsed_content("preprocessing")(dict(paths))
        image = data["image"]
        meta = {
            "affine": np.asarray(image.affine),
            "original_affine": np.asarray(image.affine),
            "spacing": np.sqrt((np.asarray(image.affine)[:3, :3] ** 2).sum(axis=0)),
            "original_channel_dim": 0,
            "space": "RAS",
        }
        op_output.emit(Image(image.as_tensor().numpy().astype(np.float32), metadata=meta), "image")
        op_output.emit(PreprocessedPair(data), "pair")


class RegistrationBundleInferenceOperator(MonaiBundleInferenceOperator):
    """
    ``MonaiBundleInferenceOperator`` for a registration bundle: the network input arrives already stacked and scaled
    (by :py:class:`PairLoaderOperator`, with the bundle's own preprocessing), the bundle's ``inferer`` and the
    TorchScript network predict the displacement field, and ``pred`` leaves as a float32 (3, D, H, W) :py:class:`Image`.

    The base class would otherwise re-run the preprocessing meant for file paths on the stacked tensor, and convert an
    ``image`` output to a uint8 label volume, which would destroy a displacement field. Pass
    ``bundle_config_names=registration_config_names()``.
    """

    def _init_config(self, config_names) -> None:
        check_exported_configs(self.bundle_path)
        super()._init_config(config_names)

    def pre_process(self, data: Any, *args, **kwargs) -> Any:
        return data

    def post_process(self, data: Any, *args, **kwargs) -> Any:
        return data

    def _send_output(self, value: Any, name: str, metadata: Dict, op_output, context) -> None:
        array = value.detach().cpu().float().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
        if array.ndim == 5:  # the batch of one added by the base class
            array = array[0]
        if array.ndim != 4 or array.shape[0] != 3:
            raise ValueError(f"expected a displacement field of shape (3, D, H, W), got {array.shape}.")
        op_output.emit(Image(array, metadata=dict(metadata)), name)


class RegistrationWriterOperator(Operator):
    """
    Write the registration result with the bundle's ``postprocessing`` into ``output_folder``: ``warped_image.nii.gz``,
    ``ddf.nii.gz``, ``jacobian_det.nii.gz``, ``affine.mat`` and ``warp.nii.gz`` (the affine stage and the field for
    ITK/ANTs; ``transform.h5``, both in one file), ``metrics.json`` (and ``warped_label.nii.gz`` with labels), all on
    the fixed image's grid as stored on disk.

    Named inputs:
        pred: :py:class:`Image` (3, D, H, W) displacement in voxels of the preprocessed fixed grid.
        pair: :py:class:`PreprocessedPair` from :py:class:`PairLoaderOperator`.
    Named output (only with ``emit_warped_label``; the pair must then have a moving label):
        warped_label: :py:class:`Image` (X, Y, Z) the warped moving labels as written to ``warped_label.nii.gz``,
            with that file's affine as ``metadata["affine"]`` (for the DICOM SEG, see ``dicom_operators``).
    """

    def __init__(
        self, fragment: Fragment, *args, output_folder: Path, bundle_path: Path, emit_warped_label: bool = False,
        **kwargs
    ) -> None:
        self.output_folder = Path(output_folder).resolve()
        self.bundle_path = Path(bundle_path)
        self.emit_warped_label = emit_warped_label
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("pred")
        spec.input("pair")
        if self.emit_warped_label:
            spec.output("warped_label")

    def compute(self, op_input, op_output, context) -> None:
        pred, data = op_input.receive("pred"), dict(op_input.receive("pair").data)
        ddf = torch.as_tensor(np.asarray(pred.asnumpy()), dtype=torch.float32)
        fixed = data["fixed_image"]
        if tuple(ddf.shape[1:]) != tuple(fixed.shape[1:]):
            raise ValueError(
                f"displacement grid {tuple(ddf.shape[1:])} differs from the fixed grid {tuple(fixed.shape[1:])}."
            )
        data["pred"] = MetaTensor(ddf, affine=fixed.affine.clone())
        self.output_folder.mkdir(parents=True, exist_ok=True)
        parser = _bundle_parser(self.bundle_path, {"output_dir": str(self.output_folder)})
        result = parser.get_parsed_content("postprocessing")(data)
        logging.getLogger(__name__).info("SACB-Net outputs: %s", result.get("output_files"))
        if self.emit_warped_label:
            if "warped_label" not in result:
                raise ValueError("the pair has no moving label, so there is no warped label to emit.")
            label = result["warped_label"]
            array = np.asarray(label.detach().cpu().numpy() if isinstance(label, torch.Tensor) else label)
            op_output.emit(Image(array.reshape(array.shape[-3:]), metadata={"affine": np.asarray(label.affine)}),
                           "warped_label")
