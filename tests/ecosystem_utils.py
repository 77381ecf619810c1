"""Helpers for the ecosystem tests: run ``python -m monai.bundle`` commands the way users and the model-zoo CI do."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Mapping, Optional, Sequence

__all__ = ["run_bundle_command", "run_checked"]


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
