"""Every user error through the real entry points (CLI ``register``, ``monai.bundle run`` of inference/train.json) on
the real pair made bad on purpose: one clear message, exit status 2 without traceback, nothing damaged or half-written."""

import hashlib
import re
import json
import subprocess
import sys
from pathlib import Path

import monai.bundle
import nibabel as nib
import numpy as np
import pytest
import torch
from reliability_data import load_sample, save, small_pair
from workflow_data import PLAIN_INFERENCE

from scripts.cli import register
from scripts.io.errors import BundleUserError, RegistrationInputError, find_user_error
from scripts.io.outputs import FAILED_PAIRS

BUNDLE = Path(__file__).resolve().parents[1] / "bundle"
NO_WEIGHTS = {"ckpt_path": "/nonexistent/model.pt"}  # run from initialisation, whatever is in bundle/models


def _digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


@pytest.fixture()
def pair(tmp_path):
    return small_pair(tmp_path / "pair")


def _register(capsys, tmp_path, pair, **changes):
    """Run the CLI's ``register`` in this process; return (exit status, stderr, output folder)."""
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    (out / "notes.txt").write_text("an unrelated file that must survive")
    args = {"fixed": pair["fixed_image"], "moving": pair["moving_image"], "out": str(out),
            "moving_label": pair["moving_label"], "fixed_label": pair["fixed_label"], "iterations": 0}
    args.update(changes)
    inputs_before = _digest(Path(pair["fixed_image"]).parent)
    with pytest.raises(SystemExit) as info:
        register(**args)
    err = capsys.readouterr().err
    assert _digest(Path(pair["fixed_image"]).parent) == inputs_before  # inputs never touched
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]  # nothing written, not even a temporary file
    assert "Traceback" not in err
    return info.value.code, err


def _truncated_copy(source, target, size=20000):
    """The first ``size`` bytes of a real .nii.gz: intact header, voxel stream cut off (an interrupted copy)."""
    Path(target).write_bytes(Path(source).read_bytes()[:size])
    return str(target)


def _bad(tmp_path, name, data, affine):
    return str(save(tmp_path / name, data, affine))


def _sheared(tmp_path, source):
    image = nib.load(source)
    affine = image.affine.copy()
    affine[:3, 2] += 0.3 * affine[:3, 1]  # a gantry-tilted grid
    sheared = nib.Nifti1Image(np.asanyarray(image.dataobj), None)
    sheared.set_sform(affine, code=1)
    nib.save(sheared, str(tmp_path / "tilted.nii.gz"))
    return str(tmp_path / "tilted.nii.gz")


def _two_placements(tmp_path, source):
    image = nib.load(source)
    image = nib.Nifti1Image(np.asanyarray(image.dataobj), image.affine)
    shifted = image.affine.copy()
    shifted[1, 3] += 10.0
    image.set_qform(shifted, code=1)
    image.set_sform(image.affine, code=1)
    nib.save(image, str(tmp_path / "placements.nii.gz"))
    return str(tmp_path / "placements.nii.gz")


CASES = {
    "missing file": (
        lambda t, p: {"moving": str(t / "typo" / "moving.nii.gz")},
        r"error: moving image '.*typo/moving.nii.gz' does not exist; expected a readable 3-D NIfTI file",
    ),
    "truncated": (
        lambda t, p: {"fixed": _truncated_copy(p["fixed_image"], t / "cut.nii.gz")},
        r"error: fixed image '.*cut.nii.gz' could not be read \(.*\); expected .* probably truncated",
    ),
    "2-D": (
        lambda t, p: {"moving": _bad(t, "slice.nii.gz", load_sample("moving_image")[0][:, :, 20], np.eye(4))},
        r"error: moving image '.*slice.nii.gz' is 2-D \(shape \(40, 48\)\); expected a 3-D volume",
    ),
    "4-D": (
        lambda t, p: {"moving": _bad(t, "series.nii.gz", np.stack([load_sample("moving_image")[0]] * 2, -1),
                                     load_sample("moving_image")[1])},
        r"error: moving image '.*series.nii.gz' is 4-D with 2 volumes .*; expected a single 3-D volume",
    ),
    "no overlap": (
        lambda t, p: {"moving": _bad(t, "far.nii.gz", load_sample("moving_image")[0],
                                     np.diag([4.0, 4, 4, 1]) + np.array([[0, 0, 0, 900.0]] + [[0] * 4] * 3)),
                      "moving_label": None, "fixed_label": None, "affine": "none"},  # pre-aligned inputs
        r"error: moving image '.*far.nii.gz' .* and fixed image .* have no physical overlap .*; expected affinely "
        r"pre-aligned images",
    ),
    "NaN": (
        lambda t, p: {"fixed": _bad(t, "nan.nii.gz", np.where(load_sample("fixed_image")[0] > 5000, np.nan,
                                                              load_sample("fixed_image")[0]).astype(np.float32),
                                    load_sample("fixed_image")[1])},
        r"error: fixed image '.*nan.nii.gz' contains \d+ NaN/Inf voxels .*; expected finite values everywhere",
    ),
    "constant": (
        lambda t, p: {"moving": _bad(t, "blank.nii.gz", np.full((40, 48, 40), 7, np.int16),
                                     load_sample("moving_image")[1])},
        r"error: moving image '.*blank.nii.gz' is constant \(every voxel = 7\); expected an image with contrast",
    ),
    "label not integer": (
        lambda t, p: {"fixed_label": _bad(t, "prob.nii.gz", load_sample("fixed_label")[0] / 3.0,
                                          load_sample("fixed_label")[1])},
        r"error: fixed label map '.*prob.nii.gz' is not integer-valued .*; expected a label map with integer label ids",
    ),
    "label on another grid": (
        lambda t, p: {"moving_label": _bad(t, "labels_2mm.nii.gz", *load_sample("moving_label", factor=2))},
        r"error: moving label map '.*labels_2mm.nii.gz' is on a different grid .* than its image .*; expected the "
        r"same shape and affine",
    ),
    "anisotropic": (
        lambda t, p: {"fixed": _bad(t, "thick.nii.gz", load_sample("fixed_image", 2)[0][:, :, ::6],
                                    load_sample("fixed_image", 2)[1] @ np.diag([1.0, 1, 6, 1])), "fixed_label": None},
        r"error: fixed image '.*thick.nii.gz' has extremely anisotropic voxels \(2 x 2 x 12 mm, ratio 6.0\); expected "
        r"a largest/smallest spacing ratio <= 5",
    ),
    "fixed label alone": (
        lambda t, p: {"moving_label": None},
        r"error: fixed label map '.*fixed_mni152_seg8.nii.gz' was given without a moving label map; expected both",
    ),
    "negative iterations": (
        lambda t, p: {"iterations": -1},
        r"error: --iterations must be >= 0, got -1.",
    ),
    "sheared grid": (  # refused from the header, before the registration runs (it used to end in a traceback)
        lambda t, p: {"fixed": _sheared(t, p["fixed_image"]), "fixed_label": None},
        r"error: fixed image '.*tilted.nii.gz' has a sheared voxel grid .*; expected perpendicular voxel axes",
    ),
    "qform and sform disagree": (
        lambda t, p: {"moving": _two_placements(t, p["moving_image"]), "moving_label": None, "fixed_label": None},
        r"error: moving image '.*placements.nii.gz' has a qform \[.*\] \(code 1\) and an sform \[.*\] \(code 1\) "
        r"that disagree \(by up to 10 mm",
    ),
    "too small": (
        lambda t, p: {"fixed": _bad(t, "crop.nii.gz", load_sample("fixed_image")[0][:, :, :10],
                                    load_sample("fixed_image")[1]), "fixed_label": None},
        r"error: fixed image '.*crop.nii.gz' is too small for the network \(40x48x10 voxels\); expected at least 16 "
        r"voxels along every axis",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_cli_user_error(case, pair, tmp_path, capsys):
    make, message = CASES[case]
    code, err = _register(capsys, tmp_path, pair, **make(tmp_path, pair))
    assert code == 2
    assert len([line for line in err.splitlines() if line.startswith("error: ")]) == 1
    assert any(re.match(message, line) for line in err.splitlines()), err[-2000:]


def test_cli_refuses_to_overwrite_and_overwrites_when_asked(pair, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "warped_image.nii.gz").write_bytes(b"earlier result")
    # the network's forward pass alone (PLAIN_INFERENCE): refusing and replacing outputs does not depend on the stages
    args = {"fixed": pair["fixed_image"], "moving": pair["moving_image"], "out": str(out), "iterations": 0,
            "affine": "none", "refine_iterations": 0}
    with pytest.raises(SystemExit) as info:
        register(**args)
    err = capsys.readouterr().err
    assert info.value.code == 2 and "Traceback" not in err
    assert f"error: output file(s) already exist: {out / 'warped_image.nii.gz'}; expected an output folder without " \
           "earlier results. Choose another output folder, or pass --overwrite" in err
    assert sorted(p.name for p in out.iterdir()) == ["warped_image.nii.gz"]
    assert (out / "warped_image.nii.gz").read_bytes() == b"earlier result"
    register(**args, overwrite=True)
    assert nib.load(str(out / "warped_image.nii.gz")).shape == (40, 48, 40)
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_cli_accepts_4d_single_volume_and_resamples_other_grids(pair, tmp_path, capsys):
    volume, affine = load_sample("moving_image", factor=2)
    one_volume = _bad(tmp_path, "moving_4d.nii.gz", volume[..., None], affine)  # 80x96x80x1, 2 mm: another grid
    out = tmp_path / "out"
    # the default affine stage takes the moving scan from its own grid; the field refinement after the network works
    # on the fixed grid only, so it is left out
    register(fixed=pair["fixed_image"], moving=one_volume, out=str(out), iterations=0, refine_iterations=0)
    err = "".join(capsys.readouterr())  # the log goes to stdout (configs/logging.conf)
    assert "moving_4d.nii.gz' (80x96x80 voxels of 2x2x2 mm, LAS, origin" in err
    assert "resampling it onto the fixed grid" in err
    warped = nib.load(str(out / "warped_image.nii.gz"))
    assert warped.shape == (40, 48, 40) and np.allclose(warped.affine, nib.load(pair["fixed_image"]).affine)
    assert np.ptp(np.asanyarray(warped.dataobj)) > 0


def test_cli_process_exit_status_and_debug_traceback(pair, tmp_path, capsys):
    truncated = tmp_path / "cut.nii.gz"
    truncated.write_bytes(Path(pair["moving_image"]).read_bytes()[:5000])
    command = [sys.executable, "-m", "scripts.cli", "register", "--fixed", pair["fixed_image"], "--moving",
               str(truncated), "--out", str(tmp_path / "out"), "--iterations", "0"]
    result = subprocess.run(command, cwd=BUNDLE, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert f"error: moving image '{truncated}' could not be read" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())
    with pytest.raises(Exception) as info:  # --debug: the exception itself propagates (python prints the traceback)
        register(fixed=pair["fixed_image"], moving=str(truncated), out=str(tmp_path / "out"), iterations=0, debug=True)
    assert isinstance(find_user_error(info.value), RegistrationInputError)


def _bundle_run(config, **overrides):
    monai.bundle.run(
        config_file=str(BUNDLE / "configs" / config),
        meta_file=str(BUNDLE / "configs" / "metadata.json"),
        logging_file=str(BUNDLE / "configs" / "logging.conf"),
        bundle_root=str(BUNDLE),
        **({**PLAIN_INFERENCE, **overrides} if config == "inference.json" else overrides),
    )


def test_checkpoint_from_another_architecture_is_named_before_inference(pair, tmp_path):
    from scripts.networks.sacb_net import SACBNet

    checkpoint = tmp_path / "model.pt"
    torch.save({"model": SACBNet(base_channels=2, num_clusters=5).state_dict()}, checkpoint)
    before = checkpoint.read_bytes()
    with pytest.raises(Exception) as info:
        _bundle_run("inference.json", **pair, output_dir=str(tmp_path / "out"), ckpt_path=str(checkpoint))
    error = find_user_error(info.value)
    assert isinstance(error, RegistrationInputError), info.value
    assert str(error).startswith(f"checkpoint '{checkpoint}' does not match the network: ")
    assert "shape-mismatched keys (" in str(error) and "checkpoint (2," in str(error) and "vs network (4," in str(error)
    assert checkpoint.read_bytes() == before and not (tmp_path / "out").exists()


def test_batch_continues_past_bad_pairs_and_reports_them(pair, tmp_path):
    truncated = tmp_path / "cut.nii.gz"
    truncated.write_bytes(Path(pair["fixed_image"]).read_bytes()[:20000])
    pairs = [
        {"id": "bad_truncated", "moving_image": pair["moving_image"], "fixed_image": str(truncated)},
        {"id": "good", "moving_image": pair["moving_image"], "fixed_image": pair["fixed_image"]},
        {"id": "bad_missing", "moving_image": str(tmp_path / "gone.nii.gz"), "fixed_image": pair["fixed_image"]},
    ]
    datalist = tmp_path / "pairs.json"
    datalist.write_text(json.dumps({"pairs": pairs}))
    out = tmp_path / "batch"
    with pytest.raises(Exception) as info:
        _bundle_run("inference.json", datalist=str(datalist), output_dir=str(out), **NO_WEIGHTS)
    error = find_user_error(info.value)
    assert isinstance(error, BundleUserError), info.value
    message = str(error)
    assert message.startswith(f"2 of 3 pairs were skipped because of bad inputs (details in {out / FAILED_PAIRS})")
    assert "bad_truncated: fixed image" in message and "bad_missing: moving image" in message
    assert sorted(p.name for p in (out / "good").iterdir()) == ["affine.mat", "ddf.nii.gz", "jacobian_det.nii.gz",
                                                                "qc.png", "transform.h5", "warp.nii.gz",
                                                                "warped_image.nii.gz"]
    assert not (out / "bad_truncated").exists() and not (out / "bad_missing").exists()
    report = json.loads((out / FAILED_PAIRS).read_text())
    assert [item["pair_id"] for item in report["failed"]] == ["bad_truncated", "bad_missing"]


def test_training_datalist_reports_every_bad_entry_before_training(pair, tmp_path):
    names = {k: Path(v).name for k, v in pair.items()}
    (Path(pair["fixed_image"]).parent / "empty.nii.gz").write_bytes(b"")
    datalist = {
        "training": [
            {"image": names["moving_image"]},
            {"image": "subject_07.nii.gz"},
            {"image": "empty.nii.gz"},
        ],
        "validation": [{"moving_image": names["moving_image"], "fixed_image": "missing_fixed.nii.gz"}],
    }
    path = Path(pair["fixed_image"]).parent / "datalist.json"
    path.write_text(json.dumps(datalist))
    ckpt = tmp_path / "ckpt"
    with pytest.raises(Exception) as info:
        _bundle_run("train.json", datalist=str(path), dataset_dir=str(path.parent), ckpt_dir=str(ckpt),
                    output_dir=str(tmp_path / "runs"), max_epochs=1)
    error = find_user_error(info.value)
    assert isinstance(error, RegistrationInputError), info.value
    lines = str(error).splitlines()
    assert lines[0].startswith(f"{path}: 3 problem(s) in 4 entries; expected every entry to name existing, readable")
    assert lines[1].startswith("  training[1]: image '") and lines[1].endswith("subject_07.nii.gz' does not exist")
    assert lines[2].startswith("  training[2]: image '") and "empty.nii.gz' is not a readable NIfTI file" in lines[2]
    assert lines[3].startswith("  validation[0]: fixed_image '") and lines[3].endswith("missing_fixed.nii.gz' does not exist")
    assert not ckpt.exists() or not list(ckpt.iterdir())  # training never started


def test_diverging_instance_optimisation_stops_with_a_message(pair):
    from reliability_data import load_sample

    from scripts.io.errors import NonFiniteLossError
    from scripts.engines.instance_optimization import InstanceOptimizationInferer
    from scripts.losses.ncc import LocalNCCLoss
    from scripts.losses.regularization import GradientLoss
    from scripts.layers.warp import Warp

    moving, fixed = (torch.as_tensor(load_sample(k, factor=8)[0], dtype=torch.float32) for k in ("moving_image",
                                                                                                "fixed_image"))
    image = torch.stack([moving / moving.max(), fixed / fixed.max()])[None]
    inferer = InstanceOptimizationInferer(LocalNCCLoss(kernel_size=5), GradientLoss(), Warp(), iterations=5,
                                          learning_rate=1e30, network_scale=1.0)  # absurd step size: diverges
    with pytest.raises(NonFiniteLossError, match=r"instance optimisation stopped: the loss became (nan|inf) at step "
                       r"\d; expected a finite loss. Nothing was written for this pair. Lower the learning rate"):
        inferer(image, torch.nn.Conv3d(2, 3, 3, padding=1))
    assert isinstance(NonFiniteLossError("x"), BundleUserError)  # so the CLI prints it and exits 2


def test_resuming_from_a_checkpoint_of_another_architecture_is_named(pair, tmp_path):
    from scripts.networks.sacb_net import SACBNet

    names = {k: Path(v).name for k, v in pair.items()}
    path = Path(pair["fixed_image"]).parent / "datalist.json"
    path.write_text(json.dumps({"training": [{"image": names["moving_image"]}, {"image": names["fixed_image"]}],
                                "validation": [names]}))
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    torch.save({"model": SACBNet(base_channels=2).state_dict(), "trainer": {}}, ckpt / "checkpoint_epoch=3.pt")
    before = _digest(ckpt)
    with pytest.raises(Exception) as info:
        _bundle_run("train.json", datalist=str(path), dataset_dir=str(path.parent), ckpt_dir=str(ckpt),
                    output_dir=str(tmp_path / "runs"), max_epochs=5)
    error = find_user_error(info.value)
    assert isinstance(error, RegistrationInputError), info.value
    assert str(error).startswith(f"checkpoint '{ckpt / 'checkpoint_epoch=3.pt'}' does not match the network: ")
    assert _digest(ckpt) == before


def test_an_input_named_like_an_output_is_never_overwritten(pair, tmp_path, capsys):
    """A moving image saved as OUT/warped_image.nii.gz would be replaced by its own result: refused, --overwrite or not."""
    out = tmp_path / "out"
    out.mkdir()
    moving = out / "warped_image.nii.gz"
    moving.write_bytes(Path(pair["moving_image"]).read_bytes())
    before = _digest(out)
    for overwrite in (False, True):
        with pytest.raises(SystemExit) as info:
            register(fixed=pair["fixed_image"], moving=str(moving), out=str(out), iterations=0, overwrite=overwrite)
        err = capsys.readouterr().err
        assert info.value.code == 2 and "Traceback" not in err
        assert f"error: moving image '{moving}' is also the output 'warped_image.nii.gz' of this run" in err
        assert _digest(out) == before  # the user's scan is intact and nothing else was written


def test_outputs_keep_the_fixed_images_nifti_placement_codes(pair, tmp_path):
    """A fixed image in MNI space (qform/sform code 4) gives NIfTI outputs that still say MNI space."""
    image = nib.load(pair["fixed_image"])
    mni = nib.Nifti1Image(np.asanyarray(image.dataobj), image.affine)
    mni.set_qform(image.affine, code=4)
    mni.set_sform(image.affine, code=4)
    nib.save(mni, str(tmp_path / "fixed_mni.nii.gz"))
    out = tmp_path / "out"
    register(fixed=str(tmp_path / "fixed_mni.nii.gz"), moving=pair["moving_image"], out=str(out),
             moving_label=pair["moving_label"], iterations=0, refine_iterations=0, affine="none")
    for name in ("warped_image.nii.gz", "ddf.nii.gz", "warped_label.nii.gz", "jacobian_det.nii.gz"):
        header = nib.load(str(out / name)).header
        assert (int(header["qform_code"]), int(header["sform_code"])) == (4, 4), name
