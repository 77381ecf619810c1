"""Multi-GPU config on CPU: ``torchrun --standalone --nproc_per_node 2 -m monai.bundle run`` with train.json +
multi_gpu_train.json (gloo backend): DDP trains on a DistributedSampler split, and only rank 0 logs and saves."""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
from conftest import BUNDLE_ROOT
from ecosystem_utils import run_checked
from reliability_data import load_sample, save
from torchrun_launch import standalone_command

pytestmark = [pytest.mark.ddp, pytest.mark.slow]


def _datalist(folder: Path) -> Path:
    """The real pair at 8 mm (20x24x20): 2 training images (-> 2 ordered pairs), 2 validation pairs."""
    paths = {k: str(save(folder / f"{k}.nii.gz", *load_sample(k, factor=8)))
             for k in ("moving_image", "fixed_image", "moving_label", "fixed_label")}
    forward = dict(paths)
    backward = {"moving_image": paths["fixed_image"], "fixed_image": paths["moving_image"],
                "moving_label": paths["fixed_label"], "fixed_label": paths["moving_label"]}
    content = {
        "training": [{"image": paths["moving_image"], "label": paths["moving_label"]},
                     {"image": paths["fixed_image"], "label": paths["fixed_label"]}],
        "validation": [forward, backward],
    }
    target = folder / "datalist.json"
    target.write_text(json.dumps(content))
    return target


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    if shutil.which("torchrun") is None and not (Path(sys.executable).parent / "torchrun").exists():
        pytest.skip("torchrun not found")
    work = tmp_path_factory.mktemp("ddp")
    datalist = _datalist(work)
    command = [
        *standalone_command(2), "-m", "monai.bundle", "run",
        "--config_file", "['configs/train.json','configs/multi_gpu_train.json']",
        "--datalist", str(datalist), "--dataset_dir", str(work),
        "--ckpt_dir", str(work / "ckpt"), "--output_dir", str(work / "runs"), "--max_epochs", "2",
    ]
    result = run_checked(command, cwd=BUNDLE_ROOT, env={"PYTHONPATH": str(BUNDLE_ROOT), "OMP_NUM_THREADS": "1"})
    return work, result.stdout + result.stderr


def _lines(log: str, rank: int, pattern: str) -> list:
    return [line for line in log.splitlines() if line.startswith(f"[default{rank}]:") and re.search(pattern, line)]


def test_both_ranks_train_on_half_of_the_pairs(ddp_run):
    _, log = ddp_run
    for rank in (0, 1):
        completed = _lines(log, rank, r"SupervisedTrainer - INFO - Epoch\[\d\] Complete")
        assert len(completed) == 2, f"rank {rank} did not run 2 epochs:\n{log[-3000:]}"
    # 2 pairs over 2 ranks: one iteration per epoch on each
    assert _lines(log, 0, r"Epoch: 2/2, Iter: 1/1 -- train_loss")


def test_only_rank_zero_logs_and_saves(ddp_run):
    work, log = ddp_run
    # StatsHandler output (the engines' own "Epoch[n] Complete" lines are not the bundle's logging)
    stats = r"train_loss: |Metrics -- val_mean_dice|Key metric: "
    assert not _lines(log, 1, stats)
    assert len(_lines(log, 0, r"Metrics -- val_mean_dice")) == 2
    writers = {re.search(r"events\.out\.tfevents\.\d+\.[^.]+\.(\d+)\.", p.name).group(1)
               for p in (work / "runs").glob("events.out.tfevents.*")}
    assert len(writers) == 1, f"TensorBoard files from several processes: {sorted(writers)}"
    assert sorted(p.name for p in (work / "ckpt").iterdir()) == ["checkpoint_epoch=2.pt", "model.json", "model.pt"]


def test_saved_weights_are_the_plain_network(ddp_run):
    work, _ = ddp_run
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(BUNDLE_ROOT / "configs" / "train.json"))
    network = parser.get_parsed_content("network_def")
    state = torch.load(work / "ckpt" / "model.pt", weights_only=True)
    assert not any(k.startswith("module.") for k in state)  # DDP wrapper not saved
    network.load_state_dict(state)
    checkpoint = torch.load(work / "ckpt" / "checkpoint_epoch=2.pt", weights_only=True)
    assert set(checkpoint) == {"model", "optimizer", "lr_scheduler", "trainer"}
    # 2 epochs x 1 iteration: each rank saw half of the 2 pairs per epoch
    assert checkpoint["trainer"]["iteration"] == 2 and checkpoint["trainer"]["max_epochs"] == 2
