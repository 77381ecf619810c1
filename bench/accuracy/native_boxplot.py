# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""Per-structure Dice box plot (the SACB-Net paper's Figure 2 style) of a native-pair benchmark results JSON.

``python -m bench.accuracy.native_boxplot bench/accuracy/results/native_ants.json docs/figures/native_dice_boxplot.png``

One group of boxes per ``seg14`` structure, one box per method, each box over the pairs that *every* chosen method
finished (so the boxes of a group describe the same pairs); the legend gives each method's mean Dice over those pairs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from bench.accuracy.report import NATIVE_ROWS, PREALIGNED_ROWS, SEG14_NAMES

__all__ = ["DEFAULT_METHODS", "common_pairs", "main", "plot"]

DEFAULT_METHODS = ("ants_affine", "ants_syn_60_30_10", "bundle_default")
_LABELS = {**NATIVE_ROWS, **PREALIGNED_ROWS, "bundle_default": "bundle register (defaults)"}


def common_pairs(report: dict, methods: list[str]) -> list[str]:
    """Names of the pairs with an ``ok`` result for every method in ``methods``, in the report's pair order."""
    done = {(r["pair"], r["method"]) for r in report["results"] if r.get("status") == "ok"}
    return [p for p in report["pairs"] if all((p, m) in done for m in methods)]


def plot(report: dict, methods: list[str], png: Path) -> list[str]:
    """Write the box plot to ``png`` (atomically); returns the pairs it covers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = common_pairs(report, methods)
    if not pairs:
        raise ValueError(f"no pair has an ok result for every method of {methods}.")
    result = {(r["pair"], r["method"]): r for r in report["results"] if r.get("status") == "ok"}
    classes = list(SEG14_NAMES)
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(14, 4.8), dpi=110)
    colours = plt.get_cmap("tab10").colors
    for i, method in enumerate(methods):
        values = [[result[(p, method)]["dice_per_class"].get(str(c), np.nan) for p in pairs] for c in classes]
        values = [[v for v in column if v is not None and np.isfinite(v)] for column in values]
        positions = np.arange(len(classes)) + (i - (len(methods) - 1) / 2) * width
        boxes = ax.boxplot(values, positions=positions, widths=width * 0.9, patch_artist=True, showfliers=True)
        for box in boxes["boxes"]:
            box.set(facecolor=colours[i % len(colours)], alpha=0.75)
        mean = np.mean([result[(p, method)]["dice_mean"] for p in pairs])
        ax.plot([], [], "s", color=colours[i % len(colours)], label=f"{_LABELS.get(method, method)} (mean {mean:.3f})")
    ax.set_xticks(np.arange(len(classes)), [SEG14_NAMES[c] for c in classes], rotation=30, ha="right")
    ax.set_ylabel("Dice")
    ax.set_ylim(0.3, 1.0)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="lower left", fontsize=9)
    ax.set_title(f"seg14 Dice per structure on {len(pairs)} native inter-subject test pairs (brain_mal2012 + FreeSurfer)")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    partial = png.with_name(png.name + ".partial.png")
    fig.savefig(partial)
    plt.close(fig)
    partial.replace(png)
    return pairs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", help="results JSON of bench.accuracy.native")
    parser.add_argument("png", help="output PNG")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    args = parser.parse_args(argv)
    report = json.loads(Path(args.results).read_text())
    pairs = plot(report, [m for m in args.methods.split(",") if m], Path(args.png))
    print(f"wrote {args.png} ({len(pairs)} pairs: {', '.join(pairs)})")


if __name__ == "__main__":
    main()
