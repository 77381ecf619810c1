"""Cohort building blocks on real files: lazy screening (an atlas read once), the definition of a complete pair,
interrupted folders, sharding over ranks, and datalists of an atlas and its subjects."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from reliability_data import DecodeCounter, cohort_record, load_sample, loading_transforms, run_pairs, save, small_pair

from scripts.io.outputs import (
    ABSENT,
    COMPLETE,
    FOREIGN,
    IN_PROGRESS_MARKER,
    INTERRUPTED,
    clear_interrupted_outputs,
    expected_pair_outputs,
    mark_in_progress,
    pair_output_state,
    pair_outputs_complete,
)
from scripts.io.datalist import cli_datalist_overrides, inference_pairs
from scripts.io.errors import RegistrationInputError
from scripts.io.devices import check_launch, rank_share
from scripts.workflow.cohort import CohortDataset, CohortRecord

OUTPUT_NAMES = ["warped_image.nii.gz", "ddf.nii.gz", "warped_label.nii.gz", "jacobian_det.nii.gz", "affine.mat",
                "metrics.json", "metrics.csv", "summary.json", "summary.csv"]


@pytest.fixture()
def atlas_study(tmp_path):
    """The real Colin27 volume as an atlas and three subjects (the MNI152 volume under three names)."""
    files = small_pair(tmp_path / "data")
    subjects = []
    for i in range(3):
        target = tmp_path / "data" / f"subject{i}.nii.gz"
        shutil.copy(files["fixed_image"], target)
        subjects.append(str(target))
    return files, subjects


def test_nothing_is_read_before_a_pair_is_reached(tmp_path, monkeypatch):
    pairs = [{"moving_image": str(tmp_path / f"m{i}.nii.gz"), "fixed_image": str(tmp_path / "f.nii.gz"),
              "pair_id": f"p{i}"} for i in range(500)]
    counter = DecodeCounter(monkeypatch)
    record = cohort_record(pairs, tmp_path / "out")  # 500 missing files: not even looked at yet
    assert len(record.pairs) == 500 and not record.failed and not counter.counts
    assert run_pairs(pairs, loading_transforms(), tmp_path / "out", record) == []
    assert [b["pair_id"] for b in record.failed] == [f"p{i}" for i in range(500)]
    assert "does not exist" in record.failed[7]["error"] and not counter.counts


def test_an_atlas_shared_by_every_pair_is_decoded_once(atlas_study, tmp_path, monkeypatch):
    files, subjects = atlas_study
    pairs = [{"moving_image": files["moving_image"], "moving_label": files["moving_label"], "fixed_image": s,
              "pair_id": f"s{i}"} for i, s in enumerate(subjects)]
    counter = DecodeCounter(monkeypatch)
    assert run_pairs(pairs, loading_transforms(pairs=pairs), tmp_path / "out") == ["s0", "s1", "s2"]
    assert counter.counts[files["moving_image"]] == 1 and counter.counts[files["moving_label"]] == 1
    assert all(counter.counts[s] == 1 for s in subjects) and len(counter.counts) == 5


def test_a_bad_atlas_fails_every_pair_but_is_decoded_once(atlas_study, tmp_path, monkeypatch):
    _, subjects = atlas_study
    volume, affine = load_sample("moving_image")
    volume = volume.astype(np.float32)
    volume[3, 3, 3] = np.inf
    atlas = str(save(tmp_path / "data" / "inf_atlas.nii.gz", volume, affine))
    pairs = [{"moving_image": atlas, "fixed_image": s, "pair_id": f"s{i}"} for i, s in enumerate(subjects)]
    record = cohort_record(pairs, tmp_path / "out")
    counter = DecodeCounter(monkeypatch)
    assert run_pairs(pairs, loading_transforms(pairs=pairs), tmp_path / "out", record) == []
    assert len(record.failed) == 3 and all("NaN/Inf" in b["error"] for b in record.failed)
    assert counter.counts[atlas] == 1


def test_header_problems_are_found_before_any_image_is_decoded(atlas_study, tmp_path, monkeypatch):
    files, subjects = atlas_study
    flat = str(save(tmp_path / "data" / "flat_label.nii.gz", np.zeros((40, 50, 1), np.uint8), np.eye(4)))
    pair = {"moving_image": files["moving_image"], "moving_label": flat, "fixed_image": subjects[0], "pair_id": "a"}
    record = cohort_record([pair, {**files, "pair_id": "b"}], tmp_path / "out")
    counter = DecodeCounter(monkeypatch)
    assert run_pairs(record.pairs, loading_transforms(), tmp_path / "out", record) == ["b"]
    assert "is 2-D" in record.failed[0]["error"] and flat not in counter.counts
    assert set(counter.counts) == set(files.values())  # pair a decoded nothing: its moving image was read for b


def test_expected_outputs_follow_the_pair_and_the_config():
    labelled = {"moving_image": "m", "fixed_image": "f", "moving_label": "ml", "fixed_label": "fl"}
    assert expected_pair_outputs(labelled, OUTPUT_NAMES) == OUTPUT_NAMES[:7]  # run-level summary files excluded
    moving_only = {"moving_image": "m", "fixed_image": "f", "moving_label": "ml"}
    assert expected_pair_outputs(moving_only, OUTPUT_NAMES) == [
        "warped_image.nii.gz", "ddf.nii.gz", "warped_label.nii.gz", "jacobian_det.nii.gz", "affine.mat"]
    images_only = {"moving_image": "m", "fixed_image": "f"}
    new_output = expected_pair_outputs(images_only, OUTPUT_NAMES + ["inverse_warp.nii.gz"])
    assert "inverse_warp.nii.gz" in new_output and "metrics.json" not in new_output  # new outputs join by config
    with pytest.raises(TypeError, match="single name"):
        expected_pair_outputs(images_only, "ddf.nii.gz")


def test_pair_folder_states_and_clearing_an_interrupted_one(tmp_path):
    pair = {"moving_image": "m", "fixed_image": "f", "moving_label": "ml", "fixed_label": "fl"}
    expected = expected_pair_outputs(pair, OUTPUT_NAMES)
    folder = tmp_path / "p0"
    assert pair_output_state(folder, expected) == (ABSENT, [])
    folder.mkdir()
    for name in expected:
        if name != "metrics.json":  # written last
            (folder / name).write_text("x")
    assert pair_output_state(folder, expected)[0] == FOREIGN
    assert not pair_outputs_complete(folder, pair, OUTPUT_NAMES)
    (folder / "metrics.json").write_text("{}")
    assert pair_output_state(folder, expected)[0] == COMPLETE and pair_outputs_complete(folder, pair, OUTPUT_NAMES)
    # A folder from a run without the QC figure (--qc false, an older version) is complete for a run that writes it.
    with_qc = expected_pair_outputs(pair, OUTPUT_NAMES + ["qc.png"])
    assert "qc.png" in with_qc and pair_output_state(folder, with_qc)[0] == COMPLETE
    (folder / "metrics.json").unlink()
    assert pair_output_state(folder, with_qc)[0] == FOREIGN  # the picture alone never completes a result
    (folder / "metrics.json").write_text("{}")
    with pytest.raises(ValueError, match="refusing"):
        clear_interrupted_outputs(folder, expected)  # complete results without a marker are never removed
    mark_in_progress(folder)
    (folder / ".jacobian_det.tmp-0a1b2c3d.nii.gz").write_text("half a file")  # a write cut short by SIGKILL
    (folder / "notes.txt").write_text("the user's")
    assert pair_output_state(folder, expected)[0] == INTERRUPTED  # may mix an older and a newer result
    removed = clear_interrupted_outputs(folder, expected)
    assert sorted(removed) == sorted(expected + [".jacobian_det.tmp-0a1b2c3d.nii.gz"])
    assert sorted(p.name for p in folder.iterdir()) == [IN_PROGRESS_MARKER, "notes.txt"]


@pytest.mark.parametrize("count, world", [(10, 3), (2, 4), (0, 2), (7, 1), (5, 5)])
def test_every_pair_has_exactly_one_rank(count, world):
    pairs = [f"p{i}" for i in range(count)]
    shards = [rank_share(pairs, rank, world) for rank in range(world)]
    assert sorted(p for shard in shards for p in shard) == sorted(pairs)  # no pair twice (no padding), none left out
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    assert all(shard == pairs[rank::world] for rank, shard in enumerate(shards))  # round-robin in datalist order


def test_sharding_refuses_bad_ranks_and_torchrun_without_a_process_group(monkeypatch):
    with pytest.raises(ValueError, match="rank must be in"):
        rank_share(["a", "b", "c", "d"], 2, 2)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RegistrationInputError, match="multi_gpu_inference.json"):
        check_launch()


def _finalize_as_rank(rank, tmp_path, monkeypatch, other_failed):
    """``CohortRecord.finalize`` then ``CohortRecord.report`` as rank ``rank`` of 2 runs them (as in
    multi_gpu_inference.json): the process group stubbed (rank 0 decides which pairs run, the gather gives both ranks'
    parts), then the report after the group was closed, so that ``idist.get_rank()`` says 0 on every rank by then."""
    from scripts.io.errors import BundleUserError
    from scripts.workflow import cohort

    pairs = [{"moving_image": "m.nii.gz", "fixed_image": "f.nii.gz", "pair_id": f"p{i}"} for i in range(4)]
    record = cohort.CohortRecord(pairs, tmp_path, ["warped_image.nii.gz"])
    group = cohort.idist
    monkeypatch.setattr(group, "get_rank", lambda: rank)
    monkeypatch.setattr(group, "get_world_size", lambda: 2)
    monkeypatch.setattr(group, "broadcast", lambda todo, src, safe_mode: todo if rank == 0 else "[0, 1, 2, 3]")
    assert [p["pair_id"] for p in record.start()] == (["p0", "p2"] if rank == 0 else ["p1", "p3"])
    if rank == 1:
        record.reject(pairs[3], ValueError("missing"))
    other = {"rows": {}, "metrics": {}, "failed": other_failed}
    monkeypatch.setattr(group, "all_gather", lambda part: [part, other] if rank == 0 else [other, part])
    record.finalize()
    monkeypatch.setattr(group, "get_rank", lambda: 0)  # the group is closed: every rank looks like rank 0
    try:
        record.report()
    except BundleUserError as error:
        return error
    return None


def test_a_resumed_cohort_deals_only_the_unfinished_pairs_to_the_ranks(tmp_path, monkeypatch):
    """Rank 0 leaves the complete pairs out before the ranks split the rest: both of rank 0's pairs of a round-robin
    over all four are done, and each rank still gets one of the two left (the same list reaches both ranks)."""
    from scripts.workflow import cohort

    pairs = [{"moving_image": "m.nii.gz", "fixed_image": "f.nii.gz", "pair_id": f"p{i}"} for i in range(4)]
    for done in ("p0", "p2"):
        (tmp_path / done).mkdir()
        (tmp_path / done / "warped_image.nii.gz").write_bytes(b"from an earlier run")
    group, sent = cohort.idist, []
    monkeypatch.setattr(group, "get_world_size", lambda: 2)
    shares = {}
    for rank in (0, 1):  # rank 0 first: what it broadcasts is what rank 1 receives
        monkeypatch.setattr(group, "get_rank", lambda: rank)
        monkeypatch.setattr(group, "broadcast", lambda todo, src, safe_mode: sent.append(todo) or todo if rank == 0
                            else sent[0])
        record = CohortRecord(pairs, tmp_path, ["warped_image.nii.gz"])
        shares[rank] = [pair["pair_id"] for pair in record.start()]
        assert {i: r["status"] for i, r in record.rows.items()} == (
            {"p0": "already_complete", "p2": "already_complete"} if rank == 0 else {})
    assert shares == {0: ["p1"], 1: ["p3"]}


def test_only_rank_zero_reports_skipped_pairs_after_the_process_group_is_closed(tmp_path, monkeypatch):
    # rank 0 reports the pair that rank 1 skipped (its file written, one error)
    bad = [{"pair_id": "p3", "moving_image": "m.nii.gz", "fixed_image": "f.nii.gz", "error": "missing"}]
    error = _finalize_as_rank(0, tmp_path, monkeypatch, bad)
    assert error is not None and "1 of 4 pairs" in str(error) and "p3: missing" in str(error)
    written = (tmp_path / "failed_pairs.json").read_text()
    assert [f["pair_id"] for f in json.loads(written)["failed"]] == ["p3"]
    # rank 1, reporting after rank 0 (the race of issue 24): neither raises nor removes rank 0's failed_pairs.json
    assert _finalize_as_rank(1, tmp_path, monkeypatch, bad) is None
    assert (tmp_path / "failed_pairs.json").read_text() == written


def test_atlas_and_subjects_datalist_and_duplicate_ids(atlas_study, tmp_path):
    files, subjects = atlas_study
    datalist = tmp_path / "study.json"
    datalist.write_text(json.dumps({"atlas": {"image": files["moving_image"], "label": files["moving_label"]},
                                    "subjects": [subjects[0], {"image": subjects[1], "id": "second"}]}))
    pairs = inference_pairs(datalist=str(datalist))
    assert [p["pair_id"] for p in pairs] == ["subject0", "second"]
    assert all(p["moving_image"] == files["moving_image"] and p["moving_label"] == files["moving_label"] for p in pairs)
    assert pairs[1]["fixed_image"] == subjects[1] and "fixed_label" not in pairs[1]
    clash = [{"id": "a b", "moving_image": subjects[0], "fixed_image": subjects[1]},
             {"id": "a_b", "moving_image": subjects[1], "fixed_image": subjects[0]}]
    with pytest.raises(RegistrationInputError, match="duplicate pair id.*'a_b'"):
        inference_pairs(datalist=clash)


def test_cli_takes_either_one_pair_or_a_datalist(tmp_path):
    assert cli_datalist_overrides(None, "f.nii.gz", "m.nii.gz", "out") == {}
    assert cli_datalist_overrides("d.json", None, None, "out")["datalist"].endswith("d.json")
    with pytest.raises(RegistrationInputError, match="--fixed and --moving"):
        cli_datalist_overrides(None, "f.nii.gz", None, "out")
    with pytest.raises(RegistrationInputError, match="expected no --fixed"):
        cli_datalist_overrides("d.json", None, None, "out", ("label.nii.gz", None))


def test_the_first_pair_of_a_long_datalist_is_ready_after_reading_only_its_own_files(atlas_study, tmp_path,
                                                                                       monkeypatch):
    files, subjects = atlas_study
    first = {**files, "pair_id": "first"}
    rest = [{"moving_image": str(tmp_path / f"m{i}.nii.gz"), "fixed_image": subjects[0], "pair_id": f"p{i}"}
            for i in range(300)]
    record = CohortRecord([first, *rest], tmp_path / "out", OUTPUT_NAMES)
    counter = DecodeCounter(monkeypatch)
    item = next(iter(CohortDataset(record.start(), loading_transforms(), record)))
    assert item["pair_id"] == "first" and tuple(item["moving_image"].shape) == (1, 40, 48, 40)
    assert set(counter.counts) == set(files.values()) and not record.failed  # the other 300 not looked at yet
    assert not (tmp_path / "out" / "first").exists()  # marked only when the engine starts writing its outputs
    record.started("first")
    assert (tmp_path / "out" / "first" / IN_PROGRESS_MARKER).exists()


def test_summary_row_of_a_segmented_subject_has_named_structure_volumes(atlas_study, tmp_path):
    from conftest import SAMPLE_DATA

    files, subjects = atlas_study
    atlas_label = tmp_path / "data" / "moving_colin27_seg8.nii.gz"  # written by atlas_study
    shutil.copy(SAMPLE_DATA / "moving_colin27_seg8.tsv", atlas_label.with_name("moving_colin27_seg8.tsv"))
    pair = {"moving_image": files["moving_image"], "moving_label": str(atlas_label), "fixed_image": subjects[0],
            "pair_id": "subject0"}
    record = CohortRecord([pair], tmp_path / "out", OUTPUT_NAMES)
    assert [p["pair_id"] for p in record.start()] == ["subject0"]
    folder = tmp_path / "out" / "subject0"
    folder.mkdir(parents=True)
    shutil.copy(atlas_label, folder / "warped_label.nii.gz")  # stands in for the atlas labels warped onto a subject
    row = record.record("subject0", "registered", folder, seconds=1.5)
    labels = np.asarray(nib.load(str(atlas_label)).dataobj)
    voxel_ml = abs(np.linalg.det(nib.load(str(atlas_label)).affine[:3, :3])) / 1000
    assert row["volume_ml_7_cerebellum"] == pytest.approx((labels == 7).sum() * voxel_ml)
    assert len([k for k in row if k.startswith("volume_ml_")]) == 8 and row.get("mean_dice") is None  # no labels
    assert json.loads((tmp_path / "out" / "cohort.json").read_text())["pairs"][0]["volume_ml_7_cerebellum"] > 0


def test_rows_left_by_a_stopped_multi_rank_run_are_kept_and_merged(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "cohort.rank1.json").write_text(json.dumps({"rank": 1, "pairs": [
        {"pair_id": "b", "status": "registered", "rank": 1, "seconds": 12.5, "mean_dice": 0.8}]}))
    pairs = [{"moving_image": "m.nii.gz", "fixed_image": "f.nii.gz", "pair_id": i} for i in ("a", "b", "c")]
    record = CohortRecord(pairs, out, OUTPUT_NAMES)
    record.start()  # b's folder does not exist here: start() leaves it to register, as it does a
    record.record("b", "already_complete", out / "b")
    record.reject(pairs[2], RegistrationInputError("moving image 'x' does not exist"))
    document = record.finalize()
    rows = {r["pair_id"]: r for r in document["pairs"]}
    assert rows["b"] == {"pair_id": "b", "status": "already_complete", "rank": 1, "seconds": 12.5, "mean_dice": 0.8}
    assert rows["a"]["status"] == "pending" and rows["c"]["error"].startswith("moving image")
    assert not list(out.glob("cohort.rank*.json")) and (out / "cohort.md").exists()
    assert json.loads((out / "cohort.json").read_text())["counts"] == {
        "registered": 0, "already_complete": 1, "failed": 1, "pending": 1}


def test_a_datalist_input_inside_its_pair_folder_under_an_output_name_is_refused(atlas_study, tmp_path):
    files, subjects = atlas_study
    folder = tmp_path / "out" / "inside"
    folder.mkdir(parents=True)
    trap = folder / "warped_image.nii.gz"
    shutil.copy(subjects[0], trap)
    pairs = [{"moving_image": files["moving_image"], "fixed_image": str(trap), "pair_id": "inside"},
             {"moving_image": files["moving_image"], "fixed_image": subjects[1], "pair_id": "fine"}]
    record = cohort_record(pairs, tmp_path / "out")
    assert run_pairs(pairs, None, tmp_path / "out", record) == ["fine"]
    assert "fixed image" in record.failed[0]["error"]
    assert "is also the output 'warped_image.nii.gz'" in record.failed[0]["error"]
    assert trap.read_bytes() == Path(subjects[0]).read_bytes()
