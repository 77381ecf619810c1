# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""The registration methods compared by the accuracy benchmark, each as a command run in its own process.

**Pre-aligned folder methods** (:class:`Method`, :func:`build_methods`; ``bench.accuracy.run``). Every method
writes, into its output folder and on the fixed image's grid, ``warped_label.nii.gz`` (when a moving label is given)
and a displacement ``ddf.nii.gz`` and/or ``jacobian_det.nii.gz``; the runner scores all of them with the same code. Running each method as a separate process gives an honest wall time (imports and file I/O included, as a user
sees them) and its own peak resident memory.

**Native-pair methods** (:class:`NativeMethod`, :data:`METHODS`, :func:`task_order`; ``bench.accuracy.native``).
A method runs on either the **native** pair (moving scan in its own scanner space) or the **pre-aligned** pair (the
moving scan and labels resampled into the fixed space by that pair's ``ants_affine`` result, written by that run).
Each builds the command of its own process; every command writes ``warped_label.nii.gz`` (and, when deformable,
``jacobian_det.nii.gz``) on the fixed grid into the folder it is given.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

from bench.accuracy import BUNDLE_ROOT
from bench.accuracy.pairs import NativePair, Pair

REPO_ROOT = BUNDLE_ROOT.parent

#: run overrides of configs/inference.json for the network alone on pre-aligned pairs (the pipeline's affine stage and
#: field refinement off), as the methods of this benchmark were defined before inference.json held the whole pipeline
PLAIN_INFERENCE = {"affine_transform": "none", "refine_iterations": "0"}

__all__ = [
    "DEFAULT_METHODS",
    "METHODS",
    "Method",
    "NativeMethod",
    "ants_syn",
    "build_methods",
    "bundle_instance_optimisation",
    "bundle_trained",
    "identity",
    "task_order",
]


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


# ---------------------------------------------------------------- native-pair methods


@dataclass(frozen=True)
class NativeMethod:
    """A named method.

    Args:
        name: key in the results JSON.
        inputs: ``"native"`` or ``"prealigned"`` (needs the pair's ``ants_affine`` first).
        mode: the ``bench.accuracy.ants_native`` mode, or ``"bundle"`` for the bundle's CLI.
        reg_iterations: SyN iterations per level (deformable ANTs modes only).
        extra: extra arguments (bundle: ``["--iterations", "0"]``).
        masks: pass the pair's brain masks (bundle: ``--moving_mask/--fixed_mask``; ANTs: ``mask``/``moving_mask``,
            as ``antsRegistration -x``); only for pairs that have them.
        deformable: whether det J statistics apply.
        tier: run order (lower first); within a tier pairs go in their fixed order.
    """

    name: str
    inputs: str
    mode: str
    reg_iterations: tuple[int, ...] = ()
    extra: tuple[str, ...] = ()
    deformable: bool = False
    tier: int = 0
    settings: dict = field(default_factory=dict)
    masks: bool = False

    def command(self, pair: NativePair, out_dir: Path, seed: int) -> tuple[list[str], Path]:
        """(argv, working directory) of this method on ``pair`` writing into ``out_dir``."""
        if self.masks and not (pair.fixed_mask and pair.moving_mask):
            raise ValueError(f"{self.name} needs a pair with brain masks; {pair.name} has none.")
        if self.mode == "bundle":
            argv = [
                sys.executable,
                "-m",
                "scripts.cli",
                "register",
                "--fixed",
                pair.fixed_image,
                "--moving",
                pair.moving_image,
            ]
            argv += ["--out", str(out_dir), "--fixed_label", pair.fixed_label, "--moving_label", pair.moving_label]
            if self.masks:
                argv += ["--fixed_mask", pair.fixed_mask, "--moving_mask", pair.moving_mask]
            return argv + list(self.extra), BUNDLE_ROOT
        argv = [sys.executable, "-m", "bench.accuracy.ants_native", "--mode", self.mode, "--fixed", pair.fixed_image]
        argv += ["--moving", pair.moving_image, "--moving_label", pair.moving_label, "--out", str(out_dir)]
        if self.reg_iterations:
            argv += ["--reg_iterations", ",".join(str(i) for i in self.reg_iterations)]
        if self.mode != "identity":
            argv += ["--random_seed", str(seed)]
        if self.masks:
            argv += ["--fixed_mask", pair.fixed_mask, "--moving_mask", pair.moving_mask]
        return argv + list(self.extra), REPO_ROOT


def _ants(name, inputs, mode, its=(), tier=0, extra=(), masks=False):
    settings = {"antspyx": f"registration(type_of_transform={mode!r})"} if mode != "identity" else {}
    if its:
        settings["reg_iterations"] = list(its)
    if masks:
        settings["masks"] = "mask=fixed brain mask, moving_mask=moving brain mask (antsRegistration -x)"
    deformable = mode in ("SyN", "SyNOnly")
    return NativeMethod(name, inputs, mode, tuple(its), tuple(extra), deformable, tier, settings, masks)


_BUNDLE_AFFINE_ONLY = NativeMethod(
    "bundle_affine_only",
    "native",
    "bundle",
    extra=("--affine_only", "--overwrite"),
    tier=5,
    settings={"cli": "scripts.cli register --affine_only (the bundle's affine stage alone)"},
)
_BUNDLE_DEFAULT = NativeMethod(
    "bundle_default",
    "native",
    "bundle",
    extra=("--overwrite",),
    deformable=True,
    tier=5,
    settings={"cli": "scripts.cli register (defaults: affine stage + one forward pass + velocity refinement)"},
)


def _with_masks(method: NativeMethod, cli: str) -> NativeMethod:
    """``method`` given the pair's brain masks (``<name>_masks``): only pairs that have masks run it."""
    return replace(method, name=f"{method.name}_masks", settings={"cli": cli}, masks=True)


METHODS: dict[str, NativeMethod] = {
    m.name: m
    for m in (
        _ants("identity", "native", "identity", tier=1),
        _ants("ants_affine", "native", "Affine", tier=1),
        _ants("identity_after_affine", "prealigned", "identity", tier=1),
        _ants("ants_syn_60_30_10", "native", "SyN", (60, 30, 10), tier=2),
        _ants("ants_synonly_60_30_10", "prealigned", "SyNOnly", (60, 30, 10), tier=3),
        _ants("ants_syn_40_20_0", "native", "SyN", (40, 20, 0), tier=4),
        _ants("ants_synonly_40_20_0", "prealigned", "SyNOnly", (40, 20, 0), tier=4),
        _ants("ants_affine_masks", "native", "Affine", tier=7, masks=True),
        _ants("ants_syn_60_30_10_masks", "native", "SyN", (60, 30, 10), tier=8, masks=True),
        _BUNDLE_AFFINE_ONLY,
        _BUNDLE_DEFAULT,
        _with_masks(_BUNDLE_DEFAULT, "scripts.cli register --moving_mask MM --fixed_mask FM (defaults, brain masks)"),
        _with_masks(_BUNDLE_AFFINE_ONLY, "scripts.cli register --affine_only --moving_mask MM --fixed_mask FM"),
        NativeMethod(
            "bundle_native_it0",
            "native",
            "bundle",
            extra=("--iterations", "0", "--refine_iterations", "0", "--overwrite"),
            deformable=True,
            tier=6,
            settings={"cli": "scripts.cli register --iterations 0 --refine_iterations 0 (affine stage + one forward pass)"},
        ),
        NativeMethod(
            "bundle_register_it0",
            "prealigned",
            "bundle",
            extra=("--affine", "none", "--iterations", "0", "--refine_iterations", "0", "--overwrite"),
            deformable=True,
            tier=6,
            settings={"cli": "scripts.cli register --affine none --iterations 0 --refine_iterations 0 (one forward pass)"},
        ),
        NativeMethod(
            "bundle_register",
            "prealigned",
            "bundle",
            extra=("--affine", "none", "--overwrite"),
            deformable=True,
            tier=6,
            settings={"cli": "scripts.cli register --affine none (defaults: one forward pass + velocity refinement)"},
        ),
    )
}
DEFAULT_METHODS = tuple(n for n, m in METHODS.items() if m.mode != "bundle")


def task_order(pairs: list[NativePair], method_names: list[str]) -> list[tuple[NativePair, NativeMethod]]:
    """All (pair, method) tasks: by tier, then pair (in the given order), then the method's place in :data:`METHODS`."""
    unknown = [n for n in method_names if n not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {list(METHODS)}.")
    rank = {name: i for i, name in enumerate(METHODS)}
    chosen = sorted((METHODS[n] for n in dict.fromkeys(method_names)), key=lambda m: (m.tier, rank[m.name]))
    tiers = sorted({m.tier for m in chosen})
    tasks = []
    for tier in tiers:
        for pair in pairs:
            tasks += [(pair, m) for m in chosen if m.tier == tier and (pair.fixed_mask or not m.masks)]
    return tasks
