# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""Sweep of the field-refinement settings on brain_mal2012 pairs (use tuning people only), each from a finished
``register --iterations 0 --refine_iterations 0`` run of that pair: seg14 Dice and % det J <= 0 in the fixed brain, and
the refinement's own CPU seconds, grid and steps taken.

    cd bundle && python -m scripts.cli register --fixed $D/mal1014_t1.nii.gz --moving $D/mal1015_t1.nii.gz \
        --fixed_label $D/mal1014_seg14.nii.gz --moving_label $D/mal1015_seg14.nii.gz --out RUNS/mal1015_to_mal1014 \
        --iterations 0 --refine_iterations 0
    python -m bench.accuracy.refinement_sweep --runs RUNS --data $D --pairs mal1015:mal1014 mal1019:mal1125 \
        --settings velocity,50,2,0.5,9 velocity,50,2,0.5,5 velocity,30,2,0.5,9,tolerance=0.01,max_voxels=400000 \
        --json bench/accuracy/results/refinement_sweep.json

(``--out RUN --moving mal1015 --fixed mal1014`` names one pair by its run folder, as before.) Each pair ``M:F`` reads
``DATA/M_t1.nii.gz``, ``DATA/M_seg14.nii.gz`` (and the same for ``F``) and the run folder ``RUNS/M_to_F``; a whole-head
pair names its files with ``--suffix`` (``--suffix head_t1`` for ``brain_freesurfer_head``'s ``cfmi-sub09_head_t1``).

Each setting is ``parameterization,iterations,learning_rate,smoothness_weight,lncc_kernel`` followed by optional
fields: ``unsquared`` (Eq. (1) of the SACB-Net supplement, ``LocalNCCLoss(squared=False)``, instead of the squared local
NCC) and ``key=value`` for ``scale`` (default 0.5), ``tolerance`` and ``window`` (the early stop, default 0 = off and
10 steps), ``max_voxels`` (the grid's voxel budget, default 0 = none) and ``steps`` (squaring steps, default 4). The
first setting above is the refinement of configs/inference.json before early stopping and the budget existed.

The refinement runs as ``register`` runs it: :py:class:`scripts.engines.FieldRefinementInferer` on the pair's
foreground box (``foreground_box`` / ``crop_to_box`` / ``extend_from_box``, what
:py:class:`scripts.engines.ForegroundCropInferer` does around it; its ``refine`` also returns the steps and losses), on the pair scaled by the pipeline's own
:py:class:`scripts.workflow.ScaleRegistrationIntensityd`. The moving scan and labels are taken onto the fixed grid
through the run's ``affine.mat`` (bundle ``apply``), the refinement starts from the run's ``ddf.nii.gz``; labels are
warped with nearest-neighbour sampling. CPU seconds are ``time.process_time`` around the refinement (all the
process's threads; the machine is shared, so wall time would measure the neighbours).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from bench.accuracy.io import write_json_atomic
from bench.accuracy.runner import machine_info
from bench.accuracy.scoring import dice_per_class, jacobian_stats
from scripts.engines import FieldRefinementInferer, crop_to_box, extend_from_box, foreground_box
from scripts.layers.jacobian import jacobian_determinant
from scripts.layers.warp import warp_image
from scripts.losses import GradientLoss, LocalNCCLoss
from scripts.spatial import apply_transforms
from scripts.workflow import ScaleRegistrationIntensityd

#: the foreground box margin of configs/inference.json (``foreground_crop_margin``)
CROP_MARGIN = 8
OPTIONS = {"scale": float, "tolerance": float, "window": int, "max_voxels": int, "steps": int}


@dataclass(frozen=True)
class Setting:
    """One refinement setting (see the module docstring for its text form)."""

    text: str
    parameterization: str
    iterations: int
    learning_rate: float
    weight: float
    kernel: int
    squared: bool = True
    scale: float = 0.5
    tolerance: float = 0.0
    window: int = 10
    max_voxels: int = 0
    steps: int = 4

    @classmethod
    def parse(cls, text: str) -> Setting:
        fields = text.split(",")
        if len(fields) < 5:
            raise ValueError(f"setting {text!r}: expected parameterization,iterations,lr,weight,kernel[,...].")
        parameterization, iterations, learning_rate, weight, kernel = fields[:5]
        options: dict = {}
        for extra in fields[5:]:
            key, _, value = extra.partition("=")
            if extra == "unsquared":
                options["squared"] = False
            elif key in OPTIONS and value:
                options[key] = OPTIONS[key](value)
            else:
                raise ValueError(f"setting {text!r}: unknown field {extra!r}; expected 'unsquared' or one of "
                                 f"{', '.join(k + '=VALUE' for k in OPTIONS)}.")
        return cls(text, parameterization, int(iterations), float(learning_rate), float(weight), int(kernel), **options)

    def refinement(self, base) -> FieldRefinementInferer:
        return FieldRefinementInferer(
            base, LocalNCCLoss(self.kernel, squared=self.squared), GradientLoss(), self.weight, self.iterations,
            self.learning_rate, self.scale, parameterization=self.parameterization, integration_steps=self.steps,
            tolerance=self.tolerance, tolerance_window=self.window, max_voxels=self.max_voxels,
        )


class _GivenField:
    """A base inferer that returns the run's field on whatever box the crop inferer hands it (the box is found by the
    same :func:`scripts.engines.foreground_box` call on the same pair, so it is the crop of the pair's box)."""

    def __init__(self, ddf: torch.Tensor, box) -> None:
        self.ddf, self.box = ddf, box

    def __call__(self, inputs: torch.Tensor, network=None) -> torch.Tensor:
        crop = self.ddf[(slice(None), slice(None), *self.box)]
        if crop.shape[2:] != inputs.shape[2:]:
            raise RuntimeError(f"box mismatch: field crop {tuple(crop.shape)} for inputs {tuple(inputs.shape)}.")
        return crop


def _load_pair(run: Path, data: Path, moving: str, fixed: str, suffix: str) -> dict:
    fixed_image = nib.load(str(data / f"{fixed}_{suffix}.nii.gz"))
    with tempfile.TemporaryDirectory() as affine_only:
        shutil.copy(run / "affine.mat", Path(affine_only) / "affine.mat")
        moving_image = apply_transforms(fixed_image, data / f"{moving}_{suffix}.nii.gz", affine_only, "linear")
        moving_label = apply_transforms(fixed_image, data / f"{moving}_seg14.nii.gz", affine_only, "nearest")
    images = {
        "moving": torch.as_tensor(np.asanyarray(moving_image.dataobj).astype(np.float32))[None],
        "fixed": torch.as_tensor(fixed_image.get_fdata(dtype=np.float32))[None],
    }
    images = ScaleRegistrationIntensityd(keys=["moving", "fixed"])(images)
    ddf = np.moveaxis(np.asanyarray(nib.load(str(run / "ddf.nii.gz")).dataobj), -1, 0)
    fixed_label = np.asanyarray(nib.load(str(data / f"{fixed}_seg14.nii.gz")).dataobj)
    # the brain mask for det J: the stripped brain's own T1 where the fixed scan is a whole head
    brain_t1 = data / f"{fixed}_brain_t1.nii.gz"
    brain = (nib.load(str(brain_t1)).get_fdata() if brain_t1.exists() else fixed_image.get_fdata()) > 0
    return {
        "inputs": torch.cat([torch.as_tensor(images["moving"]), torch.as_tensor(images["fixed"])], 0)[None].float(),
        "ddf": torch.as_tensor(np.ascontiguousarray(ddf))[None].float(),
        "moving_label": torch.as_tensor(np.asanyarray(moving_label.dataobj))[None, None].float(),
        "fixed_label": fixed_label,
        "brain": brain,
    }


def _score(pair: dict, field: torch.Tensor) -> dict:
    warped = warp_image(pair["moving_label"], field, mode="nearest")[0, 0].numpy()
    ids = [k for k in range(1, 15) if (pair["fixed_label"] == k).any()]
    dice = float(np.mean(list(dice_per_class(pair["fixed_label"], warped, ids).values())))
    det = jacobian_determinant(field).reshape(pair["brain"].shape).numpy()
    return {"dice": dice, "fold_pct": jacobian_stats(det, pair["brain"])["fold_pct"]}


def _summary(rows: list[dict], settings: list[Setting]) -> list[dict]:
    """Mean Dice, largest % det J <= 0, mean CPU seconds and steps per setting over the pairs."""
    out = []
    for setting in settings:
        mine = [r for r in rows if r["setting"] == setting.text]
        if mine:
            out.append({
                "setting": setting.text,
                "pairs": len(mine),
                "dice_mean": float(np.mean([r["dice"] for r in mine])),
                "fold_pct_max": float(max(r["fold_pct"] for r in mine)),
                "cpu_s_mean": float(np.mean([r["cpu_s"] for r in mine])),
                "steps_mean": float(np.mean([r["steps"] for r in mine])),
                "grid_voxels_mean": float(np.mean([np.prod(r["grid"]) for r in mine])),
            })
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="folder of the scans (brain_mal2012, brain_freesurfer_head)")
    parser.add_argument("--runs", help="folder holding one register run per pair, named M_to_F")
    parser.add_argument("--pairs", nargs="+", default=[], help="pairs MOVING:FIXED (file stems before _t1)")
    parser.add_argument("--out", help="one pair's register run folder (with --moving and --fixed)")
    parser.add_argument("--fixed")
    parser.add_argument("--moving")
    parser.add_argument("--suffix", default="t1", help="image file suffix: DATA/<stem>_<suffix>.nii.gz")
    parser.add_argument("--settings", nargs="+", default=["velocity,50,2,0.5,9"])
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: CPU seconds count work only, no OpenMP spin-waiting)")
    parser.add_argument("--json", help="write the rows and the per-setting summary here (atomically, after each row)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = Path(args.data)
    pairs = [(Path(args.runs or ".") / f"{m}_to_{f}", m, f) for m, _, f in (p.partition(":") for p in args.pairs)]
    if args.out:
        pairs.append((Path(args.out), args.moving, args.fixed))
    if not pairs or any(not m or not f for _, m, f in pairs):
        parser.error("name the pairs: --runs RUNS --pairs MOVING:FIXED ..., or --out RUN --moving M --fixed F.")
    settings = [Setting.parse(s) for s in args.settings]
    document = {
        "what": "field refinement settings (bench/accuracy/refinement_sweep.py); seg14 Dice, % det J <= 0 in the "
                "fixed brain, refinement CPU seconds (time.process_time, all threads)",
        "machine": machine_info(args.threads, list(argv) if argv is not None else sys.argv[1:]),
        "rows": [],
    }
    rows = document["rows"]
    for run, moving, fixed in pairs:
        pair = _load_pair(run, data, moving, fixed, args.suffix)
        plain = _score(pair, pair["ddf"])
        rows.append({"pair": f"{moving}_to_{fixed}", "setting": "plain (no refinement)", **plain, "cpu_s": 0.0,
                     "steps": 0, "grid": [0, 0, 0]})
        print(f"{moving} -> {fixed}: plain Dice {plain['dice']:.4f}, det J <= 0 {plain['fold_pct']:.3f} %", flush=True)
        for setting in settings:
            box = foreground_box(pair["inputs"], margin=CROP_MARGIN)
            refinement = setting.refinement(_GivenField(pair["ddf"], box))
            start = time.process_time()
            refined, run_info = refinement.refine(crop_to_box(pair["inputs"], box), None)
            field = extend_from_box(refined, box, pair["inputs"].shape[2:])
            cpu_s = time.process_time() - start
            row = {"pair": f"{moving}_to_{fixed}", "setting": setting.text, **_score(pair, field), "cpu_s": cpu_s,
                   "steps": run_info["steps"], "grid": list(run_info["grid"]),
                   "box": [b.stop - b.start for b in box], "losses": [round(v, 6) for v in run_info["losses"]]}
            rows.append(row)
            print(f"  {setting.text}: Dice {row['dice']:.4f}, det J <= 0 {row['fold_pct']:.3f} %, "
                  f"{cpu_s:.1f} CPU s, {row['steps']} steps on {'x'.join(map(str, row['grid']))}", flush=True)
            if args.json:
                document["summary"] = _summary(rows, settings)
                write_json_atomic(document, args.json)
    summary = _summary(rows, settings)
    print("\n| setting | pairs | mean Dice | max % det J <= 0 | mean CPU s | mean steps | mean grid voxels |")
    print("|---|---|---|---|---|---|---|")
    for s in summary:
        print(f"| `{s['setting']}` | {s['pairs']} | {s['dice_mean']:.4f} | {s['fold_pct_max']:.3f} | "
              f"{s['cpu_s_mean']:.1f} | {s['steps_mean']:.1f} | {s['grid_voxels_mean']:.0f} |")
    if args.json:
        document["summary"] = summary
        write_json_atomic(document, args.json)


if __name__ == "__main__":
    main()
