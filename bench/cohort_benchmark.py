# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""Cohort throughput: time to the first result, pairs per hour and peak memory against the length of the datalist.

For each ``--sizes`` entry N, a datalist of N copies of one real pair (the shipped Colin27 -> MNI152 pair with its labels,
block-averaged by ``--factor``; each copy is its own set of files, so nothing is shared between pairs) is registered by

    python -m monai.bundle run --config_file configs/inference.json --affine_transform none --refine_iterations 0 \
        --datalist D --output_dir O

(plain inference with the bundle's weights: what ``register --datalist D --affine none --refine_iterations 0`` runs) in a fresh process. The
parent starts the clock just before it launches the process and polls the output folder: *time to first result* is when
the first pair's ``metrics.json`` (written last) appears, *total* when the process exits, *throughput* N / total and the
steady rate (N - 1) / (total - first). *Peak RSS* is the process's ``VmHWM`` (Linux), polled until it exits.
``--bundle`` runs another copy of the bundle (e.g. the code before this change, from ``git archive``) for comparison.

``--first-only`` stops each run at its first result (for long datalists of full-size scans), ``--repeats`` runs each
size several times (medians reported, every run kept).

Usage::

    python bench/cohort_benchmark.py --sizes 1 10 100 --out bench/results/cohort_cpu_3mm.json
    python bench/cohort_benchmark.py --sizes 1 100 --factor 1 --first-only --repeats 3 --out bench/results/cohort_1mm_first.json
    git archive <commit> bundle | tar -x -C /tmp/old && \
        python bench/cohort_benchmark.py --bundle /tmp/old/bundle ...          # the same against older code
    python bench/cohort_benchmark.py --sizes 1 10 --factor 4 --out /tmp/cohort.json      # quick
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parents[1]
BUNDLE_ROOT = REPO_ROOT / "bundle"
SAMPLE = {
    "moving_image": "moving_colin27_t1.nii.gz",
    "fixed_image": "fixed_mni152_t1.nii.gz",
    "moving_label": "moving_colin27_seg8.nii.gz",
    "fixed_label": "fixed_mni152_seg8.nii.gz",
}


def reduced(path: Path, factor: int, label: bool) -> nib.Nifti1Image:
    """The volume block-averaged by ``factor`` (labels: the centre voxel of each block), voxel centres kept aligned."""
    image = nib.load(str(path))
    data = np.asarray(image.dataobj)
    if factor > 1:
        size = [s // factor * factor for s in data.shape]
        data = data[: size[0], : size[1], : size[2]]
        if label:
            data = data[factor // 2 :: factor, factor // 2 :: factor, factor // 2 :: factor].astype(np.uint8)
        else:
            data = F.avg_pool3d(torch.as_tensor(data.astype(np.float32))[None, None], factor)[0, 0].numpy()
    affine = image.affine.copy()
    affine[:3, 3] = image.affine[:3, :3] @ np.full(3, (factor - 1) / 2.0) + image.affine[:3, 3]
    affine[:3, :3] = image.affine[:3, :3] * factor
    return nib.Nifti1Image(data, affine)


def write_datalist(folder: Path, count: int, factor: int) -> Path:
    """``count`` copies of the reduced real pair, each its own four files, and the datalist naming them."""
    volumes = {k: reduced(BUNDLE_ROOT / "sample_data" / name, factor, "label" in k) for k, name in SAMPLE.items()}
    pairs = []
    for i in range(count):
        pair = {"id": f"p{i:04d}"}
        for key, image in volumes.items():
            target = folder / "data" / f"{pair['id']}_{key}.nii.gz"
            target.parent.mkdir(parents=True, exist_ok=True)
            nib.save(image, str(target))
            pair[key] = str(target)
        pairs.append(pair)
    datalist = folder / f"datalist_{count}.json"
    datalist.write_text(json.dumps({"pairs": pairs}))
    os.sync()  # the run must not pay for flushing the data just written (its atomic writes fsync)
    return datalist


def _peak_rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


def run_case(bundle: Path, datalist: Path, out: Path, count: int, extra: list[str], first_only: bool = False) -> dict:
    """One cohort run in a fresh process: time to the first result, total time, peak RSS (``first_only``: stop the
    process at its first result and report only that)."""
    command = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json",
               "--affine_transform", "none", "--refine_iterations", "0",  # plain inference (the module docstring)
               "--datalist", str(datalist), "--output_dir", str(out), *extra]
    first_result = out / "p0000" / "metrics.json"
    out.mkdir(parents=True, exist_ok=True)
    log_file = out.parent / f"{out.name}.log"
    first, peak = None, 0.0
    with open(log_file, "w") as log:
        start = time.perf_counter()
        process = subprocess.Popen(command, cwd=bundle, env={**os.environ, "PYTHONPATH": str(bundle)}, stdout=log,
                                   stderr=subprocess.STDOUT)
        while process.poll() is None:
            if first is None and first_result.exists():
                first = time.perf_counter() - start
            peak = max(peak, _peak_rss_mb(process.pid) or 0.0)
            if first is not None and first_only:
                process.terminate()
                process.wait()
                return {"pairs": count, "time_to_first_result_s": round(first, 3), "peak_rss_mb_to_first": round(peak, 1)}
            time.sleep(0.02)
        total = time.perf_counter() - start
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited {process.returncode}; see {log_file}")
    first = first if first is not None else total
    done = sum(1 for p in out.iterdir() if (p / "metrics.json").is_file())
    return {
        "pairs": count,
        "completed": done,
        "time_to_first_result_s": round(first, 3),
        "total_s": round(total, 3),
        "pairs_per_hour": round(3600.0 * count / total, 1),
        "steady_pairs_per_hour": round(3600.0 * (count - 1) / (total - first), 1) if count > 1 and total > first else None,
        "peak_rss_mb": round(peak, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 10, 100], help="datalist lengths")
    parser.add_argument("--factor", type=int, default=3, help="block-average the 1 mm pair by this (3: 3 mm voxels)")
    parser.add_argument("--bundle", type=Path, default=BUNDLE_ROOT, help="bundle to run (default: this one)")
    parser.add_argument("--device", default=None, help="override the config's device, e.g. cpu or cuda")
    parser.add_argument("--work", type=Path, default=None, help="folder for data and outputs (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--first-only", action="store_true", help="stop each run at its first result")
    parser.add_argument("--repeats", type=int, default=1, help="runs per size (fresh output folder); medians reported")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="cohort_bench_"))
    extra = ["--device", f"$torch.device('{args.device}')"] if args.device else []
    results = []
    for count in args.sizes:
        case = work / f"n{count}"
        case.mkdir(parents=True, exist_ok=True)
        datalist = write_datalist(case, count, args.factor)
        runs = []
        for repeat in range(args.repeats):
            runs.append(run_case(args.bundle.resolve(), datalist, case / f"out{repeat}", count, extra, args.first_only))
            print(json.dumps(runs[-1]), flush=True)
        result = {k: (statistics.median(r[k] for r in runs) if isinstance(v, (int, float)) and k != "pairs" else v)
                  for k, v in runs[0].items()}
        result["runs"] = runs
        results.append(result)
    base = next((r for r in results if r["pairs"] == 1), results[0])
    for r in results:
        r["first_result_vs_1_pair"] = round(r["time_to_first_result_s"] / base["time_to_first_result_s"], 3)
    report = {
        "command": " ".join(sys.argv),
        "bundle": str(args.bundle),
        "factor": args.factor,
        "shape": list(reduced(BUNDLE_ROOT / "sample_data" / SAMPLE["fixed_image"], args.factor, False).shape),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "load_average": os.getloadavg(),
                    "torch": torch.__version__, "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
        "results": results,
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
