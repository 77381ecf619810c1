# Copyright (c) the SACB-Net MONAI bundle authors.
# Licensed under the Apache License, Version 2.0 (the "License"); see the LICENSE file at the repository root.
"""
Side-by-side speed and memory of this bundle's components and MONAI's references, in ONE run on one machine.

Cases (each at every ``--sizes`` entry, on the real shipped pair resized to that size):

- ``ncc_*``: ``scripts.losses.ncc.LocalNCCLoss`` vs ``monai.losses.LocalNormalizedCrossCorrelationLoss(kernel_size=9,
  kernel_type="rectangular")``, forward and forward+backward (gradient w.r.t. the prediction), plus the value difference;
- ``warp_*``: ``scripts.layers.warp.Warp`` vs ``monai.networks.blocks.Warp``, image (bilinear) and label map (nearest), plus the
  maximum absolute difference of the outputs;
- ``*_infer``: ``scripts.networks.sacb_net.SACBNet`` vs ``monai.networks.nets.VoxelMorph()`` (default backbone) inference of one pair
  under ``torch.inference_mode`` (field + warped moving image, which VoxelMorph returns anyway);
- ``*_train``: one training step of each (image NCC + 0.1 · gradient penalty, Adam): SACB-Net with this bundle's losses,
  VoxelMorph with MONAI's (LNCC + DiffusionLoss), i.e. what each stack gives a user;
- ``bundle_run``: ``python -m monai.bundle run --config_file configs/inference.json`` on the shipped 160×192×160 pair
  with ``--affine_transform none --refine_iterations 0`` (load → network → save), wall time of the subprocess.

Every case runs in a fresh subprocess so its peak memory is its own: CPU peak = ``ru_maxrss`` of that process (also
reported minus the RSS after imports and data loading), GPU peak = ``torch.cuda.max_memory_allocated``. Times are the
median of ``--repeats`` runs after ``--warmup`` runs; process CPU time is reported too (steadier on a shared machine).

Usage::

    python bench/benchmark.py --out bench/results/cpu.json             # full run (tens of minutes on 2 cores)
    python bench/benchmark.py --device cuda --amp --out bench/results/gpu.json
    python bench/benchmark.py --quick --out /tmp/bench.json            # tiny smoke run, seconds
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
BUNDLE_ROOT = REPO_ROOT / "bundle"
SAMPLE_DATA = BUNDLE_ROOT / "sample_data"
MOVING = SAMPLE_DATA / "moving_colin27_t1.nii.gz"
FIXED = SAMPLE_DATA / "fixed_mni152_t1.nii.gz"
MOVING_LABEL = SAMPLE_DATA / "moving_colin27_seg8.nii.gz"

# name -> (reference case or None, description). Order = run order: the cheap, important figures first.
CASES = {
    "ncc_ours_fwd": ("ncc_monai_fwd", "LocalNCCLoss forward"),
    "ncc_monai_fwd": (None, "MONAI LNCC forward"),
    "ncc_ours_fwd_bwd": ("ncc_monai_fwd_bwd", "LocalNCCLoss forward+backward"),
    "ncc_monai_fwd_bwd": (None, "MONAI LNCC forward+backward"),
    "warp_ours_image": ("warp_monai_image", "Warp bilinear (image)"),
    "warp_monai_image": (None, "MONAI Warp bilinear (image)"),
    "warp_ours_label": ("warp_monai_label", "Warp nearest (label)"),
    "warp_monai_label": (None, "MONAI Warp nearest (label)"),
    "sacbnet_infer": ("voxelmorph_infer", "SACB-Net inference (+warp)"),
    "voxelmorph_infer": (None, "MONAI VoxelMorph inference"),
    "sacbnet_train": ("voxelmorph_train", "SACB-Net training step"),
    "voxelmorph_train": (None, "MONAI VoxelMorph training step"),
}
BUNDLE_CASE = "bundle_run"
REGULARIZATION_WEIGHT = 0.1


# ----------------------------------------------------------------------------------------------------------- worker
def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: kilobytes


def _current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@functools.lru_cache(maxsize=None)
def _read_volume(path: Path, normalise: bool):
    """A shipped volume as a (1, 1, D, H, W) float32 tensor (images scaled to [0, 1] by their 99.5th percentile)."""
    import nibabel as nib
    import torch

    vol = torch.as_tensor(nib.load(str(path)).get_fdata(dtype="float32"))[None, None]
    if normalise:
        vol = (vol / torch.quantile(vol[vol > 0], 0.995)).clamp(0, 1)
    return vol


def _load_pair(size, device):
    """Real moving/fixed T1 (1, 1, *size) in [0, 1] and the moving label map (1, 1, *size), float32 on ``device``."""
    import torch.nn.functional as F

    moving, fixed = (
        F.interpolate(_read_volume(path, True), size=size, mode="trilinear", align_corners=False).to(device)
        for path in (MOVING, FIXED)
    )
    label = F.interpolate(_read_volume(MOVING_LABEL, False), size=size, mode="nearest").to(device)
    return moving, fixed, label


def _smooth_field(size, device, amplitude=3.0):
    """Seeded smooth random displacement field of a few voxels (1, 3, *size), like a registration output."""
    import torch
    import torch.nn.functional as F

    generator = torch.Generator().manual_seed(0)
    coarse = torch.randn(1, 3, 5, 6, 7, generator=generator) * amplitude
    return F.interpolate(coarse, size=size, mode="trilinear", align_corners=True).to(device)


def _build_case(name, size, device, amp):
    """Returns (step, check): ``step()`` is timed; ``check()`` (after the memory reading) returns extra figures."""
    import torch
    from monai.losses import DiffusionLoss, LocalNormalizedCrossCorrelationLoss
    from monai.networks.blocks import Warp as MonaiWarp
    from monai.networks.nets import VoxelMorph

    from scripts.losses.ncc import LocalNCCLoss
    from scripts.networks.sacb_net import SACBNet
    from scripts.losses.regularization import GradientLoss
    from scripts.layers.warp import Warp

    moving, fixed, label = _load_pair(size, device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    autocast = lambda: torch.autocast(device_type=device.type, enabled=amp)  # noqa: E731

    if name.startswith("ncc_"):
        ours, reference = LocalNCCLoss(kernel_size=9), LocalNormalizedCrossCorrelationLoss(
            spatial_dims=3, kernel_size=9, kernel_type="rectangular"
        )
        loss = ours if "_ours_" in name else reference
        pred = moving.clone().requires_grad_(name.endswith("_bwd"))

        def step():
            value = loss(pred, fixed)
            if pred.requires_grad:
                pred.grad = None
                value.backward()
            sync()

        def check():
            with torch.no_grad():
                a, b = ours(moving, fixed).item(), reference(moving, fixed).item()
            return {"value_ours": a, "value_monai": b, "value_abs_diff": abs(a - b)}

        return step, check

    if name.startswith("warp_"):
        mode = "bilinear" if name.endswith("_image") else "nearest"
        image = moving if mode == "bilinear" else label
        ddf = _smooth_field(size, device)
        ours, reference = Warp(mode=mode, padding_mode="zeros"), MonaiWarp(mode=mode, padding_mode="zeros")
        warp = ours if "_ours_" in name else reference

        def step():
            with torch.inference_mode():
                warp(image, ddf)
            sync()

        def check():
            with torch.inference_mode():
                diff = (ours(image, ddf) - reference(image, ddf)).abs().max().item()
            return {"max_abs_diff_vs_monai": diff}

        return step, check

    torch.manual_seed(0)
    sacbnet = name.startswith("sacbnet")
    net = (SACBNet() if sacbnet else VoxelMorph()).to(device)
    warp = Warp() if sacbnet else None
    pair = torch.cat((moving, fixed), dim=1)

    def forward():
        if sacbnet:
            ddf = net(pair)
            return warp(moving, ddf), ddf
        return net(moving, fixed)

    params = sum(p.numel() for p in net.parameters())
    if name.endswith("_infer"):
        net.eval()

        def step():
            with torch.inference_mode(), autocast():
                forward()
            sync()

        return step, lambda: {"parameters": params}

    net.train()
    image_loss = LocalNCCLoss(9) if sacbnet else LocalNormalizedCrossCorrelationLoss(3, 9, "rectangular")
    regularization = GradientLoss() if sacbnet else DiffusionLoss()
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=amp and device.type == "cuda")

    def step():
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            warped, ddf = forward()
            loss = image_loss(warped, fixed) + REGULARIZATION_WEIGHT * regularization(ddf)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        sync()

    return step, lambda: {"parameters": params}


def _run_worker(args) -> dict:
    import torch

    sys.path.insert(0, str(BUNDLE_ROOT))
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    size = tuple(int(s) for s in args.size.split(","))
    step, check = _build_case(args.case, size, device, args.amp)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    baseline_rss = _current_rss_mb()
    for _ in range(args.warmup):
        step()
    wall, cpu = [], []
    for _ in range(args.repeats):
        start_wall, start_cpu = time.perf_counter(), time.process_time()
        step()
        wall.append(time.perf_counter() - start_wall)
        cpu.append(time.process_time() - start_cpu)
    result = {
        "case": args.case,
        "size": list(size),
        "times_s": wall,
        "median_s": statistics.median(wall),
        "median_cpu_s": statistics.median(cpu),
        "peak_rss_mb": _peak_rss_mb(),
        "peak_rss_above_baseline_mb": _peak_rss_mb() - baseline_rss,
    }
    if device.type == "cuda":
        result["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    result.update(check())
    return result


def _run_bundle(args) -> dict:
    """Wall time of ``python -m monai.bundle run`` (fresh interpreter each time) on the shipped pair."""
    wall = []
    with tempfile.TemporaryDirectory() as out_dir:
        command = [
            sys.executable, "-m", "monai.bundle", "run",
            "--config_file", "configs/inference.json",
            "--bundle_root", ".",
            "--moving_image", str(MOVING), "--fixed_image", str(FIXED),
            "--output_dir", out_dir, "--overwrite", "True",
            "--affine_transform", "none", "--refine_iterations", "0",  # the network alone, as before the pipeline moved in
        ]  # fmt: skip
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
        if args.device == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = ""
        for index in range(args.warmup + args.repeats):
            start = time.perf_counter()
            done = subprocess.run(command, cwd=BUNDLE_ROOT, env=env, capture_output=True, text=True)
            elapsed = time.perf_counter() - start
            if done.returncode != 0:
                raise RuntimeError(f"monai.bundle run failed ({done.returncode}):\n{done.stderr[-3000:]}")
            if index >= args.warmup:
                wall.append(elapsed)
        outputs = sorted(p.name for p in Path(out_dir).rglob("*.nii.gz"))
    return {
        "case": BUNDLE_CASE,
        "size": [160, 192, 160],
        "times_s": wall,
        "median_s": statistics.median(wall),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0,
        "outputs": outputs,
    }


# ----------------------------------------------------------------------------------------------------------- driver
def _environment(args) -> dict:
    import monai
    import torch

    cpu_model = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu_model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    env = {
        "torch": torch.__version__,
        "monai": monai.__version__,
        "python": platform.python_version(),
        "device": args.device,
        "device_name": torch.cuda.get_device_name(0) if args.device == "cuda" else cpu_model,
        "cpu_model": cpu_model,
        "cpu_count": os.cpu_count(),
        "threads": args.threads,
        "amp": args.amp,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "load_average_at_start": os.getloadavg(),
        "git_commit": _git("rev-parse", "HEAD"),
        # Workers import the working tree as it is when each case starts: note local edits.
        "git_dirty_paths": _git("status", "--porcelain", "--", "bundle/scripts", "bench").splitlines(),
    }
    return env


def _git(*args) -> str:
    try:
        done = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""


def _spawn(args, case, size) -> dict:
    command = [
        sys.executable, __file__, "--worker", case, "--size", size, "--device", args.device,
        "--threads", str(args.threads), "--repeats", str(args.repeats), "--warmup", str(args.warmup),
    ] + (["--amp"] if args.amp else [])  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        return {"case": case, "size": [int(s) for s in size.split(",")], "error": done.stderr[-2000:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _in_process(args, case, size) -> dict:
    worker_args = argparse.Namespace(**{**vars(args), "case": case, "size": size})
    try:
        return _run_bundle(worker_args) if case == BUNDLE_CASE else _run_worker(worker_args)
    except Exception as error:  # keep the other figures
        return {"case": case, "size": [int(s) for s in size.split(",")], "error": repr(error)}


def _add_ratios(results: list) -> None:
    """ratio = our median time / reference median time (< 1 means faster), for each (case, size) with a reference."""
    by_key = {(r["case"], tuple(r["size"])): r for r in results}
    for r in results:
        reference_case = CASES.get(r["case"], (None,))[0]
        reference = by_key.get((reference_case, tuple(r["size"])))
        if reference and "median_s" in r and "median_s" in reference:
            r["reference"] = reference_case
            r["time_ratio_vs_reference"] = r["median_s"] / reference["median_s"]
            r["speedup_vs_reference"] = reference["median_s"] / r["median_s"]
            if "median_cpu_s" in r and reference.get("median_cpu_s"):
                r["cpu_time_ratio_vs_reference"] = r["median_cpu_s"] / reference["median_cpu_s"]
            r["peak_rss_ratio_vs_reference"] = r["peak_rss_mb"] / reference["peak_rss_mb"]


def _volume(size: str) -> int:
    """Number of voxels of a "D,H,W" size string."""
    d, h, w = (int(s) for s in size.split(","))
    return d * h * w


def _write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    os.replace(tmp, path)


def _table(results: list) -> str:
    lines = [f"{'case':<20} {'size':<12} {'median s':>9} {'cpu s':>8} {'peak MB':>8} {'vs ref':>7}  extra"]
    for r in results:
        size = "x".join(str(s) for s in r["size"])
        if "error" in r:
            lines.append(f"{r['case']:<20} {size:<12} ERROR {r['error'].strip().splitlines()[-1][:80]}")
            continue
        peak = r.get("peak_gpu_mb", r["peak_rss_mb"])
        ratio = f"{r['time_ratio_vs_reference']:.3f}" if "time_ratio_vs_reference" in r else ""
        extra = ", ".join(
            f"{k}={v:.3g}" for k, v in r.items() if k in ("value_abs_diff", "max_abs_diff_vs_monai", "parameters")
        )
        cpu = f"{r['median_cpu_s']:.3f}" if "median_cpu_s" in r else ""
        lines.append(f"{r['case']:<20} {size:<12} {r['median_s']:>9.3f} {cpu:>8} {peak:>8.0f} {ratio:>7}  {extra}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["160,192,224", "96,112,128"], help="D,H,W sizes")
    parser.add_argument("--cases", nargs="+", default=list(CASES) + [BUNDLE_CASE], help="subset of cases to run")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--amp", action="store_true", help="autocast the networks (CUDA)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results" / "benchmark.json")
    parser.add_argument("--quick", action="store_true", help="tiny smoke run: 16^3, 2 repeats, in-process, no bundle")
    parser.add_argument("--in-process", action="store_true", help="no subprocess per case (memory not isolated)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--size", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    unknown = set(args.cases) - set(CASES) - {BUNDLE_CASE}
    if unknown:
        parser.error(f"unknown cases {sorted(unknown)}; choose from {list(CASES) + [BUNDLE_CASE]}")

    import torch

    if args.threads is None:
        args.threads = torch.get_num_threads()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but no GPU is available")
    if args.worker:
        args.case = args.worker
        result = _run_bundle(args) if args.worker == BUNDLE_CASE else _run_worker(args)
        print(json.dumps(result))
        return 0
    if args.quick:
        args.sizes, args.repeats, args.warmup, args.in_process = ["16,16,16"], 2, 1, True
        args.cases = [c for c in args.cases if c != BUNDLE_CASE]

    payload = {"environment": _environment(args), "command": " ".join(sys.argv), "results": []}
    # Cheap groups for every size first, the bundle run, then training steps smallest size first: an interrupted
    # run still has the key figures (results are written after every case).
    groups = [("ncc_", "warp_", "_infer"), ("_train",)]
    jobs = [
        (case, size)
        for size in args.sizes
        for case in CASES
        if case in args.cases and any(tag in case for tag in groups[0])
    ]
    if BUNDLE_CASE in args.cases:
        if (BUNDLE_ROOT / "configs" / "inference.json").exists():
            jobs.append((BUNDLE_CASE, "160,192,160"))
        else:
            print("skipping bundle_run: bundle/configs/inference.json does not exist yet", file=sys.stderr)
    by_voxels = sorted(args.sizes, key=lambda s: _volume(s))
    jobs += [(case, size) for size in by_voxels for case in CASES if case in args.cases and "_train" in case]
    started = time.perf_counter()
    for case, size in jobs:
        print(f"[{time.perf_counter() - started:7.1f}s] {case} {size}", file=sys.stderr, flush=True)
        result = _in_process(args, case, size) if args.in_process else _spawn(args, case, size)
        payload["results"].append(result)
        _add_ratios(payload["results"])
        payload["environment"]["load_average_at_end"] = os.getloadavg()
        payload["memory_isolated"] = not args.in_process
        _write_json(args.out, payload)  # partial results survive an interrupted run
    print(_table(payload["results"]))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
