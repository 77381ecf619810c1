# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""Sweep of the affine stage's settings on brain_mal2012 pairs (use tuning people only): the stage's own CPU seconds
and steps, the seg14 Dice of the affine alone, and (``--final``) the seg14 Dice of the whole default pipeline run with
that affine setting.

    python -m bench.accuracy.affine_sweep --data ../shared/data/brain_mal2012 \\
        --pairs mal1015:mal1014 mal1019:mal1014 --settings 6-4-2:100-60-30 6-4-3:100-60-30,tolerance=1e-5 \\
        [--final 6-4-2:100-60-30 ...] --json bench/accuracy/results/affine_sweep_tuning.json

Each pair ``M:F`` reads ``DATA/M_t1.nii.gz`` and ``DATA/M_seg14.nii.gz`` (and the same for ``F``; ``--suffix`` for
other image names). Each setting is ``LEVELS:ITERATIONS`` (spacings in mm and Adam steps per level, coarse to fine,
``-`` between levels) followed by optional ``key=value`` fields: ``tolerance`` and ``window`` (the early stop, default
0 = off and 10 steps), ``search`` (the start search's steps per rotation, default 20), ``similarity`` (``ncc``,
``lncc`` or ``mi``, default ``ncc``) and ``init`` (``moments``, ``com`` or ``identity``, default ``moments``). ``6-4-2:100-60-30`` is the
stage of configs/inference.json (kept after this sweep: docs/benchmarks.md, "The affine stage tuned for time").

The affine stage: :py:class:`scripts.engines.AffineRegistration` with the settings of configs/inference.json otherwise,
on the two scans reoriented to RAS (as the pipeline's ``Orientationd``; the stage works in world coordinates, so the
orientation changes nothing but float rounding), timed with ``time.process_time`` around the call (all the process's
threads; ``--threads 1`` by default, so the seconds count work, not OpenMP spin-waiting on a shared machine; Adam is
constructed once beforehand so its one-time import is not booked to the first setting). Its affine Dice: the moving
seg14 labels taken onto the fixed grid through the result (nearest neighbour), scored by
:py:func:`bench.accuracy.scoring.score_labels` over the classes present in both.

``--final``: for the settings named, the whole pipeline (configs/inference.json as ``register`` runs it, the network
and the field refinement after the affine stage) runs in this process with the affine config ids overridden
(``affine_levels_mm``, ``affine_iterations``, ``affine_tolerance``, ``affine_tolerance_window``), into a temporary
folder; its ``warped_label.nii.gz`` is scored the same way (the benchmark's ``bundle_default`` score). The JSON is
rewritten atomically after every row; a rerun skips the (pair, setting, kind) rows it already holds.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from bench.accuracy.io import write_json_atomic
from bench.accuracy.runner import machine_info
from bench.accuracy.scoring import read_labels, score_labels
from scripts.engines import AffineRegistration
from scripts.layers import resample_moving

OPTIONS = {"tolerance": float, "window": int, "search": int, "similarity": str, "init": str}


@dataclass(frozen=True)
class Setting:
    """One affine-stage setting (see the module docstring for its text form)."""

    text: str
    levels_mm: tuple[float, ...]
    iterations: tuple[int, ...]
    options: dict = field(default_factory=dict, compare=False)

    @classmethod
    def parse(cls, text: str) -> Setting:
        head, *extras = text.split(",")
        levels, _, iterations = head.partition(":")
        try:
            levels_mm = tuple(float(v) for v in levels.split("-"))
            steps = tuple(int(v) for v in iterations.split("-"))
        except ValueError:
            levels_mm, steps = (), ()
        if not levels_mm or len(levels_mm) != len(steps):
            raise ValueError(f"setting {text!r}: expected LEVELS:ITERATIONS with one count per level, e.g. "
                             "6-4-2:100-60-30.")
        options: dict = {}
        for extra in extras:
            key, _, value = extra.partition("=")
            if key not in OPTIONS or not value:
                raise ValueError(f"setting {text!r}: unknown field {extra!r}; expected one of "
                                 f"{', '.join(k + '=VALUE' for k in OPTIONS)}.")
            options[key] = OPTIONS[key](value)
        return cls(text, levels_mm, steps, options)

    def registration(self) -> AffineRegistration:
        """The stage as configs/inference.json builds it, with this setting's levels, steps and early stop."""
        return AffineRegistration(
            "affine", self.levels_mm, self.iterations, similarity=self.options.get("similarity", "ncc"),
            init=self.options.get("init", "moments"),
            search_iterations=self.options.get("search", 20), tolerance=self.options.get("tolerance", 0.0),
            tolerance_window=self.options.get("window", 10),
        )

    def overrides(self) -> dict:
        """The run overrides of configs/inference.json that give the pipeline this setting."""
        unmapped = sorted(set(self.options) & {"search", "init"})
        if unmapped:
            raise ValueError(f"setting {self.text!r}: {unmapped} have no config id here; --final cannot run it.")
        chosen = {"affine_similarity": self.options["similarity"]} if "similarity" in self.options else {}
        return {"affine_levels_mm": list(self.levels_mm), "affine_iterations": list(self.iterations),
                "affine_tolerance": self.options.get("tolerance", 0.0),
                "affine_tolerance_window": self.options.get("window", 10)} | chosen


def _load(data: Path, stem: str, suffix: str) -> dict:
    image = nib.as_closest_canonical(nib.load(str(data / f"{stem}_{suffix}.nii.gz")))
    label = nib.as_closest_canonical(nib.load(str(data / f"{stem}_seg14.nii.gz")))
    if not np.allclose(label.affine, image.affine, atol=1e-3) or label.shape != image.shape:
        raise ValueError(f"{stem}: labels and image are not on one grid.")
    return {
        "image": torch.as_tensor(image.get_fdata(dtype=np.float32))[None, None],
        "affine": torch.as_tensor(image.affine, dtype=torch.float64),
        "label": np.rint(np.asanyarray(label.dataobj)).astype(np.int16),
    }


def affine_row(setting: Setting, moving: dict, fixed: dict) -> dict:
    """Run the stage once: CPU seconds, steps per level, losses and the affine-only seg14 Dice."""
    registration = setting.registration()
    start = time.process_time()
    matrix = registration(moving["image"], fixed["image"], moving["affine"], fixed["affine"])[0]
    cpu_s = time.process_time() - start
    report = registration.last_report
    warped = resample_moving(torch.as_tensor(moving["label"])[None, None].float(), moving["affine"],
                             fixed["label"].shape, fixed["affine"], matrix, mode="nearest")[0, 0]
    scores = score_labels(fixed["label"], moving["label"], warped.round().to(torch.int16).numpy())
    return {
        "cpu_s": cpu_s, "dice": scores["dice_mean"], "final_loss": report["final_loss"],
        "steps": [level["steps"] for level in report["levels"]], "points": [lv["points"] for lv in report["levels"]],
        "matrix": matrix.tolist(),
    }


def final_row(setting: Setting, data: Path, moving: str, fixed: str, suffix: str) -> dict:
    """Run the whole default pipeline with this affine setting and score its warped labels."""
    from scripts.cli import _run_workflow, workflow_overrides

    with tempfile.TemporaryDirectory(prefix="affine_sweep_") as out:
        files, overrides = workflow_overrides(
            fixed=str(data / f"{fixed}_{suffix}.nii.gz"), moving=str(data / f"{moving}_{suffix}.nii.gz"),
            fixed_label=str(data / f"{fixed}_seg14.nii.gz"), moving_label=str(data / f"{moving}_seg14.nii.gz"),
            out=out, qc=False,
        )
        start = time.process_time()
        _run_workflow(files, overrides | setting.overrides())
        cpu_s = time.process_time() - start
        fixed_label, _ = read_labels(data / f"{fixed}_seg14.nii.gz")
        moving_label, _ = read_labels(data / f"{moving}_seg14.nii.gz")
        warped, _ = read_labels(Path(out) / "warped_label.nii.gz")
    return {"dice": score_labels(fixed_label, moving_label, warped)["dice_mean"], "pipeline_cpu_s": cpu_s}


def summary(rows: list[dict], settings: list[Setting], baseline: str) -> list[dict]:
    """Per setting and kind: pairs, mean Dice, its change against ``baseline`` on the same pairs, mean CPU s/steps."""
    out = []
    for kind in ("affine", "final"):
        reference = {r["pair"]: r["dice"] for r in rows if r["kind"] == kind and r["setting"] == baseline}
        for setting in settings:
            mine = [r for r in rows if r["kind"] == kind and r["setting"] == setting.text]
            if not mine:
                continue
            same = [r for r in mine if r["pair"] in reference]
            entry = {"kind": kind, "setting": setting.text, "pairs": len(mine),
                     "dice_mean": float(np.mean([r["dice"] for r in mine])),
                     "dice_change_vs_baseline": float(np.mean([r["dice"] - reference[r["pair"]] for r in same]))
                     if same else None}
            if kind == "affine":
                entry.update(cpu_s_mean=float(np.mean([r["cpu_s"] for r in mine])),
                             steps_mean=[float(v) for v in np.mean([r["steps"] for r in mine], axis=0)])
            out.append(entry)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="folder of the scans (brain_mal2012)")
    parser.add_argument("--pairs", nargs="+", required=True, help="pairs MOVING:FIXED (file stems before _t1)")
    parser.add_argument("--suffix", default="t1", help="image file suffix: DATA/<stem>_<suffix>.nii.gz")
    parser.add_argument("--settings", nargs="+", default=["6-4-2:100-60-30"],
                        help="affine-only rows; the first is the baseline of the summary's Dice change")
    parser.add_argument("--final", nargs="*", default=[], help="settings to run through the whole pipeline too")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: CPU seconds count work only, no OpenMP spin-waiting)")
    parser.add_argument("--json", help="write the rows and the summary here (atomically, after each row)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.optim.Adam([torch.zeros(1, requires_grad=True)])  # its one-time import is not the first setting's work
    data = Path(args.data)
    pairs = [(m, f) for m, _, f in (p.partition(":") for p in args.pairs)]
    if any(not m or not f for m, f in pairs):
        parser.error("name the pairs as MOVING:FIXED.")
    settings = [Setting.parse(s) for s in args.settings]
    finals = [Setting.parse(s) for s in args.final]
    document = {"rows": []}
    if args.json and Path(args.json).exists():
        document = json.loads(Path(args.json).read_text())
    document.update({
        "what": "affine stage settings (bench/accuracy/affine_sweep.py): the stage's CPU seconds (time.process_time) "
                "and steps, seg14 Dice of the affine alone (kind affine) and of the whole pipeline (kind final)",
        "machine": machine_info(args.threads, list(argv) if argv is not None else sys.argv[1:]),
    })
    rows = document["rows"]
    done = {(r["pair"], r["setting"], r["kind"]) for r in rows}
    known = {s.text: s for s in settings + finals}
    for moving, fixed in pairs:
        name = f"{moving}_to_{fixed}"
        scans = {stem: _load(data, stem, args.suffix) for stem in (moving, fixed)}
        for kind, chosen in (("affine", settings), ("final", finals)):
            for setting in chosen:
                if (name, setting.text, kind) in done:
                    continue
                if kind == "affine":
                    row = affine_row(setting, scans[moving], scans[fixed])
                    note = f"{row['cpu_s']:.2f} CPU s, steps {row['steps']}"
                else:
                    row = final_row(setting, data, moving, fixed, args.suffix)
                    note = f"pipeline {row['pipeline_cpu_s']:.0f} CPU s"
                rows.append({"pair": name, "setting": setting.text, "kind": kind, **row})
                print(f"{name} {kind} {setting.text}: Dice {row['dice']:.4f}, {note}", flush=True)
                if args.json:
                    document["summary"] = summary(rows, list(known.values()), settings[0].text)
                    write_json_atomic(document, args.json)
    table = summary(rows, list(known.values()), settings[0].text)
    print("\n| kind | setting | pairs | mean Dice | change vs baseline | stage CPU s | steps per level |")
    print("|---|---|---:|---:|---:|---:|---|")
    for s in table:
        change = "" if s["dice_change_vs_baseline"] is None else f"{s['dice_change_vs_baseline']:+.4f}"
        steps = ", ".join(f"{v:.0f}" for v in s.get("steps_mean", []))
        cpu = f"{s['cpu_s_mean']:.2f}" if "cpu_s_mean" in s else ""
        print(f"| {s['kind']} | `{s['setting']}` | {s['pairs']} | {s['dice_mean']:.4f} | {change} | {cpu} | {steps} |")
    if args.json:
        document["summary"] = table
        write_json_atomic(document, args.json)


if __name__ == "__main__":
    main()
