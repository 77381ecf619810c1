"""Evaluation workflow (configs/evaluate.json over inference.json): per-label Dice, HD95, SSIM and folding, per-pair
metrics.json + CSV and a run summary, checked on cases with a known answer and against the written files."""

from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest
import torch
from workflow_data import PLAIN_INFERENCE, run_bundle_workflow, write_small_pair

from scripts.workflow.metrics import registration_metrics

LABELS = [1, 2, 3, 4, 5, 6, 7, 8]


def test_metrics_on_known_cases():
    label = torch.zeros(1, 10, 10, 10)
    label[0, 2:6, 2:6, 2:6] = 1
    label[0, 6:9, 6:9, 6:9] = 2
    shifted = torch.roll(label, shifts=2, dims=1)  # structure 1 moves by 2 voxels along axis 0
    same = registration_metrics(label, label, moving_label=shifted, label_ids=[1, 2, 3], hd95=True)
    assert same["labels"][0]["dice"] == 1.0 and same["labels"][1]["dice"] == 1.0
    assert np.isnan(same["labels"][2]["dice"]) and same["mean_dice"] == 1.0  # absent label: not counted
    assert same["labels"][0]["hd95"] == 0.0
    assert same["labels"][0]["dice_identity"] == pytest.approx(2 * 2 * 16 / (64 + 64))  # overlap 2 of 4 slices
    det = torch.ones(1, 10, 10, 10)
    det[0, 0, 0, :5] = -0.1
    assert registration_metrics(label, label, jacobian_det=det)["percent_non_positive_jacobian"] == pytest.approx(0.5)


@pytest.fixture(scope="module")
def small_pair(tmp_path_factory):
    return write_small_pair(tmp_path_factory.mktemp("pair"), factor=4)


def _zero_field_network(workflow):
    """Identity transform: the evaluation must then report exactly the identity metrics."""
    network = workflow.parser.get_parsed_content("network")
    torch.nn.init.zeros_(network.weight)


@pytest.mark.slow
def test_evaluate_identical_and_real_pair(small_pair, tmp_path):
    pairs = [
        {  # identical images and labels: Dice 1, HD95 0, SSIM 1, no folding
            "id": "identical",
            "moving_image": small_pair["fixed_image"],
            "fixed_image": small_pair["fixed_image"],
            "moving_label": small_pair["fixed_label"],
            "fixed_label": small_pair["fixed_label"],
        },
        {"id": "colin_to_mni", **small_pair},
    ]
    datalist = tmp_path / "pairs.json"
    datalist.write_text(json.dumps(pairs))
    out = tmp_path / "eval"
    run_bundle_workflow(
        ["inference.json", "evaluate.json"],
        **PLAIN_INFERENCE,
        prepare=_zero_field_network,
        datalist=str(datalist),
        output_dir=str(out),
        network="$torch.nn.Conv3d(2, 3, kernel_size=1, bias=False).to(@device)",
        ckpt_path=str(tmp_path / "none.pt"),
        network_scale=1.0,
    )
    identical = json.loads((out / "identical" / "metrics.json").read_text())
    assert identical["mean_dice"] == pytest.approx(1.0) and identical["mean_dice_identity"] == pytest.approx(1.0)
    assert identical["mean_hd95"] == pytest.approx(0.0)
    assert identical["ssim"] == pytest.approx(1.0, abs=1e-4)
    assert identical["percent_non_positive_jacobian"] == 0.0
    assert [r["label"] for r in identical["labels"]] == LABELS

    real = json.loads((out / "colin_to_mni" / "metrics.json").read_text())
    fixed = nib.load(small_pair["fixed_label"]).get_fdata()
    moving = nib.load(small_pair["moving_label"]).get_fdata()
    for row in real["labels"]:
        a, b = moving == row["label"], fixed == row["label"]
        expected = 2 * np.logical_and(a, b).sum() / (a.sum() + b.sum())
        assert row["dice"] == pytest.approx(expected, abs=1e-4)  # zero field: after == before
        assert row["dice_identity"] == pytest.approx(expected, abs=1e-4)
        assert row["hd95"] > 0  # different protocols: the boundaries differ
    assert 0.3 < real["mean_dice"] < 0.95 and real["ssim"] < 0.99
    with open(out / "colin_to_mni" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["label"]) for r in rows] == LABELS
    assert float(rows[0]["dice"]) == pytest.approx(real["labels"][0]["dice"])

    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_pairs"] == 2
    assert summary["mean_dice"]["mean"] == pytest.approx((1.0 + real["mean_dice"]) / 2)
    with open(out / "summary.csv") as f:
        assert [r["pair_id"] for r in csv.DictReader(f)] == ["identical", "colin_to_mni"]
