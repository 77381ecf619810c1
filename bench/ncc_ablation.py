# Copyright (c) the SACB-Net MONAI bundle authors.
# Licensed under the Apache License, Version 2.0 (the "License"); see the LICENSE file at the repository root.
"""
What each NCC optimisation buys: forward+backward time of local NCC (9³ window) variants on the real pair.

Variants (all compute the same value as MONAI's rectangular LNCC):

- ``monai``: MONAI's loss (five separate separable depthwise conv3d filterings, autograd backward);
- ``shift_autograd``: one batched pass of the five maps, box sums by shifted additions, autograd backward;
- ``gemm_autograd``: one batched pass, box sums as banded GEMMs (the shipped box sum), autograd backward;
- ``shift_custom``: shifted-addition box sums with the custom box-sum backward;
- ``gemm_custom``: the shipped ``LocalNCCLoss`` (banded GEMMs + custom box-sum backward).

Usage::

    python bench/ncc_ablation.py --sizes 160,192,224 96,112,128 --out bench/results/ncc_ablation.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "bundle"))
sys.path.insert(0, str(REPO_ROOT / "bench"))

from benchmark import _load_pair  # noqa: E402
from monai.losses import LocalNormalizedCrossCorrelationLoss  # noqa: E402

import scripts.losses.ncc as ncc  # noqa: E402


def _autograd_ncc(box, kernel_size=9, smooth_dr=1e-5):
    """Same definition, differentiated by autograd through the batched box sums."""

    def loss(pred, target):
        p = pred.reshape(-1, *pred.shape[2:])
        t = target.reshape(-1, *target.shape[2:])
        sums = box(torch.cat((t, p, t * t, p * p, t * p)), kernel_size // 2).reshape(5, *p.shape)
        _, _, cross, t_var, p_var = ncc._window_statistics(sums, float(kernel_size**3), smooth_dr)
        return -(cross * cross / (t_var * p_var)).mean()

    return loss


def _custom_with(box):
    """The shipped LocalNCCLoss with its box sum swapped (restored after each call)."""
    shipped = ncc.LocalNCCLoss()

    def loss(pred, target):
        original = ncc.box_sum
        ncc.box_sum = lambda x, k: box(x.contiguous(), k // 2)
        try:
            return shipped(pred, target)
        finally:
            ncc.box_sum = original

    return loss


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["160,192,224", "96,112,128"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--variants", nargs="+", default=None, help="subset (default: all)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results" / "ncc_ablation.json")
    args = parser.parse_args(argv)
    variants = {
        "monai": LocalNormalizedCrossCorrelationLoss(3, 9, "rectangular"),
        "shift_autograd": _autograd_ncc(ncc._box_sum_shift),
        "gemm_autograd": _autograd_ncc(ncc._box_sum_gemm),
        "shift_custom": _custom_with(ncc._box_sum_shift),
        "gemm_custom": ncc.LocalNCCLoss(),
    }
    if args.variants:
        variants = {name: variants[name] for name in args.variants}
    results = []
    for size in args.sizes:
        moving, fixed, _ = _load_pair(tuple(int(s) for s in size.split(",")), torch.device("cpu"))
        for name, loss in variants.items():
            pred = moving.clone().requires_grad_()
            times = []
            for index in range(args.repeats + 1):  # first run = warm-up
                start = time.perf_counter()
                value = loss(pred, fixed)
                value.backward()
                if index:
                    times.append(time.perf_counter() - start)
                pred.grad = None
            row = {"variant": name, "size": size, "median_s": statistics.median(times), "value": value.item()}
            results.append(row)
            print(json.dumps(row), flush=True)
    payload = {"threads": torch.get_num_threads(), "torch": torch.__version__, "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    os.replace(tmp, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
