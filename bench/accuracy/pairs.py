"""Find registration pairs (moving → fixed, with label maps) in a data folder laid out like ``shared/data``.

Recognised layouts, looked for in the folder itself and in each of its sub-folders:

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
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["LabelGroup", "Pair", "Skipped", "discover_pairs"]


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
