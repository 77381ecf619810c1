"""Accuracy benchmark: register every pair found in the data folders with every method, score, print, write JSON.

Usage (from the repository root)::

    python -m bench.accuracy.run --data ../shared/data --data bundle/sample_data \
        --methods identity,ants_syn,bundle_io,bundle_trained --out outputs/accuracy

Each method runs in its own process (``methods.py``); the parent measures its wall time and peak resident memory
(``ru_maxrss`` of the child from ``os.wait4``) and scores the outputs with ``metrics.py``: mean Dice over the labels
present in both maps (per label group, see ``pairs.py``), HD95 in mm (MONAI), and % voxels with det J ≤ 0.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from bench.accuracy.io import load_array, write_json_atomic
from bench.accuracy.methods import Method, build_methods
from bench.accuracy.metrics import (
    dice_per_label,
    folding_percentage_numpy,
    hd95_per_label,
    jacobian_determinant_numpy,
    labels_present_in_both,
)
from bench.accuracy.pairs import Pair, Skipped, discover_pairs

__all__ = ["run_method", "score_pair", "load_ddf", "run_benchmark", "format_table", "main"]

REPO_ROOT = Path(__file__).resolve().parents[2]
BUNDLE_ROOT = REPO_ROOT / "bundle"


def thread_env(threads: int) -> dict[str, str]:
    """Environment for a method's process with every thread pool (OpenMP/MKL/OpenBLAS/torch/ITK) capped."""
    env = dict(os.environ)
    for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"):
        env[key] = str(threads)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def run_method(method: Method, pair: Pair, out_dir: Path, threads: int, log_path: Path) -> dict:
    """Run one method on one pair as a child process; return wall time, peak RSS and exit status.

    Args:
        method: the method (its ``command`` builds the argv).
        pair: the pair to register.
        out_dir: the method's output folder.
        threads: thread cap for the child.
        log_path: where the child's stdout/stderr go.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    argv = method.command(pair, out_dir)
    with open(log_path, "w") as log:
        start = time.perf_counter()
        child = subprocess.Popen(argv, cwd=method.cwd or REPO_ROOT, env=thread_env(threads), stdout=log, stderr=log)
        _, status, usage = os.wait4(child.pid, 0)
        wall = time.perf_counter() - start
    child.returncode = os.waitstatus_to_exitcode(status)
    return {
        "command": argv,
        "returncode": child.returncode,
        "wall_s": wall,
        "cpu_s": usage.ru_utime + usage.ru_stime,  # robust to other load on a shared machine, unlike wall time
        "peak_rss_mib": usage.ru_maxrss / 1024.0,  # Linux reports KiB
        "log": str(log_path),
    }


def load_ddf(path: Path) -> np.ndarray:
    """Load a displacement field saved as (D, H, W, 3), (D, H, W, 1, 3) or (3, D, H, W) and return (3, D, H, W)."""
    ddf = np.squeeze(load_array(path, np.float32))
    if ddf.ndim != 4:
        raise ValueError(f"{path}: expected a 3-channel 3D displacement field, got shape {ddf.shape}.")
    if ddf.shape[-1] == 3:
        ddf = np.moveaxis(ddf, -1, 0)
    if ddf.shape[0] != 3:
        raise ValueError(f"{path}: expected 3 displacement channels, got shape {ddf.shape}.")
    return ddf


def _det_from_ddf(ddf: np.ndarray) -> np.ndarray:
    """det J with the bundle's own ``scripts.layers.jacobian`` when importable (same code users get), else numpy."""
    try:
        if str(BUNDLE_ROOT) not in sys.path:
            sys.path.insert(0, str(BUNDLE_ROOT))
        import torch
        from scripts.layers.jacobian import jacobian_determinant

        return jacobian_determinant(torch.from_numpy(ddf)[None]).numpy()[0, 0]
    except ImportError:
        return jacobian_determinant_numpy(ddf)


def label_agreement(moving_label: np.ndarray, warped_label: np.ndarray, ddf: np.ndarray) -> float:
    """Fraction of foreground voxels where ``warped_label`` equals the moving label resampled (nearest) at p + ddf(p).

    A convention check of a method's outputs: a ddf in another unit, axis order or sign than the bundle convention
    (warped(p) = moving(p + ddf(p)), channel i along array axis i) gives a low value.
    """
    from scipy.ndimage import map_coordinates

    coords = np.indices(moving_label.shape, dtype=np.float32) + ddf
    resampled = map_coordinates(moving_label, coords, order=0, mode="constant", cval=0)
    foreground = (resampled != 0) | (warped_label != 0)
    return float((resampled[foreground] == warped_label[foreground]).mean()) if foreground.any() else 1.0


def score_pair(pair: Pair, method_dir: Path | None) -> dict:
    """Score a method's outputs on a pair (``method_dir`` None = identity: moving labels unwarped, det J = 1).

    Returns:
        dict with per-group mean Dice / HD95, per-label Dice / HD95, the labels used, and folding percentages.
    """
    result: dict = {}
    fixed_img = nib.load(str(pair.fixed_image))
    spacing = [float(z) for z in fixed_img.header.get_zooms()[:3]]
    if pair.labelled:
        fixed = load_array(pair.fixed_label, np.int32)
        moving = load_array(pair.moving_label, np.int32)
        warped = moving if method_dir is None else load_array(method_dir / "warped_label.nii.gz", np.int32)
        if warped.shape != fixed.shape:
            raise ValueError(f"{pair.name}: warped label {warped.shape} is not on the fixed grid {fixed.shape}.")
        groups, per_label_dice, per_label_hd = {}, {}, {}
        for group in pair.groups:
            if group.merge:
                f, w = np.isin(fixed, group.ids).astype(np.int32), np.isin(warped, group.ids).astype(np.int32)
                dice, hd = dice_per_label(f, w, [1])[1], hd95_per_label(f, w, [1], spacing)[1]
                groups[group.name] = {"dice": dice, "hd95_mm": hd, "labels": list(group.ids), "merged": True}
                continue
            candidates = group.ids or np.unique(fixed).tolist()
            labels = labels_present_in_both(fixed, moving, candidates)
            todo = [lab for lab in labels if lab not in per_label_dice]
            per_label_dice.update(dice_per_label(fixed, warped, todo))
            per_label_hd.update(hd95_per_label(fixed, warped, todo, spacing))
            groups[group.name] = {
                "dice": float(np.mean([per_label_dice[lab] for lab in labels])) if labels else float("nan"),
                "hd95_mm": float(np.nanmean([per_label_hd[lab] for lab in labels])) if labels else float("nan"),
                "labels": labels,
                "merged": False,
            }
        result.update(groups=groups, dice_per_label=per_label_dice, hd95_per_label=per_label_hd)
    if method_dir is None:
        result.update(fold_pct=0.0, fold_source="identity")
        return result
    ddf_path, det_path = method_dir / "ddf.nii.gz", method_dir / "jacobian_det.nii.gz"
    if (method_dir / "method.json").exists() and det_path.exists():
        # ANTs: its own Jacobian of the forward warp is the reference; the voxel ddf gives a cross-check.
        result.update(fold_pct=folding_percentage_numpy(load_array(det_path)), fold_source="ants jacobian_det")
        if ddf_path.exists():
            result["fold_pct_from_ddf"] = folding_percentage_numpy(_det_from_ddf(load_ddf(ddf_path)))
    elif ddf_path.exists():
        result.update(fold_pct=folding_percentage_numpy(_det_from_ddf(load_ddf(ddf_path))), fold_source="ddf")
        if det_path.exists():
            result["fold_pct_written"] = folding_percentage_numpy(load_array(det_path))
    elif det_path.exists():
        result.update(fold_pct=folding_percentage_numpy(load_array(det_path)), fold_source="jacobian_det")
    else:
        result.update(fold_pct=float("nan"), fold_source="missing")
    if pair.labelled and ddf_path.exists() and (method_dir / "warped_label.nii.gz").exists():
        result["ddf_label_agreement"] = label_agreement(moving, warped, load_ddf(ddf_path))
    return result


def _versions() -> dict:
    versions = {"python": platform.python_version()}
    for module in ("numpy", "torch", "monai", "nibabel", "ants", "matplotlib"):
        try:
            versions[module] = __import__(module).__version__
        except Exception as err:  # a broken optional install must not stop the benchmark
            versions[module] = f"unavailable ({type(err).__name__})"
    return versions


def _machine(threads: int) -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = ""
    return {
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "threads_per_method": threads,
        "git_commit": commit,
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def run_benchmark(
    data_dirs: list[Path],
    methods: list[Method],
    out_dir: Path,
    threads: int = 2,
    include_unlabeled: bool = False,
    json_path: Path | None = None,
) -> dict:
    """Run every available method on every discovered pair; write results JSON after each run (partial progress kept)."""
    report = {"machine": _machine(threads), "versions": _versions(), "methods": {}, "skipped": [], "results": []}
    for method in methods:
        report["methods"][method.name] = {"available": method.available, "why_not": method.why_not, **method.settings}
    json_path = json_path or out_dir / "results.json"
    for data_dir in data_dirs:
        for item in discover_pairs(data_dir, include_unlabeled=include_unlabeled):
            if isinstance(item, Skipped):
                report["skipped"].append({"pair": item.name, "reason": item.reason})
                print(f"[skip] {item.name}: {item.reason}", flush=True)
                continue
            for method in methods:
                record = {"pair": item.name, "method": method.name, "primary": item.primary.name if item.primary else None}
                if not method.available:
                    record.update(status="not run", reason=method.why_not)
                elif method.command is None:
                    record.update(status="ok", wall_s=0.0, peak_rss_mib=None, **score_pair(item, None))
                else:
                    method_dir = out_dir / item.name.replace("/", "__") / method.name
                    print(f"[run] {item.name} / {method.name} ...", flush=True)
                    run = run_method(method, item, method_dir, threads, method_dir.with_suffix(".log"))
                    record.update(run)
                    if run["returncode"] != 0:
                        record.update(status="failed", reason=f"exit {run['returncode']}, see {run['log']}")
                    else:
                        try:
                            record.update(status="ok", **score_pair(item, method_dir))
                        except (OSError, ValueError) as err:
                            record.update(status="failed", reason=f"scoring: {err}")
                        info = method_dir / "method.json"
                        if info.exists():
                            record["method_info"] = json.loads(info.read_text())
                report["results"].append(record)
                print(format_row(record), flush=True)
                write_json_atomic(report, json_path)
    write_json_atomic(report, json_path)
    return report


def _fmt(value, spec: str) -> str:
    return "—" if value is None or (isinstance(value, float) and np.isnan(value)) else format(value, spec)


def format_row(record: dict) -> str:
    groups = record.get("groups", {})
    names = list(groups)
    main = groups.get(names[0], {}) if names else {}
    second = groups.get(names[1], {}) if len(names) > 1 else {}
    cells = [
        record["pair"],
        record["method"],
        f"{names[0]}={_fmt(main.get('dice'), '.3f')}" if names else "—",
        f"{names[1]}={_fmt(second.get('dice'), '.3f')}" if len(names) > 1 else "—",
        _fmt(main.get("hd95_mm"), ".2f"),
        _fmt(record.get("fold_pct"), ".3f"),
        _fmt(record.get("wall_s"), ".1f"),
        _fmt(record.get("cpu_s"), ".1f"),
        _fmt(record.get("peak_rss_mib"), ".0f"),
        record.get("status", "") if record.get("status") == "ok" else f"{record.get('status')}: {record.get('reason', '')}",
    ]
    return "| " + " | ".join(cells) + " |"


TABLE_HEADER = (
    "| pair | method | Dice (primary) | Dice (secondary) | HD95 primary (mm) | % det J ≤ 0 | wall (s) | CPU (s) | peak RSS (MiB) | status |\n"
    "|---|---|---|---|---|---|---|---|---|---|"
)


def format_table(report: dict) -> str:
    """Markdown table of all results (primary label group first)."""
    return "\n".join([TABLE_HEADER] + [format_row(r) for r in report["results"]])


def _parse_overrides(items: list[str]) -> dict[str, str]:
    overrides = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--io_override must look like id=value, got {item!r}.")
        key, value = item.split("=", 1)
        overrides[key] = value
    return overrides


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", action="append", required=True, help="data folder (repeatable)")
    parser.add_argument("--methods", default="identity,ants_syn,bundle_io,bundle_trained")
    parser.add_argument("--out", default=str(REPO_ROOT / "outputs" / "accuracy"))
    parser.add_argument("--json", default=None, help="results JSON (default OUT/results.json)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--include_unlabeled", action="store_true")
    parser.add_argument("--syn_iterations", default="40,20,0", help="ANTs SyN iterations per level, coarse to fine")
    parser.add_argument("--io_override", action="append", default=[], help="bundle config override id=value (repeatable)")
    parser.add_argument("--bundle_root", default=str(BUNDLE_ROOT))
    args = parser.parse_args(argv)
    if args.threads < 1:
        raise ValueError(f"--threads must be ≥ 1, got {args.threads}.")
    methods = build_methods(
        [m.strip() for m in args.methods.split(",") if m.strip()],
        Path(args.bundle_root),
        _parse_overrides(args.io_override),
        tuple(int(v) for v in args.syn_iterations.split(",")),
    )
    out = Path(args.out)
    report = run_benchmark(
        [Path(d) for d in args.data], methods, out, args.threads, args.include_unlabeled, Path(args.json) if args.json else None
    )
    print(format_table(report))
    return report


if __name__ == "__main__":
    main()
