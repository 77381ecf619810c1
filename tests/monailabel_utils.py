"""Shared by the MONAI Label tests: the Label venv, the app folder and small real studies for it."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
from conftest import REPO_ROOT
from cohort_data import SMALL_NETWORK
from ecosystem_utils import save_seeded_weights
from reliability_data import load_sample, save

__all__ = [
    "APP_DIR", "LABEL_PYTHON", "LABEL_VENV", "MODEL", "fast_affine_stage", "label_venv_missing", "small_network",
    "write_pair",
]

LABEL_VENV = Path(os.environ.get("SACB_LABEL_VENV", REPO_ROOT / ".venv-label"))
LABEL_PYTHON = LABEL_VENV / "bin" / "python"
APP_DIR = REPO_ROOT / "integrations" / "monailabel"
MODEL = "sacb_net_registration"


def label_venv_missing() -> Optional[str]:
    """Why the MONAI Label tests cannot run (the skip reason), or None."""
    if LABEL_PYTHON.is_file():
        return None
    return f"MONAI Label venv not found at {LABEL_VENV}: run integrations/monailabel/setup_env.sh"


def write_pair(folder: Path, factor: int, atlas_move: Optional[np.ndarray] = None) -> dict:
    """The shipped pair subsampled by ``factor``; ``atlas_move`` (4, 4) moves the atlas (moving) headers in world."""
    folder.mkdir(parents=True, exist_ok=True)
    names = {"moving_image": "colin27.nii.gz", "moving_label": "colin27_seg.nii.gz",
             "fixed_image": "mni152.nii.gz", "fixed_label": "mni152_seg.nii.gz"}
    pair = {}
    for key, name in names.items():
        data, affine = load_sample(key, factor=factor)
        moved = atlas_move is not None and key.startswith("moving")
        pair[key] = str(save(folder / name, data, atlas_move @ affine if moved else affine))
    # the shipped label maps' own lookup tables travel with their copies (X.tsv beside X.nii.gz names the classes)
    for key, table in (("moving_label", "moving_colin27_seg8.tsv"), ("fixed_label", "fixed_mni152_seg8.tsv")):
        shutil.copy(REPO_ROOT / "bundle" / "sample_data" / table, pair[key].replace(".nii.gz", ".tsv"))
    return pair


def fast_affine_stage(bundle: Path) -> None:
    """The affine stage at 8 and 4 mm only (not 6, 4, 2 mm) for the 4 mm pair, in the bundle copy's inference.json,
    which the app and the CLI both read: a fifth of the time, the same stages."""
    path = bundle / "configs" / "inference.json"
    config = json.loads(path.read_text())
    config.update(affine_levels_mm=[8.0, 4.0], affine_iterations=[60, 30])
    path.write_text(json.dumps(config, indent=4))


def small_network(bundle: Path) -> None:
    """The bundle copy's network_def made small (``cohort_data.SMALL_NETWORK``) with seeded weights of that size in its
    models/model.pt: for tests of the app's task plumbing (pairs, where the weights go), not of the network's quality;
    one training epoch of the shipped-size network is most of such a test's time."""
    path = bundle / "configs" / "inference.json"
    config = json.loads(path.read_text())
    config["network_def"] = {**config["network_def"], **SMALL_NETWORK}
    path.write_text(json.dumps(config, indent=4))
    save_seeded_weights(bundle / "models" / "model.pt", bundle)
