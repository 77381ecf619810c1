"""DICOM test data: write a NIfTI volume as a DICOM MR series, and place a DICOM SEG's frames in patient space (pydicom).

The series is written as a scanner writes an axial acquisition: slices along the array's third axis after reorienting
it to LPS (DICOM's patient space), so that rows run anterior -> posterior and columns right -> left, one Part 10 file
per slice (MR Image Storage, explicit VR little endian, 16-bit integer pixels).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

__all__ = ["DicomSeries", "write_mr_series", "segmentation_label_map"]

#: RAS (NIfTI) <-> LPS (DICOM) patient coordinates
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass(frozen=True)
class DicomSeries:
    """What the test knows about a written series: its UIDs and its files (slice order)."""

    study_uid: str
    series_uid: str
    sop_instance_uids: tuple[str, ...]
    files: tuple[Path, ...]


def write_mr_series(folder: Path, data: np.ndarray, affine: np.ndarray, description: str = "T1 axial",
                    study_uid: str | None = None) -> DicomSeries:
    """
    Write the (X, Y, Z) volume ``data`` with the RAS ``affine`` (orthogonal axes) as an axial DICOM MR series into
    ``folder`` (``slice_000.dcm`` ...), in a new study or the study ``study_uid``. Values must be integers in the int16
    range: they are stored exactly.
    """
    values = np.asarray(data)
    if not np.array_equal(values, np.round(values)) or values.min() < -32768 or values.max() > 32767:
        raise ValueError("write_mr_series stores int16 pixels: the volume must hold integers in the int16 range.")
    # reorient the array so that its axes run along L, P, S: then the LPS affine is diagonal-positive in direction
    to_lps = nib.orientations.ornt_transform(nib.orientations.io_orientation(affine),
                                             nib.orientations.axcodes2ornt(("L", "P", "S")))
    lps_data = nib.orientations.apply_orientation(values, to_lps).astype(np.int16)
    ras_affine = affine @ nib.orientations.inv_ornt_aff(to_lps, values.shape)
    lps_affine = RAS_TO_LPS @ ras_affine
    spacing = np.sqrt((lps_affine[:3, :3] ** 2).sum(axis=0))
    row_cosine, column_cosine = lps_affine[:3, 0] / spacing[0], lps_affine[:3, 1] / spacing[1]

    folder.mkdir(parents=True, exist_ok=True)
    study_uid, series_uid, frame_uid = study_uid or generate_uid(), generate_uid(), generate_uid()
    sop_uids, files = [], []
    for k in range(lps_data.shape[2]):
        sop_uid = generate_uid()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, sop_uid
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Test^MNI152", "SACB0001", "", "O"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.StudyID, ds.StudyDate, ds.StudyTime, ds.AccessionNumber = "1", "20260101", "120000", ""
        ds.ReferringPhysicianName = ""
        ds.StudyDescription, ds.SeriesDescription = "Brain MRI", description
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "MR", 3, k + 1
        ds.Manufacturer, ds.PositionReferenceIndicator = "SACB-Net tests", ""
        ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]
        ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions, ds.MRAcquisitionType = "GR", "SP", "", "3D"
        ds.EchoTrainLength = 1
        ds.ImageOrientationPatient = [float(v) for v in (*row_cosine, *column_cosine)]
        ds.ImagePositionPatient = [float(v) for v in (lps_affine @ np.array([0.0, 0.0, k, 1.0]))[:3]]
        ds.PixelSpacing = [float(spacing[1]), float(spacing[0])]  # between rows, between columns
        ds.SliceThickness = float(spacing[2])
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = lps_data.shape[1], lps_data.shape[0]
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = 0, 1
        ds.PixelData = np.ascontiguousarray(lps_data[:, :, k].T).tobytes()  # pixel (row r, column c) = data[c, r, k]
        path = folder / f"slice_{k:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        sop_uids.append(sop_uid)
        files.append(path)
    return DicomSeries(study_uid, series_uid, tuple(sop_uids), tuple(files))


def segmentation_label_map(seg: Dataset, shape: tuple[int, ...], affine: np.ndarray) -> tuple[np.ndarray, int]:
    """
    Place a binary DICOM SEG's frames in patient space and read them onto the (X, Y, Z) grid with the RAS ``affine``.

    Returns:
        (segment-number map on that grid (0: none), number of frame pixels that fell off the grid's voxel centres).
    """
    shared = seg.SharedFunctionalGroupsSequence[0]
    row_cosine, column_cosine = (np.array(shared.PlaneOrientationSequence[0].ImageOrientationPatient[i:i + 3],
                                          dtype=np.float64) for i in (0, 3))
    row_spacing, column_spacing = (float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing)
    frames = seg.pixel_array.reshape(-1, seg.Rows, seg.Columns)
    rows, columns = np.meshgrid(np.arange(seg.Rows), np.arange(seg.Columns), indexing="ij")
    world_to_voxel = np.linalg.inv(RAS_TO_LPS @ affine)
    out = np.zeros(shape, dtype=np.int32)
    off_grid = 0
    for frame, item in zip(frames, seg.PerFrameFunctionalGroupsSequence):
        position = np.array(item.PlanePositionSequence[0].ImagePositionPatient, dtype=np.float64)
        number = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        on = frame > 0
        points = position + np.outer(columns[on] * column_spacing, row_cosine) + np.outer(rows[on] * row_spacing,
                                                                                           column_cosine)
        voxels = points @ world_to_voxel[:3, :3].T + world_to_voxel[:3, 3]
        index = np.rint(voxels).astype(int)
        off_grid += int(np.count_nonzero(np.abs(voxels - index).max(axis=1) > 1e-3))
        if (out[tuple(index.T)] > 0).any():
            raise AssertionError(f"segment {number} overlaps another segment in the SEG (binary labels are exclusive).")
        out[tuple(index.T)] = number
    return out, off_grid
