"""Command line (scripts/cli.py): help text, and a real registration through the same bundle configs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import nibabel as nib
import numpy as np
import pytest
from conftest import BUNDLE_ROOT
from workflow_data import write_small_pair

from scripts.cli import register, workflow_overrides


def _cli(*args, timeout=600):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run(
        [sys.executable, "-m", "scripts.cli", *args], cwd=BUNDLE_ROOT, env=env, capture_output=True, text=True,
        timeout=timeout,
    )


def _help_text(capsys, monkeypatch, command: str) -> str:
    """``python -m scripts.cli <command> --help`` through the CLI's own entry point (``main``), in this process: the
    help text is fire's rendering of the docstrings; the process boundary itself is run by
    test_register_writes_outputs_and_prints_dice."""
    import warnings

    from scripts.cli import main

    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)  # main() routes warnings: restored afterwards
    monkeypatch.setattr(sys, "argv", ["scripts.cli", command, "--help"])
    with pytest.raises(SystemExit) as info:  # fire's FireExit(0) after printing the help
        main()
    assert info.value.code == 0
    captured = capsys.readouterr()
    return captured.out + captured.err  # fire writes help to stderr when not on a terminal


def test_help_explains_every_argument(capsys, monkeypatch):
    text = _help_text(capsys, monkeypatch, "register")
    for argument in ("FIXED", "MOVING", "OUT", "--moving_label", "--fixed_label", "--iterations", "--overwrite",
                     "--network_scale", "--learning_rate", "--regularization_weight", "--device", "--debug"):
        assert argument in text, argument
    assert "instance-optimisation steps" in text and "fixed image's grid" in text
    assert "Register the shipped real brain pair" in _help_text(capsys, monkeypatch, "demo")


def test_cli_passes_overrides_to_inference_json_only():
    """register runs configs/inference.json, the whole pipeline, and switches its stages by run overrides."""
    files, overrides = workflow_overrides("f.nii.gz", "m.nii.gz", "out", iterations=0, affine="none", refine_iterations=0)
    assert [os.path.basename(f) for f in files] == ["inference.json"]
    assert overrides["affine_transform"] == "none" and overrides["refine_iterations"] == 0
    files, overrides = workflow_overrides("f.nii.gz", "m.nii.gz", "out", iterations=0)  # register's defaults
    assert [os.path.basename(f) for f in files] == ["inference.json"] and "refine_iterations" not in overrides
    assert overrides["affine_transform"] == "affine" and overrides["instance_optimization_iterations"] == 0
    files, overrides = workflow_overrides("f.nii.gz", "m.nii.gz", "out", iterations=7, overwrite=True)
    assert overrides["affine_only"] is False
    assert overrides["instance_optimization_iterations"] == 7 and overrides["overwrite"] is True
    files, overrides = workflow_overrides("f.nii.gz", "m.nii.gz", "out", iterations=7, affine="rigid", affine_only=True)
    assert overrides["affine_transform"] == "rigid" and overrides["affine_only"] is True  # the zero field after it
    assert os.path.isabs(overrides["fixed_image"]) and os.path.isabs(overrides["output_dir"])
    with pytest.raises(ValueError, match="iterations"):
        workflow_overrides("f", "m", "o", iterations=-1)
    assert "amp" not in overrides  # the configs' default (off: docs/benchmarks.md, "GPU")
    assert workflow_overrides("f", "m", "o", amp=False)[1]["amp"] is False  # --amp false


@pytest.mark.slow
def test_register_writes_outputs_and_prints_dice(tmp_path, capsys, monkeypatch):
    pair = write_small_pair(tmp_path / "data", factor=4)
    out = tmp_path / "out"
    args = ["register", "--fixed", pair["fixed_image"], "--moving", pair["moving_image"], "--out", str(out),
            "--moving_label", pair["moving_label"], "--fixed_label", pair["fixed_label"], "--iterations", "2",
            "--network_scale", "0.5"]
    result = _cli(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("warped_image.nii.gz", "ddf.nii.gz", "warped_label.nii.gz", "jacobian_det.nii.gz", "metrics.json"):
        assert (out / name).is_file()
    assert np.allclose(nib.load(str(out / "ddf.nii.gz")).affine, nib.load(pair["fixed_image"]).affine)
    metrics = json.loads((out / "metrics.json").read_text())
    assert f"{metrics['mean_dice']:.4f}" in result.stdout and f"{metrics['mean_dice_identity']:.4f}" in result.stdout
    assert "Dice before" in result.stdout and str(out) in result.stdout

    # outputs exist: refused with a message, no traceback, files kept. The same flags through ``register`` in this
    # process (the process's exit status 2 without a traceback: test_cli_process_exit_status_and_debug_traceback)
    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)  # register() routes warnings: restored
    with pytest.raises(SystemExit) as again:
        register(fixed=pair["fixed_image"], moving=pair["moving_image"], out=str(out), moving_label=pair["moving_label"],
                 fixed_label=pair["fixed_label"], iterations=2, network_scale=0.5)
    stderr = capsys.readouterr().err
    assert again.value.code != 0
    assert "already exist" in stderr and "Traceback" not in stderr
    assert json.loads((out / "metrics.json").read_text()) == metrics


def test_weights_flag_is_checked_before_anything_runs(tmp_path):
    with pytest.raises(ValueError, match="--weights .*no such file"):
        workflow_overrides("f.nii.gz", "m.nii.gz", str(tmp_path / "out"), weights=str(tmp_path / "missing.pt"))
    assert not (tmp_path / "out").exists()
    weights = tmp_path / "model.pt"
    weights.write_bytes(b"")
    _, overrides = workflow_overrides("f.nii.gz", "m.nii.gz", "out", weights=str(weights))
    assert overrides["ckpt_path"] == str(weights.resolve())


@pytest.mark.slow
def test_weights_flag_registers_with_the_given_state_dict(tmp_path, monkeypatch):
    """The field comes from the file given: perturbed weights give another field than a copy of the shipped ones."""
    import torch

    pair = write_small_pair(tmp_path / "data", factor=4)
    shipped = torch.load(BUNDLE_ROOT / "models" / "model.pt", map_location="cpu", weights_only=True)
    generator = torch.Generator().manual_seed(0)
    perturbed = {k: v + 0.5 * v.std() * torch.randn(v.shape, generator=generator) if v.is_floating_point() and v.numel() > 1
                 else v for k, v in shipped.items()}
    torch.save(shipped, tmp_path / "copy.pt")
    torch.save(perturbed, tmp_path / "perturbed.pt")
    fields = {}
    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)  # register() routes warnings: restored
    for name in ("copy", "perturbed"):  # register itself, in this process (the flags' parsing: the test above)
        out = tmp_path / name
        register(fixed=pair["fixed_image"], moving=pair["moving_image"], out=str(out), affine="none",
                 refine_iterations=0, weights=str(tmp_path / f"{name}.pt"))
        fields[name] = np.asanyarray(nib.load(str(out / "ddf.nii.gz")).dataobj)
    assert np.abs(fields["perturbed"] - fields["copy"]).max() > 0.1
