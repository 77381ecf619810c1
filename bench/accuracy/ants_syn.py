"""ANTs SyN baseline, run as its own process so the benchmark can measure its wall time and peak memory.

``python -m bench.accuracy.ants_syn --fixed F --moving M [--moving_label L] --out OUT``

Uses antspyx ``type_of_transform="SyNOnly"``: ANTs' SyN stage with its rigid/affine stages switched off and an identity
initial transform, because every benchmark pair is already affinely aligned (an extra affine stage would only let
ANTs absorb misalignment that the bundle is not asked to handle). Writes, on the fixed image's grid and with its
affine: ``warped_image.nii.gz``, ``warped_label.nii.gz`` (genericLabel interpolation), ``jacobian_det.nii.gz``
(``ants.create_jacobian_determinant_image`` of the forward warp), ``ddf.nii.gz`` (the forward warp converted to voxels,
channel-last, bundle convention warped(p) = moving(p + ddf(p))) and ``method.json`` (timing, versions, settings).
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from bench.accuracy.io import save_like, write_json_atomic

__all__ = ["ddf_from_physical_field", "main", "register_syn"]


def ddf_from_physical_field(field: np.ndarray, direction: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """Convert a displacement field given in world units (ITK/ANTs, mm) to voxel units along the array axes.

    A world displacement v corresponds to the index displacement (D·diag(s))⁻¹ v, where D is the grid's direction
    matrix and s its spacing, both in the same world frame as v.

    Args:
        field: (D, H, W, 3) world displacement per voxel (ANTs' ``numpy()`` layout of a vector image).
        direction: 3×3 direction matrix of the grid.
        spacing: voxel sizes (3,).

    Returns:
        (3, D, H, W) displacement in voxels, channel i along array axis i.
    """
    if field.ndim != 4 or field.shape[-1] != 3:
        raise ValueError(f"field must have shape (D, H, W, 3), got {field.shape}.")
    to_index = np.linalg.inv(np.asarray(direction, dtype=np.float64) @ np.diag(np.asarray(spacing, dtype=np.float64)))
    ddf = np.einsum("ij,dhwj->idhw", to_index, field.astype(np.float64))
    return ddf.astype(np.float32)


def register_syn(
    fixed_path: str,
    moving_path: str,
    moving_label_path: str | None,
    out_dir: str | Path,
    type_of_transform: str = "SyNOnly",
    reg_iterations: tuple[int, ...] = (40, 20, 0),
) -> dict:
    """Register ``moving`` to ``fixed`` with ANTs SyN and write the outputs listed in the module docstring.

    Args:
        fixed_path: fixed image (NIfTI).
        moving_path: moving image on a grid already aligned with the fixed one.
        moving_label_path: optional moving label map, warped with nearest-label interpolation.
        out_dir: output folder.
        type_of_transform: antspyx transform name; ``SyNOnly`` = SyN without ANTs' affine stages.
        reg_iterations: SyN iterations per level, coarse to fine (antspyx default (40, 20, 0)).

    Returns:
        dict of settings and timings (also written to ``method.json``).
    """
    import ants  # optional dependency (requirements-bench.txt)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    reference = nib.load(fixed_path)
    fixed = ants.image_read(str(fixed_path), pixeltype="float")
    moving = ants.image_read(str(moving_path), pixeltype="float")
    if fixed.shape != reference.shape[:3]:
        raise ValueError(f"ANTs and nibabel disagree on the fixed grid: {fixed.shape} vs {reference.shape}.")

    start = time.perf_counter()
    reg = ants.registration(
        fixed, moving, type_of_transform=type_of_transform, reg_iterations=tuple(reg_iterations), verbose=False
    )
    registration_s = time.perf_counter() - start

    warp_files = [t for t in reg["fwdtransforms"] if t.endswith((".nii.gz", ".nii"))]
    if len(warp_files) != 1:
        raise ValueError(f"expected one forward warp field from ANTs, got {reg['fwdtransforms']}.")
    save_like(reg["warpedmovout"].numpy().astype(np.float32), reference, out_dir / "warped_image.nii.gz")
    if moving_label_path:
        moving_label = ants.image_read(str(moving_label_path), pixeltype="float")
        warped_label = ants.apply_transforms(fixed, moving_label, reg["fwdtransforms"], interpolator="genericLabel")
        save_like(np.rint(warped_label.numpy()).astype(np.int16), reference, out_dir / "warped_label.nii.gz")
    det = ants.create_jacobian_determinant_image(fixed, warp_files[0], do_log=False)
    save_like(det.numpy().astype(np.float32), reference, out_dir / "jacobian_det.nii.gz")
    field = ants.image_read(warp_files[0])
    ddf = ddf_from_physical_field(field.numpy(), field.direction, field.spacing)
    save_like(np.moveaxis(ddf, 0, -1), reference, out_dir / "ddf.nii.gz")
    total_s = time.perf_counter() - start

    info = {
        "method": "ants_syn",
        "ants_version": ants.__version__,
        "type_of_transform": type_of_transform,
        "reg_iterations": list(reg_iterations),
        "fwdtransforms": [Path(t).name for t in reg["fwdtransforms"]],
        "itk_threads": os.environ.get("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"),
        "registration_s": registration_s,
        "registration_and_outputs_s": total_s,
    }
    write_json_atomic(info, out_dir / "method.json")
    return info


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fixed", required=True)
    parser.add_argument("--moving", required=True)
    parser.add_argument("--moving_label", default=None)
    parser.add_argument("--out", required=True)
    parser.add_argument("--type_of_transform", default="SyNOnly")
    parser.add_argument("--reg_iterations", default="40,20,0", help="comma-separated, coarse to fine")
    args = parser.parse_args(argv)
    iterations = tuple(int(v) for v in args.reg_iterations.split(","))
    register_syn(args.fixed, args.moving, args.moving_label, args.out, args.type_of_transform, iterations)


if __name__ == "__main__":
    main()
