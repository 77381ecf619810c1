# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""The registration pairs of the accuracy benchmark: pre-aligned pairs found in data folders, and the native pairs.

**Pre-aligned pairs** (:func:`discover_pairs`, scored by ``bench.accuracy.run``): moving → fixed, with label maps, in a
data folder laid out like ``shared/data``. Recognised layouts, looked for in the folder itself and in each of its
sub-folders:

* **fixed/moving** — exactly one ``fixed_*_t1.nii.gz`` and one ``moving_*_t1.nii.gz``; labels ``fixed_*_seg8.nii.gz`` /
  ``moving_*_seg8.nii.gz`` (the common 8-class brain map: primary score = mean Dice of classes 1–7, also 1–8).
  Used by ``brain_colin27_mni152`` and the bundle's ``sample_data``.
* **A/B subjects** — ``<prefix>_A_t1.nii.gz`` and ``<prefix>_B_t1.nii.gz`` (B is moving, A fixed), labels
  ``<prefix>_{A,B}_seg.nii.gz``. In a folder whose name contains ``weaklabels`` only label 2 (WM) and the brain mask
  (labels > 0) are comparable across subjects, so only those are scored; otherwise every label present in both maps.
  Without label files the pair is unlabeled (scored only for folding and time, and only on request).
* **per-modality scans** — ``<mod>_img.nii.gz`` with ``<mod>_seg*.nii.gz`` (e.g. ``ct``/``mr``): a pair needs two scans of
  one modality; otherwise the folder is reported as not applicable.

Anything else is reported as "not recognised", never silently dropped.

**Native pairs** (:func:`native_pairs`, scored by ``bench.accuracy.native``): the moving scan in its own scanner
space, in a fixed order:

1. ``fs_fsdemo_to_bert``: ``shared/data/brain_freesurfer_native`` ``fsdemo_subject1`` (moving) -> ``bert`` (fixed),
   seg14. Both 256^3 conformed volumes are cropped, each to the bounding box of its brain (T1 > 0 or seg14 > 0) plus a
   margin of :data:`FS_MARGIN` voxels, keeping world positions (the affine's origin moves with the crop): the crop
   only removes empty background, every method reads the same cropped files, and scores are on the cropped fixed grid.
2. ``mal{moving}_to_mal{fixed}``: the 10 test pairs of ``bench/accuracy/splits/mal2012_split.json`` (all pairs of
   the 5 test people, higher scan id moving), as stored there.
3. optional (``include_retest``): the test-retest pair of the test part (``mal1025`` -> ``mal1005``, one person).

A native pair's pre-aligned twin (:func:`prealigned_pair`) has the moving scan and labels resampled into the fixed
space by that pair's ``ants_affine`` result.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from bench.accuracy.io import save_like
from bench.accuracy.native_split import SPLIT_PATH, load_split, scan_files

__all__ = [
    "FS_MARGIN",
    "HEAD_PAIRS",
    "LabelGroup",
    "NativePair",
    "Pair",
    "Skipped",
    "crop_to_foreground",
    "discover_pairs",
    "freesurfer_pair",
    "mal2012_pairs",
    "native_pairs",
    "prealigned_pair",
    "whole_head_pairs",
]


@dataclass(frozen=True)
class LabelGroup:
    """A named set of label ids scored together.

    Args:
        name: key used in tables and JSON (e.g. ``"mean_1_7"``).
        ids: label ids.
        merge: if True, the ids are merged into one structure (e.g. a brain mask) and scored once; if False, each id is
            scored separately and the group reports the mean over the ids present in both label maps.
    """

    name: str
    ids: tuple[int, ...]
    merge: bool = False


@dataclass(frozen=True)
class Pair:
    """One moving → fixed registration problem."""

    name: str
    fixed_image: Path
    moving_image: Path
    fixed_label: Path | None = None
    moving_label: Path | None = None
    groups: tuple[LabelGroup, ...] = ()
    note: str = ""

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def labelled(self) -> bool:
        return self.fixed_label is not None and self.moving_label is not None and len(self.groups) > 0

    @property
    def primary(self) -> LabelGroup | None:
        return self.groups[0] if self.groups else None


@dataclass(frozen=True)
class Skipped:
    """A folder (or pair) that was found but cannot be scored, with the reason."""

    name: str
    reason: str


SEG8_GROUPS = (
    LabelGroup("mean_1_7", tuple(range(1, 8))),
    LabelGroup("mean_1_8", tuple(range(1, 9))),
)
WEAK_GROUPS = (
    LabelGroup("wm_2", (2,)),
    LabelGroup("brain_mask", (1, 2), merge=True),
)


def _one(folder: Path, pattern: str) -> Path | None:
    found = sorted(folder.glob(pattern))
    return found[0] if len(found) == 1 else None


def _fixed_moving(folder: Path, name: str) -> list[Pair | Skipped]:
    fixed, moving = _one(folder, "fixed_*_t1.nii.gz"), _one(folder, "moving_*_t1.nii.gz")
    if fixed is None or moving is None:
        return []
    fixed_seg, moving_seg = _one(folder, "fixed_*_seg8.nii.gz"), _one(folder, "moving_*_seg8.nii.gz")
    if fixed_seg is None or moving_seg is None:
        return [Pair(name, fixed, moving, note="no seg8 label maps: unlabeled")]
    return [
        Pair(
            name,
            fixed,
            moving,
            fixed_seg,
            moving_seg,
            SEG8_GROUPS,
            note="seg8: primary = mean Dice of classes 1-7 (class 8, cortex, follows different protocols)",
        )
    ]


def _subjects_ab(folder: Path, name: str) -> list[Pair | Skipped]:
    results: list[Pair | Skipped] = []
    for fixed in sorted(folder.glob("*_A_t1.nii.gz")):
        prefix = fixed.name[: -len("_A_t1.nii.gz")]
        moving = folder / f"{prefix}_B_t1.nii.gz"
        if not moving.exists():
            continue
        fixed_seg, moving_seg = folder / f"{prefix}_A_seg.nii.gz", folder / f"{prefix}_B_seg.nii.gz"
        pair_name = f"{name}/{prefix}_B_to_A"
        if not (fixed_seg.exists() and moving_seg.exists()):
            results.append(Pair(pair_name, fixed, moving, note="no label maps: unlabeled"))
        elif "weaklabels" in folder.name:
            note = "weak intensity labels: only WM (label 2) and the brain mask are comparable across subjects"
            results.append(Pair(pair_name, fixed, moving, fixed_seg, moving_seg, WEAK_GROUPS, note=note))
        else:
            results.append(Pair(pair_name, fixed, moving, fixed_seg, moving_seg, (LabelGroup("mean_all", ()),)))
    return results


_MODALITY_IMAGE = re.compile(r"^([a-z0-9]+?)(\d*)_img\.nii\.gz$")


def _per_modality(folder: Path, name: str) -> list[Pair | Skipped]:
    by_modality: dict[str, list[Path]] = {}
    for path in sorted(folder.glob("*_img.nii.gz")):
        match = _MODALITY_IMAGE.match(path.name)
        if match:
            by_modality.setdefault(match.group(1), []).append(path)
    if not by_modality:
        return []
    results: list[Pair | Skipped] = []
    for modality, images in by_modality.items():
        if len(images) < 2:
            continue
        fixed, moving = images[0], images[1]
        labels = [_one(folder, p.name.replace("_img.nii.gz", "_seg*.nii.gz")) for p in (fixed, moving)]
        groups = (LabelGroup("mean_all", ()),) if all(labels) else ()
        results.append(Pair(f"{name}/{modality}", fixed, moving, labels[0], labels[1], groups))
    if not results:
        counts = ", ".join(f"{len(v)} {k.upper()}" for k, v in by_modality.items())
        results.append(
            Skipped(name, f"not applicable: needs two scans of one modality (CT-to-CT or MR-to-MR), found {counts}")
        )
    return results


_RECOGNISERS = (_fixed_moving, _subjects_ab, _per_modality)


def _scan_folder(folder: Path, name: str) -> list[Pair | Skipped]:
    for recognise in _RECOGNISERS:
        found = recognise(folder, name)
        if found:
            return found
    return []


def discover_pairs(root: str | Path, include_unlabeled: bool = False) -> list[Pair | Skipped]:
    """List the pairs in ``root`` and in its immediate sub-folders.

    Args:
        root: a data folder laid out like ``shared/data`` (or one pair folder such as ``bundle/sample_data``).
        include_unlabeled: keep pairs without label maps (scored for folding and time only); otherwise they are
            returned as ``Skipped``.

    Returns:
        ``Pair`` and ``Skipped`` entries in a stable (sorted) order.
    """
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"data folder {root} does not exist or is not a folder.")
    results: list[Pair | Skipped] = []
    candidates = [(root, root.name)] + [(sub, sub.name) for sub in sorted(root.iterdir()) if sub.is_dir()]
    for folder, name in candidates:
        found = _scan_folder(folder, name)
        if not found and folder != root and any(folder.glob("*.nii*")):
            found = [Skipped(name, "not recognised: no moving/fixed pair layout (e.g. a single atlas)")]
        for item in found:
            if isinstance(item, Pair) and not item.labelled and not include_unlabeled:
                item = Skipped(item.name, "unlabeled pair: skipped (use --include_unlabeled to score folding/time)")
            results.append(item)
    return results


# ---------------------------------------------------------------- native pairs

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


#: Whole-head pairs (moving, fixed) by part. ``original``: the two people of ``shared/data/brain_freesurfer_head``, both
#: ways. ``tuning`` / ``test``: the other CFMI people built by ``bench.accuracy.cfmi_heads`` (split by person, the first
#: three usable people for tuning, the next three for testing, each part a cycle), so that whole-head settings can be
#: chosen on heads that are never scored as evidence.
HEAD_PAIRS = {
    "original": (("sub10", "sub09"), ("sub09", "sub10")),
    "tuning": (("sub01", "sub02"), ("sub02", "sub04"), ("sub04", "sub01")),
    "test": (("sub06", "sub07"), ("sub07", "sub08"), ("sub08", "sub06")),
}


def whole_head_pairs(
    data_root: str | Path, out_dir: str | Path, head_data: str | Path | None = None, part: str = "original"
) -> list[NativePair]:
    """Whole-head pairs of one part of :data:`HEAD_PAIRS`, as whole heads (skull, scalp, neck; with brain masks = the
    stripped brain > 0, written under ``OUT/inputs/``, for the masked methods) and as their stripped brains (the same
    scans, skull-stripped: what a masked whole head should reach). 256^3, 1 mm, uncropped. Files are read from
    ``head_data`` (default ``DATA/brain_freesurfer_head``; the tuning and test parts need the folder written by
    ``bench.accuracy.cfmi_heads``)."""
    if part not in HEAD_PAIRS:
        raise ValueError(f"unknown whole-head part {part!r}; known: {sorted(HEAD_PAIRS)}.")
    folder = Path(head_data) if head_data else Path(data_root) / "brain_freesurfer_head"
    masks = Path(out_dir) / "inputs" / "freesurfer_head_masks"
    masks.mkdir(parents=True, exist_ok=True)
    files = {}
    for person in sorted({p for pair in HEAD_PAIRS[part] for p in pair}):
        brain = folder / f"cfmi-{person}_brain_t1.nii.gz"
        if not brain.exists():
            raise FileNotFoundError(f"{brain} not found: the {part!r} whole heads are built by "
                                    "`python -m bench.accuracy.cfmi_heads` (see its docstring); pass --head_data.")
        mask = masks / f"cfmi-{person}_brain_mask.nii.gz"
        if not mask.exists():
            image = nib.load(str(brain))
            save_like((np.asanyarray(image.dataobj) > 0).astype(np.uint8), image, mask)
        files[person] = {"head": folder / f"cfmi-{person}_head_t1.nii.gz", "brain": brain, "mask": mask,
                         "label": folder / f"cfmi-{person}_seg14.nii.gz"}
    pairs, note = [], "whole heads (skull, scalp, neck)" + ("" if part == "original" else f", {part} people")
    for moving, fixed in HEAD_PAIRS[part]:
        m, f = files[moving], files[fixed]
        pairs.append(NativePair(f"head_{moving}_to_{fixed}", str(f["head"]), str(m["head"]), str(f["label"]),
                                str(m["label"]), "brain_freesurfer_head", note,
                                str(f["mask"]), str(m["mask"])))
        pairs.append(NativePair(f"brain_{moving}_to_{fixed}", str(f["brain"]), str(m["brain"]), str(f["label"]),
                                str(m["label"]), "brain_freesurfer_head", "the same people's stripped brains"))
    return pairs


def native_pairs(
    data_root: str | Path,
    out_dir: str | Path,
    include_retest: bool = False,
    whole_heads: bool = False,
    head_data: str | Path | None = None,
    head_part: str = "original",
) -> list[NativePair]:
    """All pairs in benchmark order: the FreeSurfer pair, the 10 ``brain_mal2012`` test pairs, [the retest pair],
    [the whole-head pairs of ``head_part`` and their stripped twins]."""
    pairs = [freesurfer_pair(data_root, out_dir)] + mal2012_pairs(data_root, include_retest=include_retest)
    return pairs + (whole_head_pairs(data_root, out_dir, head_data, head_part) if whole_heads else [])


def prealigned_pair(pair: NativePair, prealigned_dir: Path) -> NativePair:
    """The pair with its moving scan and labels replaced by the ``ants_affine`` outputs (fixed side unchanged)."""
    return NativePair(
        pair.name,
        pair.fixed_image,
        str(prealigned_dir / "moving_t1_affine.nii.gz"),
        pair.fixed_label,
        str(prealigned_dir / "moving_seg14_affine.nii.gz"),
        pair.source,
        "pre-aligned by this pair's ants_affine result",
    )
