"""Native scans end to end: affine stage -> SACB-Net -> ITK/ANTs transforms that other programs apply identically.

The native pair is the shipped real pair at 3 mm with the moving scan's header moved by a known rigid transform (10
degrees about z and a translation of about 1 cm), so the moving scan lies in its own "scanner space" and the true world
transform is known.
"""

import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from conftest import BUNDLE_ROOT
from workflow_data import NATIVE_TRUE_T, write_small_pair

from scripts.cli import apply, register
from scripts.io.completion import pair_outputs_complete
from scripts.spatial import read_itk_affine

LABELS = range(1, 9)
TRUE_T = NATIVE_TRUE_T  # fixed world point -> moving world point (the moving header moved by it)


def _mean_dice(a, b):
    return float(np.mean([2 * ((a == k) & (b == k)).sum() / max((a == k).sum() + (b == k).sum(), 1) for k in LABELS]))


def _array(path):
    return np.asanyarray(nib.load(str(path)).dataobj)


@pytest.fixture(scope="module")
def native(native_registration):
    """The moved pair and one full registration of it (inverse written; shared with the ANTs tests)."""
    return native_registration


def test_affine_stage_recovers_the_scanner_space_offset(native):
    estimated = read_itk_affine(native["out"] / "affine.mat")
    label = nib.load(native["pair"]["fixed_label"])
    voxels = np.argwhere(np.asanyarray(label.dataobj) > 0)
    world = nib.affines.apply_affine(label.affine, voxels)
    error = np.linalg.norm(nib.affines.apply_affine(estimated, world) - nib.affines.apply_affine(TRUE_T, world), axis=1)
    assert np.sqrt(np.mean(error**2)) < 1.5  # mm over the brain, at 3 mm voxels
    metrics = json.loads((native["out"] / "metrics.json").read_text())
    unmoved = _mean_dice(_array(native["pair"]["fixed_label"]), _array(native["aligned"]["moving_label"]))
    assert metrics["mean_dice_identity"] > unmoved - 0.02  # after the affine stage: back to the aligned pair's overlap


def test_simpleitk_applies_affine_and_warp_like_the_bundle(native):
    pair, out = native["pair"], native["out"]
    affine = sitk.ReadTransform(str(out / "affine.mat"))
    field = sitk.ReadImage(str(out / "warp.nii.gz"), sitk.sitkVectorFloat64)
    transform = sitk.CompositeTransform([affine, sitk.DisplacementFieldTransform(field)])  # last one applied first
    fixed = sitk.ReadImage(pair["fixed_image"])

    def warp(path, interpolator, pixel):
        moving = sitk.Cast(sitk.ReadImage(path), pixel)
        return sitk.GetArrayFromImage(sitk.Resample(moving, fixed, transform, interpolator, 0.0, pixel)).transpose(2, 1, 0)

    image = warp(pair["moving_image"], sitk.sitkLinear, sitk.sitkFloat32)
    label = warp(pair["moving_label"], sitk.sitkNearestNeighbor, sitk.sitkUInt8)
    brain = _array(pair["fixed_label"]) > 0
    ours = _array(out / "warped_image.nii.gz")
    assert np.corrcoef(image[brain], ours[brain])[0, 1] >= 0.99
    assert _mean_dice(label, _array(out / "warped_label.nii.gz")) >= 0.97


def test_simpleitk_applies_the_composite_files_in_one_step_like_the_two_file_pairs(native):
    """sitk.ReadTransform('transform.h5') + sitk.Resample gives what affine.mat + warp.nii.gz give (and reproduces
    warped_label.nii.gz); inverse_transform.h5 gives what affine.mat inverted + inverse_warp.nii.gz give."""
    pair, out = native["pair"], native["out"]
    affine = sitk.ReadTransform(str(out / "affine.mat"))

    def field(name):
        return sitk.DisplacementFieldTransform(sitk.ReadImage(str(out / name), sitk.sitkVectorFloat64))

    def resample(path, reference, transform):
        image = sitk.ReadImage(path)
        reference = sitk.ReadImage(reference)
        resampled = sitk.Resample(image, reference, transform, sitk.sitkNearestNeighbor, 0.0, image.GetPixelID())
        return sitk.GetArrayFromImage(resampled).transpose(2, 1, 0)

    one_file = resample(pair["moving_label"], pair["fixed_image"], sitk.ReadTransform(str(out / "transform.h5")))
    two_files = resample(pair["moving_label"], pair["fixed_image"],
                         sitk.CompositeTransform([affine, field("warp.nii.gz")]))
    assert np.array_equal(one_file, two_files)
    assert (one_file == _array(out / "warped_label.nii.gz")).mean() >= 0.995
    inverse = sitk.ReadTransform(str(out / "inverse_transform.h5"))
    one_file = resample(pair["fixed_label"], pair["moving_image"], inverse)
    two_files = resample(pair["fixed_label"], pair["moving_image"],
                         sitk.CompositeTransform([field("inverse_warp.nii.gz"), affine.GetInverse()]))
    assert np.array_equal(one_file, two_files)
    assert abs(_mean_dice(one_file, _array(pair["moving_label"])) - json.loads(
        (out / "metrics.json").read_text())["mean_dice"]) <= 0.01


def test_apply_reproduces_warped_label_and_the_inverse_maps_fixed_labels_back(native, tmp_path):
    pair, out = native["pair"], native["out"]
    apply(fixed=pair["fixed_image"], moving=pair["moving_label"], transform_dir=str(out),
          warped_out=str(tmp_path / "label.nii.gz"), interpolation="nearest")
    assert _mean_dice(_array(tmp_path / "label.nii.gz"), _array(out / "warped_label.nii.gz")) >= 0.99
    apply(fixed=pair["fixed_label"], moving=pair["moving_image"], transform_dir=str(out),
          warped_out=str(tmp_path / "inverse.nii.gz"), interpolation="nearest", inverse=True)
    on_moving = nib.load(str(tmp_path / "inverse.nii.gz"))
    assert np.allclose(on_moving.affine, nib.load(pair["moving_image"]).affine)
    forward = json.loads((out / "metrics.json").read_text())["mean_dice"]
    backward = _mean_dice(np.asanyarray(on_moving.dataobj), _array(pair["moving_label"]))
    assert abs(backward - forward) <= 0.01
    assert "inverse_consistency" in json.loads((out / "metrics.json").read_text())


def test_affine_only_stops_after_the_affine_stage(native, tmp_path):
    pair = native["pair"]
    register(fixed=pair["fixed_image"], moving=pair["moving_image"], out=str(tmp_path / "aff"),
             moving_label=pair["moving_label"], fixed_label=pair["fixed_label"], affine_only=True)
    metrics = json.loads((tmp_path / "aff" / "metrics.json").read_text())
    assert not np.any(_array(tmp_path / "aff" / "ddf.nii.gz"))
    assert metrics["mean_dice"] == pytest.approx(metrics["mean_dice_identity"], abs=0.01)
    assert np.allclose(read_itk_affine(tmp_path / "aff" / "affine.mat"), read_itk_affine(native["out"] / "affine.mat"))


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "scripts.cli", *args], cwd=BUNDLE_ROOT, capture_output=True, text=True)


def test_apply_refuses_missing_or_foreign_transforms(native, tmp_path):
    pair = native["pair"]
    missing = _cli("apply", "--fixed", pair["fixed_image"], "--moving", pair["moving_label"], "--transform_dir",
                   str(tmp_path / "nothing"), "--warped_out", str(tmp_path / "x.nii.gz"))
    assert missing.returncode == 2 and "Traceback" not in missing.stderr and "nothing" in missing.stderr
    other = write_small_pair(tmp_path / "other", factor=4)  # another fixed grid (4 mm)
    foreign = _cli("apply", "--fixed", other["fixed_image"], "--moving", pair["moving_label"], "--transform_dir",
                   str(native["out"]), "--warped_out", str(tmp_path / "y.nii.gz"), "--interpolation", "nearest")
    assert foreign.returncode == 2 and "warp.nii.gz" in foreign.stderr and "Traceback" not in foreign.stderr
    assert not (tmp_path / "x.nii.gz").exists() and not (tmp_path / "y.nii.gz").exists()
    bad = _cli("register", "--fixed", pair["fixed_image"], "--moving", pair["moving_image"], "--out",
               str(tmp_path / "z"), "--affine", "similarity")
    assert bad.returncode == 2 and "--affine" in bad.stderr and not (tmp_path / "z").exists()


def test_monai_bundle_run_of_inference_json_alone_is_register(native, tmp_path):
    """``inference.json`` is the product: run alone (as ``python -m monai.bundle run --config_file
    configs/inference.json`` does) on the native pair it writes the same transforms as ``register``'s default."""
    from workflow_data import run_bundle_workflow

    pair, out = native["pair"], tmp_path / "bundle_run"
    run_bundle_workflow(["inference.json"], output_dir=str(out), write_inverse=True,
                        **{k: pair[k] for k in ("moving_image", "fixed_image", "moving_label", "fixed_label")})
    for name in ("warp.nii.gz", "inverse_warp.nii.gz", "warped_label.nii.gz"):
        ours, reference = (np.asarray(nib.load(str(d / name)).dataobj, dtype=np.float64) for d in (out, native["out"]))
        assert np.abs(ours - reference).max() < 1e-4, name
    for name in ("transform.h5", "inverse_transform.h5"):  # the same composites (their fields are the files above)
        ours, reference = (sitk.ReadTransform(str(d / name)) for d in (out, native["out"]))
        point = (-20.0, 15.0, 10.0)
        np.testing.assert_allclose(ours.TransformPoint(point), reference.TransformPoint(point), atol=1e-4)
    np.testing.assert_allclose(read_itk_affine(out / "affine.mat"), read_itk_affine(native["out"] / "affine.mat"),
                               atol=1e-6)


@pytest.mark.parametrize("inverse", [False, True])
def test_completion_checks_know_every_transform_file_register_writes(native, inverse, tmp_path):
    """inference.json's transform_output_names are the files SaveTransformsd writes (transform.h5 and, with --inverse,
    inverse_warp.nii.gz and inverse_transform.h5 included), so a resumed cohort counts a pair without one of them as
    unfinished."""
    from monai.bundle import ConfigParser

    from scripts.workflow import SaveTransformsd

    parser = ConfigParser()
    parser.read_config(str(BUNDLE_ROOT / "configs" / "inference.json"))
    parser["write_inverse"] = inverse
    names = parser.get_parsed_content("transform_output_names")
    assert names == SaveTransformsd(tmp_path, inverse=inverse).file_names()
    assert "transform.h5" in names and ("inverse_transform.h5" in names) == inverse
    output_names = parser.get_parsed_content("pair_output_names") + names
    pair = native["pair"]
    folder = tmp_path / "pair"
    folder.mkdir()
    for name in output_names:  # register's own outputs (it ran with --inverse)
        (folder / name).symlink_to(native["out"] / name)
    assert pair_outputs_complete(folder, pair, output_names)
    (folder / names[-1]).unlink()
    assert not pair_outputs_complete(folder, pair, output_names)
