# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""Tests of the native-pair benchmark (bench.accuracy.native and the runner, pairs, methods, scoring and report it
shares with the folder benchmark): the person split of brain_mal2012, the scoring (the bundle's Dice, HD95, SDlogJ,
folding, over the classes present in both maps), resampling through world coordinates, the crop, the task order, the
resumable runner and its memory measurement, and the HD95 rescoring of an existing results JSON.

No ANTs is needed; the volumes are crops of the shipped real Colin27 -> MNI152 labels (<= 40^3), seconds in all.
"""

import json
import sys

import nibabel as nib
import numpy as np
import pytest
from conftest import REPO_ROOT, SAMPLE_PAIR

if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench.accuracy.io import resample_to_grid
from bench.accuracy.methods import METHODS, task_order
from bench.accuracy.native_rescore import rescore
from bench.accuracy.pairs import NativePair, crop_to_foreground, prealigned_pair
from bench.accuracy.runner import load_report, reuse_prealigned, run_native, run_task, task_command
from bench.accuracy.scoring import dice_per_class, hd95_per_class, hd95_summary, jacobian_stats, score_labels
from bench.accuracy.native_split import (
    PEOPLE,
    SPLIT_PATH,
    build_split_document,
    check_split,
    load_split,
    make_split,
    test_pairs,
)

# 40^3 crop of the shipped MNI152 seg8 map around the deep grey matter: classes 1-7 occur in it
CROP = (slice(60, 100), slice(80, 120), slice(50, 90))


def _real_labels() -> np.ndarray:
    return np.asanyarray(nib.load(str(SAMPLE_PAIR["fixed_label"])).dataobj)[CROP].astype(np.int16)


# ---------------------------------------------------------------- split


def test_split_by_person_keeps_rescans_together_and_is_stored():
    doc = load_split(SPLIT_PATH)
    assert doc == json.loads(json.dumps(build_split_document()))  # the stored split is the one the rules give
    parts = [set(doc[p]) for p in ("train", "tuning", "test")]
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    assert set().union(*parts) == set(PEOPLE) and len(PEOPLE) == 20
    scans = {p: set(doc["scans"][p]) for p in ("train", "tuning", "test")}
    assert sum(len(s) for s in scans.values()) == 23
    for first, rescan in (("1005", "1025"), ("1018", "1038"), ("1019", "1039")):
        holding = [p for p, s in scans.items() if first in s or rescan in s]
        assert len(holding) == 1 and {first, rescan} <= scans[holding[0]]
    # every part holds exactly one test-retest person
    assert all(len(doc["retest_pairs"][p]) == 1 for p in ("train", "tuning", "test"))


def test_test_pairs_are_inter_subject_from_the_test_part_only():
    doc = load_split(SPLIT_PATH)
    pairs = [(p["moving"], p["fixed"]) for p in doc["test_pairs"]]
    assert len(pairs) >= 10 and len(set(pairs)) == len(pairs)
    person_of = {s: p for p, scans in PEOPLE.items() for s in scans}
    for moving, fixed in pairs:
        assert person_of[moving] != person_of[fixed]
        assert person_of[moving] in doc["test"] and person_of[fixed] in doc["test"]
    assert test_pairs(["1", "3", "2"]) == [("2", "1"), ("3", "1"), ("3", "2")]


def test_check_split_rejects_a_person_in_two_parts_or_a_separated_rescan():
    split = make_split()
    bad = {**split, "test": split["test"] + [split["train"][0]]}
    with pytest.raises(ValueError, match="in both"):
        check_split(bad)
    doc = build_split_document()
    moved = {k: list(v) for k, v in doc["scans"].items()}
    rescan = next(s for s in moved["test"] if s in ("1025", "1038", "1039"))
    moved["test"].remove(rescan)
    moved["train"].append(rescan)
    with pytest.raises(ValueError, match="do not match"):
        check_split({**doc, "scans": moved})
    assert make_split(seed=7) != split  # the seed matters, so the stored seed is what fixes the split


# ---------------------------------------------------------------- scoring


def test_dice_matches_a_direct_count_on_real_labels():
    fixed = _real_labels()
    warped = np.roll(fixed, 2, axis=0)
    scores = dice_per_class(fixed, warped, [1, 2, 3, 9])
    for lab in (1, 2, 3):
        a, b = fixed == lab, warped == lab
        assert scores[lab] == pytest.approx(2 * (a & b).sum() / (a.sum() + b.sum()))
    assert np.isnan(scores[9])  # in neither map
    assert dice_per_class(fixed, fixed, [1, 2])[1] == 1.0
    with pytest.raises(ValueError, match="one grid"):
        dice_per_class(fixed, fixed[1:], [1])


def test_score_labels_uses_classes_present_in_both_inputs():
    fixed = _real_labels()
    moving = fixed.copy()
    moving[moving == 3] = 0  # class 3 missing from the moving map: not scored
    result = score_labels(fixed, moving, fixed)
    assert 3 not in result["classes"] and set(result["classes"]) <= set(range(1, 15))
    assert result["dice_mean"] == 1.0 and result["dice_subcortical"] == 1.0


def _cube(shape, start, size=10, label=1) -> np.ndarray:
    out = np.zeros(shape, np.int16)
    out[tuple(slice(s, s + size) for s in start)] = label
    return out


def test_score_labels_hd95_of_a_cube_offset_by_3_voxels_is_3_voxels_in_mm():
    # a 10^3 cube and the same cube 3 voxels further along z (2 mm voxels): HD95 exactly 6 mm (the bundle's metric,
    # tests/test_metrics.py); score_labels takes it per Dice class, keyed like dice_per_class, and their mean
    shape, spacing = (30, 30, 30), (1.0, 1.0, 2.0)
    two = _cube(shape, (10, 10, 10)) + _cube(shape, (0, 0, 0), size=5, label=2)
    moved = _cube(shape, (10, 10, 13)) + _cube(shape, (0, 0, 0), size=5, label=2)
    scored = score_labels(two, two, moved, spacing=spacing)
    assert scored["hd95_per_class"] == {"1": pytest.approx(6.0), "2": 0.0} and scored["hd95_mean"] == pytest.approx(3.0)
    assert "hd95_mean" not in score_labels(two, two, moved)  # no spacing, no HD95 (as before)


def test_hd95_is_nan_for_a_class_missing_from_one_map_and_left_out_of_the_mean():
    fixed = _real_labels()
    warped = fixed.copy()
    warped[warped == 2] = 0  # class 2 scored (in fixed and moving) but lost by the warp: Dice 0, HD95 NaN
    scored = score_labels(fixed, fixed, warped, spacing=(1.0, 1.0, 1.0))
    assert scored["dice_per_class"]["2"] == 0.0 and np.isnan(scored["hd95_per_class"]["2"])
    others = [v for c, v in scored["hd95_per_class"].items() if c != "2"]
    assert scored["hd95_mean"] == 0.0 and others == [0.0] * len(others)
    assert np.isnan(hd95_per_class(fixed, warped, [14], (1.0, 1.0, 1.0))[14])  # in neither map
    assert np.isnan(hd95_summary(fixed, 0 * fixed, [1, 2], (1.0, 1.0, 1.0))["hd95_mean"])  # no class: NaN mean


def test_sdlogj_and_folding_known_values_and_mask():
    det = np.ones((4, 4, 4), np.float32)
    det[:2] = np.e  # half the voxels log det = 1, half 0: std 0.5
    stats = jacobian_stats(det)
    assert stats["sdlogj"] == pytest.approx(0.5) and stats["fold_pct"] == 0.0
    mask = np.zeros_like(det, bool)
    mask[2:] = True
    assert jacobian_stats(det, mask)["sdlogj"] == pytest.approx(0.0)
    det[0, 0, 0] = -1.0  # folded: counted, and its log clipped at log(1e-9) instead of NaN
    stats = jacobian_stats(det)
    assert stats["fold_pct"] == pytest.approx(100 / 64) and np.isfinite(stats["sdlogj"])
    assert jacobian_stats(det, mask)["fold_pct"] == 0.0
    with pytest.raises(ValueError, match="mask"):
        jacobian_stats(det, mask[1:])


# ---------------------------------------------------------------- world-coordinate resampling and crop


def test_resample_through_world_coordinates_recovers_a_flip_and_shift():
    labels = _real_labels()
    ras = np.diag([1.0, 1.0, 1.0, 1.0])
    ras[:3, 3] = (-20.0, -30.0, 5.0)
    # the same voxels stored flipped along x (LAS) and with the origin moved: a different grid, the same world
    las = ras.copy()
    las[0, 0] = -1.0
    las[0, 3] = ras[0, 3] + labels.shape[0] - 1
    flipped = labels[::-1].copy()
    back = resample_to_grid(flipped, las, labels.shape, ras, order=0)
    np.testing.assert_array_equal(back, labels)
    # a target grid 3 voxels further along y sees the labels shifted by 3 voxels, zeros past the edge
    shifted_affine = ras.copy()
    shifted_affine[1, 3] += 3.0
    shifted = resample_to_grid(labels, ras, labels.shape, shifted_affine, order=0, chunk=7)
    np.testing.assert_array_equal(shifted[:, :-3], labels[:, 3:])
    assert not shifted[:, -3:].any()


def test_crop_keeps_world_positions(tmp_path):
    labels = np.zeros((40, 40, 40), np.uint8)
    labels[5:35, 8:30, 10:33] = _real_labels()[5:35, 8:30, 10:33]
    image = np.zeros((40, 40, 40), np.float32)
    image[5:35, 8:30, 10:33] = 100.0  # foreground box (the labels alone have holes: seg8 has no white-matter class)
    affine = np.array([[-1.0, 0, 0, 20], [0, 0, 1, -30], [0, -1, 0, 40], [0, 0, 0, 1]])  # LIA, like FreeSurfer
    nib.save(nib.Nifti1Image(image, affine), tmp_path / "s_t1.nii.gz")
    nib.save(nib.Nifti1Image(labels, affine), tmp_path / "s_seg14.nii.gz")
    _, lab_c, box = crop_to_foreground(
        tmp_path / "s_t1.nii.gz", tmp_path / "s_seg14.nii.gz", tmp_path / "crop", margin=2
    )
    assert box == [[3, 37], [6, 32], [8, 35]]
    cropped = nib.load(str(lab_c))
    back = resample_to_grid(np.asanyarray(cropped.dataobj), cropped.affine, labels.shape, affine, order=0)
    np.testing.assert_array_equal(back, labels)


# ---------------------------------------------------------------- order and resumable runner


def _pair(tmp_path, name="p") -> NativePair:
    labels = _real_labels()
    affine = np.eye(4)
    for stem, data, aff in (("f", labels, affine), ("m", np.roll(labels, 1, axis=2), affine)):
        nib.save(nib.Nifti1Image(data.astype(np.float32), aff), tmp_path / f"{stem}_t1.nii.gz")
        nib.save(nib.Nifti1Image(data.astype(np.uint8), aff), tmp_path / f"{stem}_seg14.nii.gz")
    return NativePair(
        name, *(str(tmp_path / f) for f in ("f_t1.nii.gz", "m_t1.nii.gz", "f_seg14.nii.gz", "m_seg14.nii.gz")), "test"
    )


def test_task_order_does_identity_and_affine_on_every_pair_first(tmp_path):
    pairs = [_pair(tmp_path, "a"), _pair(tmp_path, "b")]
    tasks = [
        (p.name, m.name)
        for p, m in task_order(pairs, ["ants_synonly_60_30_10", "ants_syn_60_30_10", "identity", "ants_affine"])
    ]
    assert tasks == [
        ("a", "identity"),
        ("a", "ants_affine"),
        ("b", "identity"),
        ("b", "ants_affine"),
        ("a", "ants_syn_60_30_10"),
        ("b", "ants_syn_60_30_10"),
        ("a", "ants_synonly_60_30_10"),
        ("b", "ants_synonly_60_30_10"),
    ]
    aligned = prealigned_pair(pairs[0], tmp_path / "pre")
    assert aligned.fixed_image == pairs[0].fixed_image and aligned.moving_label.endswith("moving_seg14_affine.nii.gz")
    argv, _ = METHODS["ants_syn_60_30_10"].command(pairs[0], tmp_path / "o", seed=3)
    assert argv[argv.index("--reg_iterations") + 1] == "60,30,10" and argv[argv.index("--random_seed") + 1] == "3"
    with pytest.raises(ValueError, match="unknown method"):
        task_order(pairs, ["nope"])


def test_plain_inference_methods_switch_off_every_optimisation(tmp_path):
    for name in ("bundle_register_it0", "bundle_native_it0"):  # one forward pass: no instance optimisation, no refinement
        argv, _ = METHODS[name].command(_pair(tmp_path), tmp_path / "o", seed=1)
        assert argv[argv.index("--iterations") + 1] == "0" and argv[argv.index("--refine_iterations") + 1] == "0"


def test_candidate_weights_reach_the_bundle_methods_only(tmp_path):
    pair = _pair(tmp_path)
    bundle, _ = task_command(METHODS["bundle_register_it0"], pair, tmp_path / "o", tmp_path / "p", 1, "/w/model.pt")
    assert bundle[bundle.index("--weights") + 1] == "/w/model.pt" and "--affine" in bundle
    shipped, _ = task_command(METHODS["bundle_register"], pair, tmp_path / "o", tmp_path / "p", 1, None)
    assert "--weights" not in shipped
    affine, _ = task_command(METHODS["ants_affine"], pair, tmp_path / "o", tmp_path / "p", 1, "/w/model.pt")
    assert "--weights" not in affine and affine[affine.index("--prealigned_dir") + 1] == str(tmp_path / "p")


@pytest.mark.slow
def test_runner_scores_identity_and_resumes_without_rerunning(tmp_path):
    pair = _pair(tmp_path)
    out = tmp_path / "out"
    report = run_native([pair], ["identity", "identity_after_affine"], out, threads=1, seed=1, argv=[])
    first = {r["method"]: r for r in report["results"]}
    assert set(first) == {"identity"}  # identity_after_affine waits for ants_affine
    labels = _real_labels()
    expected = score_labels(labels, labels, np.roll(labels, 1, axis=2))["dice_mean"]
    assert first["identity"]["status"] == "ok" and first["identity"]["dice_mean"] == pytest.approx(expected)
    assert first["identity"]["cpu_s"] > 0 and first["identity"]["peak_rss_mib"] > 0
    expected_hd = score_labels(labels, labels, np.roll(labels, 1, axis=2), spacing=(1.0, 1.0, 1.0))
    assert expected_hd["hd95_mean"] > 0 and first["identity"]["hd95_mean"] == pytest.approx(expected_hd["hd95_mean"])
    assert first["identity"]["hd95_per_class"].keys() == first["identity"]["dice_per_class"].keys()
    again = run_native([pair], ["identity"], out, threads=1, seed=1, argv=[])
    assert again["results"][0]["finished_utc"] == first["identity"]["finished_utc"]  # skipped, not rerun
    saved = load_report(out / "results.json")
    assert len(saved["runs"]) == 2 and len(saved["results"]) == 1 and "loadavg_1min" in saved["runs"][0]


def test_run_task_measures_the_method_not_the_runner(tmp_path):
    # the runner holds 300 MiB; a method started straight from it would report at least that as its peak RSS
    held = np.ones(300 * 2**20 // 8)
    script = "import sys; sys.stdout.write('hello'); sys.exit(3)"
    measured = run_task([sys.executable, "-c", script], tmp_path, threads=1, log_path=tmp_path / "m.log")
    assert measured["returncode"] == 3 and (tmp_path / "m.log").read_text() == "hello"
    assert 0 < measured["peak_rss_mib"] < 150 and held.sum() > 0  # a bare interpreter, not the runner's 300 MiB
    assert measured["command"][-1] == script and not list(tmp_path.glob("*.usage.json*"))
    allocating = "import numpy; a = numpy.ones(200 * 2**20 // 8); a.sum()"  # the method's own memory is seen
    assert run_task([sys.executable, "-c", allocating], tmp_path, 1, tmp_path / "a.log")["peak_rss_mib"] > 200


def test_report_means_over_the_mal_pairs_and_keeps_the_freesurfer_pair_apart():
    from bench.accuracy.report import render_native

    def rec(pair, method, dice, **extra):
        base = {"pair": pair, "method": method, "status": "ok", "dice_mean": dice, "dice_subcortical": dice}
        base.update(hd95_mean=10 * (1 - dice), hd95_per_class={"1": 10 * (1 - dice)})
        return {**base, "dice_per_class": {"1": dice}, "wall_s": 10.0, "cpu_s": 8.0, "peak_rss_mib": 100.0, **extra}

    pairs = {
        "fs": {"source": "brain_freesurfer_native", "note": ""},
        "a": {"source": "brain_mal2012", "note": "inter-subject test pair"},
        "b": {"source": "brain_mal2012", "note": "inter-subject test pair"},
    }
    results = [rec("fs", "identity", 0.9), rec("a", "identity", 0.2), rec("b", "identity", 0.4)]
    results += [rec("a", "ants_syn_60_30_10", 0.8, fold_pct=0.0, sdlogj=0.3)]
    results += [{"pair": "b", "method": "ants_syn_60_30_10", "status": "failed", "reason": "exit 1"}]
    run_info = {"started_utc": "t", "cpu": "c", "cpu_count": 2, "threads_per_method": 2, "loadavg_1min": 1.0}
    text = render_native(
        {"pairs": pairs, "results": results, "runs": [{**run_info, "nice": 10, "git_commit": "x", "versions": {}}]}
    )
    rows = {line.split(" | ")[0]: line for line in text.splitlines() if line.startswith("| ")}
    assert "| identity (world coordinates) | 2 | 0.300 | 7.00 |" in text  # fs (0.9) not in the mal mean
    assert "| method | pairs | Dice (14) | HD95 (mm) | Dice subcortical |" in text
    assert rows["| ANTs SyN (60,30,10)"].split(" | ")[1:6] == ["1", "0.800", "2.00", "0.800", "0.800"]
    assert "failed: b / ants_syn_60_30_10" in text
    assert "| a | 8.00 | 2.00 |" in text and "| 1 thalamus | 7.00 | 2.00 |" in text  # HD95 per pair and per class
    # a document scored before HD95 was recorded: "—" in the column, no HD95 tables
    for r in results:
        r.pop("hd95_mean", None), r.pop("hd95_per_class", None)
    old = render_native({"pairs": pairs, "results": results, "runs": []})
    assert "| identity (world coordinates) | 2 | 0.300 | — |" in old and "HD95 (mm) per" not in old


def test_report_of_a_whole_head_document_means_each_kind_of_input_apart():
    """A document without brain_mal2012 pairs (whole heads + their stripped twins) gets one means table per kind."""
    from bench.accuracy.report import render_native

    def rec(pair, method, dice):
        return {"pair": pair, "method": method, "status": "ok", "dice_mean": dice, "dice_subcortical": dice,
                "dice_per_class": {"1": dice}, "wall_s": 10.0, "cpu_s": 8.0, "peak_rss_mib": 100.0}

    pairs = {
        "head_ab": {"source": "brain_freesurfer_head", "note": "whole heads"},
        "brain_ab": {"source": "brain_freesurfer_head", "note": "stripped brains"},
        "head_ba": {"source": "brain_freesurfer_head", "note": "whole heads"},
    }
    results = [rec("head_ab", "bundle_default", 0.8), rec("head_ba", "bundle_default", 0.6)]
    results += [rec("brain_ab", "bundle_default", 0.9), rec("head_ab", "bundle_default_masks", 0.85)]
    text = render_native({"pairs": pairs, "results": results, "runs": []})
    assert "brain_mal2012" not in text  # no empty mal2012 tables
    heads, brains = text.split("### brain_freesurfer_head: whole heads")[1].split("### brain_freesurfer_head: stripped")
    assert "| bundle register (default) | 2 | 0.700 |" in heads  # the mean of the two heads only
    assert "| bundle register (default) with brain masks | 1 | 0.850 |" in heads
    assert "| bundle register (default) | 1 | 0.900 |" in brains.split("### Dice")[0]


def test_box_plot_covers_only_the_pairs_every_method_finished(tmp_path):
    from bench.accuracy.native_boxplot import common_pairs, plot

    def record(pair, method, dice, status="ok"):
        return {"pair": pair, "method": method, "status": status, "dice_mean": dice,
                "dice_per_class": {str(c): dice for c in range(1, 15)}}

    report = {
        "pairs": {"a": {}, "b": {}, "c": {}},
        "results": [record("a", "m1", 0.7), record("a", "m2", 0.8), record("b", "m1", 0.6),
                    record("b", "m2", 0.9, status="failed"), record("c", "m1", 0.5), record("c", "m2", 0.6)],
    }
    assert common_pairs(report, ["m1", "m2"]) == ["a", "c"]
    png = tmp_path / "box.png"
    assert plot(report, ["m1", "m2"], png) == ["a", "c"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and not list(tmp_path.glob("*.partial*"))
    with pytest.raises(ValueError, match="no pair"):
        plot(report, ["m1", "m3"], png)


def test_candidate_weights_reuse_the_same_prealigned_inputs(tmp_path):
    pair = _pair(tmp_path)
    source, out = tmp_path / "source", tmp_path / "candidate"
    (source / "prealigned" / pair.name).mkdir(parents=True)
    (source / "prealigned" / pair.name / "moving_t1_affine.nii.gz").write_bytes(b"aligned")
    records = [{"pair": pair.name, "method": m, "status": "ok"} for m in ("ants_affine", "identity_after_affine")]
    records.append({"pair": pair.name, "method": "bundle_register", "status": "ok"})
    source_report = {"runs": [], "pairs": {pair.name: pair.as_dict()}, "methods": {"ants_affine": {}}, "results": records}
    (source / "results.json").write_text(json.dumps(source_report))
    assert reuse_prealigned(source, out, [pair.name, "not_in_source"]) == [pair.name]
    copied = load_report(out / "results.json")
    assert {r["method"] for r in copied["results"]} == {"ants_affine", "identity_after_affine"}  # not the bundle's
    assert (out / "prealigned" / pair.name / "moving_t1_affine.nii.gz").read_bytes() == b"aligned"
    listed = json.loads((out / "prealigned" / "datalist.json").read_text())["pairs"]
    assert [e["id"] for e in listed] == [pair.name] and listed[0]["moving_image"].startswith(str(out))
    assert reuse_prealigned(source, out, [pair.name]) == []  # already there: nothing copied again


def _scored_out(tmp_path):
    """An OUT folder like the runner leaves it, scored before HD95 was recorded: an identity row (ok), a failed row,
    a row that already has HD95 and an ok row reused from another run's folder."""
    pair = _pair(tmp_path)
    out, other = tmp_path / "out", tmp_path / "other"
    fixed = np.asanyarray(nib.load(pair.fixed_label).dataobj).astype(np.int16)
    moving = np.asanyarray(nib.load(pair.moving_label).dataobj).astype(np.int16)
    rows = []
    for folder, method, warped in ((out, "identity", moving), (other, "ants_affine", np.roll(moving, -1, axis=2))):
        (folder / pair.name / method).mkdir(parents=True)
        target = folder / pair.name / method / "warped_label.nii.gz"
        nib.save(nib.Nifti1Image(warped.astype(np.uint8), np.eye(4)), target)
        rows.append({"pair": pair.name, "method": method, "status": "ok", "finished_utc": method,
                     **score_labels(fixed, moving, warped)})
    rows[1]["reused_from"] = str(other)
    rows.append({"pair": pair.name, "method": "ants_syn_60_30_10", "status": "failed", "reason": "exit 1"})
    rows.append({"pair": pair.name, "method": "bundle_default", "status": "ok", "dice_mean": 0.5, "hd95_mean": 1.5})
    report = {"runs": [{"started_utc": "t"}], "pairs": {pair.name: pair.as_dict()}, "methods": {}, "results": rows}
    (out / "results.json").write_text(json.dumps(report, indent=2))
    return out, report, fixed, moving


def test_rescore_adds_only_hd95_fields_and_skips_done_rows(tmp_path):
    out, before, fixed, moving = _scored_out(tmp_path)
    messages = []
    after = rescore(out, ["test"], log=messages.append)
    assert after == json.loads((out / "results.json").read_text())
    assert messages[0].endswith("2 row(s) to score, 2 done or not ok")
    old, new = before["results"], after["results"]
    for row in new[:2]:  # the two ok rows: only hd95_mean and hd95_per_class added, nothing else changed
        assert set(row) - set(old[new.index(row)]) == {"hd95_mean", "hd95_per_class"}
        assert {k: v for k, v in row.items() if not k.startswith("hd95_")} == old[new.index(row)]
    expected = hd95_summary(fixed, moving, new[0]["classes"], (1.0, 1.0, 1.0))
    assert new[0]["hd95_per_class"] == expected["hd95_per_class"] and new[0]["hd95_mean"] > 0
    assert np.isfinite(new[1]["hd95_mean"])  # found in the run it was reused from
    assert new[2:] == old[2:]  # failed row untouched, the row already scored keeps its value
    assert {k: v for k, v in after.items() if k != "rescores"} == {**before, "results": new}
    assert len(after["rescores"]) == 1 and after["rescores"][0]["added"] == ["hd95_mean", "hd95_per_class"]
    text = (out / "results.json").read_text()
    again = rescore(out, ["test"], log=messages.append)  # resumed: nothing left, the file is not rewritten
    assert messages[-1].endswith("0 row(s) to score, 4 done or not ok")
    assert again == after and (out / "results.json").read_text() == text


def test_rescore_refuses_files_that_do_not_reproduce_the_stored_dice(tmp_path):
    out, before, _, moving = _scored_out(tmp_path)
    path = out / before["results"][0]["pair"] / "identity" / "warped_label.nii.gz"
    nib.save(nib.Nifti1Image(np.roll(moving, 2, axis=0).astype(np.uint8), np.eye(4)), path)  # not what was scored
    messages = []
    with pytest.raises(RuntimeError, match="1 row"):
        rescore(out, ["test"], log=messages.append)
    saved = json.loads((out / "results.json").read_text())["results"]
    assert "hd95_mean" not in saved[0] and "hd95_mean" in saved[1]  # the bad row left alone, the others done
    assert any("does not reproduce the stored Dice" in m for m in messages)


# ---------------------------------------------------------------- whole heads


def test_seg14_from_aseg_merges_left_and_right_and_drops_every_other_id():
    from bench.accuracy.cfmi_heads import SEG14_FROM_ASEG, seg14_from_aseg

    aseg = np.array([[0, 10, 49, 2, 41], [3, 42, 16, 24, 1000]], dtype=np.int16)  # 24 = CSF, 1000 = a cortex parcel
    assert seg14_from_aseg(aseg).tolist() == [[0, 1, 1, 14, 14], [10, 10, 13, 0, 0]]
    ids = [i for pair in SEG14_FROM_ASEG.values() for i in pair]
    assert sorted(SEG14_FROM_ASEG) == list(range(1, 15)) and len(ids) == len(set(ids))  # no aseg id in two classes


def test_whole_head_parts_are_split_by_person(tmp_path):
    """Tuning, test and the original two people share nobody; every pair is inter-subject; a part whose files were
    not built says how to build them."""
    from bench.accuracy.pairs import HEAD_PAIRS, whole_head_pairs

    people = {part: {p for pair in pairs for p in pair} for part, pairs in HEAD_PAIRS.items()}
    assert all(m != f for pairs in HEAD_PAIRS.values() for m, f in pairs)
    parts = list(people)
    for i, a in enumerate(parts):
        for b in parts[i + 1:]:
            assert not people[a] & people[b], (a, b)
    with pytest.raises(FileNotFoundError, match="cfmi_heads"):
        whole_head_pairs(tmp_path, tmp_path / "out", head_data=tmp_path, part="tuning")
    with pytest.raises(ValueError, match="unknown whole-head part"):
        whole_head_pairs(tmp_path, tmp_path / "out", part="validation")


def test_whole_head_pairs_read_the_given_folder_and_write_masks(tmp_path):
    from bench.accuracy.pairs import HEAD_PAIRS, whole_head_pairs

    grid = np.eye(4)
    for person in {p for pair in HEAD_PAIRS["test"] for p in pair}:
        brain = np.zeros((6, 6, 6), np.uint8)
        brain[1:4, 1:4, 1:4] = 50
        for kind, data in (("head_t1", brain + 10), ("brain_t1", brain), ("seg14", (brain > 0).astype(np.uint8))):
            nib.save(nib.Nifti1Image(data, grid), str(tmp_path / f"cfmi-{person}_{kind}.nii.gz"))
    pairs = whole_head_pairs(tmp_path / "unused", tmp_path / "out", head_data=tmp_path, part="test")
    assert [p.name for p in pairs][:2] == ["head_sub06_to_sub07", "brain_sub06_to_sub07"] and len(pairs) == 6
    head = pairs[0]
    assert head.note.endswith("test people") and head.fixed_mask and head.moving_mask
    mask = np.asanyarray(nib.load(head.fixed_mask).dataobj)
    assert mask.sum() == 27 and mask.dtype == np.uint8  # the stripped brain > 0
