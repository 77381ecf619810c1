"""The registration methods compared by the accuracy benchmark, each as a command run in its own process.

Every method writes, into its output folder and on the fixed image's grid, ``warped_label.nii.gz`` (when a moving label
is given) and a displacement ``ddf.nii.gz`` and/or ``jacobian_det.nii.gz``; the runner scores all of them with the same
code. Running each method as a separate process gives an honest wall time (imports and file I/O included, as a user
sees them) and its own peak resident memory.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from bench.accuracy.pairs import Pair

#: run overrides of configs/inference.json for the network alone on pre-aligned pairs (the pipeline's affine stage and
#: field refinement off), as the methods of this benchmark were defined before inference.json held the whole pipeline
PLAIN_INFERENCE = {"affine_transform": "none", "refine_iterations": "0"}

__all__ = ["Method", "identity", "ants_syn", "bundle_instance_optimisation", "bundle_trained", "build_methods"]


@dataclass(frozen=True)
class Method:
    """A named registration method.

    Args:
        name: key in tables and JSON.
        command: builds the command line for (pair, output folder); None means "computed in-process" (identity).
        cwd: working directory for the command (the bundle root for bundle methods).
        available: False (with ``why_not``) when the method cannot run here, e.g. antspyx or weights missing.
        settings: what the method was run with, recorded in the JSON.
    """

    name: str
    command: object = None
    cwd: Path | None = None
    available: bool = True
    why_not: str = ""
    settings: dict = field(default_factory=dict)


def identity() -> Method:
    """No registration: the moving label map is scored as it is (all grids are pre-aligned)."""
    return Method("identity", settings={"note": "moving labels scored unwarped; det J = 1 everywhere"})


def ants_syn(reg_iterations: tuple[int, ...] = (40, 20, 0), name: str = "ants_syn") -> Method:
    """ANTs SyN (antspyx ``SyNOnly``: no affine stage, the inputs are pre-aligned) with default settings."""
    try:
        import ants  # noqa: F401

        available, why_not = True, ""
    except ImportError:
        available, why_not = False, "antspyx not installed (pip install -r requirements-bench.txt)"
    iterations = ",".join(str(i) for i in reg_iterations)

    def command(pair: Pair, out_dir: Path) -> list[str]:
        cmd = [sys.executable, "-m", "bench.accuracy.ants_syn", "--fixed", str(pair.fixed_image)]
        cmd += ["--moving", str(pair.moving_image), "--out", str(out_dir), "--reg_iterations", iterations]
        if pair.moving_label is not None:
            cmd += ["--moving_label", str(pair.moving_label)]
        return cmd

    settings = {"type_of_transform": "SyNOnly", "reg_iterations": list(reg_iterations), "metric": "mattes (default)"}
    return Method(name, command, None, available, why_not, settings)


def _bundle_command(bundle_root: Path, config_files: list[str], overrides: dict[str, str]):
    config = "[" + ",".join(f"'{c}'" for c in config_files) + "]"

    def command(pair: Pair, out_dir: Path) -> list[str]:
        cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", config]
        cmd += ["--moving_image", str(Path(pair.moving_image).resolve())]
        cmd += ["--fixed_image", str(Path(pair.fixed_image).resolve())]
        if pair.moving_label is not None:
            cmd += ["--moving_label", str(Path(pair.moving_label).resolve())]
        if pair.fixed_label is not None:
            cmd += ["--fixed_label", str(Path(pair.fixed_label).resolve())]
        cmd += ["--output_dir", str(Path(out_dir).resolve())]
        for key, value in overrides.items():
            cmd += [f"--{key}", str(value)]
        return cmd

    return command


def bundle_instance_optimisation(bundle_root: Path, overrides: dict[str, str] | None = None, name: str = "bundle_io") -> Method:
    """The bundle's instance optimisation on pre-aligned pairs (``inference.json`` with 30 fine-tuning steps, no affine
    stage, no refinement), default settings unless ``overrides`` (config id → value, passed as ``--id value``) are
    given."""
    bundle_root = Path(bundle_root).resolve()
    configs = ["configs/inference.json"]
    missing = [c for c in configs if not (bundle_root / c).exists()]
    overrides = {**PLAIN_INFERENCE, "instance_optimization_iterations": "30", **(overrides or {})}
    return Method(
        name,
        _bundle_command(bundle_root, configs, overrides),
        bundle_root,
        available=not missing,
        why_not=f"missing {missing}" if missing else "",
        settings={"configs": configs, "overrides": overrides},
    )


def bundle_trained(bundle_root: Path, name: str = "bundle_trained") -> Method:
    """Plain inference with the bundle's trained weights (``models/model.pt``), when they exist: the network's forward
    pass on pre-aligned pairs (no affine stage, no refinement)."""
    bundle_root = Path(bundle_root).resolve()
    configs = ["configs/inference.json"]
    missing = [c for c in configs + ["models/model.pt"] if not (bundle_root / c).exists()]
    return Method(
        name,
        _bundle_command(bundle_root, configs, dict(PLAIN_INFERENCE)),
        bundle_root,
        available=not missing,
        why_not=f"missing {missing}" if missing else "",
        settings={"configs": configs, "weights": "models/model.pt"},
    )


def build_methods(
    names: list[str], bundle_root: Path, io_overrides: dict[str, str] | None = None, syn_iterations=(40, 20, 0)
) -> list[Method]:
    """Build the requested methods by name: ``identity``, ``ants_syn``, ``bundle_io``, ``bundle_trained``."""
    factories = {
        "identity": identity,
        "ants_syn": lambda: ants_syn(tuple(syn_iterations)),
        "bundle_io": lambda: bundle_instance_optimisation(bundle_root, io_overrides),
        "bundle_trained": lambda: bundle_trained(bundle_root),
    }
    unknown = [n for n in names if n not in factories]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {sorted(factories)}.")
    return [factories[n]() for n in names]
