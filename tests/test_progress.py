"""What a user sees while waiting: a progress bar with ETA on an interactive terminal (the refinement, instance
optimisation, the affine stage, a cohort's pairs), the plain log lines everywhere else, and a real 3-pair cohort run
on a pseudo-terminal that draws its bars and writes a QC figure per pair."""

from __future__ import annotations

import io
import logging
import os
import pty
import re
import select
import subprocess

import pytest
import torch
from cohort_data import SMALL_NETWORK_ARGS, cohort, real_pairs, write_datalist
from conftest import BUNDLE_ROOT

from scripts.engines.affine_registration import AffineRegistration
from scripts.engines.field_refinement import refine_displacement
from scripts.engines.instance_optimization import InstanceOptimizationInferer
from scripts.io.progress import Progress, interactive_terminal
from scripts.layers import Warp
from scripts.losses import GradientLoss, LocalNCCLoss


class _Terminal(io.StringIO):
    """A stream that says it is a terminal (what ``sys.stderr`` is in an interactive shell)."""

    def isatty(self) -> bool:
        return True


def _terminal_stderr(monkeypatch) -> _Terminal:
    """Make ``sys.stderr`` a terminal for the rest of the test, as rank 0. Called in the test itself: pytest puts its
    own capture back on ``sys.stderr`` when the test body starts, after the fixtures."""
    stream = _Terminal()
    monkeypatch.setattr("sys.stderr", stream)
    monkeypatch.delenv("RANK", raising=False)
    return stream


def _blob_pair(size: int = 16) -> torch.Tensor:
    """(1, 2, s, s, s): a bright ball and the same ball shifted by 2 voxels (something to register)."""
    grid = torch.stack(torch.meshgrid(*[torch.arange(size, dtype=torch.float32)] * 3, indexing="ij"))
    centre = torch.tensor([size / 2] * 3).view(3, 1, 1, 1)
    moving = torch.exp(-((grid - centre) ** 2).sum(0) / 12.0)
    fixed = torch.exp(-((grid - centre - torch.tensor([2.0, 0, 0]).view(3, 1, 1, 1)) ** 2).sum(0) / 12.0)
    return torch.stack([moving, fixed])[None]


def _refine(log_interval: int = 2) -> torch.Tensor:
    pair = _blob_pair()
    return refine_displacement(pair, torch.zeros(1, 3, *pair.shape[2:]), LocalNCCLoss(kernel_size=3), GradientLoss(),
                               0.1, iterations=6, learning_rate=0.5, scale=1.0, log_interval=log_interval)


def test_a_bar_only_on_a_terminal_of_rank_zero(monkeypatch):
    terminal = _terminal_stderr(monkeypatch)
    assert interactive_terminal(terminal) and not interactive_terminal(io.StringIO())
    assert not Progress(5, "x", stream=io.StringIO()).active
    assert not Progress(0, "x", stream=terminal).active  # nothing to count
    monkeypatch.setenv("RANK", "1")  # torchrun's other ranks share the terminal: only rank 0 draws
    assert not interactive_terminal(terminal) and not Progress(5, "x", stream=terminal).active


def test_refinement_logs_lines_without_a_terminal(monkeypatch, caplog):
    monkeypatch.setattr("sys.stderr", io.StringIO())
    with caplog.at_level(logging.INFO, logger="scripts.engines.field_refinement"):
        _refine()
    steps = [r.getMessage() for r in caplog.records if "field refinement step" in r.getMessage()]
    assert [s.split(":")[0] for s in steps] == [f"field refinement step {k}/6" for k in (2, 4, 6)]


def test_refinement_draws_a_bar_with_eta_and_loss_on_a_terminal(monkeypatch, caplog):
    terminal = _terminal_stderr(monkeypatch)
    with caplog.at_level(logging.INFO, logger="scripts.engines.field_refinement"):
        refined = _refine()
    drawn = terminal.getvalue()
    assert "field refinement" in drawn and "6/6" in drawn and "loss=" in drawn
    assert re.search(r"\d\d:\d\d<\d\d:\d\d", drawn), drawn  # elapsed<remaining: the time estimate
    assert not [r for r in caplog.records if "field refinement step" in r.getMessage()]  # the bar replaces them
    assert refined.abs().max() > 0  # the loop still ran


def test_instance_optimisation_and_affine_stage_draw_bars_on_a_terminal(monkeypatch):
    terminal = _terminal_stderr(monkeypatch)
    pair = _blob_pair()
    network = torch.nn.Conv3d(2, 3, 3, padding=1)
    tuner = InstanceOptimizationInferer(LocalNCCLoss(kernel_size=3), GradientLoss(), Warp(), iterations=3,
                                        network_scale=1.0)
    tuner(pair, network)
    affine = AffineRegistration(transform="rigid", levels_mm=(4.0, 2.0), iterations=(3, 2))
    affine(pair[:, :1], pair[:, 1:], torch.eye(4, dtype=torch.float64), torch.eye(4, dtype=torch.float64))
    drawn = terminal.getvalue()
    assert "instance optimisation" in drawn and "3/3" in drawn
    search = len(affine._start_rotations(_affine_frame(affine, pair))) * affine.search_iterations
    assert "rigid stage" in drawn and f"{search + 5}/{search + 5}" in drawn  # rotation search + 3 + 2 level steps


def _affine_frame(affine: AffineRegistration, pair: torch.Tensor) -> dict:
    eye = torch.eye(4, dtype=torch.float64)
    return affine._pyramid(pair[:, :1], pair[:, 1:], eye, eye)[1]


def _read_all(fd: int, process: subprocess.Popen, timeout: float) -> str:
    """Everything written to the pseudo-terminal's master ``fd`` until ``process`` ends."""
    chunks, waited = [], 0.0
    while True:
        ready, _, _ = select.select([fd], [], [], 1.0)
        if ready:
            try:
                data = os.read(fd, 65536)
            except OSError:  # the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        elif process.poll() is not None:
            break
        else:
            waited += 1.0
            if waited > timeout:
                process.kill()
                raise TimeoutError("the cohort run did not finish")
    return b"".join(chunks).decode(errors="replace")


@pytest.mark.slow
def test_a_cohort_on_a_terminal_shows_its_bars_and_writes_qc_figures(tmp_path):
    pairs = [p for p in real_pairs(tmp_path) if p["id"] in ("colin_to_mni", "mni_to_colin", "colin_to_mni_nolabels")]
    datalist, out = write_datalist(tmp_path, pairs), tmp_path / "out"
    command = [
        "python", "-m", "monai.bundle", "run", "--config_file", "configs/inference.json", "--datalist", str(datalist),
        "--output_dir", str(out), "--ckpt_path", str(tmp_path / "none.pt"), *SMALL_NETWORK_ARGS,
        "--affine_transform=none", "--refine_iterations=4",
    ]
    master, child = pty.openpty()
    env = {**os.environ, "PYTHONPATH": str(BUNDLE_ROOT), "OMP_NUM_THREADS": "1", "COLUMNS": "120"}
    env.pop("RANK", None)
    process = subprocess.Popen(command, cwd=BUNDLE_ROOT, env=env, stdin=child, stdout=child, stderr=child)
    os.close(child)
    try:
        drawn = _read_all(master, process, timeout=300)
    finally:
        os.close(master)
    assert process.wait(timeout=60) == 0, drawn[-3000:]
    assert re.search(r"cohort: +100%.*3/3", drawn), drawn[-3000:]  # the pairs' bar, finished
    assert re.search(r"cohort: +33%.*1/3 \[\d\d:\d\d<\d\d:\d\d", drawn)  # after the first pair: a time estimate
    # each pair's refinement draws its bar below the pairs' one (removed when it ends: no final 4/4 is left)
    assert len(re.findall(r"field refinement: +\d+%.*\d/4 \[", drawn)) >= 3
    assert "registering pair mni_to_colin" in drawn  # the log records are still shown (above the bars)
    rows = {r["pair_id"]: r for r in cohort(out)["pairs"]}
    for pair in pairs:
        png = out / pair["id"] / "qc.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
        assert rows[pair["id"]]["qc_png"] == f"{pair['id']}/qc.png"
    report = (out / "cohort.md").read_text()
    # the report shows the QC figures, the worse of the two labelled pairs first
    shown = re.findall(r"!\[QC figure of (\S+)\]\((\S+)\)", report)
    labelled = sorted(("colin_to_mni", "mni_to_colin"), key=lambda i: rows[i]["mean_dice"])
    assert [s[0] for s in shown] == [*labelled, "colin_to_mni_nolabels"] and all(s[1].endswith("qc.png") for s in shown)
