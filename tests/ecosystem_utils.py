"""Helpers for the ecosystem tests: run ``python -m monai.bundle`` commands the way users and the model-zoo CI do."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np
import torch
from reliability_data import load_sample, save
from spatial_cases import rotation_ras

__all__ = [
    "ATLAS_MOVE", "bundle_copy_with_weights", "fast_affine_stage", "register_moved_pair", "run_bundle_command",
    "run_checked", "save_seeded_weights", "write_pair",
]

BUNDLE_ROOT = Path(__file__).resolve().parents[1] / "bundle"
#: fixed world point -> atlas (moving) world point of :func:`register_moved_pair`: the atlas headers moved by 10 + 4
#: degrees about the brain centre and ~17 mm, so the atlas lies in its own scanner space
ATLAS_MOVE = rotation_ras((0.0, -20.0, 10.0), degrees_z=10.0, degrees_x=-4.0, translation=(12.0, -10.0, 8.0))


def bundle_copy_with_weights(folder: Path) -> Path:
    """
    Copy of the bundle in ``folder/bundle`` (without run outputs). Without shipped weights, a seeded initialisation of
    ``network_def`` is saved as ``models/model.pt`` so that tools needing weights (``load``, MONAI Label) can run; a
    release ships trained weights there.
    """
    root = Path(folder) / "bundle"
    shutil.copytree(BUNDLE_ROOT, root, ignore=shutil.ignore_patterns("__pycache__", "eval", "runs"))
    weights = root / "models" / "model.pt"
    if not weights.is_file():
        save_seeded_weights(weights, root)
    return root


def save_seeded_weights(path: Path, bundle_root: Path = BUNDLE_ROOT) -> Path:
    """Save the state dict of ``network_def`` (from the bundle's inference.json) initialised with seed 0."""
    from scripts.networks.sacb_net import SACBNet

    config = json.loads((Path(bundle_root) / "configs" / "inference.json").read_text())["network_def"]
    torch.manual_seed(0)
    network = SACBNet(**{k: v for k, v in config.items() if not k.startswith("_")})
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save(network.state_dict(), path)
    return Path(path)


def run_checked(
    command: Sequence[str], cwd: Path, env: Optional[Mapping[str, str]] = None, timeout: float = 900
) -> subprocess.CompletedProcess:
    """Run ``command`` in ``cwd``; on a non-zero exit fail with the tail of its output (what a user would read)."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    result = subprocess.run(
        list(command), cwd=str(cwd), env=full_env, capture_output=True, text=True, timeout=timeout, check=False
    )
    if result.returncode != 0:
        output = result.stdout + result.stderr
        # chained tracebacks bury the cause: list the distinct error lines first, then the end of the output
        errors = list(dict.fromkeys(line.strip() for line in output.splitlines() if "Error:" in line))
        raise AssertionError(
            f"`{' '.join(command)}` exited {result.returncode} in {cwd}.\nerrors: {errors[:8]}\n...{output[-3000:]}"
        )
    return result


def run_bundle_command(
    args: Sequence[str], bundle_root: Path, python: str = sys.executable, timeout: float = 900
) -> subprocess.CompletedProcess:
    """
    ``python -m monai.bundle <args>`` from the bundle root, as documented for the zoo: ``verify_net_in_out`` and
    ``ckpt_export`` do not put the bundle root on ``sys.path`` themselves, so ``PYTHONPATH`` carries it.
    """
    env = {"PYTHONPATH": os.pathsep.join([str(bundle_root), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    return run_checked([python, "-m", "monai.bundle", *args], cwd=bundle_root, env=env, timeout=timeout)


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
        shutil.copy(BUNDLE_ROOT / "sample_data" / table, pair[key].replace(".nii.gz", ".tsv"))
    return pair


def fast_affine_stage(bundle: Path) -> None:
    """The affine stage at 8 and 4 mm only (not 6, 4, 2 mm) for the 4 mm pair, in the bundle copy's inference.json,
    which the apps (MONAI Label, the Deploy export) and the CLI all read: a fifth of the time, the same stages."""
    path = bundle / "configs" / "inference.json"
    config = json.loads(path.read_text())
    config.update(affine_levels_mm=[8.0, 4.0], affine_iterations=[60, 30])
    path.write_text(json.dumps(config, indent=4))


def register_moved_pair(folder: Path) -> dict:
    """
    The reference the MONAI Label and MONAI Deploy apps must reproduce: the shipped pair at 4 mm (40x48x40) with the
    atlas headers moved by :data:`ATLAS_MOVE`, registered by ``python -m scripts.cli register`` with its defaults
    (affine stage, SACB-Net, field refinement) in a bundle copy with the shipped weights and :func:`fast_affine_stage`,
    the configuration both apps' tests run their app with.

    Returns:
        ``{"pair": paths of the pair (write_pair's names, label tables beside), "out": the register output folder}``.
    """
    folder = Path(folder)
    bundle = bundle_copy_with_weights(folder)
    fast_affine_stage(bundle)
    pair = write_pair(folder / "data", factor=4, atlas_move=ATLAS_MOVE)
    out = folder / "cli_out"
    run_checked(
        [sys.executable, "-m", "scripts.cli", "register", "--fixed", pair["fixed_image"], "--moving",
         pair["moving_image"], "--moving_label", pair["moving_label"], "--fixed_label", pair["fixed_label"],
         "--out", str(out), "--device", "cpu"],
        cwd=bundle,
    )
    return {"pair": pair, "out": out}
