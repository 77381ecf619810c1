# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""What a new user hits first: training never touches the shipped weights (run folder, automatic resume there,
installing is explicit); reports name labels by the user's names, the label map's own table or their numbers;
a device the machine lacks stops the CLI with one line; the checkpoint hint names what really changes the weights;
library deprecation warnings stay out of the terminal."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import BUNDLE_ROOT, SAMPLE_DATA
from ignite.engine import Events
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from workflow_data import PLAIN_INFERENCE, run_bundle_workflow, write_small_pair

from scripts.io import RegistrationInputError, check_state_dict, install_weights, label_names_for, read_label_names
from scripts.io.devices import available_devices, resolve_device
from scripts.networks import SACBNet
from scripts.workflow.metrics import RegistrationMetricsd

SMALL_NETWORK = {"_target_": "scripts.networks.SACBNet", "base_channels": 2, "kmeans_iterations": 3}
SHIPPED_NAMES = {"1": "thalamus", "2": "caudate", "3": "putamen", "4": "pallidum", "5": "hippocampus",
                 "6": "amygdala", "7": "cerebellum", "8": "cerebral cortex"}


def _cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """The CLI as a user runs it (no PYTHONWARNINGS filter: what reaches the terminal is what the user sees)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    return subprocess.run([sys.executable, "-m", "scripts.cli", *args], cwd=BUNDLE_ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


# ------------------------------------------------------------------------------------------------ training run folder
def test_training_defaults_point_into_a_run_folder_not_models():
    parser = ConfigParser()
    parser.read_config(str(BUNDLE_ROOT / "configs" / "train.json"))
    assert parser.get_parsed_content("ckpt_dir") == "./runs/train"
    assert parser.get_parsed_content("output_dir") == "./runs/train"
    assert parser.get_parsed_content("install_weights") is False
    for preset in sorted((BUNDLE_ROOT / "configs" / "presets").glob("*.json")):
        parser = ConfigParser()
        parser.read_config([str(BUNDLE_ROOT / "configs" / "train.json"), str(preset)])
        assert parser.get_parsed_content("ckpt_dir") == f"./runs/{preset.stem}", preset.name


@pytest.mark.slow
def test_readme_training_command_keeps_the_shipped_weights_and_resumes_in_its_run_folder(tmp_path):
    """``monai.bundle run --config_file configs/train.json`` as the README gives it (bundle_root = a copy holding
    models/model.pt), on the shipped pair at 1/8 size: models/model.pt stays byte-identical, the run writes
    runs/train/, a second run resumes there, and only install_weights replaces models/model.pt."""
    bundle = tmp_path / "bundle"
    (bundle / "models").mkdir(parents=True)
    shipped = bundle / "models" / "model.pt"
    torch.save(SACBNet(base_channels=2).state_dict(), shipped)
    shipped_bytes = shipped.read_bytes()
    data = tmp_path / "data"
    write_small_pair(data, factor=8)  # the file names of the default datalist (sample_data), 22x27x22 voxels
    settings = dict(bundle_root=str(bundle), dataset_dir=str(data), network_def=SMALL_NETWORK, val_interval=1)

    run_bundle_workflow(["train.json"], workflow_type="train", max_epochs=1, **settings)
    run = bundle / "runs" / "train"
    assert shipped.read_bytes() == shipped_bytes
    assert {"checkpoint_epoch=1.pt", "model.pt"} <= {p.name for p in run.iterdir()}
    assert any(p.name.startswith("events.out.tfevents") for p in run.iterdir())  # TensorBoard in the same folder

    seen = {}

    def record(workflow):
        trainer = workflow.parser.get_parsed_content("train::trainer")
        seen["amp"] = trainer.amp
        trainer.add_event_handler(Events.EPOCH_STARTED, lambda engine: seen.setdefault("epochs", []).append(engine.state.epoch))

    run_bundle_workflow(["train.json"], workflow_type="train", prepare=record, max_epochs=2, amp=True, **settings)
    assert seen == {"amp": True, "epochs": [2]}  # resumed from runs/train (epoch 1 not trained again), amp reached it
    assert shipped.read_bytes() == shipped_bytes

    run_bundle_workflow(["train.json"], workflow_type="train", max_epochs=2, install_weights=True, **settings)
    assert shipped.read_bytes() == (run / "model.pt").read_bytes() != shipped_bytes  # the explicit step


def test_install_weights_checks_before_replacing(tmp_path):
    target = tmp_path / "models" / "model.pt"
    target.parent.mkdir()
    torch.save(SACBNet(base_channels=2).state_dict(), target)
    before = target.read_bytes()
    with pytest.raises(RegistrationInputError, match="does not exist"):
        install_weights(tmp_path / "runs" / "model.pt", target)  # no validation has run yet
    wider = tmp_path / "wider.pt"
    torch.save(SACBNet(base_channels=4).state_dict(), wider)
    with pytest.raises(RegistrationInputError, match="base_channels=4, network_def 2"):
        install_weights(wider, target, SACBNet(base_channels=2))
    assert target.read_bytes() == before
    assert install_weights(wider, target, SACBNet(base_channels=4)) == str(target)
    assert target.read_bytes() == wider.read_bytes()
    assert not [p for p in target.parent.iterdir() if p.name.startswith(".")]  # no temporary file left


# ------------------------------------------------------------------------------------------------------- label names
def _thirteen_class_pair(folder: Path) -> dict[str, str]:
    """The shipped pair at 1/4 size with its labels split into 13 classes (classes 1-5 of one hemisphere + 8)."""
    pair = write_small_pair(folder, factor=4)
    for key in ("moving_label", "fixed_label"):
        image = nib.load(pair[key])
        labels = np.asarray(image.dataobj).astype(np.uint8)
        half = np.zeros(labels.shape, bool)
        half[: labels.shape[0] // 2] = True
        split = half & (labels >= 1) & (labels <= 5)
        labels[split] += 8
        target = folder / Path(pair[key]).name.replace("seg8", "seg13")
        nib.save(nib.Nifti1Image(labels, image.affine), str(target))
        pair[key] = str(target)
    return pair


def test_label_names_from_the_user_the_label_maps_table_or_the_numbers(tmp_path):
    assert label_names_for(None, SAMPLE_DATA / "fixed_mni152_seg8.nii.gz") == SHIPPED_NAMES  # the shipped table
    copy = tmp_path / "fixed_mni152_seg8.nii.gz"
    shutil.copy(SAMPLE_DATA / "fixed_mni152_seg8.nii.gz", copy)
    assert label_names_for(None, copy) is None  # the same labels elsewhere, without their table: numbers
    assert label_names_for(None, copy, SAMPLE_DATA / "moving_colin27_seg8.nii.gz") == SHIPPED_NAMES  # moving's
    (tmp_path / "names.json").write_text(json.dumps({"2": "left thalamus", "13": "brainstem"}))
    assert label_names_for(str(tmp_path / "names.json"), SAMPLE_DATA / "fixed_mni152_seg8.nii.gz") == {
        "2": "left thalamus", "13": "brainstem"}  # the user's names win
    (tmp_path / "lut.txt").write_text("# FreeSurfer colour table\n0 Unknown 0 0 0 0\n17 Left-Hippocampus 220 216 20 0\n")
    assert read_label_names(tmp_path / "lut.txt") == {"0": "Unknown", "17": "Left-Hippocampus"}
    (tmp_path / "dseg.tsv").write_text("index\tname\tabbreviation\n1\tgrey matter\tGM\n2\twhite matter\tWM\n")
    assert read_label_names(tmp_path / "dseg.tsv") == {"1": "grey matter", "2": "white matter"}
    for bad, message in (({"x": "a"}, "not a non-negative integer"), ({"1": ""}, "non-empty"), ({}, "no label id")):
        with pytest.raises(RegistrationInputError, match=message):
            read_label_names(bad)
    with pytest.raises(RegistrationInputError, match="does not exist"):
        read_label_names(tmp_path / "missing.json")


def test_metrics_name_labels_from_their_source_file(tmp_path):
    labels = torch.zeros(1, 6, 6, 6, dtype=torch.int64)
    labels[0, :3], labels[0, 3:, :3] = 2, 13
    transform = RegistrationMetricsd(output_dir=str(tmp_path), overwrite=True)

    def names(fixed_file):
        fixed = MetaTensor(labels.clone(), meta={"filename_or_obj": str(fixed_file)})
        out = transform({"fixed_label": fixed, "warped_label": labels.clone(), "moving_label": labels.clone()})
        return {row["label"]: row["name"] for row in out["metrics"]["labels"]}

    assert names(SAMPLE_DATA / "fixed_mni152_seg8.nii.gz") == {2: "caudate", 13: "13"}  # shipped table, 13 unnamed
    assert names(tmp_path / "other_labels.nii.gz") == {2: "2", 13: "13"}  # no table: the numbers
    named = RegistrationMetricsd(output_dir=str(tmp_path / "named"), label_names={"13": "brainstem"})
    out = named({"fixed_label": MetaTensor(labels.clone(), meta={"filename_or_obj": str(SAMPLE_DATA / "x.nii.gz")}),
                 "warped_label": labels.clone()})
    assert {r["label"]: r["name"] for r in out["metrics"]["labels"]} == {2: "2", 13: "brainstem"}


@pytest.mark.slow
def test_register_names_thirteen_classes_by_number_or_by_the_users_names_without_warnings(tmp_path):
    pair = _thirteen_class_pair(tmp_path / "data")
    common = ["register", "--fixed", pair["fixed_image"], "--moving", pair["moving_image"],
              "--moving_label", pair["moving_label"], "--fixed_label", pair["fixed_label"], "--iterations", "0",
              "--affine", "none"]
    result = _cli(*common, "--out", str(tmp_path / "numbers"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = json.loads((tmp_path / "numbers" / "metrics.json").read_text())["labels"]
    assert [(r["label"], r["name"]) for r in rows] == [(i, str(i)) for i in range(1, 14)]
    table = result.stdout[result.stdout.index("Dice before"):]
    assert not any(name in table for name in SHIPPED_NAMES.values())  # no structure name for the user's classes
    assert "\n13 " in table and "\n2 " in table
    terminal = result.stdout + result.stderr
    assert "FutureWarning" not in terminal and "DeprecationWarning" not in terminal and "Traceback" not in terminal

    names = {str(i): f"structure {chr(96 + i)}" for i in range(1, 14)}
    (tmp_path / "names.json").write_text(json.dumps(names))
    result = _cli(*common, "--out", str(tmp_path / "named"), "--label_names", str(tmp_path / "names.json"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = json.loads((tmp_path / "named" / "metrics.json").read_text())["labels"]
    assert [r["name"] for r in rows] == list(names.values())
    assert "13 structure m" in result.stdout


@pytest.mark.slow
def test_shipped_pair_keeps_its_structure_names(tmp_path):
    """The demo's inputs (sample_data) carry their lookup tables, so the 8 structure names still appear."""
    out = tmp_path / "out"
    run_bundle_workflow(["inference.json"], **PLAIN_INFERENCE, moving_label=str(SAMPLE_DATA / "moving_colin27_seg8.nii.gz"),
                        fixed_label=str(SAMPLE_DATA / "fixed_mni152_seg8.nii.gz"), output_dir=str(out),
                        network_scale=0.25, network_def=SMALL_NETWORK, ckpt_path="/nonexistent/model.pt")
    rows = json.loads((out / "metrics.json").read_text())["labels"]
    assert {str(r["label"]): r["name"] for r in rows} == SHIPPED_NAMES


# ------------------------------------------------------------------------------------------------------------ device
def test_device_names_are_validated_against_the_machine(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu") and resolve_device(" CPU ") == torch.device("cpu")
    assert resolve_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")
    for bad in ("gpu", "mps", "cuda:x", "cuda:-1", "cpu'); import os; ('", 3):
        with pytest.raises(RegistrationInputError, match="is not a device name"):
            resolve_device(bad)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RegistrationInputError, match=r"device 'cuda:0' was requested, but CUDA is not available.*"
                                                     r"available: cpu\."):
        resolve_device("cuda:0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert available_devices() == ["cpu", "cuda:0", "cuda:1"]
    assert resolve_device("cuda:1") == torch.device("cuda:1") and resolve_device("cuda") == torch.device("cuda")
    with pytest.raises(RegistrationInputError, match=r"'cuda:2' was requested, but this machine has 2 CUDA device\(s\); "
                                                     r"available: cpu, cuda:0, cuda:1\."):
        resolve_device("cuda:2")


@pytest.mark.parametrize("device", ["cuda" if not torch.cuda.is_available() else "cuda:99", "gpu"])
def test_cli_with_a_missing_device_stops_with_one_line_and_writes_nothing(tmp_path, device):
    out = tmp_path / "out"
    result = _cli("register", "--fixed", str(SAMPLE_DATA / "fixed_mni152_t1.nii.gz"), "--moving",
                  str(SAMPLE_DATA / "moving_colin27_t1.nii.gz"), "--out", str(out), "--device", device)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: device ") and "available: cpu" in lines[0], result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert not out.exists()


# ------------------------------------------------------------------------------------------ checkpoint hint, warnings
def test_checkpoint_hint_names_the_setting_that_changes_the_weights():
    # num_clusters, k-means settings and the diffeomorphic mode keep the state dict: these weights load as they are
    check_state_dict(SACBNet().state_dict(), SACBNet(num_clusters=3, kmeans_iterations=2, diffeomorphic=True,
                                                     integration_steps=4).state_dict(), "same.pt")
    with pytest.raises(RegistrationInputError) as error:
        check_state_dict(SACBNet(base_channels=4).state_dict(), SACBNet(base_channels=8).state_dict(), "wide.pt")
    message = str(error.value)
    assert "encoder.0.convs.0.conv.weight: checkpoint (8, 1, 3, 3, 3) vs network (4, 1, 3, 3, 3)" in message
    assert "(the checkpoint has base_channels=8, network_def 4)" in message
    assert "num_clusters, kmeans_iterations, diffeomorphic and integration_steps do not" in message


def test_cli_routes_library_deprecation_warnings_to_the_log(monkeypatch, caplog):
    from scripts.io.errors import route_warnings  # what scripts.cli's register and main call first

    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)  # restored after the test
    route_warnings(debug=False)
    with caplog.at_level(logging.DEBUG, logger="py.warnings"), warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("a default changed", FutureWarning)
        warnings.warn("something odd", UserWarning)
        # MONAI's LoadImage builds the GPU DICOM decoder too where pydicom is installed (e.g. the Deploy environment)
        warnings.warn("NvImgCodecPydicomReader: nvImageCodec decoder plugin did not register", UserWarning)
    levels = {r.getMessage().split(": ", 1)[1].split("\n")[0]: r.levelno for r in caplog.records}
    assert levels == {"FutureWarning: a default changed": logging.DEBUG, "UserWarning: something odd": logging.WARNING,
                      "UserWarning: NvImgCodecPydicomReader: nvImageCodec decoder plugin did not register": logging.DEBUG}


def test_the_bundle_log_leaves_out_the_missing_gpu_dicom_decoder(tmp_path):
    """The logger MONAI's GPU DICOM decoder warns through at each load is set to errors only by ``logging.conf``."""
    import logging.config

    from conftest import BUNDLE_ROOT

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    logging.config.fileConfig(str(BUNDLE_ROOT / "configs" / "logging.conf"), disable_existing_loggers=False)
    try:
        decoder = logging.getLogger("monai.data.nvimgcodec_pydicom_plugin")
        assert decoder.getEffectiveLevel() == logging.ERROR
        assert logging.getLogger("scripts.engines").getEffectiveLevel() == logging.INFO  # the bundle's own lines stay
    finally:
        logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.NOTSET)
        root.handlers[:] = handlers
        root.setLevel(level)
