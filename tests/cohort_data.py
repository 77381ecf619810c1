"""Small real cohorts for the cohort tests: the shipped Colin27/MNI152 pair at 4 mm in both directions, a small network."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
from workflow_data import write_small_pair

#: a network small enough for a cohort of pairs in seconds on 2 cores (weights from the seed; no checkpoint).
SMALL_NETWORK = {
    "_target_": "scripts.networks.SACBNet",
    "base_channels": 2,
    "num_clusters": [7, 7, 7, 7],
    "kmeans_iterations": 3,
}

#: command-line form of SMALL_NETWORK for ``python -m monai.bundle run``.
SMALL_NETWORK_ARGS = ["--network_def::base_channels", "2", "--network_def::kmeans_iterations", "3"]

PAIR_OUTPUTS = ("warped_image.nii.gz", "ddf.nii.gz", "jacobian_det.nii.gz")


def real_pairs(folder: Path, factor: int = 4) -> list[dict[str, str]]:
    """Four different real pairs (with and without labels) and one bad pair (a missing moving image)."""
    files = write_small_pair(Path(folder) / "data", factor=factor)
    colin = {"image": files["moving_image"], "label": files["moving_label"]}
    mni = {"image": files["fixed_image"], "label": files["fixed_label"]}

    def pair(pair_id, moving, fixed, labels=True):
        entry = {"id": pair_id, "moving_image": moving["image"], "fixed_image": fixed["image"]}
        if labels:
            entry.update(moving_label=moving["label"], fixed_label=fixed["label"])
        return entry

    return [
        pair("colin_to_mni", colin, mni),
        pair("mni_to_colin", mni, colin),
        pair("colin_to_mni_nolabels", colin, mni, labels=False),
        {"id": "missing_moving", "moving_image": str(Path(folder) / "not_there.nii.gz"), "fixed_image": mni["image"]},
        pair("colin_to_colin", colin, colin),
    ]


def write_datalist(folder: Path, pairs: list[dict], name: str = "datalist.json") -> Path:
    target = Path(folder) / name
    target.write_text(json.dumps({"pairs": pairs}))
    return target


def cohort(folder: Path) -> dict:
    return json.loads((Path(folder) / "cohort.json").read_text())


def statuses(folder: Path) -> dict[str, str]:
    return {row["pair_id"]: row["status"] for row in cohort(folder)["pairs"]}


def file_stamps(folder: Path) -> dict[str, tuple[int, int]]:
    """(inode, mtime_ns) of every output file under ``folder``: unchanged stamps mean the file was not rewritten."""
    return {str(p.relative_to(folder)): (p.stat().st_ino, p.stat().st_mtime_ns)
            for p in sorted(Path(folder).rglob("*")) if p.is_file() and p.parent != Path(folder)}


def volume(path: Path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).dataobj)
