# Copyright (c) the SACB-Net MONAI bundle authors.
# Licensed under the Apache License, Version 2.0 (the "License"); see the LICENSE file at the repository root.
"""Render a ``bench/benchmark.py`` JSON as the Markdown table used in ``docs/benchmarks.md``.

Usage::

    python bench/report.py bench/results/cpu_full.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

# Reference figure compared against a target (ratio = ours / reference; targets from the performance issue).
TARGETS = {
    "ncc_ours_fwd_bwd": ("≥ 4× faster at 160×192×224", lambda r: r <= 0.25),
    "warp_ours_image": ("ratio ≤ 1.05", lambda r: r <= 1.05),
    "warp_ours_label": ("ratio ≤ 1.05", lambda r: r <= 1.05),
    "sacbnet_infer": ("ratio ≤ 1.5", lambda r: r <= 1.5),
}


def render(payload: dict) -> str:
    env = payload["environment"]
    lines = [
        f"Machine: {env['device_name']} ({env['cpu_count']} cores), torch {env['torch']}, MONAI {env['monai']}, "
        f"{env['threads']} torch threads, median of {env['repeats']} runs after {env['warmup']} warm-up; "
        f"load average {env['load_average_at_start'][0]:.1f} at start, {env.get('load_average_at_end', ['?'])[0]:.1f} at end.",
        "",
        "| case | size | median wall s | median CPU s | peak RSS MB (above baseline) | ours / reference (wall) | (CPU) | extra |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in payload["results"]:
        size = "×".join(str(s) for s in r["size"])
        if "error" in r:
            lines.append(f"| {r['case']} | {size} | error: {r['error'].strip().splitlines()[-1][:60]} | | | | | |")
            continue
        peak = f"{r['peak_rss_mb']:.0f}"
        if "peak_rss_above_baseline_mb" in r:
            peak += f" ({r['peak_rss_above_baseline_mb']:.0f})"
        if "peak_gpu_mb" in r:
            peak += f", GPU {r['peak_gpu_mb']:.0f}"
        ratio = f"{r['time_ratio_vs_reference']:.3f}" if "time_ratio_vs_reference" in r else ""
        if r["case"] in TARGETS and ratio and (r["case"] != "ncc_ours_fwd_bwd" or r["size"] == [160, 192, 224]):
            text, ok = TARGETS[r["case"]]
            ratio += f" ({'meets' if ok(r['time_ratio_vs_reference']) else 'MISSES'} {text})"
        cpu_ratio = f"{r['cpu_time_ratio_vs_reference']:.3f}" if "cpu_time_ratio_vs_reference" in r else ""
        extra = []
        if "value_abs_diff" in r:
            extra.append(f"Δvalue = {r['value_abs_diff']:.1e}")
        if "max_abs_diff_vs_monai" in r:
            extra.append(f"max abs Δ = {r['max_abs_diff_vs_monai']:.1e}")
        if "parameters" in r:
            extra.append(f"{r['parameters']:,} params")
        cpu = f"{r['median_cpu_s']:.3f}" if "median_cpu_s" in r else ""
        lines.append(
            f"| {r['case']} | {size} | {r['median_s']:.3f} | {cpu} | {peak} | {ratio} | {cpu_ratio} | {'; '.join(extra)} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    print(render(json.loads(Path(argv[0]).read_text())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
