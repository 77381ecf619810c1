"""MONAI Deploy app (integrations/deploy/): the exported TorchScript runs in a Holoscan application built on
``MonaiBundleInferenceOperator`` on the real pair, NIfTI in and out, and reproduces ``python -m scripts.cli register``
with its defaults: the affine stage (the moving scan's header is moved by a known rigid transform, so it lies in its
own scanner space), SACB-Net and the field refinement, whose configs the TorchScript file carries.

DICOM in, DICOM SEG out: the same fixed scan written as an axial MR series (beside a 3-slice localizer) is registered
with the same atlas, whose labels are renumbered (10, 20, ... 80) so that a wrong label -> segment mapping shows; the
SEG that pydicom reads back must reference the series and, placed in patient space, give the NIfTI path's labels.

Needs the MONAI Deploy virtual environment (``integrations/deploy/setup_env.sh``; ``$SACB_DEPLOY_VENV`` or
``.venv-deploy``): the SDK cannot live in the main environment (see requirements-deploy.txt)."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from conftest import BUNDLE_ROOT, REPO_ROOT, SAMPLE_DATA
from dicom_series import segmentation_label_map, write_mr_series
from ecosystem_utils import ATLAS_MOVE, bundle_copy_with_weights, fast_affine_stage, run_bundle_command, run_checked
from reliability_data import save
from spatial_cases import mean_dice

from scripts.layers import resample_moving
from scripts.spatial import read_itk_affine

pytestmark = [pytest.mark.deploy, pytest.mark.slow]

DEPLOY_PYTHON = Path(os.environ.get("SACB_DEPLOY_VENV", REPO_ROOT / ".venv-deploy")) / "bin" / "python"
APP = REPO_ROOT / "integrations" / "deploy" / "app.py"
INPUT_FILES = {
    "moving_image": "moving.nii.gz",
    "fixed_image": "fixed.nii.gz",
    "moving_label": "moving_label.nii.gz",
    "fixed_label": "fixed_label.nii.gz",
}
OUTPUTS = ("ddf.nii.gz", "warped_image.nii.gz", "warped_label.nii.gz", "jacobian_det.nii.gz", "warp.nii.gz")
#: fixed world point -> moving world point: the moving header moved by 10 + 4 degrees about the brain centre and ~17 mm
MOVE = ATLAS_MOVE

if not DEPLOY_PYTHON.is_file():
    pytest.skip(
        f"MONAI Deploy venv not found at {DEPLOY_PYTHON.parent.parent}: run integrations/deploy/setup_env.sh",
        allow_module_level=True,
    )


def _run_app(model_ts: Path, inputs: Path, out: Path, bundle: Path, check: bool = True, **env: str):
    """Run the Deploy app (its scripts package and macros from ``bundle``, more variables in ``env``); ``check``: fail
    the test on an error."""
    command = " ".join(shlex.quote(str(a)) for a in (DEPLOY_PYTHON, APP, "-i", inputs, "-o", out, "-m", model_ts))
    shell = ["bash", "-c", f"ulimit -s 32768 && exec {command}"]
    env = {"SACB_BUNDLE_ROOT": str(bundle), **env}
    if check:
        return run_checked(shell, cwd=out.parent, env=env)
    return subprocess.run(shell, cwd=out.parent, capture_output=True, text=True, timeout=600, check=False,
                          env=dict(os.environ, **env))


@pytest.fixture(scope="module")
def deployed_run(tmp_path_factory, moved_pair_registration):
    """Export the TorchScript with the default pipeline's configs, run the Deploy app and the CLI's default register
    on the real pair (4 mm, 40x48x40), the moving scan in its own scanner space (``MOVE``); the CLI's run is the
    session's ``moved_pair_registration`` (a bundle copy configured as this one), shared with the MONAI Label tests."""
    work = tmp_path_factory.mktemp("deploy")
    bundle = bundle_copy_with_weights(work)
    fast_affine_stage(bundle)
    inputs = work / "in"
    inputs.mkdir()
    for key, name in INPUT_FILES.items():  # the app reads these names (the same voxels and headers as the CLI's pair)
        (inputs / name).write_bytes(Path(moved_pair_registration["pair"][key]).read_bytes())
    model_ts = work / "model.ts"
    run_bundle_command(
        ["ckpt_export", "--net_id", "network_def", "--filepath", str(model_ts), "--ckpt_file", "models/model.pt",
         "--meta_file", "configs/metadata.json", "--config_file", "configs/inference.json"],
        bundle,
    )
    app_out = work / "app_out"
    app_run = _run_app(model_ts, inputs, app_out, bundle)
    return inputs, app_out, moved_pair_registration["out"], app_run.stdout + app_run.stderr


def test_app_ran_the_bundle_operator(deployed_run):
    _, app_out, _, log = deployed_run
    assert "Graph execution finished" in log and "GXF_FAILURE" not in log
    for name in OUTPUTS + ("metrics.json", "affine.mat"):
        assert (app_out / name).is_file(), name


def test_outputs_on_fixed_grid_and_not_empty(deployed_run):
    inputs, app_out, _, _ = deployed_run
    fixed = nib.load(str(inputs / "fixed.nii.gz"))
    warped = nib.load(str(app_out / "warped_image.nii.gz"))
    ddf = nib.load(str(app_out / "ddf.nii.gz"))
    assert warped.shape == fixed.shape
    assert ddf.shape[:3] == fixed.shape and ddf.shape[-1] == 3
    np.testing.assert_allclose(warped.affine, fixed.affine, atol=1e-5)
    np.testing.assert_allclose(ddf.affine, fixed.affine, atol=1e-5)
    warped_data = np.asarray(warped.dataobj, dtype=np.float32)
    assert np.count_nonzero(warped_data) > 0.1 * warped_data.size
    assert np.abs(np.asarray(ddf.dataobj)).max() > 0.1  # a real field, not an identity passthrough


def test_affine_stage_brings_the_moving_scan_from_its_own_scanner_space(deployed_run):
    inputs, app_out, reference_out, _ = deployed_run
    fixed, moving = nib.load(str(inputs / "fixed_label.nii.gz")), nib.load(str(inputs / "moving_label.nii.gz"))
    fixed_labels = np.asarray(fixed.dataobj)
    brain = nib.affines.apply_affine(fixed.affine, np.argwhere(fixed_labels > 0))
    estimated = read_itk_affine(app_out / "affine.mat")
    error = nib.affines.apply_affine(estimated, brain) - nib.affines.apply_affine(MOVE, brain)
    assert np.sqrt(np.mean(np.sum(error**2, axis=1))) < 2.0  # mm over the fixed brain, 4 mm voxels
    np.testing.assert_allclose(estimated, read_itk_affine(reference_out / "affine.mat"), atol=1e-4)
    # the moving labels where the header puts them (no affine stage) vs the app's warped labels
    in_place = resample_moving(torch.as_tensor(np.asarray(moving.dataobj))[None, None], moving.affine, fixed.shape,
                               fixed.affine, torch.eye(4, dtype=torch.float64), mode="nearest")[0, 0].numpy()
    warped = np.asarray(nib.load(str(app_out / "warped_label.nii.gz")).dataobj)
    assert mean_dice(fixed_labels, warped) > mean_dice(fixed_labels, in_place) + 0.3  # about 0.6 vs 0.15


def test_app_refuses_a_torchscript_without_the_pipeline_configs(deployed_run, tmp_path):
    """A file exported without inference.json (the network alone) has no pipeline to run: refused, naming the export."""
    inputs, _, _, _ = deployed_run
    bundle = inputs.parent / "bundle"
    bare_export = tmp_path / "model.ts"
    with zipfile.ZipFile(inputs.parent / "model.ts") as source, zipfile.ZipFile(bare_export, "w") as target:
        for item in source.infolist():
            if Path(item.filename).stem != "inference":
                target.writestr(item, source.read(item))
    result = _run_app(bare_export, inputs, tmp_path / "out", bundle, check=False)
    assert result.returncode != 0
    assert "lacks the config(s) ['inference']" in result.stderr and "ckpt_export" in result.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.parametrize("name", OUTPUTS)
def test_app_matches_the_cli_default_register(deployed_run, name):
    _, app_out, reference_out, _ = deployed_run
    app, reference = nib.load(str(app_out / name)), nib.load(str(reference_out / name))
    np.testing.assert_allclose(app.affine, reference.affine, atol=1e-6)
    scale = max(1.0, float(np.abs(np.asarray(reference.dataobj)).max()))
    np.testing.assert_allclose(np.asarray(app.dataobj), np.asarray(reference.dataobj), atol=1e-4 * scale, rtol=0)


#: the DICOM run's atlas labels: the NIfTI run's, times this (ids 10..80, not the segment numbers 1..8)
LABEL_FACTOR = 10
SEGMENTATION_FILE = "warped_label_seg.dcm"


@pytest.fixture(scope="module")
def dicom_run(deployed_run):
    """The app on a DICOM study: the NIfTI run's fixed scan as an axial MR series (and a localizer), with the NIfTI
    run's atlas beside it, its labels renumbered (``LABEL_FACTOR``) and named by a lookup table."""
    inputs, _, _, _ = deployed_run
    work = inputs.parent
    study = work / "dicom_in"
    fixed = nib.load(str(inputs / "fixed.nii.gz"))
    fixed_data = np.asarray(fixed.dataobj)
    series = write_mr_series(study / "series_3", fixed_data, fixed.affine)
    localizer = write_mr_series(study / "series_1", fixed_data[:, :, 18:21],
                                fixed.affine @ nib.affines.from_matvec(np.eye(3), [0, 0, 18]), "localizer",
                                study_uid=series.study_uid)
    moving_label = nib.load(str(inputs / "moving_label.nii.gz"))
    save(study / "moving_label.nii.gz", np.asarray(moving_label.dataobj) * LABEL_FACTOR, moving_label.affine)
    (study / "moving.nii.gz").write_bytes((inputs / "moving.nii.gz").read_bytes())
    table = (SAMPLE_DATA / "moving_colin27_seg8.tsv").read_text().splitlines()
    names = {int(row.split("\t")[0]) * LABEL_FACTOR: row.split("\t")[1] for row in table[1:]}
    (study / "moving_label.tsv").write_text("index\tname\n" + "".join(f"{i}\t{n}\n" for i, n in names.items()))
    out = work / "dicom_out"
    run = _run_app(work / "model.ts", study, out, work / "bundle")
    return series, localizer, names, out, run.stdout + run.stderr


def test_dicom_study_gives_a_seg_of_the_selected_series(dicom_run):
    series, localizer, names, out, log = dicom_run
    assert "Graph execution finished" in log and "GXF_FAILURE" not in log
    seg = pydicom.dcmread(out / SEGMENTATION_FILE)
    assert seg.SOPClassUID == pydicom.uid.SegmentationStorage and seg.Modality == "SEG"
    assert seg.SegmentationType == "BINARY"
    assert seg.StudyInstanceUID == series.study_uid
    assert seg.SeriesInstanceUID not in (series.series_uid, localizer.series_uid)
    # the volume (40 slices), not the localizer (3 slices), was chosen by the selection rules and is referenced
    (referenced,) = seg.ReferencedSeriesSequence
    assert referenced.SeriesInstanceUID == series.series_uid
    assert {item.ReferencedSOPInstanceUID for item in referenced.ReferencedInstanceSequence} == set(
        series.sop_instance_uids)
    # one segment per atlas label, in label order, named by the atlas label map's lookup table
    assert [(item.SegmentNumber, item.SegmentLabel) for item in seg.SegmentSequence] == [
        (number, names[label]) for number, label in enumerate(sorted(names), start=1)]
    for name in OUTPUTS + ("affine.mat", "transform.h5"):
        assert (out / name).is_file(), name
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temporary file or folder left behind


def test_seg_frames_in_patient_space_match_the_nifti_path_labels(deployed_run, dicom_run):
    """Every SEG frame placed through its own position, orientation and spacing lands on a voxel centre of the NIfTI
    run's warped label map, and the segments there are exactly that map (segment n = n-th atlas label)."""
    _, app_out, _, _ = deployed_run
    _, _, names, out, _ = dicom_run
    reference = nib.load(str(app_out / "warped_label.nii.gz"))
    expected = np.asarray(reference.dataobj).astype(np.int64) * LABEL_FACTOR
    seg = pydicom.dcmread(out / SEGMENTATION_FILE)
    numbers, off_grid = segmentation_label_map(seg, reference.shape, reference.affine)
    assert off_grid == 0
    label_of_segment = np.array([0] + sorted(names))
    found = label_of_segment[numbers]
    assert len(np.unique(expected)) >= 6  # most atlas structures survive at 4 mm: a real check, not an empty map
    np.testing.assert_array_equal(found, expected)
    # empty frames are left out: one frame per (segment, axial slice) that holds the segment
    axial = nib.orientations.aff2axcodes(reference.affine).index("S")
    frames = sum(len(np.unique(np.nonzero(expected == label)[axial])) for label in names)
    assert seg.NumberOfFrames == frames


def test_dicom_path_writes_the_nifti_path_transforms(deployed_run, dicom_run):
    """The transforms are in world coordinates, so the DICOM series' own grid (LPS slices) gives the NIfTI run's."""
    _, app_out, _, _ = deployed_run
    _, _, _, out, _ = dicom_run
    np.testing.assert_allclose(read_itk_affine(out / "affine.mat"), read_itk_affine(app_out / "affine.mat"), atol=1e-4)
    dicom_labels = nib.load(str(out / "warped_label.nii.gz"))
    assert nib.orientations.aff2axcodes(dicom_labels.affine) == ("L", "P", "S")  # the series' grid, not the NIfTI's


def test_app_refuses_a_folder_with_neither_a_pair_nor_dicom(deployed_run, tmp_path):
    inputs, _, _, _ = deployed_run
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "moving.nii.gz").write_bytes((inputs / "moving.nii.gz").read_bytes())
    (folder / "notes.txt").write_text("not DICOM")
    result = _run_app(inputs.parent / "model.ts", folder, tmp_path / "out", inputs.parent / "bundle", check=False)
    assert result.returncode != 0
    assert "holds neither fixed.nii.gz" in result.stderr and "DICOM" in result.stderr


def test_app_names_the_series_found_when_none_matches_the_rules(dicom_run, tmp_path):
    """Rules that select CT only, on the MR study: the app stops at the selection, naming the rules and the series."""
    series, _, _, out, _ = dicom_run
    work = out.parent
    rules = tmp_path / "ct_only.json"
    rules.write_text(json.dumps({"selections": [{"name": "CT", "conditions": {"Modality": "(?i)^CT$"}}]}))
    result = _run_app(work / "model.ts", work / "dicom_in", tmp_path / "out", work / "bundle", check=False,
                      SACB_SERIES_RULES=str(rules))
    assert result.returncode != 0
    assert f"no series of the DICOM study matches the selection rules {rules}" in result.stderr
    assert "('MR', 'T1 axial', 40)" in result.stderr and "('MR', 'localizer', 3)" in result.stderr
    assert not (tmp_path / "out" / SEGMENTATION_FILE).exists()


ATLAS_CHECKS = r"""
import json, sys, tempfile
from pathlib import Path
import numpy as np
bundle, app_dir = Path(sys.argv[1]), sys.argv[2]
sys.path[:0] = [str(bundle), app_dir]
from dicom_operators import AtlasSegments, atlas_pair
result = {}
with tempfile.TemporaryDirectory() as folder:
    shipped = atlas_pair(Path(folder), bundle)
    segments = AtlasSegments.from_label_map(shipped["moving_label"])
    result.update(shipped=shipped, label_ids=segments.label_ids, names=segments.names)
    (Path(folder) / "moving.nii.gz").write_bytes(Path(shipped["moving_image"]).read_bytes())
    try:
        atlas_pair(Path(folder), bundle)
    except ValueError as error:
        result["half_atlas_error"] = str(error)
renumbered = AtlasSegments((10, 30, 80), ("a", "b", "c"))
result["segment_numbers"] = renumbered.segment_numbers(np.array([[[0, 10], [80, 30]]])).tolist()
try:
    renumbered.segment_numbers(np.array([[[0, 20]]]))
except ValueError as error:
    result["unknown_label_error"] = str(error)
print(json.dumps(result))
"""


def test_dicom_atlas_defaults_to_the_shipped_colin27_and_segments_follow_label_order():
    """Without an atlas beside the study, the shipped Colin27 and its 8 named labels; half an atlas is refused; label
    ids map to segment numbers 1..N in label order, and a label the atlas lacks is refused."""
    command = " ".join(shlex.quote(str(a)) for a in (DEPLOY_PYTHON, "-c", ATLAS_CHECKS, BUNDLE_ROOT, APP.parent))
    result = json.loads(run_checked(["bash", "-c", f"ulimit -s 32768 && exec {command}"], cwd=REPO_ROOT).stdout
                        .strip().splitlines()[-1])
    assert result["shipped"] == {key: str(SAMPLE_DATA / name) for key, name in (
        ("moving_image", "moving_colin27_t1.nii.gz"), ("moving_label", "moving_colin27_seg8.nii.gz"))}
    assert result["label_ids"] == list(range(1, 9))
    table = (SAMPLE_DATA / "moving_colin27_seg8.tsv").read_text().splitlines()[1:]
    assert result["names"] == [row.split("\t")[1] for row in table]
    assert "has moving.nii.gz but lacks moving_label.nii.gz" in result["half_atlas_error"]
    assert result["segment_numbers"] == [[[0, 1], [3, 2]]]
    assert "[20] are not atlas labels [10, 30, 80]" in result["unknown_label_error"]
