# Copyright (c) the SACB-Net MONAI bundle authors.
# Licensed under the Apache License, Version 2.0 (the "License"); see the LICENSE file at the repository root.
"""
Where ``register``'s time goes, stage by stage, on real native pairs.

Each run is a fresh process (so imports count as a user meets them) that times the imports and then runs
``scripts.cli.register`` with the classes that implement each stage (the transforms and inferers named in
``configs/inference.json``) wrapped by a timer. Time is booked to the innermost stage running (the network's forward
passes inside the refinement's inferer count as network, not refinement), so the stages never overlap::

    import        python -c "import scripts.cli" (torch, MONAI, nibabel, SimpleITK) before the run starts
    read          header checks, decoding, content checks, reorientation, masks
    affine        the affine stage (AffineAlignd: moments + the multi-resolution affine optimisation)
    resample      moving image (and label) onto the fixed grid, intensity scaling
    network       SACBNet.forward (every call: the forward pass of the deformable stage)
    refinement    FieldRefinementInferer minus the network calls inside it
    postprocess   warping by the field, Jacobian, restoring the fixed grid, warping the sources through the transforms
    write         the NIfTI and ITK/ANTs transform files (the part the main thread waits for)
    metrics       Dice / folding of metrics.json
    other         the rest of the run (workflow set-up, config parsing, engine, logging)

Use the default ``--timer wall`` on an idle machine. ``--timer cpu`` books process CPU seconds (every thread, to the
stage the main thread is in) and only says something on an idle machine too: under load, OpenMP threads that spin
while waiting count as busy and inflate the parallel stages (measured: a whole head 1.05x its stripped brain in CPU
seconds under load, 1.9-2.1x in wall seconds idle).

Usage::

    python bench/profile_register.py --pair MOVING FIXED [--pair M2 F2 ...] --out bench/results/profile_register.json
    python bench/profile_register.py --markdown bench/results/profile_register.json  # print the table again

Extra ``register`` flags go after ``--``, e.g. ``-- --refine_iterations 0 --affine none``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundle"

# Stage -> (module, class, method) whose calls make up the stage.
STAGES: dict[str, list[tuple[str, str, str]]] = {
    "read": [
        ("scripts.io.input_checks", "CheckRegistrationHeadersd", "__call__"),
        ("scripts.io.input_checks", "LoadRegistrationInputsd", "__call__"),
        ("scripts.io.input_checks", "CheckRegistrationContentd", "__call__"),
        ("monai.transforms", "EnsureChannelFirstd", "__call__"),
        ("monai.transforms", "Orientationd", "__call__"),
        ("scripts.workflow.intensity", "MaskImagesd", "__call__"),
    ],
    "affine": [("scripts.workflow.alignment", "AffineAlignd", "__call__")],
    "resample": [
        ("scripts.workflow.grid_transforms", "ResampleToFixedGridd", "__call__"),
        ("scripts.workflow.intensity", "ScaleRegistrationIntensityd", "__call__"),
    ],
    "network": [("scripts.networks.sacb_net", "SACBNet", "forward")],
    "refinement": [("scripts.engines.field_refinement", "FieldRefinementInferer", "__call__")],
    "postprocess": [
        ("scripts.workflow.grid_transforms", "WarpByDdfd", "__call__"),
        ("scripts.workflow.grid_transforms", "JacobianDeterminantd", "__call__"),
        ("scripts.workflow.grid_transforms", "RestoreOriginalGridd", "__call__"),
        ("scripts.workflow.transform_outputs", "WarpFromSourced", "__call__"),
    ],
    "write": [
        ("scripts.workflow.transform_outputs", "SaveTransformsd", "__call__"),
        ("scripts.io.writer", "SaveRegistrationOutputsd", "__call__"),
        ("scripts.io.writer", "ConcurrentWriter", "wait"),
        ("scripts.workflow.qc", "SaveQCFigured", "__call__"),
    ],
    "metrics": [("scripts.workflow.metrics", "RegistrationMetricsd", "__call__")],
}


class StageTimer:
    """
    Books the time of wrapped calls to stages, exclusively: a stage call made inside another one is taken out of the
    outer stage's time (innermost stage wins), so the stage times add up to at most the run's time.
    """

    def __init__(self, timer) -> None:
        self.timer = timer
        self.seconds = dict.fromkeys(STAGES, 0.0)
        self._stack: list[list] = []  # [stage, start, time of nested stage calls]

    def wrap(self, stage: str, method):
        """``method`` with its calls booked to ``stage``."""
        timer = self

        def timed(*args, **kwargs):
            timer._stack.append([stage, timer.timer(), 0.0])
            try:
                return method(*args, **kwargs)
            finally:
                _, start, nested = timer._stack.pop()
                elapsed = timer.timer() - start
                timer.seconds[stage] += elapsed - nested
                if timer._stack:
                    timer._stack[-1][2] += elapsed

        timed.__wrapped__ = method  # type: ignore[attr-defined]
        return timed

    def install(self) -> None:
        """Wrap every method of :data:`STAGES` on its class (instances made later or earlier both see it)."""
        import importlib

        for stage, targets in STAGES.items():
            for module_name, class_name, method_name in targets:
                cls = getattr(importlib.import_module(module_name), class_name)
                setattr(cls, method_name, self.wrap(stage, getattr(cls, method_name)))


def _child(args: argparse.Namespace) -> None:
    """Run in a fresh process: time the imports and the stages of one register call, print one JSON line."""
    timer = time.process_time if args.timer == "cpu" else time.perf_counter
    sys.path.insert(0, str(BUNDLE))
    os.chdir(BUNDLE)
    start = timer()
    wall_start = time.perf_counter()
    # What every run imports (scripts.cli itself defers its heavy imports to the run): timed here, not in a stage.
    import monai  # noqa: E402,F401
    import nibabel  # noqa: E402,F401
    import SimpleITK  # noqa: E402,F401
    import torch  # noqa: E402,F401

    import scripts.cli as cli  # noqa: E402
    import scripts.workflow  # noqa: E402,F401

    imported = timer() - start
    stage_timer = StageTimer(timer)
    stage_timer.install()
    run_start = timer()
    cli.register(moving=args.moving, fixed=args.fixed, out=args.out_dir, overwrite=True, **json.loads(args.flags))
    total = timer() - run_start
    booked = stage_timer.seconds
    stages = {"import": imported, **booked, "other": max(0.0, total - sum(booked.values()))}
    print("PROFILE " + json.dumps({"stages": stages, "total": imported + total, "wall": time.perf_counter() - wall_start}))


def _register_flags(extra: list[str]) -> dict:
    """``--name value`` pairs after ``--`` -> keyword arguments of ``scripts.cli.register`` (numbers parsed)."""
    flags: dict = {}
    key = None
    for token in extra:
        if token.startswith("--"):
            key = token[2:]
            flags[key] = True
        elif key is not None:
            try:
                flags[key] = json.loads(token)
            except json.JSONDecodeError:
                flags[key] = token
            key = None
    return flags


def markdown(report: dict) -> str:
    """The profile table: one column per run, seconds and share of the total per stage."""
    runs = report["runs"]
    stages = ["import", *STAGES, "other"]
    head = "| stage | " + " | ".join(run["name"] for run in runs) + " |"
    lines = [head, "|---|" + "---:|" * len(runs)]
    for stage in stages:
        cells = [f"{run['stages'][stage]:.1f} s ({run['stages'][stage] / run['total']:.0%})" for run in runs]
        lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    lines.append("| **total** | " + " | ".join(f"**{run['total']:.1f} s**" for run in runs) + " |")
    timer = report.get("timer", "wall")
    return "\n".join(lines) + f"\n\nTimer: {timer}; register flags: {report.get('flags') or 'defaults'}.\n"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pair", nargs=2, action="append", metavar=("MOVING", "FIXED"), default=[])
    parser.add_argument("--timer", choices=("wall", "cpu"), default="wall")
    parser.add_argument("--out", type=Path, help="write the report (JSON) here and the table beside it (.md)")
    parser.add_argument("--markdown", type=Path, help="print the table of an existing report and exit")
    parser.add_argument("--child", nargs=4, metavar=("MOVING", "FIXED", "OUT_DIR", "FLAGS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.markdown:
        print(markdown(json.loads(args.markdown.read_text())))
        return 0
    if args.child:
        args.moving, args.fixed, args.out_dir, args.flags = args.child
        _child(args)
        return 0
    pairs = [tuple(p) for p in args.pair]
    if not pairs:
        parser.error("give at least one --pair MOVING FIXED")
    flags = _register_flags(extra)
    runs = []
    for moving, fixed in pairs:
        with tempfile.TemporaryDirectory(prefix="profile_register_") as out_dir:
            command = [sys.executable, str(Path(__file__).resolve()), "--timer", args.timer,
                       "--child", str(Path(moving).resolve()), str(Path(fixed).resolve()), out_dir, json.dumps(flags)]
            done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
        line = next((l for l in done.stdout.splitlines() if l.startswith("PROFILE ")), None)
        if done.returncode != 0 or line is None:
            print(done.stdout[-2000:], done.stderr[-4000:], file=sys.stderr)
            raise SystemExit(f"register failed on {moving} -> {fixed} (exit {done.returncode})")
        record = json.loads(line[len("PROFILE "):])
        record["name"] = f"{Path(moving).name.split('.')[0]} -> {Path(fixed).name.split('.')[0]}"
        record["pair"] = [str(moving), str(fixed)]
        runs.append(record)
        print(f"{record['name']}: total {record['total']:.1f} s", flush=True)
    report = {"timer": args.timer, "flags": flags, "cpu_count": os.cpu_count(), "runs": runs,
              "date": time.strftime("%Y-%m-%d")}
    table = markdown(report)
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        args.out.with_suffix(".md").write_text(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
