# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""Native-pair benchmark: ANTs and the bundle on native and pre-aligned inter-subject brain pairs.

``python -m bench.accuracy.native --data ../shared/data --out outputs/native --threads 2 [--methods a,b] [--pairs p,q]``

Pairs (``pairs.native_pairs``): the FreeSurfer pair and the 10 ``brain_mal2012`` test pairs of the split. Methods
(``methods.METHODS``) in order of importance: identity + ANTs Affine (+ identity after that affine) on every pair,
then ANTs SyN (60,30,10) native, SyNOnly (60,30,10) on the pre-aligned pairs, then the (40,20,0) runs. The one runner
(``runner.run_native``) runs each in its own process with every thread pool capped at ``--threads``, takes wall time,
CPU time and peak RSS of the child from ``os.wait4`` and scores the outputs with the bundle's metrics
(``scoring.score_outputs``). After every task ``OUT/results.json`` is rewritten atomically; a rerun skips every
(pair, method) already ``ok`` there, so the run can be stopped any time. The pre-aligned inputs are written to
``OUT/prealigned/<pair>/`` and listed in ``OUT/prealigned/datalist.json``.
``--rescore OUT`` runs no method: it adds HD95 to an existing ``OUT/results.json`` (``native_rescore.py``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bench.accuracy import BUNDLE_ROOT
from bench.accuracy.methods import DEFAULT_METHODS, METHODS
from bench.accuracy.native_rescore import rescore
from bench.accuracy.pairs import native_pairs
from bench.accuracy.runner import reuse_prealigned, run_native

__all__ = ["main"]

REPO_ROOT = BUNDLE_ROOT.parent


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
    parser.add_argument("--head_part", default="original", choices=["original", "tuning", "test"],
                        help="which whole-head pairs (bench.accuracy.pairs.HEAD_PAIRS); tuning/test need --head_data")
    parser.add_argument("--head_data", default=None,
                        help="folder of the cfmi-* whole-head files (default DATA/brain_freesurfer_head; the tuning "
                        "and test parts: the folder written by python -m bench.accuracy.cfmi_heads)")
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
        return rescore(Path(args.rescore).resolve(), ["python", "-m", "bench.accuracy.native", *argv])
    out_dir = Path(args.out).resolve()
    pairs = native_pairs(args.data, out_dir, include_retest=args.include_retest, whole_heads=args.whole_heads,
                         head_data=args.head_data, head_part=args.head_part)
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
    return run_native(
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
