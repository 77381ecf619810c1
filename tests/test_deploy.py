"""MONAI Deploy app (integrations/deploy/): the exported TorchScript runs in a Holoscan application built on
``MonaiBundleInferenceOperator`` on the real pair, NIfTI in and out, and reproduces ``python -m scripts.cli register``
with its defaults: the affine stage (the moving scan's header is moved by a known rigid transform, so it lies in its
own scanner space), SACB-Net and the field refinement, whose configs the TorchScript file carries.

Needs the MONAI Deploy virtual environment (``integrations/deploy/setup_env.sh``; ``$SACB_DEPLOY_VENV`` or
``.venv-deploy``): the SDK cannot live in the main environment (see requirements-deploy.txt)."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import REPO_ROOT
from ecosystem_utils import bundle_copy_with_weights, run_bundle_command, run_checked
from reliability_data import load_sample, save
from spatial_cases import mean_dice, rotation_ras

from scripts.layers import resample_moving
from scripts.spatial import read_itk_affine

pytestmark = [pytest.mark.deploy, pytest.mark.slow]

DEPLOY_PYTHON = Path(os.environ.get("SACB_DEPLOY_VENV", REPO_ROOT / ".venv-deploy")) / "bin" / "python"
APP = REPO_ROOT / "integrations" / "deploy" / "app.py"
INPUT_FILES = {
    "moving_image": "moving.nii.gz",
    "fixed_image": "fixed.nii.gz",
    "moving_label": "moving_label.nii.gz",
    "fixed_label": "fixed_label.nii.gz",
}
OUTPUTS = ("ddf.nii.gz", "warped_image.nii.gz", "warped_label.nii.gz", "jacobian_det.nii.gz", "warp.nii.gz")
#: fixed world point -> moving world point: the moving header moved by 10 + 4 degrees about the brain centre and ~17 mm
MOVE = rotation_ras((0.0, -20.0, 10.0), degrees_z=10.0, degrees_x=-4.0, translation=(12.0, -10.0, 8.0))

if not DEPLOY_PYTHON.is_file():
    pytest.skip(
        f"MONAI Deploy venv not found at {DEPLOY_PYTHON.parent.parent}: run integrations/deploy/setup_env.sh",
        allow_module_level=True,
    )


def _fast_affine_stage(bundle: Path) -> None:
    """The affine stage at 8 and 4 mm only (not 6, 4, 2 mm) for the 4 mm pair, in the bundle copy's inference.json,
    which the export (and so the app) and the CLI both read: a fifth of the time, the same stages."""
    path = bundle / "configs" / "inference.json"
    config = json.loads(path.read_text())
    config.update(affine_levels_mm=[8.0, 4.0], affine_iterations=[60, 30])
    path.write_text(json.dumps(config, indent=4))


def _run_app(model_ts: Path, inputs: Path, out: Path, bundle: Path, check: bool = True):
    """Run the Deploy app (its scripts package and macros from ``bundle``); ``check``: fail the test on an error."""
    command = " ".join(shlex.quote(str(a)) for a in (DEPLOY_PYTHON, APP, "-i", inputs, "-o", out, "-m", model_ts))
    shell = ["bash", "-c", f"ulimit -s 32768 && exec {command}"]
    if check:
        return run_checked(shell, cwd=out.parent, env={"SACB_BUNDLE_ROOT": str(bundle)})
    return subprocess.run(shell, cwd=out.parent, capture_output=True, text=True, timeout=600, check=False,
                          env=dict(os.environ, SACB_BUNDLE_ROOT=str(bundle)))


@pytest.fixture(scope="module")
def deployed_run(tmp_path_factory):
    """Export the TorchScript with the default pipeline's configs, run the Deploy app and the CLI's default register
    on the real pair (4 mm, 40x48x40), the moving scan in its own scanner space (``MOVE``)."""
    work = tmp_path_factory.mktemp("deploy")
    bundle = bundle_copy_with_weights(work)
    _fast_affine_stage(bundle)
    inputs = work / "in"
    inputs.mkdir()
    for key, name in INPUT_FILES.items():
        data, affine = load_sample(key, factor=4)
        save(inputs / name, data, MOVE @ affine if key.startswith("moving") else affine)
    model_ts = work / "model.ts"
    run_bundle_command(
        ["ckpt_export", "--net_id", "network_def", "--filepath", str(model_ts), "--ckpt_file", "models/model.pt",
         "--meta_file", "configs/metadata.json", "--config_file", "configs/inference.json"],
        bundle,
    )
    app_out = work / "app_out"
    app_run = _run_app(model_ts, inputs, app_out, bundle)

    reference_out = work / "cli_out"
    paths = {key: str(inputs / name) for key, name in INPUT_FILES.items()}
    run_checked(
        [sys.executable, "-m", "scripts.cli", "register", "--fixed", paths["fixed_image"], "--moving",
         paths["moving_image"], "--moving_label", paths["moving_label"], "--fixed_label", paths["fixed_label"],
         "--out", str(reference_out), "--device", "cpu"],
        cwd=bundle,
    )
    return inputs, app_out, reference_out, app_run.stdout + app_run.stderr


def test_app_ran_the_bundle_operator(deployed_run):
    _, app_out, _, log = deployed_run
    assert "Graph execution finished" in log and "GXF_FAILURE" not in log
    for name in OUTPUTS + ("metrics.json", "affine.mat"):
        assert (app_out / name).is_file(), name


def test_outputs_on_fixed_grid_and_not_empty(deployed_run):
    inputs, app_out, _, _ = deployed_run
    fixed = nib.load(str(inputs / "fixed.nii.gz"))
    warped = nib.load(str(app_out / "warped_image.nii.gz"))
    ddf = nib.load(str(app_out / "ddf.nii.gz"))
    assert warped.shape == fixed.shape
    assert ddf.shape[:3] == fixed.shape and ddf.shape[-1] == 3
    np.testing.assert_allclose(warped.affine, fixed.affine, atol=1e-5)
    np.testing.assert_allclose(ddf.affine, fixed.affine, atol=1e-5)
    warped_data = np.asarray(warped.dataobj, dtype=np.float32)
    assert np.count_nonzero(warped_data) > 0.1 * warped_data.size
    assert np.abs(np.asarray(ddf.dataobj)).max() > 0.1  # a real field, not an identity passthrough


def test_affine_stage_brings_the_moving_scan_from_its_own_scanner_space(deployed_run):
    inputs, app_out, reference_out, _ = deployed_run
    fixed, moving = nib.load(str(inputs / "fixed_label.nii.gz")), nib.load(str(inputs / "moving_label.nii.gz"))
    fixed_labels = np.asarray(fixed.dataobj)
    brain = nib.affines.apply_affine(fixed.affine, np.argwhere(fixed_labels > 0))
    estimated = read_itk_affine(app_out / "affine.mat")
    error = nib.affines.apply_affine(estimated, brain) - nib.affines.apply_affine(MOVE, brain)
    assert np.sqrt(np.mean(np.sum(error**2, axis=1))) < 2.0  # mm over the fixed brain, 4 mm voxels
    np.testing.assert_allclose(estimated, read_itk_affine(reference_out / "affine.mat"), atol=1e-4)
    # the moving labels where the header puts them (no affine stage) vs the app's warped labels
    in_place = resample_moving(torch.as_tensor(np.asarray(moving.dataobj))[None, None], moving.affine, fixed.shape,
                               fixed.affine, torch.eye(4, dtype=torch.float64), mode="nearest")[0, 0].numpy()
    warped = np.asarray(nib.load(str(app_out / "warped_label.nii.gz")).dataobj)
    assert mean_dice(fixed_labels, warped) > mean_dice(fixed_labels, in_place) + 0.3  # about 0.6 vs 0.15


def test_app_refuses_a_torchscript_without_the_pipeline_configs(deployed_run, tmp_path):
    """A file exported without inference.json (the network alone) has no pipeline to run: refused, naming the export."""
    inputs, _, _, _ = deployed_run
    bundle = inputs.parent / "bundle"
    bare_export = tmp_path / "model.ts"
    with zipfile.ZipFile(inputs.parent / "model.ts") as source, zipfile.ZipFile(bare_export, "w") as target:
        for item in source.infolist():
            if Path(item.filename).stem != "inference":
                target.writestr(item, source.read(item))
    result = _run_app(bare_export, inputs, tmp_path / "out", bundle, check=False)
    assert result.returncode != 0
    assert "lacks the config(s) ['inference']" in result.stderr and "ckpt_export" in result.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.parametrize("name", OUTPUTS)
def test_app_matches_the_cli_default_register(deployed_run, name):
    _, app_out, reference_out, _ = deployed_run
    app, reference = nib.load(str(app_out / name)), nib.load(str(reference_out / name))
    np.testing.assert_allclose(app.affine, reference.affine, atol=1e-6)
    scale = max(1.0, float(np.abs(np.asarray(reference.dataobj)).max()))
    np.testing.assert_allclose(np.asarray(app.dataobj), np.asarray(reference.dataobj), atol=1e-4 * scale, rtol=0)
