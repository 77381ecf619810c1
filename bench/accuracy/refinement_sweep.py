# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""Sweep of the field-refinement settings on one brain_mal2012 pair (use tuning people only), from a finished
``register --iterations 0 --refine_iterations 0`` run of that pair: seg14 Dice and % det J <= 0 in the fixed brain.

    cd bundle && python -m scripts.cli register --fixed $D/mal1014_t1.nii.gz --moving $D/mal1015_t1.nii.gz \
        --fixed_label $D/mal1014_seg14.nii.gz --moving_label $D/mal1015_seg14.nii.gz --out OUT --iterations 0 \
        --refine_iterations 0
    python -m bench.accuracy.refinement_sweep --out OUT --data $D --fixed mal1014 --moving mal1015 \
        --settings velocity,50,2,0.5,9 velocity,50,2,0.5,5 velocity,50,0.1,1,5 displacement,50,0.1,4,5

Each setting is ``parameterization,iterations,learning_rate,smoothness_weight,lncc_kernel[,unsquared]`` (scale 0.5 and
4 squaring steps, as the refinement of configs/inference.json, whose defaults are the first setting above; a sixth field ``unsquared``
uses Eq. (1) of the SACB-Net supplement, ``LocalNCCLoss(squared=False)``, instead of the squared local NCC).
The moving scan and labels are taken onto the fixed grid through the run's ``affine.mat`` (bundle ``apply``), the
refinement starts from the run's ``ddf.nii.gz``; labels are warped with nearest-neighbour sampling.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from bench.accuracy.scoring import dice_per_class, jacobian_stats
from scripts.engines import refine_displacement
from scripts.layers.jacobian import jacobian_determinant
from scripts.layers.warp import warp_image
from scripts.losses import GradientLoss, LocalNCCLoss
from scripts.spatial import apply_transforms


def _scaled(array: np.ndarray) -> torch.Tensor:
    low, high = np.percentile(array, [0.5, 99.5])
    return torch.as_tensor(np.clip((array - low) / (high - low), 0, 1), dtype=torch.float32)[None, None]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output folder of the register run")
    parser.add_argument("--data", required=True, help="brain_mal2012 folder")
    parser.add_argument("--fixed", required=True)
    parser.add_argument("--moving", required=True)
    parser.add_argument("--settings", nargs="+", default=["velocity,50,2,0.5,9"])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out, data = Path(args.out), Path(args.data)
    fixed = nib.load(str(data / f"{args.fixed}_t1.nii.gz"))
    with tempfile.TemporaryDirectory() as affine_only:
        shutil.copy(out / "affine.mat", Path(affine_only) / "affine.mat")
        moving = apply_transforms(fixed, data / f"{args.moving}_t1.nii.gz", affine_only, "linear")
        moving_label = apply_transforms(fixed, data / f"{args.moving}_seg14.nii.gz", affine_only, "nearest")
    fixed_label = np.asanyarray(nib.load(str(data / f"{args.fixed}_seg14.nii.gz")).dataobj)
    labels = torch.as_tensor(np.asanyarray(moving_label.dataobj))[None, None].float()
    inputs = torch.cat([_scaled(np.asanyarray(moving.dataobj).astype(np.float32)), _scaled(fixed.get_fdata(dtype=np.float32))], 1)
    ddf = torch.as_tensor(np.moveaxis(np.asanyarray(nib.load(str(out / "ddf.nii.gz")).dataobj), -1, 0))[None].float()
    brain = fixed.get_fdata() > 0

    def score(field: torch.Tensor) -> tuple[float, float]:
        warped = warp_image(labels, field, mode="nearest")[0, 0].numpy()
        ids = [k for k in range(1, 15) if (fixed_label == k).any()]
        dice = np.mean(list(dice_per_class(fixed_label, warped, ids).values()))
        det = jacobian_determinant(field).reshape(brain.shape).numpy()
        return float(dice), jacobian_stats(det, brain)["fold_pct"]

    print("plain (no refinement): Dice %.4f, det J <= 0 %.3f %%" % score(ddf), flush=True)
    for setting in args.settings:
        parameterization, iterations, learning_rate, weight, kernel, *form = setting.split(",")
        if form not in ([], ["unsquared"]):
            raise ValueError(f"setting {setting!r}: the sixth field may only be 'unsquared'.")
        start = time.time()
        loss = LocalNCCLoss(int(kernel), squared=not form)
        field = refine_displacement(
            inputs, ddf, loss, GradientLoss(), float(weight), int(iterations), float(learning_rate),
            0.5, parameterization=parameterization,
        )
        dice, folds = score(field)
        print(f"{parameterization}, iterations {iterations}, lr {learning_rate}, weight {weight}, kernel {kernel} "
              f"{'Eq. (1) unsquared' if form else 'squared'}: "
              f"Dice {dice:.4f}, det J <= 0 {folds:.3f} %, {time.time() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
