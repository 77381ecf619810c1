# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""The metrics of ``scripts.workflow.metrics`` (also the accuracy benchmark's): per-label Dice (counted from a confusion
count) against MONAI's ``compute_dice``, per-label HD95 (on each label's bounding box) against MONAI's
``compute_hausdorff_distance`` on the whole grid, on the shipped real label maps and on synthetic maps with absent and
one-sided labels; folding and SDlogJ of a Jacobian determinant on known values."""

from __future__ import annotations

import math

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import SAMPLE_PAIR
from monai.data import MetaTensor
from monai.metrics import compute_dice, compute_hausdorff_distance

from scripts.workflow.metrics import (
    dice_per_label,
    hd95_per_label,
    jacobian_statistics,
    label_confusions,
    label_indices,
    label_one_hot,
    percent_non_positive,
    present_labels,
    registration_metrics,
)


def _monai_dice(pred, reference, label_ids) -> list[float]:
    """The reference: MONAI's compute_dice on one-hot maps, NaN where a label is in neither map."""
    p, r = label_one_hot(pred, label_ids), label_one_hot(reference, label_ids)
    dice = compute_dice(p, r, include_background=True, ignore_empty=False)[0]
    dice[(p.sum(dim=(0, 2, 3, 4)) == 0) & (r.sum(dim=(0, 2, 3, 4)) == 0)] = float("nan")
    return [float(v) for v in dice]


def _assert_same(values, expected):
    assert len(values) == len(expected)
    for value, want in zip(values, expected):
        assert (math.isnan(value) and math.isnan(want)) or abs(value - want) <= 1e-6, (values, expected)


@pytest.fixture(scope="module")
def sample_labels():
    """The shipped seg8 maps of Colin27 and MNI152 (same 1 mm grid), every 2nd voxel: (1, 80, 96, 80) uint8."""
    read = lambda key: torch.as_tensor(np.asarray(nib.load(str(SAMPLE_PAIR[key])).dataobj))[None, ::2, ::2, ::2]
    return read("moving_label").contiguous(), read("fixed_label").contiguous()


def test_dice_matches_monai_on_the_shipped_labels(sample_labels):
    moving, fixed = sample_labels
    ids = list(range(1, 10))  # 9 is in neither map: NaN
    expected = _monai_dice(moving, fixed, ids)
    assert math.isnan(expected[-1]) and all(0.0 < v < 1.0 for v in expected[:-1])
    _assert_same(dice_per_label(moving, fixed, ids), expected)
    _assert_same(dice_per_label(moving.float(), MetaTensor(fixed.double()), ids), expected)  # float maps, MetaTensor
    _assert_same(dice_per_label(moving.numpy(), fixed.long(), ids[::-1]), expected[::-1])  # numpy, any order


def test_dice_with_absent_and_one_sided_labels():
    pred = torch.zeros(1, 9, 8, 7)
    reference = torch.zeros(1, 9, 8, 7)
    pred[0, 1:5, 1:5, 1:5] = 1.2  # rounds to 1
    reference[0, 2:6, 1:5, 1:5] = 1
    pred[0, 6:8, 6:8, 5:7] = 3  # only in pred
    reference[0, 0, 0, 0] = 2.6  # rounds to 3: one voxel of 3 in the reference too, no overlap
    reference[0, 8, 7, 6] = 5  # only in the reference
    ids = [1, 2, 3, 5, 1]  # 2 in neither map; a repeated id is reported again
    expected = _monai_dice(pred, reference, ids)
    values = dice_per_label(pred, reference, ids)
    _assert_same(values, expected)
    assert values[0] == pytest.approx(2 * 48 / 128) and math.isnan(values[1]) and values[2] == values[3] == 0.0


def test_dice_with_large_and_negative_ids():
    """Ids outside the counting table's range (FreeSurfer-like 2035, negative) go through the sorted search."""
    pred = torch.zeros(1, 6, 6, 6, dtype=torch.int32)
    reference = torch.zeros_like(pred)
    pred[0, :3] = 2035
    reference[0, 1:4] = 2035
    pred[0, 5, :2] = -4
    reference[0, 5, :3] = -4
    reference[0, 4, 0, 0] = 1 << 21
    ids = [-4, 2035, 7, 1 << 21]
    _assert_same(dice_per_label(pred, reference, ids), _monai_dice(pred, reference, ids))
    index = label_indices(pred, [2035, -4])
    assert index.shape == (216,) and set(index.tolist()) == {0, 1, 2}  # 1 = -4, 2 = 2035 (sorted ids)


def test_dice_rejects_bad_inputs():
    label = torch.zeros(1, 4, 4, 4)
    with pytest.raises(ValueError, match="shape"):
        dice_per_label(label, torch.zeros(1, 4, 4, 5), [1])
    with pytest.raises(ValueError, match=r"\(1, D, H, W\)"):
        dice_per_label(label[0], label[0], [1])
    with pytest.raises(ValueError, match="empty"):
        dice_per_label(label, label, [])


def test_confusions_counted_in_chunks_equal_one_whole_map_count(sample_labels):
    """A CT-sized map is compared a chunk at a time: even chunks, uneven ones and the whole map give the counts of one
    bincount over whole-map indices, for several maps against one reference."""
    moving, fixed = sample_labels
    warped = torch.roll(moving, shifts=2, dims=2).float()
    ids = [3, 1, 2, 5, 4, 6, 7, 8, 9]
    bins = len(set(ids)) + 1
    reference_index = label_indices(fixed, ids)
    whole = [torch.bincount(label_indices(m, ids) * bins + reference_index, minlength=bins * bins).reshape(bins, bins)
             for m in (warped, moving)]
    for chunk in (96 * 80 * 8, 100_003, 1 << 30):  # 10 even chunks, 7 uneven ones, the whole map
        counts = label_confusions(fixed, [warped, moving], ids, chunk_voxels=chunk)
        assert all(torch.equal(c, w) for c, w in zip(counts, whole)), chunk
    with pytest.raises(ValueError, match="chunk_voxels"):
        label_confusions(fixed, [moving], ids, chunk_voxels=0)


def test_percent_non_positive_in_chunks_is_the_whole_array_mean():
    det = np.random.default_rng(0).normal(1.0, 1.0, size=(1, 17, 13, 11)).astype(np.float32)
    det[0, 0, 0, :3] = [0.0, -0.0, np.nan]  # zeros count as folded, NaN does not (as det <= 0 says)
    expected = 100.0 * float((det.astype(np.float64) <= 0).mean())
    for chunk in (1, 1000, 1 << 30):
        assert percent_non_positive(det, chunk_voxels=chunk) == expected
    assert percent_non_positive(torch.from_numpy(det)) == expected
    with pytest.raises(ValueError, match="empty"):
        percent_non_positive(np.zeros((1, 0, 2, 2)))


def test_present_labels_counts_like_unique(sample_labels):
    moving, fixed = sample_labels
    assert present_labels(moving, None, fixed.float()) == list(range(1, 9))
    odd = torch.tensor([[[[0.0, 2.7, -3.5, 4096.0]]]])  # truncated like int(): 2, -3, 4096
    assert present_labels(odd) == [-3, 2, 4096]
    assert present_labels(torch.tensor([[[[0, 3, 1 << 22]]]])) == [3, 1 << 22]
    assert present_labels(torch.zeros(1, 2, 2, 2)) == [] and present_labels(torch.zeros(1, 0, 2, 2)) == []


def test_registration_metrics_dice_before_and_after(sample_labels):
    moving, fixed = sample_labels
    warped = torch.roll(moving, shifts=1, dims=1)
    metrics = registration_metrics(MetaTensor(fixed.float()), MetaTensor(warped.float()), moving_label=moving)
    assert metrics["label_ids"] == list(range(1, 9))
    _assert_same([row["dice"] for row in metrics["labels"]], _monai_dice(warped, fixed, metrics["label_ids"]))
    _assert_same([row["dice_identity"] for row in metrics["labels"]], _monai_dice(moving, fixed, metrics["label_ids"]))


def _monai_hd95(pred, reference, label_ids, spacing) -> list[float]:
    """The reference: MONAI's compute_hausdorff_distance on whole-grid one-hot maps, NaN where a map lacks the label."""
    p, r = label_one_hot(pred, label_ids), label_one_hot(reference, label_ids)
    hd = compute_hausdorff_distance(p, r, include_background=True, percentile=95, spacing=list(spacing))[0]
    hd[(p.sum(dim=(0, 2, 3, 4)) == 0) | (r.sum(dim=(0, 2, 3, 4)) == 0)] = float("nan")
    return [float(v) for v in hd]


def test_hd95_on_bounding_boxes_matches_monai_on_the_whole_grid(sample_labels):
    moving, fixed = sample_labels
    warped = torch.roll(moving, shifts=3, dims=1)  # wraps round: labels touching the grid's edge, boxes clipped there
    warped[warped == 5] = 0
    warped[0, :2, :2, :2] = 5  # a stray island far from label 5: the union of the boxes spans both
    ids, spacing = [7, 1, 2, 3, 4, 5, 6, 8, 9], (2.0, 2.4, 1.8)  # any order; 9 is in neither map
    cropped = hd95_per_label(warped, fixed, ids, spacing)
    _assert_same(cropped, _monai_hd95(warped, fixed, ids, spacing))
    _assert_same(hd95_per_label(warped, fixed, ids, spacing, crop_margin=None), cropped)
    assert cropped[ids.index(5)] > 40.0 and math.isnan(cropped[-1])  # HD95 sees the island; label 9: NaN
    _assert_same(hd95_per_label(fixed, warped, ids, spacing), cropped)  # symmetric


def _cube(shape, start, size=10, label=1) -> torch.Tensor:
    out = torch.zeros((1, *shape), dtype=torch.int16)
    out[(0, *(slice(s, s + size) for s in start))] = label
    return out


def test_hd95_of_a_cube_offset_by_3_voxels_is_3_voxels_in_mm():
    # a 10^3 cube and the same cube 3 voxels further along one axis: the far faces (20 % of the surface voxels) are
    # 3 voxels apart and nothing is further, so the 95th percentile is exactly 3 voxels, in mm of that axis
    shape, spacing = (30, 30, 30), (1.0, 1.0, 2.0)
    fixed = _cube(shape, (10, 10, 10))
    assert hd95_per_label(_cube(shape, (10, 10, 13)), fixed, [1], spacing) == [pytest.approx(6.0)]
    assert hd95_per_label(_cube(shape, (13, 10, 10)), fixed, [1], spacing) == [pytest.approx(3.0)]
    assert hd95_per_label(_cube(shape, (10, 10, 13)), fixed, [1]) == [pytest.approx(3.0)]  # no spacing: voxels
    assert hd95_per_label(fixed, fixed, [1], spacing) == [0.0]
    one_sided = hd95_per_label(fixed, _cube(shape, (0, 0, 0), size=5, label=2), [1, 2], spacing)
    assert all(math.isnan(v) for v in one_sided)  # each label is missing from one map
    with pytest.raises(ValueError, match="crop_margin"):
        hd95_per_label(fixed, fixed, [1], spacing, crop_margin=0)
    with pytest.raises(ValueError, match="differ in shape"):
        hd95_per_label(fixed, fixed[:, 1:], [1], spacing)
    with pytest.raises(ValueError, match="3 values"):
        hd95_per_label(fixed, fixed, [1], (1.0, 1.0))


def test_jacobian_statistics_known_values_and_mask():
    det = np.ones((4, 4, 4), np.float32)
    det[:2] = np.e  # half the voxels log det = 1, half 0: std 0.5
    stats = jacobian_statistics(torch.from_numpy(det)[None])
    assert stats["sdlogj"] == pytest.approx(0.5) and stats["percent_non_positive_jacobian"] == 0.0
    assert stats["det_min"] == 1.0 and stats["det_max"] == pytest.approx(np.e)
    mask = np.zeros_like(det, bool)
    mask[2:] = True
    assert jacobian_statistics(det, mask)["sdlogj"] == pytest.approx(0.0)
    det[0, 0, 0] = -1.0  # folded: counted, and its log clipped at log(1e-9) instead of NaN
    stats = jacobian_statistics(det)
    assert stats["percent_non_positive_jacobian"] == pytest.approx(100 / 64) and np.isfinite(stats["sdlogj"])
    assert jacobian_statistics(det, mask)["percent_non_positive_jacobian"] == 0.0
    with pytest.raises(ValueError, match="mask"):
        jacobian_statistics(det, mask[1:])
    with pytest.raises(ValueError, match="empty"):
        jacobian_statistics(det, np.zeros_like(mask))
