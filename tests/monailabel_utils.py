"""Shared by the MONAI Label tests: the Label venv, the app folder and small real studies for it (``write_pair``
and ``fast_affine_stage`` live in ecosystem_utils: the Deploy tests use them too)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

from conftest import REPO_ROOT
from cohort_data import SMALL_NETWORK
from ecosystem_utils import fast_affine_stage, save_seeded_weights, write_pair

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


def small_network(bundle: Path) -> None:
    """The bundle copy's network_def made small (``cohort_data.SMALL_NETWORK``) with seeded weights of that size in its
    models/model.pt: for tests of the app's task plumbing (pairs, where the weights go), not of the network's quality;
    one training epoch of the shipped-size network is most of such a test's time."""
    path = bundle / "configs" / "inference.json"
    config = json.loads(path.read_text())
    config["network_def"] = {**config["network_def"], **SMALL_NETWORK}
    path.write_text(json.dumps(config, indent=4))
    save_seeded_weights(bundle / "models" / "model.pt", bundle)
