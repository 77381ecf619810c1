# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""One registration of the native-pair benchmark, run as its own process (so its time and memory can be measured).

``python -m bench.accuracy.ants_native --mode MODE --fixed F --moving M --moving_label ML --out OUT [...]``

Modes, each writing into ``OUT`` on the fixed image's grid and with its affine:

* ``identity``: no registration; the moving labels resampled onto the fixed grid through the world coordinates of
  the two NIfTI headers, nearest neighbour (``warped_label.nii.gz``);
* ``Affine``: antspyx ``registration(type_of_transform="Affine")`` (centre-of-mass initialisation, Mattes MI);
  writes ``warped_image.nii.gz`` (linear), ``warped_label.nii.gz`` (``genericLabel``) and ``affine.mat``: these are
  the pre-aligned inputs of the deformable-only runs (``--prealigned_dir`` copies them there);
* ``SyN`` (ANTs' affine stage, then SyN) and ``SyNOnly`` (SyN alone, for pre-aligned inputs), ``--reg_iterations``
  coarse to fine: ``warped_image.nii.gz``, ``warped_label.nii.gz`` and ``jacobian_det.nii.gz``, ANTs' own det J of
  the deformable (SyN) warp. For ``SyN`` the full map is warp then affine; the affine's constant det only shifts
  log det J, so folding and SDlogJ of the warp are those of the whole map.

ANTs' random sampling is seeded with ``--random_seed`` (antspyx passes ``ants.config._random_seed`` on as
``--random-seed``; its public ``set_ants_deterministic`` would also force one ITK thread, which ``--threads`` of the
runner sets instead). ``method.json`` records settings, versions and the registration time.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from bench.accuracy.io import resample_to_grid, save_like, write_json_atomic

__all__ = ["MODES", "main", "run_ants", "run_identity"]

MODES = ("identity", "Affine", "SyN", "SyNOnly")


def run_identity(fixed_path: str, moving_label_path: str, out_dir: Path) -> dict:
    """Moving labels on the fixed grid through world coordinates (nearest neighbour); returns method info."""
    fixed, moving = nib.load(fixed_path), nib.load(moving_label_path)
    labels = np.rint(np.asanyarray(moving.dataobj)).astype(np.int16)
    warped = resample_to_grid(labels, moving.affine, fixed.shape[:3], fixed.affine, order=0)
    save_like(warped, fixed, out_dir / "warped_label.nii.gz")
    return {"interpolation": "nearest neighbour through world coordinates (scipy map_coordinates, order 0)"}


def _ants_kwargs(mode: str, reg_iterations: tuple[int, ...] | None) -> dict:
    kwargs = {"type_of_transform": mode, "verbose": False}
    if mode in ("SyN", "SyNOnly"):
        if not reg_iterations:
            raise ValueError(f"{mode} needs --reg_iterations, e.g. 60,30,10.")
        kwargs["reg_iterations"] = tuple(reg_iterations)
    return kwargs


def run_ants(
    mode: str,
    fixed_path: str,
    moving_path: str,
    moving_label_path: str | None,
    out_dir: Path,
    reg_iterations: tuple[int, ...] | None = None,
    random_seed: int = 1,
    keep_warps: bool = False,
    fixed_mask_path: str | None = None,
    moving_mask_path: str | None = None,
) -> dict:
    """Run one antspyx registration and write the outputs of the module docstring; returns method info."""
    import ants

    ants.config._random_seed = int(random_seed)
    reference = nib.load(fixed_path)
    fixed = ants.image_read(fixed_path, pixeltype="float")
    moving = ants.image_read(moving_path, pixeltype="float")
    if tuple(fixed.shape) != tuple(reference.shape[:3]):
        raise ValueError(f"ANTs and nibabel disagree on the fixed grid: {fixed.shape} vs {reference.shape}.")
    kwargs = _ants_kwargs(mode, reg_iterations)
    if fixed_mask_path:  # the metric is evaluated inside the masks only (antsRegistration -x [fixed, moving])
        kwargs["mask"] = ants.image_read(fixed_mask_path, pixeltype="float")
    if moving_mask_path:
        kwargs["moving_mask"] = ants.image_read(moving_mask_path, pixeltype="float")
    start = time.perf_counter()
    reg = ants.registration(fixed, moving, outprefix=str(out_dir / "ants_"), **kwargs)
    registration_s = time.perf_counter() - start
    transforms = list(reg["fwdtransforms"])
    save_like(reg["warpedmovout"].numpy().astype(np.float32), reference, out_dir / "warped_image.nii.gz")
    if moving_label_path:
        label = ants.image_read(moving_label_path, pixeltype="float")
        warped = ants.apply_transforms(fixed, label, transforms, interpolator="genericLabel")
        save_like(np.rint(warped.numpy()).astype(np.int16), reference, out_dir / "warped_label.nii.gz")
    info = {"fwdtransforms": [Path(t).name for t in transforms],
            "ants_kwargs": {k: (v if k not in ("mask", "moving_mask") else "given") for k, v in kwargs.items()}}
    warps = [t for t in transforms if t.endswith((".nii.gz", ".nii"))]
    if mode in ("SyN", "SyNOnly"):
        if len(warps) != 1:
            raise ValueError(f"expected one forward warp field from ANTs {mode}, got {transforms}.")
        det = ants.create_jacobian_determinant_image(fixed, warps[0], do_log=False)
        save_like(det.numpy().astype(np.float32), reference, out_dir / "jacobian_det.nii.gz")
    matrices = [t for t in transforms if t.endswith(".mat")]
    if matrices:
        shutil.copyfile(matrices[0], out_dir / "affine.mat")
    if not keep_warps:
        for path in set(warps) | {t for t in reg["invtransforms"] if t.endswith((".nii.gz", ".nii"))}:
            if Path(path).exists():
                os.remove(path)
        info["warps_deleted"] = True
    info.update(ants_version=ants.__version__, random_seed=int(random_seed), registration_s=registration_s)
    return info


def _copy_prealigned(out_dir: Path, prealigned_dir: Path) -> dict:
    prealigned_dir.mkdir(parents=True, exist_ok=True)
    copies = {"warped_image.nii.gz": "moving_t1_affine.nii.gz", "warped_label.nii.gz": "moving_seg14_affine.nii.gz"}
    for source, target in copies.items():
        if (out_dir / source).exists():
            tmp = prealigned_dir / f".{target}.tmp"
            shutil.copyfile(out_dir / source, tmp)
            os.replace(tmp, prealigned_dir / target)
    shutil.copyfile(out_dir / "affine.mat", prealigned_dir / "affine.mat")
    return {"prealigned_dir": str(prealigned_dir)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", required=True, choices=MODES)
    parser.add_argument("--fixed", required=True)
    parser.add_argument("--moving", required=True)
    parser.add_argument("--moving_label", default=None)
    parser.add_argument("--out", required=True)
    parser.add_argument("--reg_iterations", default=None, help="SyN iterations per level, coarse to fine: 60,30,10")
    parser.add_argument("--random_seed", type=int, default=1)
    parser.add_argument("--prealigned_dir", default=None, help="Affine only: also copy the aligned moving scan here")
    parser.add_argument("--keep_warps", action="store_true", help="keep ANTs' displacement fields (large)")
    parser.add_argument("--fixed_mask", default=None, help="restrict the metric to this fixed-image mask (-x)")
    parser.add_argument("--moving_mask", default=None, help="and to this moving-image mask")
    args = parser.parse_args(argv)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    if args.mode == "identity":
        if not args.moving_label:
            raise ValueError("identity needs --moving_label (it only moves labels).")
        info = run_identity(args.fixed, args.moving_label, out_dir)
    else:
        iterations = tuple(int(v) for v in args.reg_iterations.split(",")) if args.reg_iterations else None
        info = run_ants(
            args.mode,
            args.fixed,
            args.moving,
            args.moving_label,
            out_dir,
            iterations,
            args.random_seed,
            args.keep_warps,
            args.fixed_mask,
            args.moving_mask,
        )
        if args.prealigned_dir:
            if args.mode != "Affine":
                raise ValueError(f"--prealigned_dir is for --mode Affine, got {args.mode}.")
            info.update(_copy_prealigned(out_dir, Path(args.prealigned_dir)))
    info.update(mode=args.mode, itk_threads=os.environ.get("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"))
    info["worker_s"] = time.perf_counter() - start
    write_json_atomic(info, out_dir / "method.json")
    return info


if __name__ == "__main__":
    main()
