# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""
The one prepared GPU check: everything that needs CUDA, in one go, under 8 minutes, into one folder.

1. AMP agreement: the shipped weights on the real pair at 160x192x224, float32 vs autocast (float16): field
   difference and Dice; with the speed figures below it decides whether ``amp`` defaults to on for CUDA.
2. ``pytest -m cuda tests/test_cuda.py``: network, NCC, warp, k-means, affine stage, instance optimisation, Jacobian
   on CUDA vs CPU within tolerance, AMP paths, a CLI run and a training epoch on CUDA.
3. ``bench/benchmark.py`` on CUDA without and with ``--amp`` at 160x192x224 (in one process per mode, the peak GPU
   memory reset per case): SACB-Net inference and training step beside MONAI VoxelMorph, LocalNCCLoss beside MONAI
   LNCC, Warp beside MONAI Warp.
4. One instance-optimisation step (``bench/gpu_check_cases.py``), with and without autocast, at network_scale 1.0
   and 0.5.
5. With ``--native_pair M,F,ML,FL`` (a real native pair, e.g. two ``brain_mal2012`` scans with their seg14 maps):
   ``register``'s default pipeline (affine stage, forward pass, field refinement, ITK/ANTs files) through the CLI on
   the chosen device, with ``--amp false`` and ``--amp true``: wall time of the whole command, mean Dice, folding.

Writes ``OUT/gpu_check.json`` (every figure) and ``OUT/gpu_check.md`` (the tables), plus the raw benchmark JSONs and
the tests' JUnit XML. Without CUDA it writes a "skipped" report and exits 0; ``--dry-run`` runs every step on the
CPU at 32^3 with one repeat (bfloat16 autocast), to check the script itself.

Usage (from the repository root)::

    bash bench/gpu_check.sh OUT_DIR            # the GPU check (wraps this script in a 470 s timeout)
    python bench/gpu_check.py OUT_DIR --dry-run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

__all__ = ["main", "markdown", "native_register"]

REPO_ROOT = Path(__file__).resolve().parents[1]
BUNDLE_ROOT = REPO_ROOT / "bundle"
BENCH_CASES = ["ncc_ours_fwd_bwd", "ncc_monai_fwd_bwd", "warp_ours_image", "warp_monai_image", "warp_ours_label",
               "warp_monai_label", "sacbnet_infer", "voxelmorph_infer", "sacbnet_train", "voxelmorph_train"]
AMP_DEFAULT_RULE = "amp on for CUDA if SACB-Net inference and training are >= 1.1x faster with it and the field " \
                   "differs by < 0.05 voxel on average with a Dice change < 0.01"


def _environment(device: str) -> dict:
    import monai
    import torch

    git = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True)
    try:  # the driver version is only known to nvidia-smi
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=30).stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        driver = None
    return {"torch": torch.__version__, "cuda_build": torch.version.cuda, "monai": monai.__version__,
            "python": platform.python_version(), "device": device, "cuda_available": torch.cuda.is_available(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "gpu_count": torch.cuda.device_count(), "driver": driver,
            "cpu_count": os.cpu_count(), "git_commit": git.stdout.strip()}


def _run(command: list[str], timeout: float, log: Path) -> tuple[int, float]:
    """Run a subprocess from the repository root; stdout+stderr to ``log``; returns (exit code, seconds)."""
    start = time.perf_counter()
    with open(log, "w") as stream:
        try:
            code = subprocess.run(command, cwd=REPO_ROOT, stdout=stream, stderr=subprocess.STDOUT,
                                  timeout=max(timeout, 1)).returncode
        except subprocess.TimeoutExpired:
            code = 124
    return code, time.perf_counter() - start


def native_register(pair: list[str], device: str, out: Path, timeout: float) -> list[dict]:
    """``register`` (the CLI's default pipeline) on one native pair, in float32 and with AMP; one process per run.

    Args:
        pair: moving image, fixed image, moving label map, fixed label map (paths).
        device: ``cpu`` or ``cuda``.
        out: the runs write into ``out/register_{fp32,amp}`` (NIfTI outputs, ``metrics.json``) and log beside it.
        timeout: seconds for both runs together.

    Returns:
        one record per run: wall seconds of the whole command (start-up and file writing included), exit code,
        mean Dice before/after and the percentage of folded voxels from its ``metrics.json``.
    """
    moving, fixed, moving_label, fixed_label = (str(Path(p).resolve()) for p in pair)
    records, start = [], time.perf_counter()
    for mode in ("fp32", "amp"):
        run_dir = out / f"register_{mode}"
        command = [sys.executable, "-m", "scripts.cli", "register", "--moving", moving, "--fixed", fixed,
                   "--moving_label", moving_label, "--fixed_label", fixed_label, "--out", str(run_dir),
                   "--device", device, "--amp", "true" if mode == "amp" else "false"]
        left = timeout - (time.perf_counter() - start)
        if left < 10:
            records.append({"case": "native_register", "mode": mode, "error": "skipped: time budget spent"})
            continue
        begin = time.perf_counter()
        with open(out / f"register_{mode}.log", "w") as stream:
            try:
                code = subprocess.run(command, cwd=BUNDLE_ROOT, stdout=stream, stderr=subprocess.STDOUT,
                                      timeout=left).returncode
            except subprocess.TimeoutExpired:
                code = 124
        record = {"case": "native_register", "mode": mode, "pair": [Path(p).name for p in pair],
                  "wall_s": time.perf_counter() - begin, "exit_code": code}
        metrics = run_dir / "metrics.json"
        if code == 0 and metrics.is_file():
            values = json.loads(metrics.read_text())
            record.update(mean_dice=values.get("mean_dice"), mean_dice_identity=values.get("mean_dice_identity"),
                          percent_non_positive_jacobian=values.get("percent_non_positive_jacobian"))
        else:
            record["error"] = f"exit {code}; see register_{mode}.log"
        records.append(record)
    return records


def _junit_counts(path: Path) -> dict:
    if not path.is_file():
        return {"error": "no JUnit report"}
    root = ElementTree.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    counts["failed"] = [f"{case.get('classname')}::{case.get('name')}: {(bad.get('message') or '')[:300]}"
                        for case in suite.iter("testcase") for bad in case if bad.tag in ("failure", "error")]
    return counts


def _by_case(results: list) -> dict:
    return {r["case"]: r for r in results}


def _summary(report: dict) -> dict:
    """Per benchmark case: float32 and autocast time and peak GPU memory, AMP speed-up, ratio to MONAI's case."""
    fp32, amp = (_by_case(report["benchmark"].get(mode, {}).get("results", [])) for mode in ("fp32", "amp"))
    rows = []
    for case in BENCH_CASES:
        a, b = fp32.get(case, {}), amp.get(case, {})
        row = {"case": case, "fp32_s": a.get("median_s"), "amp_s": b.get("median_s"), "fp32_peak_gpu_mb":
               a.get("peak_gpu_mb"), "amp_peak_gpu_mb": b.get("peak_gpu_mb"), "reference": a.get("reference"),
               "fp32_ratio_vs_reference": a.get("time_ratio_vs_reference"),
               "amp_ratio_vs_reference": b.get("time_ratio_vs_reference"), "error": a.get("error") or b.get("error")}
        if row["fp32_s"] and row["amp_s"]:
            row["amp_speedup"] = row["fp32_s"] / row["amp_s"]
        rows.append(row)
    speed = {r["case"]: r.get("amp_speedup") for r in rows}
    agreement = report.get("amp_agreement", {})
    justified = bool(speed.get("sacbnet_infer") and speed.get("sacbnet_train") and speed["sacbnet_infer"] >= 1.1
                     and speed["sacbnet_train"] >= 1.1 and agreement.get("ddf_mean_abs_diff", 1.0) < 0.05
                     and agreement.get("dice_abs_diff", 1.0) < 0.01)
    return {"rows": rows, "amp_default": {"rule": AMP_DEFAULT_RULE, "justified": justified,
                                          "infer_speedup": speed.get("sacbnet_infer"),
                                          "train_speedup": speed.get("sacbnet_train")}}


def _fmt(value, spec: str = ".3f") -> str:
    return "" if value is None else format(value, spec)


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [f"# GPU check{' (dry run on CPU)' if report['dry_run'] else ''}", "",
             f"{env.get('gpu') or 'no GPU'}, torch {env['torch']} (CUDA {env['cuda_build']}), MONAI {env['monai']}, "
             f"driver {env.get('driver')}, commit {env['git_commit'][:10]}, {report.get('seconds', 0):.0f} s in all; "
             f"{env.get('gpu_count', 0)} GPU(s): "
             f"{'a multi-GPU NCCL cohort run is possible' if env.get('gpu_count', 0) > 1 else 'no 2-process NCCL run'}.",
             ""]
    if report.get("status") == "skipped":
        return "\n".join(lines + [f"Skipped: {report['reason']}", ""])
    tests = report.get("tests", {})
    lines += [f"CUDA tests: {tests.get('tests', '?')} run, {tests.get('failures', '?')} failed, "
              f"{tests.get('errors', '?')} errors, {tests.get('skipped', '?')} skipped."]
    lines += [f"- FAILED {name}" for name in tests.get("failed", [])] + [""]
    lines += ["| case | float32 s | peak GPU MB | autocast s | peak GPU MB | AMP speed-up | vs MONAI (fp32) | vs MONAI (amp) |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report.get("summary", {}).get("rows", []):
        if r.get("error"):
            lines.append(f"| {r['case']} | error: {r['error'].strip().splitlines()[-1][:80]} | | | | | | |")
            continue
        lines.append(f"| {r['case']} | {_fmt(r['fp32_s'])} | {_fmt(r['fp32_peak_gpu_mb'], '.0f')} | {_fmt(r['amp_s'])} "
                     f"| {_fmt(r['amp_peak_gpu_mb'], '.0f')} | {_fmt(r.get('amp_speedup'), '.2f')} "
                     f"| {_fmt(r['fp32_ratio_vs_reference'])} | {_fmt(r['amp_ratio_vs_reference'])} |")
    for r in report.get("native_register", []):
        label = f"register, native pair ({r['mode']}, whole command)"
        lines.append(f"| {label} | error: {r['error'][-80:]} | | | | | | |" if "error" in r else
                     f"| {label} | {_fmt(r['wall_s'])} | | | | | | | (Dice {_fmt(r.get('mean_dice_identity'))} -> "
                     f"{_fmt(r.get('mean_dice'))}, det J <= 0: {_fmt(r.get('percent_non_positive_jacobian'), '.4f')} %)")
    for r in report.get("io_step", []):
        label = f"sacbnet_io_step (network_scale {r.get('network_scale')}, {'autocast' if r.get('amp') else 'float32'})"
        lines.append(f"| {label} | {_fmt(r.get('mean_step_s'))} | {_fmt(r.get('peak_gpu_mb'), '.0f')} | | | | | |"
                     if "error" not in r else f"| {label} | error: {r['error'][-80:]} | | | | | | |")
    agreement, default = report.get("amp_agreement", {}), report.get("summary", {}).get("amp_default", {})
    lines += ["", f"AMP agreement (shipped weights, real pair {agreement.get('size')}): mean |Δddf| "
              f"{_fmt(agreement.get('ddf_mean_abs_diff'), '.4f')} voxel (p99 {_fmt(agreement.get('ddf_p99_abs_diff'), '.3f')}), "
              f"Dice 1-7 {_fmt(agreement.get('dice_fp32'), '.4f')} (float32) vs {_fmt(agreement.get('dice_amp'), '.4f')} "
              f"(autocast). AMP default {'justified' if default.get('justified') else 'NOT justified'} by the rule: "
              f"{AMP_DEFAULT_RULE}.", ""]
    return "\n".join(lines)


def _write(out: Path, report: dict) -> None:
    for name, text in (("gpu_check.json", json.dumps(report, indent=2)), ("gpu_check.md", markdown(report))):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text + "\n")
        os.replace(tmp, out / name)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path, help="folder for gpu_check.json, gpu_check.md and the raw files")
    parser.add_argument("--dry-run", action="store_true", help="every step on the CPU at 32^3, one repeat")
    parser.add_argument("--size", default="160,192,224", help="D,H,W of the benchmark and agreement cases")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--budget", type=float, default=440.0, help="seconds; later steps are skipped past it")
    parser.add_argument("--native_pair", default=None,
                        help="MOVING,FIXED,MOVING_LABEL,FIXED_LABEL: also time register's default pipeline on it")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(BUNDLE_ROOT))
    import torch

    start = time.perf_counter()
    out = args.out_dir.resolve()
    out.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available() and not args.dry_run
    report = {"dry_run": args.dry_run, "environment": _environment("cuda" if cuda else "cpu")}
    if not cuda and not args.dry_run:
        report.update(status="skipped", reason=f"CUDA is not available on this machine (torch {torch.__version__}); "
                      "nothing was measured. Run it on a GPU machine, or use --dry-run to check the script on CPU.")
        _write(out, report)
        print(f"skipped (no CUDA); wrote {out / 'gpu_check.json'}")
        return 0
    device = torch.device("cuda" if cuda else "cpu")
    size = [32, 32, 32] if args.dry_run else [int(s) for s in args.size.split(",")]
    repeats, warmup = (1, 0) if args.dry_run else (args.repeats, args.warmup)
    left = lambda: args.budget - (time.perf_counter() - start)  # noqa: E731
    from gpu_check_cases import amp_agreement, io_step

    report["amp_agreement"] = amp_agreement(device, size)
    _write(out, report)
    code, seconds = _run([sys.executable, "-m", "pytest", "-m", "cuda", "tests/test_cuda.py", "-q", "-p",
                          "no:cacheprovider", f"--junitxml={out / 'cuda_tests.xml'}"], min(left() - 230, 180),
                         out / "cuda_tests.log")
    report["tests"] = dict(_junit_counts(out / "cuda_tests.xml"), exit_code=code, seconds=seconds)
    _write(out, report)
    report["benchmark"] = {}
    for mode in ("fp32", "amp"):
        raw = out / f"benchmark_{mode}.json"
        command = [sys.executable, "bench/benchmark.py", "--device", device.type, "--sizes", ",".join(map(str, size)),
                   "--cases", *BENCH_CASES, "--repeats", str(repeats), "--warmup", str(warmup), "--in-process",
                   "--out", str(raw)] + (["--amp"] if mode == "amp" else [])
        code, seconds = _run(command, min(left() - 50, 110), out / f"benchmark_{mode}.log")
        report["benchmark"][mode] = json.loads(raw.read_text()) if raw.is_file() else {"error": f"exit {code}"}
        report["benchmark"][mode].update(exit_code=code, seconds=seconds)
        _write(out, report)
    if args.native_pair:
        pair = [p.strip() for p in args.native_pair.split(",")]
        if len(pair) != 4 or not all(Path(p).is_file() for p in pair):
            raise SystemExit(f"--native_pair needs 4 existing files (moving, fixed, moving label, fixed label), "
                             f"got {pair}.")
        report["native_register"] = native_register(pair, device.type, out, min(left() - 40, 150))
        _write(out, report)
    report["io_step"] = []
    for scale in (1.0, 0.5):
        for amp in (False, True):
            if left() < 20:
                report["io_step"].append({"network_scale": scale, "amp": amp, "error": "skipped: time budget spent"})
                continue
            try:
                report["io_step"].append(io_step(device, size, amp, scale, max(repeats, 1), warmup))
            except Exception as error:  # keep the other figures
                report["io_step"].append({"network_scale": scale, "amp": amp, "error": repr(error)})
    report["summary"] = _summary(report)
    report["seconds"] = time.perf_counter() - start
    _write(out, report)
    print(markdown(report))
    failed = report["tests"].get("failures", 1) or report["tests"].get("errors", 1) or report["tests"]["exit_code"] not in (0, 5)
    errors = [r["case"] for r in report["summary"]["rows"] if r.get("error")] + [
        r["mode"] for r in report.get("native_register", []) if "error" in r] + [
        str(r.get("network_scale")) for r in report["io_step"] if "error" in r]
    return 1 if failed or errors else 0


if __name__ == "__main__":
    sys.exit(main())
