# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""Command line for SACB-Net registration: runs the bundle's own configs through ``monai.bundle.ConfigWorkflow``.

From the bundle root::

    python -m scripts.cli demo
    python -m scripts.cli register --fixed F.nii.gz --moving M.nii.gz --out OUT [--moving_label L] [--fixed_label FL]
        [--affine affine|rigid|none] [--affine_only] [--inverse] [--weights W.pt] [--intensity_window=-1000,1000]
    python -m scripts.cli apply --fixed F.nii.gz --moving X.nii.gz --transform_dir OUT --warped_out Y.nii.gz
        [--interpolation linear|nearest] [--inverse]
    python -m scripts.cli register --help
"""

from __future__ import annotations

import contextlib
import inspect
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

if __package__ in (None, ""):  # run as a file (python bundle/scripts/cli.py): make ``scripts`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fire  # noqa: E402

__all__ = ["register", "apply", "demo", "BUNDLE_ROOT", "workflow_overrides"]

BUNDLE_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = BUNDLE_ROOT / "configs"
SAMPLE_DIR = BUNDLE_ROOT / "sample_data"
AFFINE_CHOICES = ("affine", "rigid", "none")


def _absolute(path: str | os.PathLike | None) -> str | None:
    return None if path in (None, "") else str(Path(os.path.expanduser(str(path))).resolve())


def _switch(value: Any, flag: str) -> bool:
    """An on/off flag as typed (fire passes ``--qc false`` as the string "false"): a bool, 0/1, or true/false, yes/no,
    on/off in any case; any other value: RegistrationInputError."""
    if isinstance(value, bool) or value in (0, 1):
        return bool(value)
    words = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}
    if isinstance(value, str) and value.strip().lower() in words:
        return words[value.strip().lower()]
    from scripts.io.errors import RegistrationInputError

    raise RegistrationInputError(f"{flag} must be true or false, got {value!r}.")


def workflow_overrides(fixed: str, moving: str, out: str, **flags: Any) -> tuple[list[str], dict[str, Any]]:
    """
    The config files and run overrides that :py:func:`register` hands to ``ConfigWorkflow`` (also what the equivalent
    ``python -m monai.bundle run`` command would pass).

    ``flags`` are :py:func:`register`'s, by name; one not given has register's default, except ``iterations`` (not
    given: the config's ``instance_optimization_iterations``). They are checked here, before anything runs: a bad
    value, a device this machine lacks, a missing weights file or an unreadable names file raise RegistrationInputError
    (a ValueError the CLI shows without traceback) and nothing is written.

    Returns:
        (config file list, {config id: value}).
    """
    from scripts.io.errors import RegistrationInputError

    defaults = {name: p.default for name, p in inspect.signature(register).parameters.items()}
    unknown = set(flags) - set(defaults)
    if unknown:
        raise TypeError(f"workflow_overrides() got {sorted(unknown)}; expected register's flags by name.")
    f = SimpleNamespace(**{**defaults, "iterations": None, **flags})
    for flag, value in (("--iterations", f.iterations), ("--refine_iterations", f.refine_iterations)):
        if value is not None and int(value) < 0:
            raise RegistrationInputError(f"{flag} must be >= 0, got {value}.")
    if f.affine not in AFFINE_CHOICES or (f.affine_only and f.affine == "none"):
        raise RegistrationInputError(
            f"--affine must be one of {', '.join(AFFINE_CHOICES)} ('none' only without --affine_only), got {f.affine!r}."
        )
    files = [str(CONFIG_DIR / "inference.json")]  # the whole pipeline; its stages are switched by the overrides below
    overrides: dict[str, Any] = {
        "bundle_root": str(BUNDLE_ROOT),
        "fixed_image": _absolute(fixed),
        "moving_image": _absolute(moving),
        "moving_label": _absolute(f.moving_label),
        "fixed_label": _absolute(f.fixed_label),
        "moving_mask": _absolute(f.moving_mask),
        "fixed_mask": _absolute(f.fixed_mask),
        "output_dir": _absolute(out),
        "overwrite": bool(f.overwrite),
        "write_inverse": bool(f.inverse),
        "qc": _switch(f.qc, "--qc"),
    }
    from scripts.io.datalist import cli_datalist_overrides  # --datalist: every pair, resumably (usage.md, "Cohorts")

    optional_files = (f.moving_label, f.fixed_label, f.moving_mask, f.fixed_mask)
    overrides.update(cli_datalist_overrides(f.datalist, fixed, moving, out, optional_files))
    overrides["affine_transform"] = f.affine
    overrides["affine_only"] = bool(f.affine_only)
    if f.iterations is not None:
        overrides["instance_optimization_iterations"] = int(f.iterations)
    if f.refine_iterations is not None:
        overrides["refine_iterations"] = int(f.refine_iterations)
    if f.weights:
        path = _absolute(f.weights)
        if not os.path.isfile(path):  # the configs would otherwise skip loading
            raise RegistrationInputError(f"--weights {f.weights}: no such file; expected a state dict written by training.")
        overrides["ckpt_path"] = path
    if f.amp is not None:  # default: the configs' "amp" (off; measured on a GPU in docs/benchmarks.md)
        overrides["amp"] = bool(f.amp)
    from scripts.workflow.intensity import intensity_overrides  # checked now: a bad window stops before any work

    overrides.update(intensity_overrides(f.intensity_window, f.background))
    for flag, config_id in (("network_scale", "network_scale"), ("learning_rate", "optimization_learning_rate"),
                            ("regularization_weight", "regularization_weight")):
        if getattr(f, flag) is not None:
            overrides[config_id] = float(getattr(f, flag))
    if f.device is not None:
        from scripts.io.devices import resolve_device

        # checked against this machine now; only a validated name ('cpu', 'cuda', 'cuda:N') reaches the expression
        overrides["device"] = f"$scripts.io.resolve_device('{resolve_device(f.device)}')"
    if f.label_names:
        from scripts.io.label_names import read_label_names

        # read now: a bad file fails before the registration, and the config gets the {id: name} mapping itself
        overrides["label_names"] = read_label_names(_absolute(f.label_names))
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


def register(
    fixed: str | None = None,
    moving: str | None = None,
    out: str | None = None,
    moving_label: str | None = None,
    fixed_label: str | None = None,
    iterations: int | None = 0,
    overwrite: bool = False,
    network_scale: float | None = None,
    learning_rate: float | None = None,
    regularization_weight: float | None = None,
    device: str | None = None,
    debug: bool = False,
    qc_png: str | None = None,
    affine: str = "affine",
    affine_only: bool = False,
    inverse: bool = False,
    label_names: str | None = None,
    datalist: str | None = None,
    refine_iterations: int | None = None,
    weights: str | None = None,
    amp: bool | None = None,
    moving_mask: str | None = None,
    fixed_mask: str | None = None,
    intensity_window: Any = None,
    background: Any = None,
    qc: Any = True,
) -> None:
    """
    Register a moving scan onto a fixed scan (both 3-D NIfTI, each in its own scanner space): affine stage, then SACB-Net.

    Runs the bundle's configs/inference.json (affine stage unless --affine none, SACB-Net fine-tuned on the pair first
    with --iterations N > 0, the network's field refined on the pair unless --refine_iterations 0) through
    monai.bundle's ConfigWorkflow, with the flags as run overrides. Writes into OUT, on the
    fixed image's grid and affine: warped_image.nii.gz, warped_label.nii.gz (with --moving_label), ddf.nii.gz (displacement in
    voxels of the fixed grid, applied after the affine stage), jacobian_det.nii.gz, the transforms for ITK/ANTs
    (affine.mat, warp.nii.gz and both in one file, transform.h5; with --inverse also inverse_warp.nii.gz and
    inverse_transform.h5: antsApplyTransforms -r F -i M -t warp.nii.gz -t affine.mat, or -t transform.h5, reproduces
    warped_image.nii.gz) and metrics.json (with both labels: Dice per label before and after
    the deformable step, % of voxels with det J <= 0).

    Args:
        fixed: fixed (target) image, NIfTI.
        moving: moving (source) image, NIfTI; resampled onto the fixed grid first if the grids differ.
        out: output folder (created if missing).
        moving_label: optional label map of the moving image; warped with nearest-neighbour sampling.
        fixed_label: optional label map of the fixed image; with moving_label, Dice is reported.
        iterations: instance-optimisation steps that fine-tune the network on this pair before the refinement (default
            0: one forward pass; None: the config's instance_optimization_iterations).
        overwrite: replace existing outputs in OUT (otherwise the run refuses to start).
        network_scale: network resolution relative to the image, e.g. 0.5 (default from the configs).
        learning_rate: Adam learning rate of the instance optimisation (default from the config).
        regularization_weight: lambda of the smoothness term of the instance optimisation (default from the config).
        device: "cpu", "cuda" or "cuda:N" (default: CUDA when available); one this machine lacks stops the run at once.
        debug: show full Python tracebacks for input errors (and library deprecation warnings).
        qc: write the QC figure qc.png (axial middle slice: fixed, moving after the affine stage, warped,
            checkerboards, differences, deformation grid, det J) into OUT, or into each pair's folder of a
            --datalist run (default true; --qc false: none).
        qc_png: also write a QC figure of the finished outputs (the moving image as given, through the affines) here.
        affine: the affine stage: "affine" (12 parameters, default), "rigid" (6) or "none" (inputs already aligned).
        affine_only: stop after the affine stage (zero deformable field; outputs as usual).
        inverse: also write inverse_warp.nii.gz (maps fixed-space images onto the moving scan with affine.mat) and
            inverse_transform.h5 (the same in one file), and register symmetrically (the network run both ways, the
            refinement scored both ways: symmetric_registration) so that the inverse is as good as the forward.
        refine_iterations: steps of the field refinement after the network (default: the config's refine_iterations;
            0: off).
        label_names: names of the label ids in the report: a JSON {"1": "name", ...}, a TSV/CSV with index and name
            columns, or a FreeSurfer colour table. Default: the label map's own table (X.tsv beside X.nii.gz), else
            the numbers.
        datalist: instead of --fixed/--moving, a JSON datalist of pairs: each into OUT/<id>/, finished ones skipped
            (unless --overwrite), summary in OUT/cohort.csv, cohort.md (docs/usage.md, "Cohorts").
        weights: network weights to use instead of models/model.pt, e.g. a training run's runs/<preset>/model.pt.
        amp: mixed precision (float16 autocast on CUDA) for the network; default off (as fast in float32 on a GPU).
        moving_mask: optional mask of the moving image (e.g. its brain mask, values > 0 inside, on its grid): the
            affine stage, the network and the refinement look inside it only, like ANTs' -x; outputs stay whole.
        fixed_mask: optional mask of the fixed image, the same way (docs/usage.md, "Whole-head scans and masks").
        intensity_window: LOW,HIGH raw intensities clipped and scaled to [0, 1] instead of percentiles, e.g.
            --intensity_window=-1000,1000 for CT in HU (docs/usage.md, "CT").
        background: value outside the moving field of view in raw units: "auto" (default: each image's minimum) or
            a number, e.g. --background=-1024 for CT (values below it count as background too).
    """
    flags = {name: value for name, value in locals().items() if name not in ("fixed", "moving", "out", "debug")}
    from scripts.io.errors import exit_on_user_error, route_warnings

    route_warnings(debug)  # warnings to the log, library deprecation notices at DEBUG level
    files, overrides = exit_on_user_error(workflow_overrides, fixed, moving, out, **flags, debug=debug)
    if qc_png:  # refused before the run, not after it: the figure is written once the registration is done
        from scripts.io.atomic import check_outputs_writable

        exit_on_user_error(check_outputs_writable, [_absolute(qc_png)], overwrite, debug=debug)
    start = time.time()
    exit_on_user_error(_run_workflow, files, overrides, debug=debug)
    if datalist is not None:  # a cohort: its summary instead of one pair's report
        from scripts.workflow.reports import cohort_console_summary
        return print(cohort_console_summary(overrides["output_dir"]), flush=True)
    from scripts.workflow.reports import pair_console_summary

    print(pair_console_summary(overrides["output_dir"], time.time() - start), flush=True)
    if qc_png:
        from scripts.workflow.qc import qc_png_from_outputs

        print(f"QC figure: {qc_png_from_outputs(fixed, moving, overrides['output_dir'], _absolute(qc_png))}", flush=True)


def demo(out: str | None = None, iterations: int = 30, overwrite: bool = True, debug: bool = False) -> None:
    """
    Register the shipped real brain pair (Colin27 T1 -> MNI152 T1, sample_data/) and print Dice before/after.

    Same as: register --moving sample_data/moving_colin27_t1.nii.gz --fixed sample_data/fixed_mni152_t1.nii.gz
    --moving_label sample_data/moving_colin27_seg8.nii.gz --fixed_label sample_data/fixed_mni152_seg8.nii.gz --out OUT.

    Args:
        out: output folder (default: <bundle>/eval/demo).
        iterations: instance-optimisation steps (default 30; 0: no tuning).
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
        affine="none",  # the shipped pair is already in one (MNI) space
        refine_iterations=0,  # the demo as documented in README: the shipped weights + 30 instance-optimisation steps
    )


def apply(
    fixed: str,
    moving: str,
    transform_dir: str,
    warped_out: str,
    interpolation: str = "linear",
    inverse: bool = False,
    overwrite: bool = False,
    debug: bool = False,
) -> None:
    """
    Warp another image or label map with the transforms a registration saved (affine.mat, warp.nii.gz), like
    antsApplyTransforms: the moving-space image X onto the fixed grid, or with --inverse a fixed-space image onto the
    moving grid (then --moving is the reference scan and --fixed the image to warp; uses inverse_warp.nii.gz).

    Args:
        fixed: the fixed image of the registration (the output grid; with --inverse the image that is warped).
        moving: the image to warp (moving space; with --inverse the moving scan that gives the output grid).
        transform_dir: the registration's output folder.
        warped_out: NIfTI file to write (atomically; refused if it exists unless --overwrite).
        interpolation: "linear" for images, "nearest" for label maps (keep their integer ids).
        inverse: map from the fixed space onto the moving scan.
        overwrite: replace an existing warped_out.
        debug: show full Python tracebacks for input errors.
    """
    from scripts.io.errors import RegistrationInputError, exit_on_user_error

    def run() -> str:
        if interpolation not in ("linear", "nearest"):
            raise RegistrationInputError(f"--interpolation must be 'linear' or 'nearest', got {interpolation!r}.")
        from scripts.io.atomic import check_outputs_writable
        from scripts.spatial import apply_transforms

        target = _absolute(warped_out)
        check_outputs_writable([target], overwrite)
        apply_transforms(_absolute(fixed), _absolute(moving), _absolute(transform_dir), interpolation, inverse, target)
        return target

    print(f"wrote {exit_on_user_error(run, debug=debug)}", flush=True)


def main() -> None:
    """Entry point: ``register`` and ``demo`` commands (fire)."""
    from scripts.io.errors import route_warnings

    route_warnings()  # library deprecation warnings go to the log at DEBUG level, not to the terminal
    fire.Fire({"register": register, "apply": apply, "demo": demo})


if __name__ == "__main__":
    main()
