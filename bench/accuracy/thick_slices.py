# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""Thick-slice benchmark: one native pair registered at 1 mm and with thick slices (1 x 1 x 3 mm), Dice on the thick grid.

``python -m bench.accuracy.thick_slices --data ../shared/data --out outputs/thick_slices [--pairs 3] [--threads 2]
[--refine 0,default]``

For each of the first ``--pairs`` test pairs of ``bench/accuracy/splits/mal2012_split.json`` both scans are made thick
(:func:`thick_slices`: slabs of ``--factor`` slices averaged along the axis nearest to world S, as a 2-D acquisition's
slice profile does; the label map keeps each slab's middle slice). The bundle (``configs/inference.json``, the same
workflow as ``scripts.cli register``) then registers the 1 mm pair and the thick pair, with the network grid made
isotropic (``isotropic_network_grid`` true, the default) and without (false: a uniform ``network_scale`` of the
thick voxels, the behaviour before), at each ``--refine`` setting of ``refine_iterations`` in turn: 0 (affine stage
+ one forward pass) and the config's default. Scores: mean Dice over the 14 ``seg14`` classes on the thick fixed grid
(the 1 mm result read at the slab centres, so both are scored on the same voxels). Each run is a child process with its thread pools capped at
``--threads``; its CPU time (not wall time: the machine may be shared) is recorded. ``OUT/results.json`` is rewritten
after every run; a rerun skips the runs already there.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

from bench.accuracy.io import write_json_atomic
from bench.accuracy.runner import thread_env
from bench.accuracy.scoring import dice_per_class
from bench.accuracy.native_split import load_split, scan_files

__all__ = ["LABELS", "thick_axis", "thick_slices", "score_on_thick_grid", "markdown_table", "main"]

REPO_ROOT = Path(__file__).resolve().parents[2]
BUNDLE_ROOT = REPO_ROOT / "bundle"
LABELS = tuple(range(1, 15))
#: (name, isotropic_network_grid) of each run on the thick pair; the 1 mm pair runs once (both are one run there)
GRIDS = (("isotropic", True), ("uniform", False))


def thick_axis(affine: np.ndarray) -> int:
    """The array axis nearest to world S (superior): the slice axis of an axial 2-D acquisition."""
    directions = np.asarray(affine, dtype=np.float64)[:3, :3]
    return int(np.argmax(np.abs(directions[2]) / np.linalg.norm(directions, axis=0)))


def thick_slices(image: nib.Nifti1Image, factor: int, label: bool = False, axis: int | None = None) -> nib.Nifti1Image:
    """
    The image as thick slices: ``factor`` consecutive slices along ``axis`` become one slab of ``factor`` times the
    spacing, centred where its middle slice was (world positions kept; the last incomplete slab is dropped).

    Args:
        image: a 3-D NIfTI image.
        factor: slices per slab (>= 1).
        label: a label map: each slab takes its middle slice (ids are never averaged); else the slab's mean, float32.
        axis: the slice axis; default :func:`thick_axis`.

    Returns:
        the thick image, qform and sform set to its affine.
    """
    if factor < 1:
        raise ValueError(f"factor must be >= 1, got {factor}.")
    axis = thick_axis(image.affine) if axis is None else int(axis)
    data = np.moveaxis(np.asanyarray(image.dataobj), axis, -1)
    slabs = data.shape[-1] // factor
    if slabs < 1:
        raise ValueError(f"{data.shape[-1]} slices along axis {axis} make no slab of {factor}.")
    if label:
        thick = data[..., factor // 2 : slabs * factor : factor]
    else:
        thick = data[..., : slabs * factor].astype(np.float32).reshape(*data.shape[:-1], slabs, factor).mean(-1)
    affine = np.array(image.affine, dtype=np.float64)
    centre = np.zeros(3)
    centre[axis] = (factor - 1) / 2.0
    affine[:3, 3] = affine[:3, :3] @ centre + affine[:3, 3]
    affine[:3, axis] *= factor
    out = nib.Nifti1Image(np.ascontiguousarray(np.moveaxis(thick, -1, axis)), affine)
    out.set_qform(affine, code=1)
    out.set_sform(affine, code=1)
    return out


def score_on_thick_grid(warped_label: np.ndarray, fixed_thick_label: np.ndarray, factor: int, axis: int) -> float:
    """Mean seg14 Dice of a warped label map against the thick fixed labels; a 1 mm map is read at the slab centres
    (the voxels the thick fixed label map keeps)."""
    if warped_label.shape != fixed_thick_label.shape:
        index = [slice(None)] * 3
        index[axis] = slice(factor // 2, fixed_thick_label.shape[axis] * factor, factor)
        warped_label = warped_label[tuple(index)]
    return float(np.nanmean(list(dice_per_class(fixed_thick_label, warped_label, LABELS).values())))


def markdown_table(results: dict) -> str:
    """The runs of ``results.json`` as a table: per pair and refinement setting, Dice at 1 mm and on the thick pair
    with the uniform (before) and the isotropic network grid (now), and the gaps to 1 mm."""
    rows = ["| pair | refine_iterations | 1 mm | 1 × 1 × 3 mm, uniform scale (before) | 1 × 1 × 3 mm, isotropic grid (now) |",
            "|---|---|---|---|---|"]
    runs = results["runs"]
    groups = sorted({(key.split("/")[0], key.split("/")[3]) for key in runs}, key=lambda g: (g[1] != "refine_0", g[0]))
    for pair, refine in groups:
        def dice(grid, setting, pair=pair, refine=refine):
            run = runs.get(f"{pair}/{grid}/{setting}/{refine}")
            return None if run is None else run["mean_dice_thick_grid"]

        reference = dice("1mm", "isotropic")
        cells = []
        for grid, setting in (("thick", "uniform"), ("thick", "isotropic")):
            value = dice(grid, setting)
            gap = "" if value is None or reference is None else f" ({value - reference:+.3f})"
            cells.append("–" if value is None else f"{value:.3f}{gap}")
        rows.append(f"| {pair.replace('_to_', ' → ')} | {refine.split('_')[1]} | "
                    f"{'–' if reference is None else f'{reference:.3f}'} | {cells[0]} | {cells[1]} |")
    return "\n".join(rows)


def _run_bundle(pair: dict[str, str], out: Path, isotropic: bool, refine: int | None, threads: int) -> float:
    """One inference.json run into ``out``; returns its CPU time (s). Booleans go as ``True``/``False``: the runner
    reads its arguments as Python literals, and ``false`` would stay a (true) string."""
    command = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json",
               "--meta_file", "configs/metadata.json", "--logging_file", "configs/logging.conf",
               "--output_dir", str(out), "--overwrite", "True", "--isotropic_network_grid", str(bool(isotropic))]
    command += [arg for key, value in pair.items() for arg in (f"--{key}", value)]
    if refine is not None:
        command += ["--refine_iterations", str(refine)]
    before = os.times()
    result = subprocess.run(command, cwd=BUNDLE_ROOT, env=thread_env(threads), capture_output=True, text=True)
    after = os.times()
    if result.returncode != 0:
        raise RuntimeError(f"bundle run failed ({' '.join(command)}):\n{result.stderr[-3000:]}")
    return (after.children_user - before.children_user) + (after.children_system - before.children_system)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="shared/data folder (holds brain_mal2012)")
    parser.add_argument("--out", required=True, help="work folder: thick scans, outputs, results.json")
    parser.add_argument("--pairs", type=int, default=3, help="how many test pairs of the split, in its order")
    parser.add_argument("--factor", type=int, default=3, help="slices per thick slab")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--refine", default="0,default",
                        help="comma-separated refine_iterations to run, 'default' for the config's")
    args = parser.parse_args(argv)
    refines = [None if r == "default" else int(r) for r in args.refine.split(",")]
    data, out = Path(args.data), Path(args.out)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {"runs": {}}
    results["settings"] = {"factor": args.factor, "labels": "seg14, classes 1-14, scored on the thick fixed grid",
                           "threads": args.threads}
    for entry in load_split()["test_pairs"][: args.pairs]:
        name = f"mal{entry['moving']}_to_mal{entry['fixed']}"
        pairs = {"1mm": {}, "thick": {}}
        for role, scan in (("moving", entry["moving"]), ("fixed", entry["fixed"])):
            files = scan_files(data / "brain_mal2012", scan)
            image_path, label_path = files["image"], files["label"]
            pairs["1mm"][f"{role}_image"], pairs["1mm"][f"{role}_label"] = str(image_path), str(label_path)
            for key, path, is_label in ((f"{role}_image", image_path, False), (f"{role}_label", label_path, True)):
                target = out / "thick_scans" / f"{Path(path).name.split('.')[0]}_x{args.factor}.nii.gz"
                if not target.exists():
                    target.parent.mkdir(parents=True, exist_ok=True)
                    nib.save(thick_slices(nib.load(str(path)), args.factor, label=is_label), str(target))
                pairs["thick"][key] = str(target)
        fixed_thick = nib.load(pairs["thick"]["fixed_label"])
        axis = thick_axis(nib.load(pairs["1mm"]["fixed_label"]).affine)
        runs = [(grid, setting, isotropic, refine) for refine in refines for grid in ("1mm", "thick")
                for setting, isotropic in GRIDS if grid == "thick" or isotropic]  # 1 mm: both settings are one run
        for grid, setting, isotropic, refine in runs:
            key = f"{name}/{grid}/{setting}/refine_{'default' if refine is None else refine}"
            if key in results["runs"]:
                continue
            run_dir = out / "runs" / key.replace("/", "_")
            cpu = _run_bundle(pairs[grid], run_dir, isotropic, refine, args.threads)
            warped = np.asanyarray(nib.load(str(run_dir / "warped_label.nii.gz")).dataobj)
            dice = score_on_thick_grid(warped, np.asanyarray(fixed_thick.dataobj), args.factor, axis)
            results["runs"][key] = {"mean_dice_thick_grid": round(dice, 4), "cpu_s": round(cpu, 1)}
            print(key, results["runs"][key], flush=True)
            write_json_atomic(results, results_path)
    print(markdown_table(results), flush=True)
    return results


if __name__ == "__main__":
    main()
