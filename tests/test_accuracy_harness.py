"""Tests of the accuracy benchmark (bench/accuracy) and the QC figure (scripts.workflow.qc).

Known-answer cases of the bench's scoring (the bundle's metrics behind it), pair discovery on a folder laid out like
shared/data, scoring and the end-to-end runner on a crop of the shipped real pair, the ANTs world→voxel displacement conversion against ANTs' own warped image (skipped
without antspyx), and the QC PNG.
"""

import importlib.util
import json
import sys

import nibabel as nib
import numpy as np
import pytest

from conftest import BUNDLE_ROOT, REPO_ROOT

if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench.accuracy.ants_syn import ddf_from_physical_field  # noqa: E402
from bench.accuracy.methods import Method, identity  # noqa: E402
from bench.accuracy.pairs import LabelGroup, Pair, Skipped, discover_pairs  # noqa: E402
from bench.accuracy.report import format_table  # noqa: E402
from bench.accuracy.runner import run_benchmark  # noqa: E402
from bench.accuracy.scoring import (  # noqa: E402
    det_from_ddf,
    dice_per_class,
    hd95_per_class,
    jacobian_stats,
    labels_present_in_both,
    load_ddf,
    score_pair,
)

SAMPLE = BUNDLE_ROOT / "sample_data"
# 64³ crop of the shipped pair around the deep grey matter: every seg8 class 1–8 occurs in both label maps
CROP = (slice(48, 112), slice(64, 128), slice(40, 104))


def _ball(shape, center, radius):
    grid = np.indices(shape).astype(np.float64)
    dist = np.sqrt(sum((grid[i] - center[i]) ** 2 for i in range(3)))
    return dist <= radius


def _save(array, path, affine=None):
    nib.save(nib.Nifti1Image(array, np.eye(4) if affine is None else affine), str(path))
    return path


def _crop_sample(folder, step=1):
    """Write the 64³ crop (optionally subsampled by ``step``) of the shipped pair with its seg8 maps into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("fixed_mni152_t1", "moving_colin27_t1", "fixed_mni152_seg8", "moving_colin27_seg8"):
        img = nib.load(str(SAMPLE / f"{name}.nii.gz"))
        data = np.asanyarray(img.dataobj)[CROP][::step, ::step, ::step]
        affine = img.affine.copy()
        affine[:3, :3] *= step
        affine[:3, 3] = img.affine[:3, :3] @ np.array([s.start for s in CROP]) + img.affine[:3, 3]
        dtype = np.uint8 if "seg8" in name else np.float32
        _save(data.astype(dtype), folder / f"{name}.nii.gz", affine)
    return folder


def test_dice_known_overlap_and_missing_labels():
    a = np.zeros((12, 10, 10), np.int32)
    b = np.zeros_like(a)
    a[2:10, 1:9, 1:9] = 1  # 8×8×8
    b[4:12, 1:9, 1:9] = 1  # same cube shifted 2 voxels: overlap 6×8×8
    b[0, 0, 0] = 3  # only in b
    scores = dice_per_class(a, b, [1, 2, 3])
    assert scores[1] == pytest.approx(2 * 384 / 1024)
    assert np.isnan(scores[2])  # in neither map: undefined, not 0 or 1
    assert scores[3] == 0.0
    assert labels_present_in_both(a, b, [0, 1, 2, 3]) == [1]
    with pytest.raises(ValueError, match="one grid"):
        dice_per_class(a, b[:-1], [1])


def test_hd95_concentric_balls_respects_spacing():
    shape = (24, 24, 24)
    inner = _ball(shape, (12, 12, 12), 4).astype(np.int32)
    outer = _ball(shape, (12, 12, 12), 8).astype(np.int32)
    iso = hd95_per_class(inner, outer, [1], spacing=(1.0, 1.0, 1.0))[1]
    assert 3.0 <= iso <= 5.0  # surfaces are 4 voxels apart (± discretisation)
    aniso = hd95_per_class(inner, outer, [1], spacing=(2.0, 2.0, 2.0))[1]
    assert aniso == pytest.approx(2 * iso, rel=1e-6)
    assert hd95_per_class(inner, inner, [1], spacing=(1.0, 1.0, 1.0))[1] == 0.0
    assert np.isnan(hd95_per_class(inner, 0 * inner, [1], spacing=(1.0, 1.0, 1.0))[1])


def test_jacobian_of_linear_field_and_folding():
    shape = (10, 11, 12)
    grid = np.indices(shape).astype(np.float64)
    a = np.array([[0.2, 0.1, 0.0], [0.0, -0.3, 0.05], [0.1, 0.0, 0.4]])
    ddf = np.einsum("ij,jdhw->idhw", a, grid).astype(np.float32)  # u(x) = A x, so det J = det(I + A) everywhere
    det = det_from_ddf(ddf)
    np.testing.assert_allclose(det, np.linalg.det(np.eye(3) + a), rtol=1e-5)
    assert jacobian_stats(det)["fold_pct"] == 0.0
    folded = np.einsum("ij,jdhw->idhw", np.diag([-1.5, 0.0, 0.0]), grid).astype(np.float32)  # x → −0.5 x: flipped
    assert jacobian_stats(det_from_ddf(folded))["fold_pct"] == 100.0
    with pytest.raises(ValueError, match=r"\(B, 3, D, H, W\)"):
        det_from_ddf(ddf[:2])


def test_physical_to_voxel_displacement():
    field = np.zeros((2, 3, 4, 3), np.float32)
    field[..., 0] = 2.0  # +2 mm along world x
    field[..., 2] = 3.0  # +3 mm along world z
    direction = np.diag([-1.0, -1.0, 1.0])  # LPS-style flips of the first two axes
    ddf = ddf_from_physical_field(field, direction, spacing=(2.0, 1.0, 1.5))
    assert ddf.shape == (3, 2, 3, 4)
    np.testing.assert_allclose(ddf[:, 0, 0, 0], [-1.0, 0.0, 2.0])


def test_discover_pairs_on_a_shared_data_like_folder(tmp_path):
    img = np.zeros((4, 4, 4), np.float32)
    seg = np.zeros((4, 4, 4), np.uint8)
    fm = tmp_path / "brain_pair"
    fm.mkdir()
    for name in ("fixed_x_t1", "moving_y_t1"):
        _save(img, fm / f"{name}.nii.gz")
    for name in ("fixed_x_seg8", "moving_y_seg8"):
        _save(seg, fm / f"{name}.nii.gz")
    weak = tmp_path / "oasis_weaklabels"
    weak.mkdir()
    for name in ("s_A_t1", "s_B_t1"):
        _save(img, weak / f"{name}.nii.gz")
    for name in ("s_A_seg", "s_B_seg"):
        _save(seg, weak / f"{name}.nii.gz")
    unl = tmp_path / "unlabeled"
    unl.mkdir()
    for name in ("u_A_t1", "u_B_t1"):
        _save(img, unl / f"{name}.nii.gz")
    abd = tmp_path / "abdomen"
    abd.mkdir()
    for name in ("ct_img", "ct_seg_total", "mr_img", "mr_seg_total_mr"):
        _save(img, abd / f"{name}.nii.gz")
    atlas = tmp_path / "atlas"
    atlas.mkdir()
    _save(img, atlas / "template_t1.nii.gz")

    found = {item.name: item for item in discover_pairs(tmp_path)}
    pair = found["brain_pair"]
    assert isinstance(pair, Pair) and pair.labelled
    assert pair.moving_image.name == "moving_y_t1.nii.gz" and pair.fixed_label.name == "fixed_x_seg8.nii.gz"
    assert [g.name for g in pair.groups] == ["mean_1_7", "mean_1_8"]
    weak_pair = found["oasis_weaklabels/s_B_to_A"]
    assert weak_pair.moving_image.name == "s_B_t1.nii.gz" and weak_pair.fixed_image.name == "s_A_t1.nii.gz"
    assert [(g.name, g.ids, g.merge) for g in weak_pair.groups] == [("wm_2", (2,), False), ("brain_mask", (1, 2), True)]
    assert isinstance(found["unlabeled/u_B_to_A"], Skipped)
    assert "not applicable" in found["abdomen"].reason and "1 CT, 1 MR" in found["abdomen"].reason
    assert "not recognised" in found["atlas"].reason
    with_unlabeled = {item.name: item for item in discover_pairs(tmp_path, include_unlabeled=True)}
    assert isinstance(with_unlabeled["unlabeled/u_B_to_A"], Pair)

    _save(img, abd / "ct2_img.nii.gz")  # a second CT makes a CT-to-CT pair
    _save(seg, abd / "ct2_seg_total.nii.gz")
    ct_pair = {item.name: item for item in discover_pairs(tmp_path)}["abdomen/ct"]
    assert isinstance(ct_pair, Pair) and ct_pair.fixed_label.name == "ct2_seg_total.nii.gz"
    with pytest.raises(ValueError, match="does not exist"):
        discover_pairs(tmp_path / "missing")


def test_score_pair_on_real_crop(tmp_path):
    folder = _crop_sample(tmp_path / "crop")
    (pair,) = discover_pairs(folder)
    identity = score_pair(pair, None)
    primary = identity["groups"]["mean_1_7"]
    assert primary["labels"] == [1, 2, 3, 4, 5, 6, 7]
    assert 0.3 < primary["dice"] < 0.95  # two different brains, pre-aligned: overlap but not perfect
    assert identity["fold_pct"] == 0.0
    # "all labels present in both" and a merged mask group score the same maps consistently
    groups = (LabelGroup("mean_all", ()), LabelGroup("mask", tuple(range(1, 9)), merge=True))
    other = score_pair(Pair("crop", pair.fixed_image, pair.moving_image, pair.fixed_label, pair.moving_label, groups), None)
    assert other["groups"]["mean_all"]["labels"] == list(range(1, 9))
    assert other["groups"]["mean_all"]["dice"] == pytest.approx(identity["groups"]["mean_1_8"]["dice"])
    assert other["groups"]["mask"]["dice"] > identity["groups"]["mean_1_8"]["dice"]  # union overlaps more than parts

    # a "method" whose warped labels are the fixed labels and whose ddf folds a known slab of voxels
    out = tmp_path / "perfect"
    out.mkdir()
    fixed_img = nib.load(str(pair.fixed_label))
    _save(np.asanyarray(fixed_img.dataobj), out / "warped_label.nii.gz", fixed_img.affine)
    ddf = np.zeros((64, 64, 64, 3), np.float32)
    ddf[:, :, 30:34, 2] = -3.0 * np.arange(4)[None, None, :]  # u_2 drops 3 voxels per voxel: du/dz = -3 → det -2
    _save(ddf, out / "ddf.nii.gz", fixed_img.affine)
    scored = score_pair(pair, out)
    assert scored["groups"]["mean_1_7"]["dice"] == 1.0 and scored["groups"]["mean_1_8"]["hd95_mm"] == 0.0
    # only u_2 varies, and only along axis 2: det J = 1 + du_2/dz (central differences, one-sided at the borders)
    expected = 100.0 * float((1.0 + np.gradient(ddf[..., 2], axis=2) <= 0).mean())
    assert scored["fold_pct"] == pytest.approx(expected, rel=1e-5)
    assert 0.0 < scored["fold_pct"] < 100.0
    np.testing.assert_array_equal(load_ddf(out / "ddf.nii.gz"), np.moveaxis(ddf, -1, 0))


def test_runner_end_to_end_identity(tmp_path):
    data = tmp_path / "data"
    _crop_sample(data / "brain_crop", step=2)
    report = run_benchmark([data], [identity()], tmp_path / "out")
    written = json.loads((tmp_path / "out" / "results.json").read_text())
    assert written["results"][0]["pair"] == "brain_crop" and written["results"][0]["status"] == "ok"
    run = written["runs"][0]
    assert run["threads_per_method"] == 2 and "monai" in run["versions"]
    assert written["pairs"]["brain_crop"]["groups"][0]["name"] == "mean_1_7"
    table = format_table(report)
    assert "| brain_crop | identity | mean_1_7=" in table


def test_runner_runs_scores_and_records_failing_and_missing_methods(tmp_path):
    data = tmp_path / "data"
    folder = _crop_sample(data / "brain_crop", step=2)
    # a "method" process that writes the fixed labels as its warped labels: Dice 1 through the whole runner
    copy = "import shutil, sys; shutil.copy(sys.argv[1], sys.argv[2] + '/warped_label.nii.gz')"
    perfect = Method(
        "perfect", lambda pair, out: [sys.executable, "-c", copy, str(pair.fixed_label), str(out)], tmp_path
    )
    broken = Method("broken", lambda pair, out: [sys.executable, "-c", "raise SystemExit(2)"], tmp_path)
    absent = Method("absent", available=False, why_not="antspyx not installed")
    report = run_benchmark([data], [perfect, broken, absent], tmp_path / "out", threads=1)
    rows = {r["method"]: r for r in report["results"]}
    assert rows["perfect"]["status"] == "ok" and rows["perfect"]["groups"]["mean_1_7"]["dice"] == 1.0
    assert rows["perfect"]["groups"]["mean_1_8"]["hd95_mm"] == 0.0 and rows["perfect"]["fold_source"] == "missing"
    assert rows["perfect"]["peak_rss_mib"] > 0 and rows["perfect"]["returncode"] == 0
    assert (tmp_path / "out" / "brain_crop" / "perfect" / "warped_label.nii.gz").exists()
    assert rows["broken"]["status"] == "failed" and rows["broken"]["reason"].startswith("exit 2")
    assert rows["absent"] == {**rows["absent"], "status": "not run", "reason": "antspyx not installed"}
    written = json.loads((tmp_path / "out" / "results.json").read_text())["results"]
    statuses = [(r["method"], r["status"]) for r in written]
    assert statuses == [("perfect", "ok"), ("broken", "failed"), ("absent", "not run")]
    assert nib.load(str(folder / "fixed_mni152_seg8.nii.gz")).shape == (32, 32, 32)


@pytest.mark.skipif(importlib.util.find_spec("ants") is None, reason="antspyx not installed (requirements-bench.txt)")
def test_ants_syn_outputs_agree_with_voxel_ddf(tmp_path):
    from scipy.ndimage import map_coordinates

    from bench.accuracy.ants_syn import register_syn

    folder = _crop_sample(tmp_path / "crop", step=2)  # 32³ at 2 mm
    (pair,) = discover_pairs(folder)
    info = register_syn(str(pair.fixed_image), str(pair.moving_image), str(pair.moving_label), tmp_path / "syn", reg_iterations=(20, 10))
    assert info["type_of_transform"] == "SyNOnly"
    moving = nib.load(str(pair.moving_image)).get_fdata().astype(np.float32)
    warped_ants = nib.load(str(tmp_path / "syn" / "warped_image.nii.gz")).get_fdata()
    ddf = load_ddf(tmp_path / "syn" / "ddf.nii.gz")
    assert np.abs(ddf).max() > 0.1  # SyN moved something
    warped_ours = map_coordinates(moving, np.indices(moving.shape) + ddf, order=1)
    # our voxel ddf reproduces ANTs' own warped image (bundle convention warped(p) = moving(p + ddf(p)))
    assert np.abs(warped_ours - warped_ants).mean() < 1e-3 * np.abs(warped_ants).mean()
    scored = score_pair(pair, tmp_path / "syn")
    assert scored["fold_source"] == "ants jacobian_det"
    assert scored["fold_pct"] == pytest.approx(scored["fold_pct_from_ddf"], abs=0.5)
    assert scored["ddf_label_agreement"] > 0.9  # genericLabel interpolation is not exactly nearest


def test_qc_png(tmp_path):
    from scripts.workflow.qc import qc_figure, save_qc_png

    rng = np.random.default_rng(0)
    fixed = rng.random((20, 24, 16)).astype(np.float32)
    ddf = np.zeros((3, 20, 24, 16), np.float32)
    ddf[0] = 1.0
    det = np.ones((20, 24, 16), np.float32)
    det[5, 5, 8] = -0.5
    path = save_qc_png(tmp_path / "qc.png", fixed, np.roll(fixed, 1, 0), fixed, ddf, det, title="synthetic")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    fig = qc_figure(fixed, fixed, fixed, ddf, det, index=8)
    assert len(fig.axes) >= 8
    fig.canvas.draw()
    det_panel = next(ax for ax in fig.axes if ax.get_title().startswith("det J (black"))
    x0, y0 = det_panel.transData.transform((5, 5))  # the folded voxel (5, 5) of slice 8
    pixel = np.asarray(fig.canvas.buffer_rgba())[int(fig.bbox.height - y0), int(x0), :3]
    assert pixel.max() < 40  # drawn black
    assert any("folds 0.013 %" in ax.get_title() for ax in fig.axes)  # 1 of 7680 voxels
    with pytest.raises(ValueError, match="share one grid"):
        qc_figure(fixed, fixed[:-1], fixed, ddf, det)
    with pytest.raises(ValueError, match=r"\.png"):
        save_qc_png(tmp_path / "qc.jpg", fixed, fixed, fixed, ddf, det)


def test_qc_png_from_outputs_resamples_moving_grid(tmp_path):
    from scripts.workflow.qc import _resample_to_grid, qc_png_from_outputs

    rng = np.random.default_rng(1)
    fixed = rng.random((16, 18, 14)).astype(np.float32)
    shifted = np.eye(4)
    shifted[:3, 3] = [2.0, 0.0, 0.0]  # the moving grid starts 2 mm further along x: moving voxel i sits at fixed voxel i + 2
    moving = np.zeros((20, 18, 14), np.float32)
    moving[:14] = fixed[2:]
    np.testing.assert_allclose(_resample_to_grid(moving, shifted, fixed.shape, np.eye(4))[2:], fixed[2:], atol=1e-6)
    out = tmp_path / "out"
    out.mkdir()
    _save(fixed, out / "warped_image.nii.gz")
    _save(np.zeros((16, 18, 14, 3), np.float32), out / "ddf.nii.gz")
    png = qc_png_from_outputs(
        _save(fixed, tmp_path / "f.nii.gz"), _save(moving, tmp_path / "m.nii.gz", shifted), out, tmp_path / "qc.png"
    )
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_cli_register_writes_qc_png(tmp_path):
    from scripts.cli import register

    folder = _crop_sample(tmp_path / "crop", step=2)  # 32³ real crop, plain inference (no optimisation): seconds
    out, png = tmp_path / "out", tmp_path / "qc" / "demo.png"
    register(
        fixed=str(folder / "fixed_mni152_t1.nii.gz"),
        moving=str(folder / "moving_colin27_t1.nii.gz"),
        out=str(out),
        iterations=0,
        device="cpu",
        qc_png=str(png),
    )
    assert (out / "ddf.nii.gz").exists()
    assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 10_000
    assert (out / "qc.png").read_bytes()[:4] == b"\x89PNG"  # register's own figure, written by default
    # The same --qc_png again without --overwrite: refused before anything runs, the figure left as it is.
    before = png.read_bytes()
    with pytest.raises(SystemExit) as stopped:
        register(fixed=str(folder / "fixed_mni152_t1.nii.gz"), moving=str(folder / "moving_colin27_t1.nii.gz"),
                 out=str(tmp_path / "out2"), iterations=0, device="cpu", qc_png=str(png))
    assert stopped.value.code == 2
    assert png.read_bytes() == before and not (tmp_path / "out2" / "ddf.nii.gz").exists()
