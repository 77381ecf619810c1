"""Resumable cohort runs of configs/inference.json on a real datalist: a rerun skips finished pairs, an interrupted pair
is registered again (and only it), outputs from elsewhere are never replaced, and a run killed with SIGKILL and started
again completes every pair exactly once."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from cohort_data import (
    SMALL_NETWORK,
    SMALL_NETWORK_ARGS,
    cohort,
    file_stamps,
    real_pairs,
    statuses,
    volume,
    write_datalist,
)
from conftest import BUNDLE_ROOT
from workflow_data import PLAIN_INFERENCE, PLAIN_INFERENCE_ARGS, run_bundle_workflow

from scripts.io.outputs import IN_PROGRESS_MARKER, pair_outputs_complete
from scripts.io.errors import BundleUserError, find_user_error

pytestmark = pytest.mark.slow


def _run(datalist, out, **overrides):
    return run_bundle_workflow(["inference.json"], **PLAIN_INFERENCE, datalist=str(datalist), output_dir=str(out),
                               network_def=SMALL_NETWORK,
                               ckpt_path=str(out.parent / "no_weights.pt"), **overrides)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished cohort of three real pairs (two with labels)."""
    work = tmp_path_factory.mktemp("cohort")
    pairs = [p for p in real_pairs(work) if p["id"] in ("colin_to_mni", "mni_to_colin", "colin_to_mni_nolabels")]
    datalist = write_datalist(work, pairs)
    _run(datalist, work / "out")
    return work, datalist


def _copy(finished, tmp_path):
    work, datalist = finished
    out = tmp_path / "out"
    shutil.copytree(work / "out", out)
    return datalist, out


def test_first_run_writes_one_row_per_pair_and_a_report(finished):
    work, _ = finished
    document = cohort(work / "out")
    assert document["finished"] and document["counts"] == {"registered": 3, "already_complete": 0, "failed": 0,
                                                           "pending": 0}
    rows = {r["pair_id"]: r for r in document["pairs"]}
    assert rows["colin_to_mni"]["mean_dice"] is not None and rows["colin_to_mni_nolabels"].get("mean_dice") is None
    assert all(r["seconds"] > 0 and 0 <= r["percent_non_positive_jacobian"] <= 100 for r in rows.values())
    volumes = [k for k in rows["colin_to_mni"] if k.startswith("volume_ml_")]
    assert len(volumes) == 8 and all(rows["colin_to_mni"][k] > 0 for k in volumes)  # warped labels per structure
    assert (work / "out" / "cohort.csv").read_text().count("\n") == 4
    assert "registered 3" in (work / "out" / "cohort.md").read_text()
    assert not list((work / "out").rglob(IN_PROGRESS_MARKER))


def test_rerun_registers_nothing_and_keeps_the_rows(finished, tmp_path):
    datalist, out = _copy(finished, tmp_path)
    before, rows_before = file_stamps(out), {r["pair_id"]: r for r in cohort(out)["pairs"]}
    _run(datalist, out)
    assert file_stamps(out) == before  # not one output rewritten
    rows = {r["pair_id"]: r for r in cohort(out)["pairs"]}
    assert {r["status"] for r in rows.values()} == {"already_complete"}
    assert all(rows[i]["seconds"] == rows_before[i]["seconds"] for i in rows)  # the time of the run that did it


def test_an_interrupted_pair_is_registered_again_and_only_it(finished, tmp_path):
    datalist, out = _copy(finished, tmp_path)
    reference = volume(out / "mni_to_colin" / "ddf.nii.gz")
    folder = out / "mni_to_colin"
    (folder / "jacobian_det.nii.gz").unlink()
    (folder / ".jacobian_det.tmp-deadbeef.nii.gz").write_bytes(b"cut short")
    (folder / IN_PROGRESS_MARKER).write_text("killed\n")
    others = {k: v for k, v in file_stamps(out).items() if not k.startswith("mni_to_colin")}
    _run(datalist, out)
    assert {k: v for k, v in file_stamps(out).items() if not k.startswith("mni_to_colin")} == others
    assert statuses(out) == {"colin_to_mni": "already_complete", "mni_to_colin": "registered",
                             "colin_to_mni_nolabels": "already_complete"}
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) == []
    assert np.array_equal(volume(folder / "ddf.nii.gz"), reference)  # the same result as the first time


def test_outputs_from_elsewhere_are_refused_not_replaced(finished, tmp_path):
    datalist, out = _copy(finished, tmp_path)
    shutil.rmtree(out / "colin_to_mni")
    (out / "colin_to_mni").mkdir()
    (out / "colin_to_mni" / "ddf.nii.gz").write_bytes(b"the user's own field")
    with pytest.raises(Exception) as info:
        _run(datalist, out)
    error = find_user_error(info.value)
    assert isinstance(error, BundleUserError) and "1 of 3 pairs were skipped" in str(error)
    assert "output file(s) already exist" in str(error) and "--overwrite" in str(error)
    assert (out / "colin_to_mni" / "ddf.nii.gz").read_bytes() == b"the user's own field"
    assert statuses(out)["colin_to_mni"] == "failed"


def test_overwrite_registers_a_finished_pair_again(finished, tmp_path):
    datalist, out = _copy(finished, tmp_path)
    entry = [p for p in json.loads(datalist.read_text())["pairs"] if p["id"] == "colin_to_mni_nolabels"]
    before = file_stamps(out)
    _run(write_datalist(tmp_path, entry, "one_pair.json"), out, overwrite=True)
    assert statuses(out) == {"colin_to_mni_nolabels": "registered"}
    after = file_stamps(out)
    assert all((after[n] != before[n]) == n.startswith("colin_to_mni_nolabels") for n in before)


def test_a_run_killed_with_sigkill_and_started_again_completes_every_pair_once(tmp_path):
    pairs = [p for p in real_pairs(tmp_path) if p["id"] in ("colin_to_mni", "mni_to_colin", "colin_to_colin")]
    datalist, out = write_datalist(tmp_path, pairs), tmp_path / "out"
    command = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json", *PLAIN_INFERENCE_ARGS,
               "--datalist", str(datalist), "--output_dir", str(out), "--ckpt_path", str(tmp_path / "no_weights.pt"),
               *SMALL_NETWORK_ARGS]
    env = {**os.environ, "PYTHONPATH": str(BUNDLE_ROOT), "OMP_NUM_THREADS": "1"}
    with open(tmp_path / "first_run.log", "w") as log:
        process = subprocess.Popen(command, cwd=BUNDLE_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 240
        while not (out / "cohort.json").exists() or not any(r["status"] == "registered" for r in cohort(out)["pairs"]):
            assert process.poll() is None, (tmp_path / "first_run.log").read_text()[-3000:]
            assert time.time() < deadline, "the first pair did not finish in time"
            time.sleep(0.05)
        os.kill(process.pid, signal.SIGKILL)  # mid-run: the next pair is being loaded, registered or written
        process.wait()
    done = [p["id"] for p in pairs if pair_outputs_complete(out / p["id"], p, ["warped_image.nii.gz", "ddf.nii.gz",
                                                                              "jacobian_det.nii.gz", "metrics.json"])]
    assert 1 <= len(done) < len(pairs), f"kill landed after the run: {done}"
    kept = {k: v for k, v in file_stamps(out).items() if k.split(os.sep)[0] in done}
    _run(datalist, out)
    rows = cohort(out)["pairs"]
    assert sorted(r["pair_id"] for r in rows) == sorted(p["id"] for p in pairs)  # each pair once
    assert {r["pair_id"] for r in rows if r["status"] == "already_complete"} == set(done)
    assert {r["pair_id"] for r in rows if r["status"] == "registered"} == {p["id"] for p in pairs} - set(done)
    assert {k: v for k, v in file_stamps(out).items() if k in kept} == kept  # finished pairs never redone
    assert not list(out.rglob(IN_PROGRESS_MARKER)) and not list(out.rglob(".*.tmp-*"))
