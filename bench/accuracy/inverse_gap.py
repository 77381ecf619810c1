# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""Where the inverse loses Dice against the forward, cause by cause, on ``register --inverse`` outputs (issue 24).

Forward = ``warped_label.nii.gz`` against the fixed labels on the fixed grid; inverse = the fixed labels brought onto
the moving scan through ``affine.mat`` inverted + ``inverse_warp.nii.gz`` (``scripts.spatial.apply_transforms``,
``inverse=True``, what ANTs computes from the same files) against the moving labels. Per pair it reports:

* ``residual``: how far the stored inverse is from inverting the forward map, ``|W(W^-1(y)) - y|`` (voxels), on the
  fixed grid in the fixed brain and at folds, and at the points the moving brain's voxels need (``y = T^-1 m``);
* ``coverage``: the moving brain voxels whose ``y`` lies outside the fixed grid, or that no fixed voxel maps to (their
  residual stays above half a voxel), and the inverse Dice scored only where neither happens;
* ``pointwise``: the inverse solved at each moving voxel's own ``y`` by the same Newton steps instead of interpolating
  the inverse field stored on the fixed grid (the loss to the field's resolution);
* ``labels``: nearest-neighbour against one-hot trilinear resampling then argmax (ANTs' GenericLabel does the like);
* ``bound``: the forward Dice with each fixed voxel weighted by the moving volume it stands for, ``det(I + grad u)``
  (``det T`` cancels): what an exact inverse of this forward map scores, so ``forward - bound`` is lost by the forward
  map itself, not by its inversion.

    PYTHONPATH=bundle:. python -m bench.accuracy.inverse_gap --out results.json OUT_DIR:FIXED_SEG:MOVING_SEG [...]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from bench.accuracy.io import write_json_atomic
from bench.accuracy.scoring import SEG14_CLASSES, det_from_ddf, dice_per_class, labels_present_in_both
from scripts.layers.sampling import sample_at_voxels
from scripts.spatial import SavedTransforms, load_transforms, resample_with_transforms, voxel_point_map
from scripts.spatial.inversion import _improve, _jacobian

#: a moving point whose inverse leaves a residual above this (voxels) is taken as outside the forward map's range
UNREACHED_RESIDUAL = 0.5


def _mean_dice(reference: np.ndarray, labels: np.ndarray, classes, weights: np.ndarray | None = None) -> float:
    if weights is None:
        return float(np.nanmean(list(dice_per_class(reference, labels, classes).values())))
    scores = []
    for k in classes:
        a, b = reference == k, labels == k
        scores.append(2 * weights[a & b].sum() / max(weights[a].sum() + weights[b].sum(), 1e-12))
    return float(np.mean(scores))


def _grid(image: nib.Nifti1Image) -> tuple[tuple[int, ...], np.ndarray]:
    return tuple(int(s) for s in image.shape[:3]), np.asarray(image.affine, dtype=np.float64)


def _points(transforms: SavedTransforms, fixed_grid, moving_grid) -> torch.Tensor:
    """(3, N) fixed-grid voxel points of every moving voxel, through the affine stage alone (``y = T^-1 m``)."""
    no_field = transforms._replace(field=None)
    shape = moving_grid[0]
    return voxel_point_map(no_field, fixed_grid, moving_grid, inverse=True)(0, shape[2]).reshape(3, -1).float()


def _sample(field: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    return sample_at_voxels(field, points.view(1, 3, -1, 1, 1), "bilinear", "border").view(field.shape[1], -1)


def _pointwise_inverse(ddf: torch.Tensor, points: torch.Tensor, start: torch.Tensor, iterations: int = 30):
    """Newton steps of ``scripts.spatial.inversion`` at arbitrary points, from ``start`` -> (inverse, residual)."""
    jacobian = _jacobian(ddf)
    inverse = start.clone()
    residual = inverse + _sample(ddf, points + inverse)
    active = (residual.norm(dim=0) > 1e-3).nonzero().squeeze(1)
    for _ in range(iterations):
        if active.numel() == 0:
            break
        new, new_residual, improved = _improve(
            ddf, jacobian, points[:, active], inverse[:, active], residual[:, active]
        )
        inverse[:, active], residual[:, active] = new, new_residual
        active = active[improved & (new_residual.norm(dim=0) > 1e-3)]
    return inverse, residual


def _labels_onto_moving(fixed_label, coords: torch.Tensor, moving_shape, mode: str) -> np.ndarray:
    """Fixed labels at the (3, N) fixed-grid points: "nearest", or "onehot" (trilinear per class, argmax)."""
    volume = torch.as_tensor(fixed_label.astype(np.float32))[None, None]
    if mode == "nearest":
        out = sample_at_voxels(volume, coords.view(1, 3, -1, 1, 1), "nearest", "zeros")
        return out.view(moving_shape).numpy().astype(np.int64)
    classes = np.unique(fixed_label)
    best = torch.full((coords.shape[1],), -1.0)
    arg = torch.zeros(coords.shape[1], dtype=torch.int64)
    for k in classes:  # background included: a voxel is 0 where the background weighs most
        weight = _sample(torch.as_tensor((fixed_label == k).astype(np.float32))[None, None], coords)[0]
        # zero padding outside the grid: there the background (weight 1 implied) wins
        weight = weight if k != 0 else weight + (1 - _inside_weight(coords, fixed_label.shape))
        take = weight > best
        best[take], arg[take] = weight[take], int(k)
    return arg.view(moving_shape).numpy()


def _inside_weight(coords: torch.Tensor, shape) -> torch.Tensor:
    ones = torch.ones(1, 1, *shape)
    return sample_at_voxels(ones, coords.view(1, 3, -1, 1, 1), "bilinear", "zeros").view(-1)


def diagnose(out_dir: Path, fixed_seg: Path, moving_seg: Path, causes: bool = True) -> dict:
    """The figures above for one ``register --inverse`` output folder; ``causes=False``: forward, bound and inverse
    Dice only."""
    fixed_img, moving_img = nib.load(str(fixed_seg)), nib.load(str(moving_seg))
    fixed_label = np.asarray(fixed_img.dataobj).astype(np.int64)
    moving_label = np.asarray(moving_img.dataobj).astype(np.int64)
    fixed_grid, moving_grid = _grid(fixed_img), _grid(moving_img)
    warped = np.asarray(nib.load(str(out_dir / "warped_label.nii.gz")).dataobj).astype(np.int64)
    classes = labels_present_in_both(fixed_label, moving_label, SEG14_CLASSES)
    forward_tx = load_transforms(out_dir)
    inverse_tx = load_transforms(out_dir, inverse=True)
    u = torch.as_tensor(forward_tx.field)[None]
    v = torch.as_tensor(inverse_tx.field)[None]
    report: dict = {"pair": out_dir.name, "classes": classes}

    # forward, and the bound an exact inverse of it reaches
    det = det_from_ddf(forward_tx.field)
    report["forward"] = _mean_dice(fixed_label, warped, classes)
    report["bound"] = _mean_dice(fixed_label, warped, classes, weights=np.clip(det, 0, None))
    report["forward_folds_pct"] = float((det[fixed_label > 0] <= 0).mean() * 100)

    # the stored inverse through the bundle's own apply (= ANTs on these files), nearest neighbour
    as_stored = resample_with_transforms(
        torch.as_tensor(fixed_label)[None, None], inverse_tx, fixed_grid, moving_grid, "nearest", 0, inverse=True
    )[0, 0].numpy()
    report["inverse"] = _mean_dice(moving_label, as_stored, classes)
    if not causes:
        return report

    # (a) residual on the fixed grid
    grid_points = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in fixed_grid[0]],
                                             indexing="ij")).reshape(3, -1)
    grid_residual = (v[0].reshape(3, -1) + _sample(u, grid_points + v[0].reshape(3, -1))).norm(dim=0).numpy()
    brain = (fixed_label > 0).reshape(-1)
    folds = (det <= 0).reshape(-1)
    report["residual_fixed_grid"] = {
        "brain_mean": float(grid_residual[brain].mean()), "brain_p99": float(np.percentile(grid_residual[brain], 99)),
        "folds_mean": float(grid_residual[folds].mean()) if folds.any() else None,
        "fold_voxels": int(folds.sum()),
    }

    # (a) at the moving brain's points: interpolated inverse field vs pointwise Newton
    y = _points(inverse_tx, fixed_grid, moving_grid)
    v_at_y = _sample(v, y)
    stored_residual = (v_at_y + _sample(u, y + v_at_y)).norm(dim=0).numpy()
    pointwise, point_residual = _pointwise_inverse(u, y, v_at_y)
    point_residual = point_residual.norm(dim=0).numpy()
    moving_brain = (moving_label > 0).reshape(-1)
    upper = np.array(fixed_grid[0]) - 1
    y_np = y.numpy()
    outside_grid = ((y_np < 0) | (y_np > upper[:, None])).any(axis=0)
    unreached = point_residual > UNREACHED_RESIDUAL
    report["residual_moving_points"] = {
        "stored_mean": float(stored_residual[moving_brain].mean()),
        "stored_p99": float(np.percentile(stored_residual[moving_brain], 99)),
        "pointwise_mean": float(point_residual[moving_brain].mean()),
    }

    # (b) coverage: moving brain voxels the inverse cannot reach
    report["coverage"] = {
        "moving_brain_voxels": int(moving_brain.sum()),
        "outside_fixed_grid_pct": float(outside_grid[moving_brain].mean() * 100),
        "unreached_pct": float(unreached[moving_brain].mean() * 100),
        "mapped_to_fixed_background_pct": float((as_stored.reshape(-1)[moving_brain] == 0).mean() * 100),
    }
    reachable = (~outside_grid & ~unreached).reshape(moving_grid[0])
    report["inverse_reachable_only"] = _mean_dice(
        np.where(reachable, moving_label, 0), np.where(reachable, as_stored, 0), classes
    )

    # pointwise inverse (no interpolation of the inverse field) and label interpolation
    target = y + pointwise
    report["inverse_pointwise"] = _mean_dice(
        moving_label, _labels_onto_moving(fixed_label, target, moving_grid[0], "nearest"), classes
    )
    report["inverse_onehot"] = _mean_dice(
        moving_label, _labels_onto_moving(fixed_label, y + v_at_y, moving_grid[0], "onehot"), classes
    )
    report["inverse_pointwise_onehot"] = _mean_dice(
        moving_label, _labels_onto_moving(fixed_label, target, moving_grid[0], "onehot"), classes
    )
    return report


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("cases", nargs="+", help="OUT_DIR:FIXED_SEG:MOVING_SEG (a register --inverse output folder)")
    parser.add_argument("--out", required=True, help="results JSON (written atomically)")
    parser.add_argument("--dice_only", action="store_true", help="forward, bound and inverse Dice, not the causes")
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    results = []
    for case in args.cases:
        out_dir, fixed_seg, moving_seg = case.split(":")
        results.append(diagnose(Path(out_dir), Path(fixed_seg), Path(moving_seg), not args.dice_only))
        print(json.dumps(results[-1], indent=1), flush=True)
    write_json_atomic(results, args.out)


if __name__ == "__main__":
    main()
