"""bench/benchmark.py --quick: runs end to end at a tiny size and writes the JSON the performance bar reads."""

import json
import subprocess
import sys

from conftest import REPO_ROOT

CASES = ["ncc_ours_fwd_bwd", "ncc_monai_fwd_bwd", "warp_ours_label", "warp_monai_label", "sacbnet_infer", "voxelmorph_infer"]


def test_quick_benchmark_writes_complete_json(tmp_path):
    out = tmp_path / "bench.json"
    command = [sys.executable, str(REPO_ROOT / "bench" / "benchmark.py"), "--quick", "--threads", "1", "--out", str(out)]
    done = subprocess.run(command + ["--cases", *CASES], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "ncc_ours_fwd_bwd" in done.stdout  # the printed table

    payload = json.loads(out.read_text())
    environment = payload["environment"]
    for key in ("torch", "monai", "device", "device_name", "cpu_model", "threads", "repeats", "warmup"):
        assert key in environment, key
    assert environment["threads"] == 1 and environment["device"] == "cpu"

    results = {r["case"]: r for r in payload["results"]}
    assert sorted(results) == sorted(CASES)  # bundle_run is not part of --quick
    for result in results.values():
        assert "error" not in result, result
        assert result["size"] == [16, 16, 16]
        assert len(result["times_s"]) == environment["repeats"] and min(result["times_s"]) > 0
        assert result["median_s"] > 0 and result["peak_rss_mb"] > 0
    for ours, reference in (("ncc_ours_fwd_bwd", "ncc_monai_fwd_bwd"), ("warp_ours_label", "warp_monai_label"),
                            ("sacbnet_infer", "voxelmorph_infer")):  # fmt: skip
        assert results[ours]["reference"] == reference
        expected = results[ours]["median_s"] / results[reference]["median_s"]
        assert abs(results[ours]["time_ratio_vs_reference"] - expected) < 1e-9
    # The accuracy figures that come with the timings.
    assert results["ncc_ours_fwd_bwd"]["value_abs_diff"] < 1e-4
    assert results["warp_ours_label"]["max_abs_diff_vs_monai"] == 0.0
    assert results["sacbnet_infer"]["parameters"] > 1_000_000


def test_unknown_case_is_rejected(tmp_path):
    command = [sys.executable, str(REPO_ROOT / "bench" / "benchmark.py"), "--quick", "--cases", "nope"]
    done = subprocess.run(command + ["--out", str(tmp_path / "x.json")], capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "unknown cases" in done.stderr
