"""MONAI Deploy app (integrations/deploy/): the exported TorchScript runs in a Holoscan application built on
``MonaiBundleInferenceOperator`` on the real pair, NIfTI in and out, and reproduces ``monai.bundle run``.

Needs the MONAI Deploy virtual environment (``integrations/deploy/setup_env.sh``; ``$SACB_DEPLOY_VENV`` or
``.venv-deploy``): the SDK cannot live in the main environment (see requirements-deploy.txt)."""

from __future__ import annotations

import os
import shlex
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import BUNDLE_ROOT, REPO_ROOT
from ecosystem_utils import run_bundle_command, run_checked, save_seeded_weights
from reliability_data import load_sample, save

pytestmark = [pytest.mark.deploy, pytest.mark.slow]

DEPLOY_PYTHON = Path(os.environ.get("SACB_DEPLOY_VENV", REPO_ROOT / ".venv-deploy")) / "bin" / "python"
APP = REPO_ROOT / "integrations" / "deploy" / "app.py"
INPUT_FILES = {
    "moving_image": "moving.nii.gz",
    "fixed_image": "fixed.nii.gz",
    "moving_label": "moving_label.nii.gz",
    "fixed_label": "fixed_label.nii.gz",
}
OUTPUTS = ("ddf.nii.gz", "warped_image.nii.gz", "warped_label.nii.gz", "jacobian_det.nii.gz")

if not DEPLOY_PYTHON.is_file():
    pytest.skip(
        f"MONAI Deploy venv not found at {DEPLOY_PYTHON.parent.parent}: run integrations/deploy/setup_env.sh",
        allow_module_level=True,
    )


@pytest.fixture(scope="module")
def deployed_run(tmp_path_factory):
    """Export the TorchScript, run the Deploy app and the bundle's own inference on the real pair (4 mm, 40x48x40)."""
    work = tmp_path_factory.mktemp("deploy")
    inputs = work / "in"
    inputs.mkdir()
    for key, name in INPUT_FILES.items():
        save(inputs / name, *load_sample(key, factor=4))
    weights = BUNDLE_ROOT / "models" / "model.pt"
    if not weights.is_file():
        weights = save_seeded_weights(work / "model.pt")
    model_ts = work / "model.ts"
    run_bundle_command(
        ["ckpt_export", "--net_id", "network_def", "--filepath", str(model_ts), "--ckpt_file", str(weights),
         "--meta_file", "configs/metadata.json", "--config_file", "configs/inference.json"],
        BUNDLE_ROOT,
    )
    app_out = work / "app_out"
    command = " ".join(shlex.quote(str(a)) for a in (DEPLOY_PYTHON, APP, "-i", inputs, "-o", app_out, "-m", model_ts))
    app_run = run_checked(["bash", "-c", f"ulimit -s 32768 && exec {command}"], cwd=work)

    reference_out = work / "bundle_out"
    overrides = [f"--{key}={inputs / name}" for key, name in INPUT_FILES.items()]
    run_bundle_command(
        ["run", "--config_file", "configs/inference.json", "--ckpt_path", str(weights),
         "--output_dir", str(reference_out), *overrides],
        BUNDLE_ROOT,
    )
    return inputs, app_out, reference_out, app_run.stdout + app_run.stderr


def test_app_ran_the_bundle_operator(deployed_run):
    _, app_out, _, log = deployed_run
    assert "Graph execution finished" in log and "GXF_FAILURE" not in log
    for name in OUTPUTS + ("metrics.json",):
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


@pytest.mark.parametrize("name", OUTPUTS)
def test_app_matches_eager_bundle_inference(deployed_run, name):
    _, app_out, reference_out, _ = deployed_run
    app, reference = nib.load(str(app_out / name)), nib.load(str(reference_out / name))
    np.testing.assert_allclose(app.affine, reference.affine, atol=1e-6)
    scale = max(1.0, float(np.abs(np.asarray(reference.dataobj)).max()))
    np.testing.assert_allclose(np.asarray(app.dataobj), np.asarray(reference.dataobj), atol=1e-4 * scale, rtol=0)
