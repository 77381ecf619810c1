# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""
Training data for the shipped weights from ``shared/data/brain_mal2012``: the training people of the fixed split
(``bench/accuracy/splits/mal2012_split.json``) affinely aligned into one space, and the tuning pairs aligned the way
test pairs are (moving onto the fixed scan's own grid), both with the bundle's own affine stage.

``python -m bench.training.prepare_mal2012 --data ../shared/data --out outputs/training_mal2012 [--threads 2]``

- Training space: the grid of the first training scan (``--reference``, default mal1000). Every other training scan
  (rescans included) runs ``scripts.cli register --affine_only`` onto it; the reference itself is used as it is.
- Validation: the split's tuning pairs mal1015 -> mal1014 and mal1019 -> mal1125 (the pairs the defaults were chosen
  on), the moving scan aligned onto the fixed scan.
- Writes ``OUT/datalist.json`` in the bundle's training datalist format: ``training`` is the list of every ordered
  pair of the aligned scans plus the 12 ordered pairs of the four neurite-OASIS subjects (their own shared space),
  ``validation`` the aligned tuning pairs with ``seg14`` labels, and ``training_labelled`` every ordered pair of the
  aligned scans with their ``seg14`` labels (for the optional weakly supervised Dice term,
  ``configs/presets/mal2012_brain_dice.json``). Paths are absolute.

Each alignment runs in its own process with thread pools capped at ``--threads``; a scan whose ``metrics.json`` exists
is skipped, so the script resumes after a stop. Test people are never read.
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
from pathlib import Path

from bench.accuracy.runner import thread_env

__all__ = ["SPLIT_FILE", "OASIS_SUBJECTS", "TUNING_PAIRS", "align", "labelled_entries", "training_entries", "main"]

REPO = Path(__file__).resolve().parents[2]
SPLIT_FILE = REPO / "bench" / "accuracy" / "splits" / "mal2012_split.json"
OASIS_SUBJECTS = ("oasisCLAP_A", "oasisCLAP_B", "oasisSYM_A", "oasisSYM_B")
TUNING_PAIRS = (("1015", "1014"), ("1019", "1125"))


def _scan(data: Path, scan_id: str) -> tuple[Path, Path]:
    folder = data / "brain_mal2012"
    return folder / f"mal{scan_id}_t1.nii.gz", folder / f"mal{scan_id}_seg14.nii.gz"


def align(moving_id: str, fixed_id: str, data: Path, out: Path, threads: int) -> dict[str, str]:
    """
    Run the bundle's affine stage ``mal<moving_id> -> mal<fixed_id>`` into ``out`` (skipped when already complete).

    Returns:
        ``{"image", "label"}``: the moving scan and its seg14 labels on the fixed scan's grid.
    """
    fixed, fixed_label = _scan(data, fixed_id)
    moving, moving_label = _scan(data, moving_id)
    if not (out / "metrics.json").exists():
        command = [sys.executable, "-m", "scripts.cli", "register", "--affine_only", "--overwrite",
                   "--fixed", str(fixed), "--moving", str(moving), "--fixed_label", str(fixed_label),
                   "--moving_label", str(moving_label), "--out", str(out)]
        print(f"aligning mal{moving_id} -> mal{fixed_id}", flush=True)
        subprocess.run(command, cwd=REPO / "bundle", env=thread_env(threads), check=True)
    return {"image": str(out / "warped_image.nii.gz"), "label": str(out / "warped_label.nii.gz")}


def training_entries(scans: list[dict[str, str]], data: Path) -> list[dict[str, str]]:
    """Every ordered pair of the aligned scans, then every ordered pair of the neurite-OASIS subjects (images only)."""
    oasis = [{"image": str(data / "brain_oasis_unlabeled" / f"{s}_t1.nii.gz")} for s in OASIS_SUBJECTS]
    entries = []
    for group in (scans, oasis):
        entries += [{"moving_image": m["image"], "fixed_image": f["image"]} for m, f in itertools.permutations(group, 2)]
    return entries


def labelled_entries(scans: list[dict[str, str]]) -> list[dict[str, str]]:
    """Every ordered pair of the aligned scans with both label maps (the pairs of :func:`training_entries` that have
    labels)."""
    return [
        {"moving_image": m["image"], "fixed_image": f["image"], "moving_label": m["label"], "fixed_label": f["label"]}
        for m, f in itertools.permutations(scans, 2)
    ]


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="shared/data folder")
    parser.add_argument("--out", required=True)
    parser.add_argument("--reference", default="1000", help="training scan that defines the training space")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    data, out = Path(args.data).resolve(), Path(args.out).resolve()
    split = json.loads(SPLIT_FILE.read_text())
    train_scans = split["scans"]["train"]
    if args.reference not in train_scans:
        raise SystemExit(f"--reference {args.reference} is not a training scan of the split; choose from {train_scans}.")
    reference_image, reference_label = _scan(data, args.reference)
    scans = [{"image": str(reference_image), "label": str(reference_label)}]
    for scan_id in train_scans:
        if scan_id != args.reference:
            scans.append(align(scan_id, args.reference, data, out / "train" / f"mal{scan_id}", args.threads))
    validation = []
    for moving_id, fixed_id in TUNING_PAIRS:
        aligned = align(moving_id, fixed_id, data, out / "validation" / f"mal{moving_id}_to_mal{fixed_id}", args.threads)
        fixed, fixed_label = _scan(data, fixed_id)
        validation.append({"moving_image": aligned["image"], "fixed_image": str(fixed),
                           "moving_label": aligned["label"], "fixed_label": str(fixed_label)})
    datalist = {
        "_desc_": f"brain_mal2012 training people aligned onto mal{args.reference} by the bundle's affine stage "
        f"({len(scans)} scans) + the four neurite-OASIS subjects; validation: tuning pairs on the fixed scan's grid",
        "training": training_entries(scans, data),
        "training_labelled": labelled_entries(scans),
        "validation": validation,
    }
    target = out / "datalist.json"
    target.write_text(json.dumps(datalist, indent=2) + "\n")
    print(f"{len(datalist['training'])} training pairs, {len(validation)} validation pairs -> {target}")
    return target


if __name__ == "__main__":
    main()
