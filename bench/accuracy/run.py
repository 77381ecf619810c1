"""Accuracy benchmark on pre-aligned pairs: register every pair found in the data folders with every method, score,
print, write JSON.

Usage (from the repository root)::

    python -m bench.accuracy.run --data ../shared/data --data bundle/sample_data \
        --methods identity,ants_syn,bundle_io,bundle_trained --out outputs/accuracy

Pairs come from ``pairs.discover_pairs``, methods from ``methods.build_methods``; ``runner.run_benchmark`` runs each
method in its own process (wall time, CPU time, peak RSS from ``os.wait4``) and scores the outputs with the bundle's
metrics (``scoring.score_pair``): mean Dice over the labels present in both maps (per label group), HD95 in mm, and %
voxels with det J <= 0.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bench.accuracy import BUNDLE_ROOT
from bench.accuracy.methods import build_methods
from bench.accuracy.report import format_table
from bench.accuracy.runner import run_benchmark

__all__ = ["main"]


def _parse_overrides(items: list[str]) -> dict[str, str]:
    overrides = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--io_override must look like id=value, got {item!r}.")
        key, value = item.split("=", 1)
        overrides[key] = value
    return overrides


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", action="append", required=True, help="data folder (repeatable)")
    parser.add_argument("--methods", default="identity,ants_syn,bundle_io,bundle_trained")
    parser.add_argument("--out", default=str(BUNDLE_ROOT.parent / "outputs" / "accuracy"))
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
    report = run_benchmark(
        [Path(d) for d in args.data],
        methods,
        Path(args.out),
        args.threads,
        args.include_unlabeled,
        Path(args.json) if args.json else None,
        argv=["python", "-m", "bench.accuracy", *argv],
    )
    print(format_table(report))
    return report


if __name__ == "__main__":
    main()
