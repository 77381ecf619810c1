# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""Native-pair benchmark runner: ANTs (and later the bundle) on native and pre-aligned inter-subject brain pairs.

``python -m bench.accuracy.native --data ../shared/data --out outputs/native --threads 2 [--methods a,b] [--pairs p,q]``

Pairs (``native_pairs.py``): the FreeSurfer pair and the 10 ``brain_mal2012`` test pairs of the split. Methods
(``native_methods.py``) in order of importance: identity + ANTs Affine (+ identity after that affine) on every pair,
then ANTs SyN (60,30,10) native, SyNOnly (60,30,10) on the pre-aligned pairs, then the (40,20,0) runs. Each runs in
its own process with ``OMP_NUM_THREADS``, ``MKL_NUM_THREADS``, ``OPENBLAS_NUM_THREADS`` and
``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS`` set to ``--threads``; the parent takes wall time, CPU time and peak RSS of the
child from ``os.wait4`` and scores the outputs with ``native_scoring.py``. After every task ``OUT/results.json`` is
rewritten atomically; a rerun skips every (pair, method) already ``ok`` there, so the run can be stopped any time.
The pre-aligned inputs are written to ``OUT/prealigned/<pair>/`` and listed in ``OUT/prealigned/datalist.json``.
``--rescore OUT`` runs no method: it adds HD95 to an existing ``OUT/results.json`` (``native_rescore.py``).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from bench.accuracy.io import write_json_atomic
from bench.accuracy.native_methods import DEFAULT_METHODS, METHODS, NativeMethod, prealigned_pair, task_order
from bench.accuracy.native_pairs import NativePair, native_pairs
from bench.accuracy.native_scoring import jacobian_stats, score_labels, voxel_spacing

__all__ = ["main", "run", "run_task", "score_outputs", "thread_env"]

REPO_ROOT = Path(__file__).resolve().parents[2]
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS")


def thread_env(threads: int) -> dict[str, str]:
    """The child environment: every thread pool capped at ``threads``, the repository importable."""
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}.")
    env = dict(os.environ, **{key: str(threads) for key in THREAD_VARS})
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def machine_info(threads: int, argv: list[str]) -> dict:
    """Machine, versions, threads and the 1-minute load average, recorded at the start of each run."""
    cpu = platform.processor()
    try:
        cpu = next(
            l.split(":", 1)[1].strip()
            for l in Path("/proc/cpuinfo").read_text().splitlines()
            if l.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    versions = {"python": platform.python_version()}
    for dist in ("numpy", "scipy", "nibabel", "antspyx", "torch", "monai"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], check=False, cwd=REPO_ROOT, capture_output=True, text=True
    ).stdout.strip()
    return {
        "started_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "argv": argv,
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "threads_per_method": threads,
        "loadavg_1min": os.getloadavg()[0],
        "nice": os.nice(0),
        "git_commit": commit,
        "versions": versions,
    }


def run_task(argv: list[str], cwd: Path, threads: int, log_path: Path) -> dict:
    """Run one method process; return its exit code, wall time, CPU time (user + system) and peak RSS."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()[0]
    with open(log_path, "w") as log:
        start = time.perf_counter()
        child = subprocess.Popen(argv, cwd=cwd, env=thread_env(threads), stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(child.pid, 0)
        wall = time.perf_counter() - start
    return {
        "returncode": os.waitstatus_to_exitcode(status),
        "wall_s": wall,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "peak_rss_mib": usage.ru_maxrss / 1024.0,
        "loadavg_1min_at_start": load,
        "log": str(log_path),
        "command": argv,
    }


def _labels(path: str) -> tuple[np.ndarray, nib.Nifti1Image]:
    image = nib.load(path)
    return np.rint(np.asanyarray(image.dataobj)).astype(np.int16), image


def score_outputs(native: NativePair, method: NativeMethod, method_dir: Path) -> dict:
    """Score a method's outputs on the fixed grid: seg14 Dice and HD95 (mm, the fixed image's spacing), and det J
    statistics in the fixed brain (T1 > 0)."""
    fixed_label, fixed_ref = _labels(native.fixed_label)
    moving_label, _ = _labels(native.moving_label)
    warped, warped_ref = _labels(str(method_dir / "warped_label.nii.gz"))
    if warped.shape != fixed_label.shape or not np.allclose(warped_ref.affine, fixed_ref.affine, atol=1e-3):
        raise ValueError(f"{method_dir}: warped labels {warped.shape} are not on the fixed grid {fixed_label.shape}.")
    result = score_labels(fixed_label, moving_label, warped, spacing=voxel_spacing(fixed_ref.affine))
    if method.deformable:
        det_path = method_dir / "jacobian_det.nii.gz"
        if not det_path.exists():
            raise ValueError(f"{method_dir}: deformable method wrote no jacobian_det.nii.gz.")
        mask = np.asanyarray(nib.load(native.fixed_image).dataobj) > 0
        det = np.squeeze(np.asanyarray(nib.load(str(det_path)).dataobj)).astype(np.float32)
        result.update(jacobian_stats(det, mask), jacobian_mask="fixed T1 > 0")
    return result


def _load_report(path: Path) -> dict:
    if path.exists():
        report = json.loads(path.read_text())
        if {"runs", "results"} <= set(report):
            return report
    return {"runs": [], "pairs": {}, "methods": {}, "results": []}


def _record(report: dict, record: dict) -> None:
    key = (record["pair"], record["method"])
    report["results"] = [r for r in report["results"] if (r["pair"], r["method"]) != key] + [record]


def _done(report: dict) -> set[tuple[str, str]]:
    return {(r["pair"], r["method"]) for r in report["results"] if r.get("status") == "ok"}


def write_datalist(report: dict, out_dir: Path) -> Path:
    """``OUT/prealigned/datalist.json``: every pair whose ``ants_affine`` is done, with its pre-aligned inputs."""
    entries = []
    done = _done(report)
    for name, pair in report["pairs"].items():
        if (name, "ants_affine") not in done:
            continue
        aligned = prealigned_pair(NativePair(**pair), out_dir / "prealigned" / name)
        entries.append(
            {
                "id": name,
                **{k: getattr(aligned, k) for k in ("fixed_image", "moving_image", "fixed_label", "moving_label")},
            }
        )
    path = out_dir / "prealigned" / "datalist.json"
    note = "moving scan and seg14 labels resampled into the fixed space by ANTs Affine (bench/accuracy/native.py)"
    write_json_atomic({"note": note, "pairs": entries}, path)
    return path


def reuse_prealigned(source_dir: Path, out_dir: Path, pair_names: list[str]) -> list[str]:
    """
    Start ``out_dir`` from another run's ANTs ``Affine`` results: copy its ``ants_affine`` and
    ``identity_after_affine`` records (status ok) and the pre-aligned files of ``pair_names`` that ``out_dir`` lacks,
    so candidate weights are scored on the very same pre-aligned inputs without rerunning ANTs.

    Returns:
        the pairs whose pre-aligned inputs were copied.
    """
    source, report = _load_report(source_dir / "results.json"), _load_report(out_dir / "results.json")
    done, copied = _done(report), []
    for name in pair_names:
        if (name, "ants_affine") in done or (name, "ants_affine") not in _done(source):
            continue
        shutil.copytree(source_dir / "prealigned" / name, out_dir / "prealigned" / name, dirs_exist_ok=True)
        for record in source["results"]:
            if record["pair"] == name and record["method"] in ("ants_affine", "identity_after_affine"):
                _record(report, {**record, "reused_from": str(source_dir)})
        report["pairs"][name] = source["pairs"][name]
        copied.append(name)
    for name in ("ants_affine", "identity_after_affine"):
        if name in source["methods"]:
            report["methods"].setdefault(name, source["methods"][name])
    write_json_atomic(report, out_dir / "results.json")
    write_datalist(report, out_dir)
    return copied


def task_command(
    method: NativeMethod, pair: NativePair, method_dir: Path, prealigned_dir: Path, seed: int, weights: str | None
) -> tuple[list[str], Path]:
    """(argv, working directory) of one task: ``ants_affine`` also writes the pre-aligned inputs, bundle methods get
    ``--weights`` when candidate weights are given."""
    argv, cwd = method.command(pair, method_dir, seed)
    if method.name == "ants_affine":
        argv += ["--prealigned_dir", str(prealigned_dir)]
    if weights and method.mode == "bundle":
        argv += ["--weights", weights]
    return argv, cwd


def run(
    pairs: list[NativePair],
    method_names: list[str],
    out_dir: Path,
    threads: int,
    seed: int,
    argv: list[str],
    weights: str | None = None,
) -> dict:
    """
    Do every task not yet ``ok`` in ``OUT/results.json``, in :func:`task_order`; returns the report.

    ``weights`` (a state dict) replaces ``bundle/models/model.pt`` in every bundle method (``register --weights``);
    it is recorded with the methods, so give candidate weights their own ``OUT``.
    """
    json_path = out_dir / "results.json"
    report = _load_report(json_path)
    report["runs"].append(machine_info(threads, argv))
    report["pairs"].update({p.name: p.as_dict() for p in pairs})
    for name in method_names:
        m = METHODS[name]
        report["methods"][name] = {
            "inputs": m.inputs,
            "mode": m.mode,
            "deformable": m.deformable,
            "random_seed": seed,
            **m.settings,
            **({"weights": weights} if weights and m.mode == "bundle" else {}),
        }
    write_json_atomic(report, json_path)
    for native, method in task_order(pairs, method_names):
        if (native.name, method.name) in _done(report):
            continue
        pair = native
        if method.inputs == "prealigned":
            if (native.name, "ants_affine") not in _done(report):
                print(f"[wait] {native.name} / {method.name}: needs ants_affine first", flush=True)
                continue
            pair = prealigned_pair(native, out_dir / "prealigned" / native.name)
        method_dir = out_dir / native.name / method.name
        prealigned_dir = out_dir / "prealigned" / native.name
        argv_m, cwd = task_command(method, pair, method_dir, prealigned_dir, seed, weights)
        print(f"[run] {native.name} / {method.name} (load {os.getloadavg()[0]:.2f}) ...", flush=True)
        record = {"pair": native.name, "method": method.name, "inputs": method.inputs}
        record.update(run_task(argv_m, cwd, threads, method_dir.with_suffix(".log")))
        if record["returncode"] != 0:
            record.update(status="failed", reason=f"exit {record['returncode']}, see {record['log']}")
        else:
            try:
                record.update(status="ok", **score_outputs(native, method, method_dir))
            except (OSError, ValueError) as err:
                record.update(status="failed", reason=f"scoring: {err}")
            info = method_dir / "method.json"
            if info.exists():
                record["method_info"] = json.loads(info.read_text())
        record["finished_utc"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        _record(report, record)
        write_json_atomic(report, json_path)
        if method.name == "ants_affine" and record["status"] == "ok":
            write_datalist(report, out_dir)
        print(
            f"[done] {native.name} / {method.name}: {record['status']} dice={record.get('dice_mean', float('nan')):.3f} "
            f"hd95={record.get('hd95_mean', float('nan')):.2f}mm sdlogj={record.get('sdlogj', float('nan')):.3f} "
            f"wall={record['wall_s']:.0f}s cpu={record['cpu_s']:.0f}s "
            f"rss={record['peak_rss_mib']:.0f}MiB {record.get('reason', '')}",
            flush=True,
        )
    return report


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(REPO_ROOT.parent / "shared" / "data"), help="shared/data folder")
    parser.add_argument("--out", default=str(REPO_ROOT / "outputs" / "native"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS), help=f"comma-separated, from {list(METHODS)}")
    parser.add_argument("--pairs", default=None, help="comma-separated pair names (default: all, in the fixed order)")
    parser.add_argument("--include_retest", action="store_true", help="add the test-retest pair mal1025 -> mal1005")
    parser.add_argument("--whole_heads", action="store_true",
                        help="add the brain_freesurfer_head pairs: whole heads (with brain masks) and stripped brains")
    parser.add_argument("--random_seed", type=int, default=1)
    parser.add_argument("--weights", default=None, help="network weights for the bundle methods (default: the shipped)")
    parser.add_argument("--prealigned_from", default=None, help="OUT of an earlier run: reuse its ANTs Affine inputs")
    parser.add_argument(
        "--rescore",
        metavar="OUT",
        default=None,
        help="run nothing: add HD95 to the ok rows of OUT/results.json that lack it, from the files on disk "
        "(bench.accuracy.native_rescore; resumable)",
    )
    args = parser.parse_args(argv)
    if args.rescore:
        from bench.accuracy.native_rescore import rescore

        return rescore(Path(args.rescore).resolve(), ["python", "-m", "bench.accuracy.native", *argv])
    out_dir = Path(args.out).resolve()
    pairs = native_pairs(args.data, out_dir, include_retest=args.include_retest, whole_heads=args.whole_heads)
    if args.pairs:
        wanted = [p.strip() for p in args.pairs.split(",") if p.strip()]
        unknown = sorted(set(wanted) - {p.name for p in pairs})
        if unknown:
            raise ValueError(f"unknown pair(s) {unknown}; known: {[p.name for p in pairs]}.")
        pairs = [p for p in pairs if p.name in wanted]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if args.prealigned_from:
        out_dir.mkdir(parents=True, exist_ok=True)
        reused = reuse_prealigned(Path(args.prealigned_from).resolve(), out_dir, [p.name for p in pairs])
        print(f"[reuse] pre-aligned inputs of {len(reused)} pair(s) from {args.prealigned_from}", flush=True)
    return run(
        pairs,
        methods,
        out_dir,
        args.threads,
        args.random_seed,
        ["python", "-m", "bench.accuracy.native", *argv],
        weights=str(Path(args.weights).resolve()) if args.weights else None,
    )


if __name__ == "__main__":
    main()
