# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""Command line for SACB-Net registration: runs the bundle's own configs through ``monai.bundle.ConfigWorkflow``.

From the bundle root::

    python -m scripts.cli demo
    python -m scripts.cli register --fixed F.nii.gz --moving M.nii.gz --out OUT [--moving_label L] [--fixed_label FL]
    python -m scripts.cli register --help
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file (python bundle/scripts/cli.py): make ``scripts`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fire  # noqa: E402

__all__ = ["register", "demo", "BUNDLE_ROOT", "workflow_overrides"]

BUNDLE_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = BUNDLE_ROOT / "configs"
SAMPLE_DIR = BUNDLE_ROOT / "sample_data"
OUTPUT_FILES = ("warped_image.nii.gz", "ddf.nii.gz", "warped_label.nii.gz", "jacobian_det.nii.gz", "metrics.json")


def _absolute(path: str | os.PathLike | None) -> str | None:
    return None if path in (None, "") else str(Path(os.path.expanduser(str(path))).resolve())


def workflow_overrides(
    fixed: str,
    moving: str,
    out: str,
    moving_label: str | None = None,
    fixed_label: str | None = None,
    iterations: int | None = None,
    overwrite: bool = False,
    network_scale: float | None = None,
    learning_rate: float | None = None,
    regularization_weight: float | None = None,
    device: str | None = None,
) -> tuple[list[str], dict[str, Any]]:
    """
    The config files and run overrides that :py:func:`register` hands to ``ConfigWorkflow`` (also what the equivalent
    ``python -m monai.bundle run`` command would pass).

    Returns:
        (config file list, {config id: value}).
    """
    if iterations is not None and int(iterations) < 0:
        from scripts.io.errors import (
            RegistrationInputError,  # a ValueError the CLI shows without traceback
        )

        raise RegistrationInputError(f"--iterations must be >= 0, got {iterations}.")
    files = [str(CONFIG_DIR / "inference.json")]
    if iterations is None or int(iterations) > 0:
        files.append(str(CONFIG_DIR / "instance_optimization.json"))
    overrides: dict[str, Any] = {
        "bundle_root": str(BUNDLE_ROOT),
        "fixed_image": _absolute(fixed),
        "moving_image": _absolute(moving),
        "moving_label": _absolute(moving_label),
        "fixed_label": _absolute(fixed_label),
        "output_dir": _absolute(out),
        "overwrite": bool(overwrite),
    }
    if iterations is not None and int(iterations) > 0:
        overrides["optimization_iterations"] = int(iterations)
    if network_scale is not None:
        overrides["network_scale"] = float(network_scale)
    if learning_rate is not None:
        overrides["optimization_learning_rate"] = float(learning_rate)
    if regularization_weight is not None:
        overrides["regularization_weight"] = float(regularization_weight)
    if device is not None:
        overrides["device"] = f"$torch.device('{device}')"
    return files, overrides


def _run_workflow(files: list[str], overrides: dict[str, Any]) -> None:
    from monai.bundle import ConfigWorkflow

    # the configs' "%configs/..." macros are relative to the working directory: run from the bundle root (user paths
    # are absolute by now, see workflow_overrides)
    with contextlib.chdir(BUNDLE_ROOT):
        workflow = ConfigWorkflow(
            config_file=files,
            meta_file=str(CONFIG_DIR / "metadata.json"),
            logging_file=str(CONFIG_DIR / "logging.conf"),
            workflow_type="infer",
            **overrides,
        )
        workflow.initialize()
        workflow.run()
        workflow.finalize()


def _summary(out: str, seconds: float) -> str:
    """Human-readable report of one registration: Dice before/after per label (when labels were given) and outputs."""
    folder = Path(out)
    lines = [f"Registration finished in {seconds:.0f} s. Outputs in {folder}:"]
    lines += [f"  {name}" for name in OUTPUT_FILES if (folder / name).exists()]
    metrics_file = folder / "metrics.json"
    if metrics_file.exists():
        metrics = json.loads(metrics_file.read_text())
        lines.append(f"{'label':<20}{'Dice before':>12}{'Dice after':>12}")
        for row in metrics["labels"]:
            before, after = row.get("dice_identity"), row.get("dice")
            fmt = lambda v: f"{v:12.4f}" if v is not None else f"{'n/a':>12}"  # noqa: E731
            lines.append(f"{str(row['label']) + ' ' + row['name']:<20}{fmt(before)}{fmt(after)}")
        lines.append(
            f"{'mean':<20}{metrics.get('mean_dice_identity', float('nan')):12.4f}{metrics['mean_dice']:12.4f}"
        )
        if "percent_non_positive_jacobian" in metrics:
            lines.append(f"voxels with det J <= 0: {metrics['percent_non_positive_jacobian']:.4f} %")
    return "\n".join(lines)


def register(
    fixed: str,
    moving: str,
    out: str,
    moving_label: str | None = None,
    fixed_label: str | None = None,
    iterations: int | None = None,
    overwrite: bool = False,
    network_scale: float | None = None,
    learning_rate: float | None = None,
    regularization_weight: float | None = None,
    device: str | None = None,
    debug: bool = False,
    qc_png: str | None = None,
) -> None:
    """
    Register a moving image onto a fixed image with SACB-Net (both 3-D NIfTI, affinely pre-aligned).

    Runs the bundle's configs/inference.json, merged with configs/instance_optimization.json unless --iterations 0,
    through monai.bundle's ConfigWorkflow. Writes into OUT, on the fixed image's grid and affine: warped_image.nii.gz,
    ddf.nii.gz (displacement in voxels, channel i = shift along array axis i of the fixed image, warped(p) =
    moving(p + ddf(p))), jacobian_det.nii.gz, warped_label.nii.gz (with --moving_label) and metrics.json (with both
    labels: Dice per label before and after, % of voxels with det J <= 0).

    Args:
        fixed: fixed (target) image, NIfTI.
        moving: moving (source) image, NIfTI; resampled onto the fixed grid first if the grids differ.
        out: output folder (created if missing).
        moving_label: optional label map of the moving image; warped with nearest-neighbour sampling.
        fixed_label: optional label map of the fixed image; with moving_label, Dice is reported.
        iterations: instance-optimisation steps that fine-tune the network on this pair (default: configs; 0: no tuning).
        overwrite: replace existing outputs in OUT (otherwise the run refuses to start).
        network_scale: network resolution relative to the image, e.g. 0.5 (default from the configs).
        learning_rate: Adam learning rate of the instance optimisation (default from the config).
        regularization_weight: lambda of the smoothness term of the instance optimisation (default from the config).
        device: "cpu" or "cuda" (default: CUDA when available).
        debug: show full Python tracebacks for input errors.
        qc_png: also write a QC figure (PNG: middle slice of fixed, moving, warped, differences, grid, det J) here.
    """
    from scripts.io.errors import exit_on_user_error

    files, overrides = exit_on_user_error(
        workflow_overrides, fixed, moving, out, moving_label, fixed_label, iterations, overwrite, network_scale,
        learning_rate, regularization_weight, device, debug=debug,
    )
    start = time.time()
    exit_on_user_error(_run_workflow, files, overrides, debug=debug)
    print(_summary(overrides["output_dir"], time.time() - start), flush=True)
    if qc_png:
        from scripts.workflow.qc import qc_png_from_outputs

        print(f"QC figure: {qc_png_from_outputs(fixed, moving, overrides['output_dir'], _absolute(qc_png))}", flush=True)


def demo(out: str | None = None, iterations: int | None = None, overwrite: bool = True, debug: bool = False) -> None:
    """
    Register the shipped real brain pair (Colin27 T1 -> MNI152 T1, sample_data/) and print Dice before/after.

    Same as: register --moving sample_data/moving_colin27_t1.nii.gz --fixed sample_data/fixed_mni152_t1.nii.gz
    --moving_label sample_data/moving_colin27_seg8.nii.gz --fixed_label sample_data/fixed_mni152_seg8.nii.gz --out OUT.

    Args:
        out: output folder (default: <bundle>/eval/demo).
        iterations: instance-optimisation steps (default from configs/instance_optimization.json; 0: no tuning).
        overwrite: replace the outputs of an earlier demo run (default True).
        debug: show full Python tracebacks for input errors.
    """
    register(
        fixed=str(SAMPLE_DIR / "fixed_mni152_t1.nii.gz"),
        moving=str(SAMPLE_DIR / "moving_colin27_t1.nii.gz"),
        out=out or str(BUNDLE_ROOT / "eval" / "demo"),
        moving_label=str(SAMPLE_DIR / "moving_colin27_seg8.nii.gz"),
        fixed_label=str(SAMPLE_DIR / "fixed_mni152_seg8.nii.gz"),
        iterations=iterations,
        overwrite=overwrite,
        debug=debug,
    )


def main() -> None:
    """Entry point: ``register`` and ``demo`` commands (fire)."""
    logging.captureWarnings(True)  # MONAI deprecation warnings go to the log, not the terminal
    fire.Fire({"register": register, "demo": demo})


if __name__ == "__main__":
    main()
