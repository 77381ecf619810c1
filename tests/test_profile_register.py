"""bench/profile_register.py: a real register run folded into its stages, every stage seen once."""

import json
import subprocess
import sys

import pytest

from conftest import REPO_ROOT

SAMPLE = REPO_ROOT / "bundle" / "sample_data"


@pytest.mark.slow
def test_profile_of_a_register_run_accounts_for_its_stages(tmp_path):
    out = tmp_path / "profile.json"
    command = [
        sys.executable, str(REPO_ROOT / "bench" / "profile_register.py"), "--timer", "cpu", "--out", str(out),
        "--pair", str(SAMPLE / "moving_colin27_t1.nii.gz"), str(SAMPLE / "fixed_mni152_t1.nii.gz"),
        "--", "--refine_iterations", "3", "--network_scale", "0.25", "--qc", "false",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["flags"] == {"refine_iterations": 3, "network_scale": 0.25, "qc": False}
    (run,) = report["runs"]
    stages = run["stages"]
    assert set(stages) == {"import", "read", "affine", "resample", "network", "refinement", "postprocess", "write",
                           "metrics", "other"}  # fmt: skip
    # Every stage of the default pipeline ran and took time; none is counted twice (the folded stages add up to
    # the run's total, the remainder being workflow set-up and logging).
    for stage in ("import", "read", "affine", "network", "refinement", "postprocess", "write"):
        assert stages[stage] > 0, stage
    folded = sum(seconds for name, seconds in stages.items() if name != "other")
    assert folded <= run["total"] * 1.01
    assert stages["other"] < 0.5 * run["total"]
    assert "| refinement |" in out.with_suffix(".md").read_text()
