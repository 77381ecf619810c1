"""Helpers for the ecosystem tests: run ``python -m monai.bundle`` commands the way users and the model-zoo CI do."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Mapping, Optional, Sequence

import torch

__all__ = ["bundle_copy_with_weights", "run_bundle_command", "run_checked", "save_seeded_weights"]

BUNDLE_ROOT = Path(__file__).resolve().parents[1] / "bundle"


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
