# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""
MONAI Deploy operators that register a labelled atlas onto a DICOM series and return its labels as a DICOM SEG.

A clinical deployment receives a DICOM study, not a NIfTI pair. The study's selected series is the FIXED image; the
MOVING image is a labelled atlas (``moving.nii.gz`` + ``moving_label.nii.gz`` beside the study, else the bundle's
shipped Colin27 T1 and its 8 classes), as in the MONAI Label app. The pipeline (composed by ``app.py``)::

    DICOMDataLoaderOperator --> SeriesSelectorOperator (the SDK's, with series_selection.json)
        --study_selected_series_list--> DICOMSeriesToVolumeOperator --image (D, H, W)--> VolumePairLoaderOperator
        --study_selected_series_list------------------------------------------------------> SegmentationWriter
    VolumePairLoaderOperator --image/pair--> RegistrationBundleInferenceOperator --> RegistrationWriterOperator
    RegistrationWriterOperator --warped_label (X, Y, Z)--> LabelSegmentationOperator --seg_image (D, H, W)-->
        SegmentationWriter (AtomicSegmentationWriterOperator: the SDK's DICOMSegmentationWriterOperator)

The volume is handed to the bundle's preprocessing as a NIfTI file (written to a private temporary folder), so the
DICOM path runs exactly the NIfTI path's pipeline and writes the same files into the output folder, plus
:py:data:`SEGMENTATION_FILE`: the warped atlas labels as a DICOM Segmentation of the selected series, one segment per
atlas label, named by the atlas label map's lookup table (``X.tsv`` beside ``X.nii.gz``).

Array orders: ``DICOMSeriesToVolumeOperator`` stacks the sorted slices into a (D, H, W) = (slice, row, column) array
whose RAS affine ``metadata["affine"]`` maps the (column, row, slice) index, i.e. the array transposed to (W, H, D);
that transposed array is what the NIfTI file stores, and the SEG writer wants (D, H, W) again, one frame per slice of
the series in the same sorted order.
"""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Tuple

import nibabel as nib
import numpy as np
from monai.deploy.core import Fragment, Image, Operator, OperatorSpec
from monai.deploy.operators.dicom_seg_writer_operator import DICOMSegmentationWriterOperator, SegmentDescription
from monai.deploy.operators.dicom_series_selector_operator import DICOMSeriesSelectorOperator
from monai.deploy.operators.dicom_utils import ModelInfo
from operators import PAIR_FILES, PairLoaderOperator
from pydicom.sr.codedict import codes

from scripts.io.atomic import check_outputs_writable
from scripts.io.label_names import label_names_for

__all__ = [
    "SEGMENTATION_FILE",
    "SERIES_SELECTION_RULES",
    "SHIPPED_ATLAS",
    "AtlasSegments",
    "AtomicSegmentationWriterOperator",
    "LabelSegmentationOperator",
    "SeriesSelectorOperator",
    "VolumePairLoaderOperator",
    "atlas_pair",
    "exported_model_info",
    "holds_dicom",
    "segmentation_writer",
    "series_rules_path",
    "series_selection_rules",
]

#: the DICOM Segmentation written into the output folder (beside the NIfTI outputs and the transforms)
SEGMENTATION_FILE = "warped_label_seg.dcm"
#: DICOMSeriesSelectorOperator rules (JSON); ``$SACB_SERIES_RULES`` names another rules file
SERIES_SELECTION_RULES = Path(__file__).resolve().parent / "series_selection.json"
#: the atlas used when the study folder brings none: bundle-relative paths of the shipped Colin27 T1 and its labels
SHIPPED_ATLAS = {
    "moving_image": "sample_data/moving_colin27_t1.nii.gz",
    "moving_label": "sample_data/moving_colin27_seg8.nii.gz",
}
#: atlas files looked for in the input folder (the NIfTI pair's moving file names)
ATLAS_FILES = {key: PAIR_FILES[key] for key in ("moving_image", "moving_label")}
SERIES_DESCRIPTION = "SACB-Net warped atlas labels"


def holds_dicom(folder: Path) -> bool:
    """Whether any file under ``folder`` (recursively) is a DICOM Part 10 file ('DICM' after the 128-byte preamble)."""
    for path in Path(folder).rglob("*"):
        if path.is_file():
            with open(path, "rb") as stream:
                if stream.read(132)[128:] == b"DICM":
                    return True
    return False


def series_rules_path() -> Path:
    """The series selection rules file: ``$SACB_SERIES_RULES`` or :py:data:`SERIES_SELECTION_RULES`."""
    return Path(os.environ.get("SACB_SERIES_RULES", SERIES_SELECTION_RULES))


def series_selection_rules() -> str:
    """The series selection rules (JSON text) of :py:func:`series_rules_path`, checked for their top-level shape."""
    path = series_rules_path()
    try:
        rules = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"series selection rules {path} are not a readable JSON file ({error}).") from error
    if not isinstance(rules, dict) or not isinstance(rules.get("selections"), list) or not rules["selections"]:
        raise ValueError(f'series selection rules {path}: expected {{"selections": [{{"name": ..., "conditions": '
                         f'{{...}}}}, ...]}} (DICOMSeriesSelectorOperator), got {str(rules)[:200]}.')
    return json.dumps(rules)


class SeriesSelectorOperator(DICOMSeriesSelectorOperator):
    """
    The SDK's series selector with :py:func:`series_selection_rules`, every matching series of a study ranked by its
    number of instances (the volume first, not a localizer), and a clear error when no series matches: the SDK's
    would hand an empty list on, which ``DICOMSeriesToVolumeOperator`` rejects without saying why.
    """

    def __init__(self, fragment: Fragment, *args, **kwargs) -> None:
        self.rules_path = series_rules_path()
        super().__init__(fragment, *args, rules=series_selection_rules(), all_matched=True,
                         sort_by_sop_instance_count=True, **kwargs)

    def filter(self, selection_rules, dicom_study_list, all_matched: bool = False,
               sort_by_sop_instance_count: bool = False):
        selected = super().filter(selection_rules, dicom_study_list, all_matched, sort_by_sop_instance_count)
        if not any(study.selected_series for study in selected or []):
            found = [(series.Modality, series.SeriesDescription, len(series.get_sop_instances()))
                     for study in dicom_study_list for series in study.get_all_series()]
            raise ValueError(
                f"no series of the DICOM study matches the selection rules {self.rules_path} "
                f"({json.dumps(selection_rules)[:300]}); series found (modality, description, instances): {found}."
            )
        return selected


def atlas_pair(input_folder: Path, bundle_root: Path) -> Dict[str, str]:
    """
    The atlas registered onto the DICOM series: ``moving.nii.gz`` and ``moving_label.nii.gz`` from ``input_folder``
    when it has them, else the bundle's :py:data:`SHIPPED_ATLAS`.

    Raises:
        ValueError: the folder has one of the two atlas files but not the other (a SEG needs the atlas labels).
    """
    given = {key: Path(input_folder) / name for key, name in ATLAS_FILES.items()}
    present = [key for key, path in given.items() if path.is_file()]
    if len(present) == 1:
        missing = next(name for key, name in ATLAS_FILES.items() if key not in present)
        raise ValueError(f"input folder {input_folder} has {ATLAS_FILES[present[0]]} but lacks {missing}: the atlas "
                         f"registered onto the DICOM series needs both (or neither, for the bundle's shipped atlas).")
    paths = given if present else {key: Path(bundle_root) / name for key, name in SHIPPED_ATLAS.items()}
    for key, path in paths.items():
        if not path.is_file():
            raise ValueError(f"atlas {key} {path} does not exist.")
    return {key: str(path) for key, path in paths.items()}


def exported_model_info(bundle_path: Path) -> ModelInfo:
    """The SEG's algorithm identification from the ``metadata.json`` stored in the exported TorchScript file."""
    with zipfile.ZipFile(bundle_path) as archive:
        stored = [name for name in archive.namelist() if Path(name).parent.name == "extra" and
                  Path(name).name == "metadata.json"]
        metadata = json.loads(archive.read(stored[0])) if stored else {}
    return ModelInfo(
        creator=str(metadata.get("authors", "SACB-Net MONAI bundle authors"))[:64],  # LO: 64 characters at most
        name=str(metadata.get("name", "SACB-Net registration"))[:64],
        version=str(metadata.get("version", "")),
    )


@dataclass(frozen=True)
class AtlasSegments:
    """The atlas labels that become SEG segments: segment ``n`` (1-based) is label ``label_ids[n - 1]``."""

    label_ids: Tuple[int, ...]
    names: Tuple[str, ...]

    @classmethod
    def from_label_map(cls, label_path: str) -> "AtlasSegments":
        """The non-zero labels of the atlas label map, named by its lookup table (``X.tsv``) or ``label <id>``."""
        values = np.unique(np.asarray(nib.load(label_path).dataobj))
        if np.any(values != np.round(values)) or values.min() < 0:
            raise ValueError(f"atlas label map {label_path} must hold non-negative integer labels, got {values[:10]}.")
        label_ids = tuple(int(v) for v in values if v > 0)
        if not label_ids:
            raise ValueError(f"atlas label map {label_path} has no label (only background 0).")
        names = label_names_for(None, label_path) or {}
        return cls(label_ids, tuple(names.get(str(i), f"label {i}") for i in label_ids))

    def segment_numbers(self, label_map: np.ndarray) -> np.ndarray:
        """The label map with each atlas label replaced by its segment number (0 stays 0), uint8 or uint16."""
        lookup = np.zeros(max(self.label_ids) + 1, dtype=np.uint8 if len(self.label_ids) < 256 else np.uint16)
        lookup[list(self.label_ids)] = np.arange(1, len(self.label_ids) + 1)
        labels = np.rint(np.asarray(label_map)).astype(np.int64)
        unknown = np.setdiff1d(np.unique(labels), (0,) + self.label_ids)
        if unknown.size:
            raise ValueError(f"warped labels {unknown.tolist()} are not atlas labels {list(self.label_ids)}.")
        return lookup[labels]

    def descriptions(self, model: ModelInfo) -> List[SegmentDescription]:
        """One SDK segment description per label, in segment order. The lookup tables carry names only, so every
        segment is coded as the generic SNOMED 'Anatomical Structure', its label saying which one."""
        return [
            SegmentDescription(
                segment_label=name[:64],  # LO
                segmented_property_category=codes.SCT.AnatomicalStructure,
                segmented_property_type=codes.SCT.AnatomicalStructure,
                algorithm_name=model.name,
                algorithm_version=model.version,
                algorithm_family=codes.DCM.ArtificialIntelligence,
            )
            for name in self.names
        ]


def _checked_volume(volume: Image) -> Tuple[np.ndarray, np.ndarray]:
    """(D, H, W) array and RAS affine of a ``DICOMSeriesToVolumeOperator`` image; ValueError if it is not one."""
    array, metadata = np.asarray(volume.asnumpy()), volume.metadata()
    affine = np.asarray(metadata.get("affine", np.empty(0)), dtype=np.float64)
    if array.ndim != 3 or affine.shape != (4, 4) or metadata.get("space") != "RAS":
        raise ValueError(f"expected a (D, H, W) DICOM volume with a 4x4 RAS affine, got shape {array.shape}, affine "
                         f"shape {affine.shape}, space {metadata.get('space')!r}.")
    return array, affine


class VolumePairLoaderOperator(PairLoaderOperator):
    """
    :py:class:`PairLoaderOperator` whose fixed image is the DICOM volume arriving on ``fixed_volume`` (from
    ``DICOMSeriesToVolumeOperator``) and whose moving image and label are the atlas (:py:func:`atlas_pair`).

    The volume is written as a float32 NIfTI file (array transposed to (W, H, D), the volume's RAS affine) into a
    temporary folder that lives as long as the operator, and the pair goes through the bundle's preprocessing as
    files, exactly as the NIfTI pipeline's.
    """

    def __init__(self, fragment: Fragment, *args, atlas: Dict[str, str], bundle_path: Path, **kwargs) -> None:
        self.atlas = dict(atlas)
        self._scratch = tempfile.TemporaryDirectory(prefix="sacb_dicom_")  # removed with the operator / at exit
        super().__init__(fragment, *args, input_folder=Path(self._scratch.name), bundle_path=bundle_path, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("fixed_volume")
        super().setup(spec)

    def compute(self, op_input, op_output, context) -> None:
        array, affine = _checked_volume(op_input.receive("fixed_volume"))
        fixed = Path(self._scratch.name) / "fixed_series.nii.gz"
        nib.save(nib.Nifti1Image(np.ascontiguousarray(array.transpose(2, 1, 0), dtype=np.float32), affine), str(fixed))
        self.emit_preprocessed({**self.atlas, "fixed_image": str(fixed)}, op_output)


class LabelSegmentationOperator(Operator):
    """
    Turn the warped atlas labels on the fixed NIfTI grid into the SEG writer's input: segment numbers
    (:py:class:`AtlasSegments`) as a (D, H, W) :py:class:`Image`, after checking that the labels lie on the DICOM
    volume's grid (same shape once transposed, same affine).

    Named inputs:
        warped_label: :py:class:`Image` (X, Y, Z) labels with their RAS ``affine`` (``RegistrationWriterOperator``).
        fixed_volume: the (D, H, W) DICOM volume (``DICOMSeriesToVolumeOperator``).
    Named output:
        seg_image: :py:class:`Image` (D, H, W) uint8/uint16 segment numbers.
    """

    def __init__(self, fragment: Fragment, *args, segments: AtlasSegments, **kwargs) -> None:
        self.segments = segments
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("warped_label")
        spec.input("fixed_volume")
        spec.output("seg_image")

    def compute(self, op_input, op_output, context) -> None:
        label = op_input.receive("warped_label")
        volume, volume_affine = _checked_volume(op_input.receive("fixed_volume"))
        labels = np.asarray(label.asnumpy()).transpose(2, 1, 0)
        label_affine = np.asarray(label.metadata()["affine"], dtype=np.float64)
        if labels.shape != volume.shape or not np.allclose(label_affine, volume_affine, atol=1e-4):
            raise ValueError(f"warped labels (D, H, W) {labels.shape} with affine\n{label_affine}\ndo not lie on the "
                             f"DICOM series grid {volume.shape} with affine\n{volume_affine}.")
        op_output.emit(Image(self.segments.segment_numbers(labels)), "seg_image")


class AtomicSegmentationWriterOperator(DICOMSegmentationWriterOperator):
    """The SDK's SEG writer (highdicom), writing :py:data:`SEGMENTATION_FILE` atomically and never over an existing
    file: the SDK writes ``<SOPInstanceUID>.dcm`` into a hidden folder inside the output folder, then it is renamed."""

    def process_images(self, image, study_selected_series_list, output_dir: Path) -> None:
        target = Path(output_dir) / SEGMENTATION_FILE
        check_outputs_writable([target])
        with tempfile.TemporaryDirectory(dir=output_dir, prefix=".seg-") as scratch:
            super().process_images(image, study_selected_series_list, Path(scratch))
            written = sorted(Path(scratch).glob("*.dcm"))
            if len(written) != 1:
                raise RuntimeError(f"the SEG writer wrote {[p.name for p in written]}, expected one .dcm file.")
            os.replace(written[0], target)


def segmentation_writer(fragment: Fragment, segments: AtlasSegments, bundle_path: Path, output_folder: Path,
                        **kwargs) -> AtomicSegmentationWriterOperator:
    """The SEG writer for ``segments``, its algorithm identified by the exported model's metadata."""
    model = exported_model_info(bundle_path)
    return AtomicSegmentationWriterOperator(
        fragment,
        segment_descriptions=segments.descriptions(model),
        output_folder=Path(output_folder),
        model_info=model,
        custom_tags={"SeriesDescription": SERIES_DESCRIPTION},
        **kwargs,
    )
