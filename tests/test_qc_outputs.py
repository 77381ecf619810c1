"""QC figures as outputs: ``qc.png`` of every registered pair (on by default, ``--qc false`` off), the checkerboard
panel, and the cohort report's pairs to check first."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import BUNDLE_ROOT, load_sample_pair
from monai.bundle import ConfigParser
from monai.data import MetaTensor

from scripts.cli import workflow_overrides
from scripts.io.errors import OutputExistsError, RegistrationInputError
from scripts.io.outputs import QC_PNG
from scripts.workflow.qc import SaveQCFigured, checkerboard
from scripts.workflow.reports import markdown_report, worst_pairs


def test_checkerboard_alternates_square_tiles_of_the_two_images():
    first, second = np.zeros((16, 12)), np.ones((16, 12))
    board = checkerboard(first, second, tiles=4)  # 4 tiles along the longer side: 4-pixel squares
    assert board[0, 0] == 0 and board[0, 4] == 1 and board[4, 0] == 1 and board[4, 4] == 0 and board[15, 11] == 1
    assert board[:4, :4].sum() == 0 and board[:4, 4:8].sum() == 16  # whole tiles from one image each
    assert board.mean() == pytest.approx(0.5)
    with pytest.raises(ValueError, match="one shape"):
        checkerboard(first, second[:-1])


def _registered_pair() -> dict:
    """The shipped real pair at 40x48x40, as the postprocessing holds it before the grid is restored: channel-first
    images in [0, 1] on the fixed grid, a displacement of 1.5 voxels along axis 0 and its det J (1 everywhere)."""
    pair = load_sample_pair((40, 48, 40))
    fixed, moving = pair["fixed"][0], pair["moving"][0]
    ddf = torch.zeros(3, 40, 48, 40)
    ddf[0] = 1.5
    return {"pair_id": "colin_to_mni", "fixed_image": MetaTensor(fixed), "moving_image": MetaTensor(moving),
            "warped_moving_scaled": MetaTensor(torch.roll(moving, 1, dims=1)), "pred": MetaTensor(ddf),
            "jacobian_det": MetaTensor(torch.ones(1, 40, 48, 40))}


def test_each_pair_gets_its_figure_in_its_folder_never_over_an_existing_one(tmp_path):
    data = _registered_pair()
    out = SaveQCFigured(tmp_path)(data)
    png = tmp_path / "colin_to_mni" / QC_PNG
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 50_000  # 2000 x 860, real anatomy
    assert out["pred"] is data["pred"]  # the data goes on unchanged to the writers
    before = png.read_bytes()
    with pytest.raises(OutputExistsError, match="qc.png"):
        SaveQCFigured(tmp_path)(data)
    assert png.read_bytes() == before
    SaveQCFigured(tmp_path, overwrite=True)(data)
    single = {**data, "pair_id": ""}  # a single pair writes into the output folder itself
    SaveQCFigured(tmp_path / "off", enabled=False)(single)
    assert not (tmp_path / "off").exists()
    SaveQCFigured(tmp_path / "single")(single)
    assert (tmp_path / "single" / QC_PNG).is_file()


@pytest.mark.parametrize("typed, expected", [(True, True), ("false", False), ("False", False), ("no", False),
                                             ("on", True), (0, False)])
def test_qc_switch_of_register(typed, expected, tmp_path):
    _, overrides = workflow_overrides("f.nii.gz", "m.nii.gz", str(tmp_path), qc=typed)
    assert overrides["qc"] is expected


def test_qc_switch_refuses_other_words(tmp_path):
    with pytest.raises(RegistrationInputError, match="--qc must be true or false, got 'maybe'"):
        workflow_overrides("f.nii.gz", "m.nii.gz", str(tmp_path), qc="maybe")


@pytest.mark.parametrize("qc", [True, False])
def test_inference_config_writes_and_expects_qc_png_only_when_on(qc):
    parser = ConfigParser()
    parser.read_config(str(BUNDLE_ROOT / "configs" / "inference.json"))
    parser["qc"] = qc
    assert ("qc.png" in parser.get_parsed_content("output_names")) == qc  # a resumed cohort needs it only when on
    figures = [t for t in parser.get_parsed_content("postprocessing").transforms if isinstance(t, SaveQCFigured)]
    assert len(figures) == 1 and figures[0].enabled == qc


def test_report_shows_the_worst_pairs_figures_first():
    rows = [
        {"pair_id": "good", "status": "registered", "mean_dice": 0.8, "percent_non_positive_jacobian": 0.0,
         "qc_png": "good/qc.png"},
        {"pair_id": "bad", "status": "already_complete", "mean_dice": 0.4, "percent_non_positive_jacobian": 0.1,
         "qc_png": "bad/qc.png"},
        {"pair_id": "unlabelled_folded", "status": "registered", "percent_non_positive_jacobian": 2.0,
         "qc_png": "unlabelled_folded/qc.png"},
        {"pair_id": "unlabelled", "status": "registered", "percent_non_positive_jacobian": 0.01,
         "qc_png": "unlabelled/qc.png"},
        {"pair_id": "no_figure", "status": "registered", "mean_dice": 0.1},  # run with --qc false
        {"pair_id": "failed", "status": "failed", "error": "missing"},
    ]
    assert [r["pair_id"] for r in worst_pairs(rows, 3)] == ["bad", "good", "unlabelled_folded"]
    report = markdown_report(rows, {"world_size": 1, "wall_seconds": 10.0, "registered_this_run": 4}, qc_figures=2)
    assert "## Pairs to check first" in report
    assert report.index("![QC figure of bad](bad/qc.png)") < report.index("![QC figure of good](good/qc.png)")
    assert "unlabelled" not in report.split("## Pairs to check first")[1].split("## Failed")[0]
    assert "### bad (mean Dice 0.4000, det J <= 0: 0.1000 %)" in report
    assert "Pairs to check first" not in markdown_report(rows[4:], {"world_size": 1})


def test_display_range_is_read_on_a_lattice_of_large_volumes_only():
    """The QC figure's grey levels: every voxel of a volume up to RANGE_SAMPLE_VOXELS, a regular lattice of a larger
    one, whose percentiles stay within 1 % of the range of the whole volume's (heavy-tailed noise here; identical on the
    real scans tried); zeros (background) ignored."""
    from scripts.workflow.qc import RANGE_SAMPLE_VOXELS, robust_range, robust_scale

    rng = np.random.default_rng(11)
    small = rng.gamma(2.0, 50.0, size=(40, 30, 20)).astype(np.float32)
    small[:5] = 0.0
    assert robust_range(small) == tuple(np.percentile(small[small != 0], [1.0, 99.0]))
    large = rng.gamma(2.0, 50.0, size=(130, 120, 110)).astype(np.float32)  # 1.7 million voxels > the sample
    assert large.size > RANGE_SAMPLE_VOXELS
    large[:, :, :30] = 0.0
    lo, hi = robust_range(large)
    exact_lo, exact_hi = np.percentile(large[large != 0], [1.0, 99.0])
    assert abs(lo - exact_lo) < 0.01 * (exact_hi - exact_lo) and abs(hi - exact_hi) < 0.01 * (exact_hi - exact_lo)
    scaled = robust_scale(large[:, :, 60], value_range=(lo, hi))  # a slice in its volume's grey levels
    assert scaled.min() == 0.0 and scaled.max() == 1.0 and scaled.dtype == np.float32


def test_det_histogram_counted_in_chunks_is_what_hist_counts_on_the_clipped_volume():
    """The det J panel's bars: the counts and edges matplotlib's ``hist`` gets from the whole clipped volume (its
    range from the finite clipped values), counted a chunk at a time for any chunk size."""
    from matplotlib.figure import Figure

    from scripts.workflow.qc import clipped_histogram

    rng = np.random.default_rng(3)
    det = rng.normal(1.0, 1.5, size=(23, 19, 17)).astype(np.float32)  # beyond [-1, 3] on both sides
    det[0, 0, :3] = [np.nan, 3.0, -1.0]  # NaN left out; the clip bounds themselves are values
    clipped = np.clip(det.ravel(), -1.0, 3.0)
    expected, expected_edges, _ = Figure().subplots().hist(clipped, bins=120)
    for chunk in (1000, 4097, 1 << 30):
        counts, edges = clipped_histogram(det, -1.0, 3.0, bins=120, chunk_voxels=chunk)
        assert counts.dtype == np.int64 and np.array_equal(counts, expected) and np.array_equal(edges, expected_edges)
    narrow = np.full((4, 4, 4), 1.5, np.float32)
    narrow[0, 0, 0] = 1.25  # all inside the clip range: edges from the values' own range
    counts, edges = clipped_histogram(narrow, -1.0, 3.0, bins=4)
    assert counts.tolist() == [1, 0, 0, 63] and edges[0] == 1.25 and edges[-1] == 1.5
