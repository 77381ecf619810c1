# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""Add HD95 to an existing native-benchmark results JSON from the outputs on disk; no registration is rerun.

``python -m bench.accuracy.native_rescore OUT [OUT ...]`` (or ``python -m bench.accuracy.native --rescore OUT``)

For every ``ok`` row of ``OUT/results.json`` without ``hd95_mean``: the row's ``warped_label.nii.gz``
(``OUT/<pair>/<method>/``, or the run it was reused from) is scored against the pair's fixed labels by
the bundle's HD95 (``scoring.hd95_summary``) over the row's own ``classes`` (the classes its Dice was taken over),
after checking that the same file reproduces the row's stored per-class Dice (to float32 precision: the bundle's Dice
is a float32 ratio, rows scored before the bench used it hold the float64 one). Only ``hd95_mean`` and
``hd95_per_class`` are added to the row (nothing else in it changes) and one entry to the document's ``rescores``
list. The JSON is rewritten atomically after every row, re-read just before, so a stopped rescore resumes where it was
and a row rewritten meanwhile by the runner is left alone.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

from bench.accuracy.io import write_json_atomic
from bench.accuracy.pairs import NativePair
from bench.accuracy.runner import machine_info
from bench.accuracy.scoring import dice_per_class, hd95_summary, read_labels
from scripts.io.input_checks import voxel_spacing

__all__ = ["HD95_FIELDS", "find_method_dir", "hd95_of_record", "main", "rescore"]

HD95_FIELDS = ("hd95_mean", "hd95_per_class")


def find_method_dir(out_dir: Path, record: dict) -> Path:
    """The folder holding a row's ``warped_label.nii.gz``: ``OUT/<pair>/<method>``, else that of the run the row was
    reused from (``reused_from``), else the folder its ``log`` names."""
    candidates = [out_dir / record["pair"] / record["method"]]
    if record.get("reused_from"):
        candidates.append(Path(record["reused_from"]) / record["pair"] / record["method"])
    if record.get("log"):
        candidates.append(Path(record["log"]).with_suffix(""))
    for folder in candidates:
        if (folder / "warped_label.nii.gz").exists():
            return folder
    raise FileNotFoundError(f"no warped_label.nii.gz for {record['pair']} / {record['method']} in {candidates}.")


#: a recomputed Dice equals a stored one within float32 rounding (|float32(x) - x| <= 2**-24 x < 6e-8 for x <= 1);
#: one voxel more or less in a 500 000-voxel class already moves Dice by ~1e-6
DICE_TOLERANCE = 1e-7


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or abs(a - b) <= DICE_TOLERANCE


def hd95_of_record(pair: NativePair, record: dict, method_dir: Path) -> dict:
    """``hd95_mean`` / ``hd95_per_class`` of one ``ok`` row, over its stored ``classes``.

    Raises:
        ValueError: the warped labels are not on the fixed grid, or do not reproduce the row's stored Dice (then they
            are not the files the row was scored on).
    """
    fixed, fixed_ref = read_labels(pair.fixed_label)  # the runner's loader: the same rounding and dtype as its scoring
    warped, warped_ref = read_labels(method_dir / "warped_label.nii.gz")
    if warped.shape != fixed.shape or not np.allclose(warped_ref.affine, fixed_ref.affine, atol=1e-3):
        raise ValueError(f"{method_dir}: warped labels {warped.shape} are not on the fixed grid {fixed.shape}.")
    classes = [int(c) for c in record["classes"]]
    dice = dice_per_class(fixed, warped, classes)
    stored = record["dice_per_class"]
    if set(stored) != {str(c) for c in classes} or not all(_same(dice[c], float(stored[str(c)])) for c in classes):
        raise ValueError(f"{method_dir}: warped_label.nii.gz does not reproduce the stored Dice of the row.")
    return hd95_summary(fixed, warped, classes, voxel_spacing(fixed_ref.affine))


def _rescore_entry(argv: list[str]) -> dict:
    info = machine_info(1, argv)
    info.pop("threads_per_method", None)
    return {**info, "added": list(HD95_FIELDS), "what": "HD95 added to the ok rows lacking it, from the files on disk"}


def rescore(out_dir: Path, argv: list[str] | None = None, log=print) -> dict:
    """Add HD95 to every ``ok`` row of ``out_dir/results.json`` that lacks it; returns the updated document.

    A row that cannot be scored (files missing, Dice not reproduced) is reported and left without HD95; the others
    are still done. Raises ``RuntimeError`` at the end when any row failed.
    """
    path = Path(out_dir) / "results.json"
    report = json.loads(path.read_text())
    if not {"runs", "pairs", "results"} <= set(report):
        raise ValueError(f"{path} is not a native-benchmark results document.")
    todo = [(r["pair"], r["method"]) for r in report["results"] if r.get("status") == "ok" and "hd95_mean" not in r]
    log(f"[rescore] {path}: {len(todo)} row(s) to score, {len(report['results']) - len(todo)} done or not ok")
    if not todo:
        return report
    entry = _rescore_entry(argv or ["python", "-m", "bench.accuracy.native_rescore", str(out_dir)])
    failed = []
    for n, key in enumerate(todo, 1):
        record = next(r for r in report["results"] if (r["pair"], r["method"]) == key)
        start_cpu, start = time.process_time(), time.perf_counter()
        try:
            fields = hd95_of_record(
                NativePair(**report["pairs"][key[0]]), record, find_method_dir(Path(out_dir), record)
            )
        except (OSError, ValueError) as err:
            failed.append(key)
            log(f"[failed] {key[0]} / {key[1]}: {err}")
            continue
        report = json.loads(path.read_text())  # re-read: keep whatever else was written meanwhile
        current = next((r for r in report["results"] if (r["pair"], r["method"]) == key), None)
        if current is None or current.get("finished_utc") != record.get("finished_utc") or "hd95_mean" in current:
            log(f"[skip] {key[0]} / {key[1]}: the row changed while it was scored")
            continue
        current.update(fields)
        if entry not in report.setdefault("rescores", []):
            report["rescores"].append(entry)
        write_json_atomic(report, path)
        log(
            f"[hd95] {n}/{len(todo)} {key[0]} / {key[1]}: hd95_mean={fields['hd95_mean']:.3f} mm "
            f"(dice_mean {record['dice_mean']:.3f} reproduced), {time.perf_counter() - start:.1f} s wall, "
            f"{time.process_time() - start_cpu:.1f} s CPU"
        )
    entry["finished_utc"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    report = json.loads(path.read_text())
    mine = [
        s for s in report.get("rescores", []) if (s["started_utc"], s["argv"]) == (entry["started_utc"], entry["argv"])
    ]
    for stored in mine:
        stored["finished_utc"] = entry["finished_utc"]
    if mine:
        write_json_atomic(report, path)
    if failed:
        raise RuntimeError(f"{len(failed)} row(s) of {path} could not be rescored: {failed}")
    return report


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", nargs="+", help="OUT folder(s) of bench.accuracy.native (holding results.json)")
    args = parser.parse_args(argv)
    for out in args.out:
        rescore(Path(out).resolve(), ["python", "-m", "bench.accuracy.native_rescore", *argv])


if __name__ == "__main__":
    main()
