"""Training (train.json) on the real pair at reduced size: a run killed with SIGKILL mid-epoch resumes from its last
checkpoint with the optimiser and scheduler state and finishes; a NaN loss stops training and keeps the last good
checkpoint byte for byte."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import monai.bundle
import pytest
import torch
from reliability_data import small_pair

from scripts.io.errors import find_user_error
from scripts.workflow.handlers import NonFiniteLossError
from scripts.networks.sacb_net import SACBNet
from scripts.io.weights import load_network_weights

BUNDLE = Path(__file__).resolve().parents[1] / "bundle"
ITERATIONS_PER_EPOCH = 1  # one training pair
# a narrower network with fewer k-means iterations keeps each step around a second of CPU; everything else as shipped
SMALL_NETWORK = {"network_def": {"_target_": "scripts.networks.SACBNet", "base_channels": 2, "kmeans_iterations": 3}}


@pytest.fixture()
def training_data(tmp_path):
    """The real pair (subsampled to 20x24x20) as training set, with its labels as validation set."""
    paths = {k: Path(v).name for k, v in small_pair(tmp_path / "data", factor=8).items()}
    datalist = {
        "training": [{"moving_image": paths["moving_image"], "fixed_image": paths["fixed_image"]}],
        "validation": [paths],
    }
    path = tmp_path / "data" / "datalist.json"
    path.write_text(json.dumps(datalist))
    return {"datalist": str(path), "dataset_dir": str(tmp_path / "data"), "ckpt_dir": str(tmp_path / "ckpt"),
            "output_dir": str(tmp_path / "runs"), **SMALL_NETWORK}


class PauseAtIteration:
    """Training handler for the kill test: when iteration ``iteration`` starts, create ``marker`` and wait there (the
    test then kills the process), so the kill lands inside that iteration on any machine, however fast."""

    def __init__(self, iteration: int, marker: str) -> None:
        self.iteration, self.marker = iteration, marker

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.ITERATION_STARTED(once=self.iteration), self)

    def __call__(self, engine) -> None:
        Path(self.marker).touch()
        time.sleep(600)


def _command(settings, max_epochs, extra_config=None):
    configs = "configs/train.json" if extra_config is None else str(["configs/train.json", str(extra_config)])
    args = [sys.executable, "-m", "monai.bundle", "run", "--config_file", configs]
    for key, value in {**settings, "max_epochs": max_epochs, "val_interval": max_epochs}.items():
        args += [f"--{key}", str(value)]
    return args


def _all_checkpoints_load(ckpt_dir):
    for path in Path(ckpt_dir).glob("*.pt"):
        torch.load(path, weights_only=True)  # raises on a truncated file


def test_training_killed_mid_epoch_resumes_and_finishes(training_data, tmp_path):
    ckpt = Path(training_data["ckpt_dir"])
    # the first run announces the start of its second iteration (= inside epoch 2) and waits there to be killed
    marker = tmp_path / "inside_epoch_2"
    pause = tmp_path / "pause.json"
    pause.write_text(json.dumps({"+train::handlers": [
        {"_target_": "test_reliability_training.PauseAtIteration", "iteration": ITERATIONS_PER_EPOCH + 1,
         "marker": str(marker)}]}))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    log = open(tmp_path / "first.log", "w")
    first = subprocess.Popen(_command(training_data, 2, pause), cwd=BUNDLE, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while not marker.exists():
        assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        assert time.time() < deadline, "epoch 2 did not start within 300 s"
        time.sleep(0.05)
    assert (ckpt / "checkpoint_epoch=1.pt").exists()  # saved at the end of epoch 1, before epoch 2 started
    first.send_signal(signal.SIGKILL)
    assert first.wait() == -signal.SIGKILL
    log.close()
    assert not (ckpt / "checkpoint_epoch=2.pt").exists()  # killed mid-epoch 2
    _all_checkpoints_load(ckpt)

    second = subprocess.run(_command(training_data, 2), cwd=BUNDLE, capture_output=True, text=True, timeout=600)
    output = second.stdout + second.stderr
    assert second.returncode == 0, output[-3000:]
    assert "Restored all variables from" in output and "checkpoint_epoch=1.pt" in output
    assert "SupervisedTrainer - INFO - Epoch[1] Complete" not in output  # epoch 1 was not trained again
    assert "SupervisedTrainer - INFO - Epoch[2] Complete" in output
    assert sorted(p.name for p in ckpt.iterdir()) == ["checkpoint_epoch=2.pt", "model.json", "model.pt"]  # n_saved=1

    final = torch.load(ckpt / "checkpoint_epoch=2.pt", weights_only=True)
    assert final["trainer"]["iteration"] == 2 * ITERATIONS_PER_EPOCH
    # the optimiser continued from its saved state: Adam counted the steps of both epochs, not only the one after
    # the restart, and the scheduler's epoch count went on from 1 to 2
    steps = {int(state["step"]) for state in final["optimizer"]["state"].values()}
    assert steps == {2 * ITERATIONS_PER_EPOCH}
    assert final["lr_scheduler"]["last_epoch"] == 2
    network = SACBNet(base_channels=2)
    load_network_weights(network, ckpt / "checkpoint_epoch=2.pt")
    load_network_weights(network, ckpt / "model.pt")


def _train_in_process(settings, **overrides):
    settings = {k.replace("#", "::"): v for k, v in settings.items()}
    monai.bundle.run(
        config_file=str(BUNDLE / "configs" / "train.json"),
        meta_file=str(BUNDLE / "configs" / "metadata.json"),
        logging_file=str(BUNDLE / "configs" / "logging.conf"),
        bundle_root=str(BUNDLE),
        **settings,
        **overrides,
    )


def test_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(training_data):
    ckpt = Path(training_data["ckpt_dir"])
    _train_in_process(training_data, max_epochs=1, val_interval=1)
    before = {p.name: p.read_bytes() for p in ckpt.iterdir()}
    assert sorted(before) == ["checkpoint_epoch=1.pt", "model.json", "model.pt"]  # model.json: its network_scale

    # resumed with a broken setting: the first iteration of epoch 2 has a NaN loss
    with pytest.raises(Exception) as info:
        _train_in_process(training_data, max_epochs=3, val_interval=1, regularization_weight=float("nan"))
    error = find_user_error(info.value)
    assert isinstance(error, NonFiniteLossError), info.value
    assert f"the loss became nan at epoch 2, iteration {ITERATIONS_PER_EPOCH + 1}" in str(error)
    assert f"last good checkpoint in '{ckpt}' was kept" in str(error)
    after = {p.name: p.read_bytes() for p in ckpt.iterdir()}
    assert after == before  # same files, same bytes: nothing NaN was written, nothing good was deleted
    load_network_weights(SACBNet(base_channels=2), ckpt / "checkpoint_epoch=1.pt")
