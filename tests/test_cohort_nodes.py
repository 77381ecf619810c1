"""A cohort over two torchrun "nodes": two ``torchrun --nnodes 2 --node_rank 0/1 --rdzv_backend c10d`` launches on
127.0.0.1 (one process each, gloo, CPU) meet at a port chosen at run time, as two machines of a cluster would (docs/
usage.md, "Cohorts"). Every pair is registered exactly once, by one of the two nodes, and one merged summary is left."""

from __future__ import annotations

import json
import os
import re
import subprocess
import uuid

import pytest
from cohort_data import PAIR_OUTPUTS, SMALL_NETWORK_ARGS, cohort, real_pairs, write_datalist
from conftest import BUNDLE_ROOT
from torchrun_launch import free_port, node_command
from workflow_data import PLAIN_INFERENCE_ARGS

pytestmark = [pytest.mark.ddp, pytest.mark.slow]

CONFIGS = ["inference.json", "evaluate.json", "multi_gpu_inference.json"]
TIMEOUT = 600


@pytest.fixture(scope="module")
def nodes(tmp_path_factory):
    work = tmp_path_factory.mktemp("cohort_nodes")
    # three good pairs (two labelled): with two ranks, the ranks own pairs 0 and 2, and pair 1
    pairs = [p for p in real_pairs(work) if p["id"] in ("colin_to_mni", "mni_to_colin", "colin_to_mni_nolabels")]
    datalist = write_datalist(work, pairs)
    endpoint, run_id = f"127.0.0.1:{free_port()}", f"sacb-nodes-{uuid.uuid4().hex[:8]}"
    bundle_args = [
        "-m", "monai.bundle", "run", "--config_file", str([f"configs/{c}" for c in CONFIGS]),
        "--datalist", str(datalist), "--output_dir", str(work / "out"), "--ckpt_path", str(work / "none.pt"),
        *SMALL_NETWORK_ARGS, *PLAIN_INFERENCE_ARGS,
    ]
    env = {**os.environ, "PYTHONPATH": str(BUNDLE_ROOT), "OMP_NUM_THREADS": "1"}
    launches = [subprocess.Popen([*node_command(node, 2, endpoint, run_id), *bundle_args], cwd=BUNDLE_ROOT, env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for node in (0, 1)]
    logs = []
    try:
        for launch in launches:
            logs.append(launch.communicate(timeout=TIMEOUT)[0])
    finally:
        for launch in launches:
            if launch.poll() is None:
                launch.kill()
    return work / "out", pairs, [launch.returncode for launch in launches], logs


def _registered(log: str) -> list[str]:
    return re.findall(r"registering pair (\S+) ", log)


def test_both_nodes_finish_and_each_pair_is_registered_once(nodes):
    out, pairs, codes, logs = nodes
    assert codes == [0, 0], "\n".join(f"--- node {i} ---\n{log[-3000:]}" for i, log in enumerate(logs))
    per_node = [_registered(log) for log in logs]
    assert all(per_node), f"a node registered nothing: {per_node}"  # each node had its own pairs
    assert sorted(sum(per_node, [])) == sorted(p["id"] for p in pairs)
    for pair in pairs:
        assert all((out / pair["id"] / name).is_file() for name in PAIR_OUTPUTS), pair["id"]


def test_one_merged_summary_over_both_nodes(nodes):
    out, pairs, _, logs = nodes
    rows = cohort(out)["pairs"]
    assert [r["pair_id"] for r in rows] == [p["id"] for p in pairs]
    assert cohort(out)["counts"] == {"registered": 3, "already_complete": 0, "failed": 0, "pending": 0}
    assert cohort(out)["world_size"] == 2 and [r["rank"] for r in rows] == [0, 1, 0]  # round-robin over global ranks
    assert not list(out.glob("cohort.rank*.json")) and not (out / "failed_pairs.json").exists()
    assert json.loads((out / "summary.json").read_text())["num_pairs"] == 2  # the labelled pairs, one from each rank
    assert (out / "cohort.md").is_file() and (out / "cohort.csv").is_file()
    # rank 0 (on whichever node the rendezvous put it) alone merges and reports
    merged = [i for i, log in enumerate(logs) if re.search(r"cohort of 3 pair\(s\): 3 registered now", log)]
    assert len(merged) == 1, merged
