# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""The native (not pre-aligned) pairs of the native-pair benchmark, in their fixed order.

1. ``fs_fsdemo_to_bert``: ``shared/data/brain_freesurfer_native`` ``fsdemo_subject1`` (moving) -> ``bert`` (fixed),
   seg14. Both 256^3 conformed volumes are cropped, each to the bounding box of its brain (T1 > 0 or seg14 > 0) plus a
   margin of :data:`FS_MARGIN` voxels, keeping world positions (the affine's origin moves with the crop): the crop
   only removes empty background, every method reads the same cropped files, and scores are on the cropped fixed grid.
2. ``mal{moving}_to_mal{fixed}``: the 10 test pairs of ``bench/accuracy/splits/mal2012_split.json`` (all pairs of
   the 5 test people, higher scan id moving), as stored there.
3. optional (``include_retest``): the test-retest pair of the test part (``mal1025`` -> ``mal1005``, one person).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from bench.accuracy.io import save_like
from bench.accuracy.native_split import SPLIT_PATH, load_split, scan_files

__all__ = ["FS_MARGIN", "NativePair", "crop_to_foreground", "freesurfer_pair", "mal2012_pairs", "native_pairs",
           "whole_head_pairs"]

FS_MARGIN = 8


@dataclass(frozen=True)
class NativePair:
    """One moving -> fixed problem; images and seg14 labels share a grid per scan, not across the pair."""

    name: str
    fixed_image: str
    moving_image: str
    fixed_label: str
    moving_label: str
    source: str
    note: str = ""
    fixed_mask: str = ""
    moving_mask: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def crop_to_foreground(
    image_path: str | Path, label_path: str | Path, out_dir: str | Path, margin: int = FS_MARGIN
) -> tuple[Path, Path, list]:
    """Crop an image and its label map (same grid) to their foreground bounding box plus ``margin`` voxels.

    Args:
        image_path: 3-D image; foreground = voxels > 0 in the image or the label map.
        label_path: label map on the image's grid.
        out_dir: where ``<name>`` of both files is written (kept if already there: the crop is deterministic).
        margin: voxels added on every side (clamped to the grid).

    Returns:
        (cropped image path, cropped label path, [[start, stop] per axis] in the source grid).
    """
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}.")
    image, label = nib.load(str(image_path)), nib.load(str(label_path))
    if image.shape[:3] != label.shape[:3] or not np.allclose(image.affine, label.affine, atol=1e-4):
        raise ValueError(f"{image_path} and {label_path} are not on one grid.")
    img, lab = np.asanyarray(image.dataobj), np.asanyarray(label.dataobj)
    found = np.argwhere((img > 0) | (lab > 0))
    if found.size == 0:
        raise ValueError(f"{image_path}: no foreground to crop to.")
    lo = np.maximum(found.min(0) - margin, 0)
    hi = np.minimum(found.max(0) + 1 + margin, img.shape[:3])
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    affine = image.affine.copy()
    affine[:3, 3] = image.affine[:3, :3] @ lo + image.affine[:3, 3]
    out_dir = Path(out_dir)
    outs = []
    for source, data in ((Path(image_path), img), (Path(label_path), lab)):
        target = out_dir / source.name
        if not target.exists():
            reference = nib.Nifti1Image(np.zeros(hi - lo, np.uint8), affine)
            save_like(np.ascontiguousarray(data[box]), reference, target)
        outs.append(target)
    return outs[0], outs[1], [[int(a), int(b)] for a, b in zip(lo, hi)]


def freesurfer_pair(data_root: str | Path, out_dir: str | Path, margin: int = FS_MARGIN) -> NativePair:
    """``fsdemo_subject1`` -> ``bert`` from ``brain_freesurfer_native``, both cropped (see the module docstring)."""
    folder = Path(data_root) / "brain_freesurfer_native"
    crops = Path(out_dir) / "inputs" / f"freesurfer_crop_margin{margin}"
    made = {}
    for subject in ("bert", "fsdemo_subject1"):
        made[subject] = crop_to_foreground(
            folder / f"{subject}_t1.nii.gz", folder / f"{subject}_seg14.nii.gz", crops, margin
        )
    note = (
        f"256^3 LIA conformed volumes cropped to brain bbox + {margin} voxels, world positions kept; "
        f"bert box {made['bert'][2]}, fsdemo box {made['fsdemo_subject1'][2]}"
    )
    return NativePair(
        "fs_fsdemo_to_bert",
        str(made["bert"][0]),
        str(made["fsdemo_subject1"][0]),
        str(made["bert"][1]),
        str(made["fsdemo_subject1"][1]),
        "brain_freesurfer_native",
        note,
    )


def mal2012_pairs(
    data_root: str | Path, split_path: str | Path = SPLIT_PATH, include_retest: bool = False
) -> list[NativePair]:
    """The stored test pairs of the ``brain_mal2012`` split (and optionally its test-retest pair)."""
    split = load_split(split_path)
    folder = Path(data_root) / "brain_mal2012"
    listed = [(p["moving"], p["fixed"], "inter-subject test pair") for p in split["test_pairs"]]
    if include_retest:
        listed += [(p["moving"], p["fixed"], "test-retest (same person)") for p in split["retest_pairs"]["test"]]
    pairs = []
    for moving, fixed, note in listed:
        m, f = scan_files(folder, moving), scan_files(folder, fixed)
        pairs.append(
            NativePair(
                f"mal{moving}_to_mal{fixed}",
                str(f["image"]),
                str(m["image"]),
                str(f["label"]),
                str(m["label"]),
                "brain_mal2012",
                note,
            )
        )
    return pairs


def whole_head_pairs(data_root: str | Path, out_dir: str | Path) -> list[NativePair]:
    """The two ``brain_freesurfer_head`` people registered both ways, as whole heads (skull, scalp, neck; with brain
    masks = the stripped brain > 0, written under ``OUT/inputs/``, for the masked methods) and as their stripped
    brains (the same scans, skull-stripped: what a masked whole head should reach). 256^3, 1 mm, uncropped."""
    folder = Path(data_root) / "brain_freesurfer_head"
    masks = Path(out_dir) / "inputs" / "freesurfer_head_masks"
    masks.mkdir(parents=True, exist_ok=True)
    files = {}
    for person in ("sub09", "sub10"):
        brain = folder / f"cfmi-{person}_brain_t1.nii.gz"
        mask = masks / f"cfmi-{person}_brain_mask.nii.gz"
        if not mask.exists():
            image = nib.load(str(brain))
            save_like((np.asanyarray(image.dataobj) > 0).astype(np.uint8), image, mask)
        files[person] = {"head": folder / f"cfmi-{person}_head_t1.nii.gz", "brain": brain, "mask": mask,
                         "label": folder / f"cfmi-{person}_seg14.nii.gz"}
    pairs = []
    for moving, fixed in (("sub10", "sub09"), ("sub09", "sub10")):
        m, f = files[moving], files[fixed]
        pairs.append(NativePair(f"head_{moving}_to_{fixed}", str(f["head"]), str(m["head"]), str(f["label"]),
                                str(m["label"]), "brain_freesurfer_head", "whole heads (skull, scalp, neck)",
                                str(f["mask"]), str(m["mask"])))
        pairs.append(NativePair(f"brain_{moving}_to_{fixed}", str(f["brain"]), str(m["brain"]), str(f["label"]),
                                str(m["label"]), "brain_freesurfer_head", "the same people's stripped brains"))
    return pairs


def native_pairs(
    data_root: str | Path, out_dir: str | Path, include_retest: bool = False, whole_heads: bool = False
) -> list[NativePair]:
    """All pairs in benchmark order: the FreeSurfer pair, the 10 ``brain_mal2012`` test pairs, [the retest pair],
    [the whole-head pairs and their stripped twins]."""
    pairs = [freesurfer_pair(data_root, out_dir)] + mal2012_pairs(data_root, include_retest=include_retest)
    return pairs + (whole_head_pairs(data_root, out_dir) if whole_heads else [])
