"""Cohorts sharded over ranks: ``torchrun --standalone --nproc_per_node 2 -m monai.bundle run`` with inference.json +
evaluate.json + multi_gpu_inference.json (gloo, CPU) over a real datalist registers each pair exactly once, writes
exactly the outputs of a one-process run, and leaves one merged summary (cohort files, evaluation summary, failed
pairs)."""

from __future__ import annotations

import json
import os
import re
import subprocess

import numpy as np
import pytest
import torch
from cohort_data import SMALL_NETWORK, SMALL_NETWORK_ARGS, cohort, real_pairs, volume, write_datalist
from conftest import BUNDLE_ROOT
from torchrun_launch import standalone_command
from workflow_data import PLAIN_INFERENCE, PLAIN_INFERENCE_ARGS, run_bundle_workflow

from scripts.io.errors import BundleUserError, find_user_error

pytestmark = [pytest.mark.ddp, pytest.mark.slow]

CONFIGS = ["inference.json", "evaluate.json"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    work = tmp_path_factory.mktemp("cohort_ddp")
    # 4 entries over 2 ranks: rank 0 gets entries 0 and 2, rank 1 entries 1 and 3 (the bad one)
    pairs = [p for p in real_pairs(work) if p["id"] != "colin_to_colin"]
    datalist = write_datalist(work, pairs)
    command = [
        *standalone_command(2), "-m", "monai.bundle", "run",
        "--config_file", str([f"configs/{c}" for c in CONFIGS + ["multi_gpu_inference.json"]]),
        "--datalist", str(datalist), "--output_dir", str(work / "ranks"), "--ckpt_path", str(work / "none.pt"),
        *SMALL_NETWORK_ARGS, *PLAIN_INFERENCE_ARGS,
    ]
    env = {**os.environ, "PYTHONPATH": str(BUNDLE_ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=BUNDLE_ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the ranks' arithmetic, so that results can be compared exactly
    try:
        with pytest.raises(Exception) as info:
            run_bundle_workflow(CONFIGS, **PLAIN_INFERENCE, datalist=str(datalist), output_dir=str(work / "one"),
                                network_def=SMALL_NETWORK,
                                ckpt_path=str(work / "none.pt"))
    finally:
        torch.set_num_threads(threads)
    return work, pairs, result, info.value


def _rank_lines(log: str, rank: int, pattern: str) -> list[str]:
    return [line for line in log.splitlines() if line.startswith(f"[default{rank}]:") and re.search(pattern, line)]


def test_each_pair_is_registered_once_by_its_rank(runs):
    work, _, result, _ = runs
    log = result.stdout + result.stderr
    registered = {rank: [re.search(r"registering pair (\S+) ", l).group(1) for l in _rank_lines(log, rank, "registering pair")]
                  for rank in (0, 1)}
    # each rank starts exactly its own pairs; the bad one (rank 1's second) fails its input checks there and is skipped
    assert registered == {0: ["colin_to_mni", "colin_to_mni_nolabels"], 1: ["mni_to_colin", "missing_moving"]}, log[-3000:]
    assert _rank_lines(log, 1, "skipping pair missing_moving") and not _rank_lines(log, 0, "skipping pair")
    rows = {r["pair_id"]: r for r in cohort(work / "ranks")["pairs"]}
    assert {i: r["rank"] for i, r in rows.items()} == {"colin_to_mni": 0, "mni_to_colin": 1,
                                                        "colin_to_mni_nolabels": 0, "missing_moving": None}


def test_ranks_write_exactly_the_outputs_of_one_process(runs):
    work, pairs, _, _ = runs
    for pair in pairs[:3]:
        ranks, one = work / "ranks" / pair["id"], work / "one" / pair["id"]
        names = sorted(p.name for p in one.iterdir())
        assert sorted(p.name for p in ranks.iterdir()) == names and "ddf.nii.gz" in names
        for name in names:
            if name.endswith(".nii.gz"):
                assert np.array_equal(volume(ranks / name), volume(one / name)), f"{pair['id']}/{name} differs"
            elif name.endswith(".json"):
                assert json.loads((ranks / name).read_text()) == json.loads((one / name).read_text())


def test_one_merged_summary(runs):
    work, _, result, one_error = runs
    out, reference = work / "ranks", work / "one"
    assert not list(out.glob("cohort.rank*.json"))
    def strip(rows):
        return [{k: v for k, v in r.items() if k not in ("rank", "seconds")} for r in rows]

    assert strip(cohort(out)["pairs"]) == strip(cohort(reference)["pairs"])
    assert cohort(out)["counts"] == {"registered": 3, "already_complete": 0, "failed": 1, "pending": 0}
    assert json.loads((out / "summary.json").read_text()) == json.loads((reference / "summary.json").read_text())
    assert json.loads((out / "summary.json").read_text())["num_pairs"] == 2  # both labelled pairs, from both ranks
    failed = json.loads((out / "failed_pairs.json").read_text())
    assert failed["total"] == 4 and [f["pair_id"] for f in failed["failed"]] == ["missing_moving"]
    # the run fails (a pair was skipped) with one report, from rank 0, like the one-process run
    log = result.stdout + result.stderr
    assert result.returncode != 0
    assert _rank_lines(log, 0, "1 of 4 pairs were skipped") and not _rank_lines(log, 1, "pairs were skipped")
    assert isinstance(find_user_error(one_error), BundleUserError) and "1 of 4 pairs" in str(find_user_error(one_error))
