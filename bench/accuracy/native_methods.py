# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""The methods of the native-pair benchmark and the order in which the runner does (pair, method) tasks.

A method runs on either the **native** pair (moving scan in its own scanner space) or the **pre-aligned** pair (the
moving scan and labels resampled into the fixed space by that pair's ``ants_affine`` result, written by that run).
Each builds the command of its own process; every command writes ``warped_label.nii.gz`` (and, when deformable,
``jacobian_det.nii.gz``) on the fixed grid into the folder it is given.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

from bench.accuracy.native_pairs import NativePair

__all__ = ["DEFAULT_METHODS", "METHODS", "NativeMethod", "prealigned_pair", "task_order"]

REPO_ROOT = Path(__file__).resolve().parents[2]
BUNDLE_ROOT = REPO_ROOT / "bundle"


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
