# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""The training-data recipe of the shipped weights (bench/training/prepare_mal2012.py): which scans it may read and
which pairs it builds. No registration runs here."""

import itertools
import json
import sys

from conftest import REPO_ROOT

if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench.training.prepare_mal2012 import OASIS_SUBJECTS, SPLIT_FILE, TUNING_PAIRS, training_entries


def test_training_and_validation_scans_never_include_test_people():
    split = json.loads(SPLIT_FILE.read_text())
    test_scans = set(split["scans"]["test"])
    assert not test_scans & set(split["scans"]["train"])
    validation_scans = set(itertools.chain.from_iterable(TUNING_PAIRS))
    assert validation_scans <= set(split["scans"]["tuning"]) and not validation_scans & test_scans


def test_training_pairs_stay_within_one_space(tmp_path):
    scans = [{"image": f"/aligned/mal{i}.nii.gz", "label": f"/aligned/mal{i}_seg.nii.gz"} for i in range(3)]
    entries = training_entries(scans, tmp_path)
    assert len(entries) == 3 * 2 + len(OASIS_SUBJECTS) * (len(OASIS_SUBJECTS) - 1)
    assert all(e["moving_image"] != e["fixed_image"] for e in entries)
    aligned = {s["image"] for s in scans}
    for entry in entries:  # never an aligned mal2012 scan paired with an OASIS subject (another space)
        assert (entry["moving_image"] in aligned) == (entry["fixed_image"] in aligned)
    assert all(set(e) == {"moving_image", "fixed_image"} for e in entries)  # unsupervised: no labels


def test_training_log_summary_keeps_complete_epochs_and_validations():
    from bench.training.training_log import summarise

    lines = []
    for epoch, losses in ((1, (-0.2, -0.4)), (2, (-0.5, -0.7)), (3, (-0.9,))):  # epoch 3 stopped after one iteration
        for i, loss in enumerate(losses, 1):
            lines.append(f"2026-12-02 03:0{epoch}:0{i},123 - INFO - Epoch: {epoch}/5, Iter: {i}/2 -- train_loss: {loss} ")
    lines.append("2026-12-02 03:02:09,000 - INFO - Epoch[2] Metrics -- val_mean_dice: 0.7415 ")
    summary = summarise("\n".join(lines))
    assert [(e["epoch"], e["mean_loss"]) for e in summary["epochs"]] == [(1, -0.3), (2, -0.6)]
    assert summary["validation"] == [{"epoch": 2, "val_mean_dice": 0.7415}]
    assert summary["training_minutes"] == 2.0 and summary["max_epochs"] == 5 and summary["epoch_length"] == 2


def test_labelled_pairs_carry_both_label_maps_of_the_same_scans():
    from bench.training.prepare_mal2012 import labelled_entries

    scans = [{"image": f"/aligned/mal{i}.nii.gz", "label": f"/aligned/mal{i}_seg.nii.gz"} for i in range(3)]
    entries = labelled_entries(scans)
    assert len(entries) == 3 * 2
    for entry in entries:  # each label map belongs to its own image, never the other scan's
        assert entry["moving_label"] == entry["moving_image"].replace(".nii.gz", "_seg.nii.gz")
        assert entry["fixed_label"] == entry["fixed_image"].replace(".nii.gz", "_seg.nii.gz")
        assert entry["moving_image"] != entry["fixed_image"]


def test_resumed_run_counts_a_repeated_epoch_once_and_no_gap():
    from bench.training.training_log import summarise_segments

    def line(minute, epoch, i, loss):
        return f"2026-12-02 04:{minute:02d}:00,000 - INFO - Epoch: {epoch}/3, Iter: {i}/2 -- train_loss: {loss} "

    first = [line(0, 1, 1, -0.1), line(1, 1, 2, -0.3), line(2, 2, 1, -9.0)]  # stopped inside epoch 2
    second = [line(30, 2, 1, -0.4), line(31, 2, 2, -0.6), "2026-12-02 04:31:05,000 - INFO - Epoch[2] Metrics -- val_mean_dice: 0.75 "]
    summary = summarise_segments(["\n".join(first), "\n".join(second)])
    assert [(e["epoch"], e["mean_loss"]) for e in summary["epochs"]] == [(1, -0.2), (2, -0.5)]
    assert summary["training_minutes"] == 3.0  # 2 + 1 minutes, not the 31 from first to last line
    assert summary["validation"] == [{"epoch": 2, "val_mean_dice": 0.75}] and len(summary["segments"]) == 2
