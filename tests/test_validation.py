"""Input validation on the real shipped pair made bad on purpose: each problem gives one clear message naming the file."""

import json
import logging
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged
from reliability_data import load_sample, save, small_pair

from scripts.io.errors import RegistrationInputError, find_user_error
from scripts.io.input_checks import (
    ROLES,
    CheckRegistrationContentd,
    CheckRegistrationHeadersd,
    LoadRegistrationInputsd,
    fov_overlap_fraction,
)
from scripts.io.datalist import check_datalist
from scripts.io.weights import load_network_weights


@pytest.fixture()
def pair(tmp_path):
    return small_pair(tmp_path / "pair")


def _validate(d):
    """Every check of a pair, as the configs' loading_transforms run them; returns the loaded, checked pair."""
    keys = list(ROLES)
    steps = [CheckRegistrationHeadersd(), LoadRegistrationInputsd(keys),
             EnsureChannelFirstd(keys, allow_missing_keys=True), CheckRegistrationContentd()]
    for step in steps:  # not a Compose: the errors are raised as they are, not wrapped
        d = step(d)
    return d


def _resamples(d, caplog):
    """Whether the checked pair is on two grids (the header check says it resamples the moving image)."""
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="scripts.io.input_checks"):
        _validate(d)
    return "resampling it onto the fixed grid" in caplog.text


def test_real_pair_passes_on_one_grid(pair, caplog):
    assert _resamples(pair, caplog) is False  # both on the MNI 1 mm grid: no resampling needed


def test_missing_file(pair, tmp_path):
    pair["moving_image"] = str(tmp_path / "nowhere" / "moving.nii.gz")
    with pytest.raises(RegistrationInputError, match=r"moving image '.*nowhere/moving.nii.gz' does not exist; expected"):
        _validate(pair)


def test_truncated_nifti(pair, tmp_path):
    data = open(pair["fixed_image"], "rb").read()
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(data[: len(data) // 2])  # header intact, voxel stream cut: the classic interrupted copy
    pair["fixed_image"] = str(truncated)
    # the header is intact: the header checks pass, decoding the voxels fails and names the file
    CheckRegistrationHeadersd()(pair)
    with pytest.raises(RegistrationInputError, match=r"fixed image '.*truncated.nii.gz' could not be read") as info:
        _validate(pair)
    assert "truncated" in str(info.value) and "expected a readable 3-D NIfTI" in str(info.value)


def test_not_a_nifti(pair, tmp_path):
    bogus = tmp_path / "scan.nii.gz"
    bogus.write_bytes(b"DICM not really a nifti")
    pair["moving_image"] = str(bogus)
    with pytest.raises(RegistrationInputError, match=r"moving image '.*scan.nii.gz' could not be read .*expected"):
        _validate(pair)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda v: v[:, :, 20], r"is 2-D \(shape \(40, 48\)\)"),
        (lambda v: v[:, :, 20:21], r"is 2-D \(shape \(40, 48, 1\)\)"),
        (lambda v: np.stack([v, v, v], axis=-1), r"is 4-D with 3 volumes"),
        (lambda v: v[..., None, None], r"has 5 axes"),
    ],
)
def test_not_3d(pair, tmp_path, make, message):
    volume, affine = load_sample("moving_image")
    pair["moving_image"] = str(save(tmp_path / "bad_dims.nii.gz", make(volume), affine))
    with pytest.raises(RegistrationInputError, match=r"moving image '.*bad_dims.nii.gz' " + message):
        _validate(pair)


def test_4d_with_one_volume_is_accepted_and_squeezed(pair, tmp_path, caplog):
    volume, affine = load_sample("moving_image")
    path = save(tmp_path / "one_volume.nii.gz", volume[..., None], affine)
    assert nib.load(str(path)).shape == (40, 48, 40, 1)
    pair["moving_image"] = str(path)
    loaded = _validate(pair)["moving_image"]
    assert tuple(loaded.shape) == (1, 40, 48, 40) and np.array_equal(loaded[0].numpy(), volume)
    assert _resamples(pair, caplog) is False


def test_different_grid_is_resampled_with_a_log_line(pair, tmp_path, caplog):
    volume, affine = load_sample("moving_image", factor=2)
    cropped = volume[4:-4, 6:-2, :]  # other shape, spacing and origin; same anatomy in world space
    crop_affine = affine.copy()
    crop_affine[:3, 3] = affine[:3, :3] @ [4, 6, 0] + affine[:3, 3]
    pair["moving_image"] = str(save(tmp_path / "other_grid.nii.gz", cropped, crop_affine))
    pair.pop("moving_label"), pair.pop("fixed_label")
    assert _resamples(pair, caplog) is True
    assert re.search(r"other_grid.nii.gz.*different grid.*resampling it onto the fixed grid", caplog.text)


def test_no_physical_overlap(pair, tmp_path):
    volume, affine = load_sample("moving_image")
    shifted = affine.copy()
    shifted[0, 3] += 500.0  # half a metre away: the header origin is wrong or the images are not pre-aligned
    pair["moving_image"] = str(save(tmp_path / "far.nii.gz", volume, shifted))
    pair.pop("moving_label"), pair.pop("fixed_label")
    with pytest.raises(RegistrationInputError, match=r"moving image '.*far.nii.gz' .*and fixed image .* no physical overlap"):
        _validate(pair)


def test_overlap_fraction_values():
    eye = np.eye(4)
    assert fov_overlap_fraction((10, 10, 10), eye, (10, 10, 10), eye) == pytest.approx(1.0)
    half = eye.copy()
    half[0, 3] = 5.0
    assert fov_overlap_fraction((10, 10, 10), eye, (10, 10, 10), half) == pytest.approx(0.5)
    flipped = np.diag([-1.0, 1, 1, 1])
    flipped[0, 3] = 9.0  # same field of view stored in reverse order
    assert fov_overlap_fraction((10, 10, 10), eye, (10, 10, 10), flipped) == pytest.approx(1.0)


@pytest.mark.parametrize("value, word", [(np.nan, "NaN"), (np.inf, "Inf")])
def test_nan_or_inf_voxels(pair, tmp_path, value, word):
    volume, affine = load_sample("fixed_image")
    volume = volume.astype(np.float32)
    volume[10:12, 10:12, 10:12] = value
    pair["fixed_image"] = str(save(tmp_path / "nan.nii.gz", volume, affine))
    with pytest.raises(RegistrationInputError, match=r"fixed image '.*nan.nii.gz' contains 8 NaN/Inf voxels"):
        _validate(pair)


def test_constant_image(pair, tmp_path):
    volume, affine = load_sample("moving_image")
    pair["moving_image"] = str(save(tmp_path / "blank.nii.gz", np.zeros_like(volume), affine))
    with pytest.raises(RegistrationInputError, match=r"moving image '.*blank.nii.gz' is constant \(every voxel = 0\)"):
        _validate(pair)


def test_label_not_integer(pair, tmp_path):
    labels, affine = load_sample("moving_label")
    smoothed = labels.astype(np.float32) * 0.5  # e.g. a label map resampled with linear interpolation
    pair["moving_label"] = str(save(tmp_path / "soft_labels.nii.gz", smoothed, affine))
    with pytest.raises(RegistrationInputError, match=r"moving label map '.*soft_labels.nii.gz' is not integer-valued"):
        _validate(pair)


def test_intensity_image_given_as_label(pair, caplog):
    pair["fixed_label"] = pair["fixed_image"]  # int16 intensities are integers: accepted (cannot be told apart)
    assert _resamples(pair, caplog) is False


def test_label_on_another_grid(pair, tmp_path):
    labels, affine = load_sample("fixed_label", factor=2)
    pair["fixed_label"] = str(save(tmp_path / "labels_2mm.nii.gz", labels, affine))
    with pytest.raises(RegistrationInputError, match=r"fixed label map '.*labels_2mm.nii.gz' is on a different grid") as e:
        _validate(pair)
    assert "(80x96x80 voxels of 2x2x2 mm, LAS, origin" in str(e.value)
    assert "(40x48x40 voxels of 4x4x4 mm, LAS, origin" in str(e.value)


def test_extremely_anisotropic_spacing(pair, tmp_path, caplog):
    volume, affine = load_sample("moving_image", factor=1)
    thick = volume[::2, ::2, ::12]  # 2 x 2 x 12 mm: ratio 6
    thick_affine = affine @ np.diag([2.0, 2.0, 12.0, 1.0])
    pair["moving_image"] = str(save(tmp_path / "thick.nii.gz", thick, thick_affine))
    pair.pop("moving_label"), pair.pop("fixed_label")
    with pytest.raises(RegistrationInputError, match=r"moving image '.*thick.nii.gz' has extremely anisotropic voxels "
                       r"\(2 x 2 x 12 mm, ratio 6.0\); expected .* <= 5"):
        _validate(pair)
    moderate = volume[::2, ::2, ::8]  # ratio 4: accepted (resampled onto the fixed grid)
    pair["moving_image"] = str(save(tmp_path / "moderate.nii.gz", moderate, affine @ np.diag([2.0, 2.0, 8.0, 1.0])))
    assert _resamples(pair, caplog) is True


def test_volume_too_small(pair, tmp_path):
    volume, affine = load_sample("fixed_image")
    for key, name in (("fixed_image", "fixed_small.nii.gz"), ("fixed_label", "fixed_small_label.nii.gz")):
        data, _ = load_sample(key)
        pair[key] = str(save(tmp_path / name, data[12:24], affine))  # 12 voxels along axis 0
    with pytest.raises(RegistrationInputError, match=r"fixed image '.*fixed_small.nii.gz' is too small for the network "
                       r"\(12x48x40 voxels\); expected at least 16 voxels along every axis"):
        _validate(pair)


def test_checkpoint_from_another_architecture(tmp_path):
    def net(width):
        return torch.nn.Sequential(torch.nn.Conv3d(2, width, 3), torch.nn.Conv3d(width, 3, 3))

    other = torch.nn.Sequential(torch.nn.Conv3d(2, 8, 3), torch.nn.Conv3d(8, 3, 3), torch.nn.Conv3d(3, 3, 1))
    path = tmp_path / "other.pt"
    torch.save({"model": other.state_dict()}, path)
    target = net(4)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(RegistrationInputError) as info:
        load_network_weights(target, path)
    message = str(info.value)
    assert f"checkpoint '{path}' does not match the network" in message
    assert "2 unexpected keys (2.weight, 2.bias)" in message
    assert "3 shape-mismatched keys (0.weight: checkpoint (8, 2, 3, 3, 3) vs network (4, 2, 3, 3, 3)" in message
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())  # nothing half-loaded

    torch.save(net(4).state_dict(), path)  # a plain, matching state dict loads
    load_network_weights(target, path)

    partial = {k: v for k, v in net(4).state_dict().items() if k.startswith("0.")}
    torch.save(partial, path)
    with pytest.raises(RegistrationInputError, match=r"2 missing keys \(1.weight, 1.bias\)"):
        load_network_weights(target, path)


def test_truncated_checkpoint(tmp_path):
    model = torch.nn.Conv3d(2, 3, 3)
    path = tmp_path / "model.pt"
    torch.save(model.state_dict(), path)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(RegistrationInputError, match=r"checkpoint '.*model.pt' could not be read .*truncated"):
        load_network_weights(model, path)
    with pytest.raises(RegistrationInputError, match=r"checkpoint '.*absent.pt' does not exist"):
        load_network_weights(model, tmp_path / "absent.pt")


def test_datalist_reports_every_bad_entry_at_once(pair, tmp_path):
    data_dir = tmp_path / "pair"
    names = {k: v.split("/")[-1] for k, v in pair.items()}  # relative to the datalist's folder
    truncated = data_dir / "cut.nii.gz"
    truncated.write_bytes(b"\x1f\x8b" + b"\x00" * 20)
    datalist = {
        "name": "test",
        "training": [
            {"moving_image": names["moving_image"], "fixed_image": names["fixed_image"]},
            {"moving_image": "missing_1.nii.gz", "fixed_image": names["fixed_image"]},
            {"moving_image": names["moving_image"]},
            {"moving_image": names["moving_image"], "fixed_image": names["fixed_image"], "moving_label": "cut.nii.gz"},
        ],
        "validation": [{"moving_image": names["moving_image"], "fixed_image": "/abs/missing_2.nii.gz"}],
    }
    json_path = data_dir / "datalist.json"
    json_path.write_text(json.dumps(datalist))
    with pytest.raises(RegistrationInputError) as info:
        check_datalist(json_path)
    message = str(info.value)
    assert message.startswith(f"{json_path}: 4 problem(s) in 5 entries")
    assert re.search(r"training\[1\]: moving_image '.*missing_1.nii.gz' does not exist", message)
    assert "training[2]: missing key 'fixed_image'" in message
    assert re.search(r"training\[3\]: moving_label '.*cut.nii.gz' is not a readable NIfTI", message)
    assert "validation[0]: fixed_image '/abs/missing_2.nii.gz' does not exist" in message
    good = {"training": datalist["training"][:1]}
    assert check_datalist(good, base_dir=data_dir) is good


def test_transform_in_a_pipeline_and_unwrapping(pair, tmp_path):
    pipeline = Compose([CheckRegistrationHeadersd(), LoadRegistrationInputsd(list(ROLES))])
    out = pipeline({**pair, "moving_label": "", "fixed_label": None})
    assert tuple(out["moving_image"].shape) == (40, 48, 40)
    pair["fixed_image"] = str(tmp_path / "absent.nii.gz")
    with pytest.raises(Exception) as info:  # MONAI wraps transform errors in RuntimeError
        pipeline(pair)
    error = find_user_error(info.value)
    assert isinstance(error, RegistrationInputError) and "absent.nii.gz' does not exist" in str(error)
    assert find_user_error(RuntimeError("a real bug")) is None


def test_sacbnet_checkpoint_from_another_architecture(tmp_path):
    from monai.networks.nets import LocalNet

    from scripts.networks.sacb_net import SACBNet
    from scripts.io.weights import check_checkpoint

    network = SACBNet(base_channels=4)
    check_checkpoint(network, None)  # no checkpoint configured: nothing to check
    check_checkpoint(network, tmp_path / "not_trained_yet.pt")  # absent file: the bundle runs from initialisation
    same = tmp_path / "same.pt"
    torch.save({"model": SACBNet(base_channels=4).state_dict()}, same)
    check_checkpoint(network, same)

    narrow = tmp_path / "narrow.pt"
    torch.save({"model": SACBNet(base_channels=2).state_dict()}, narrow)
    with pytest.raises(RegistrationInputError, match=r"checkpoint '.*narrow.pt' does not match the network: \d+ "
                       r"shape-mismatched keys \(.*: checkpoint \(2, .*\) vs network \(4, .*\)"):
        check_checkpoint(network, narrow)

    other = tmp_path / "localnet.pt"
    torch.save(LocalNet(spatial_dims=3, in_channels=2, out_channels=3, num_channel_initial=4, extract_levels=(3,)).state_dict(), other)
    with pytest.raises(RegistrationInputError) as info:
        load_network_weights(network, other)
    message = str(info.value)
    assert re.search(r"\d+ missing keys \(.*, \.\.\. \(\d+ more\)\); \d+ unexpected keys \(", message)
    assert message.count("weight") >= 5  # the first few key names are shown, not just counts


def test_cli_boundary_prints_one_line_and_exits_2(pair, tmp_path, capsys):
    from monai.data import DataLoader, Dataset

    from scripts.io.errors import exit_on_user_error

    pair["moving_image"] = str(tmp_path / "absent.nii.gz")
    # errors raised in a DataLoader worker come back with the worker's traceback pasted into the message
    loader = DataLoader(Dataset([pair], CheckRegistrationHeadersd()), batch_size=1, num_workers=1)
    with pytest.raises(SystemExit) as info:
        exit_on_user_error(lambda: next(iter(loader)))
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: moving image '") and "absent.nii.gz' does not exist; expected" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    with pytest.raises(RuntimeError, match="Original Traceback"):  # --debug: the full exception and traceback
        exit_on_user_error(lambda: next(iter(loader)), debug=True)
    with pytest.raises(ZeroDivisionError):  # a bug is never hidden
        exit_on_user_error(lambda: 1 / 0)


def test_transforms_check_already_loaded_volumes(pair):
    """An app may feed MetaTensors: their shape and affine metadata stand in for the header, the voxels are checked."""
    loaded = LoadImaged(list(pair), image_only=True, ensure_channel_first=True)(pair)
    assert CheckRegistrationContentd()(CheckRegistrationHeadersd()(loaded)) is not None
    bad = dict(loaded)
    bad["fixed_image"] = bad["fixed_image"].clone()
    bad["fixed_image"][0, 3, 3, 3] = float("nan")
    with pytest.raises(RegistrationInputError, match=r"fixed image '.*fixed_mni152_t1.nii.gz' contains 1 NaN/Inf voxels"):
        CheckRegistrationContentd()(bad)
    bad = dict(loaded)
    bad["moving_label"] = bad["moving_label"] * 0.5
    with pytest.raises(RegistrationInputError, match=r"moving label map .* is not integer-valued"):
        CheckRegistrationContentd()(bad)
    bad = dict(loaded)
    bad["fixed_label"] = bad["fixed_label"][:, ::2]
    with pytest.raises(RegistrationInputError, match=r"fixed label map .* is on a different grid"):
        CheckRegistrationHeadersd()(bad)


def test_training_datalist_layouts_all_checked_at_once(pair, tmp_path):
    data_dir = Path(pair["fixed_image"]).parent
    names = {k: Path(v).name for k, v in pair.items()}
    datalist = {
        "atlas": {"image": names["moving_image"], "label": "atlas_seg.nii.gz"},
        "training": [{"image": names["fixed_image"], "label": names["fixed_label"]}, {"image": "sub-02.nii.gz"},
                     {"label": names["fixed_label"]}],
        "validation": [{**names, "fixed_image": "sub-09.nii.gz"}],
        "labels": {"1": "thalamus"},
    }
    with pytest.raises(RegistrationInputError) as info:
        check_datalist(datalist, keys=None, base_dir=data_dir, source="train datalist")
    message = str(info.value)
    assert message.startswith("train datalist: 4 problem(s) in 5 entries")
    assert "atlas: label '" in message and "atlas_seg.nii.gz' does not exist" in message
    assert "training[1]: image '" in message and "training[2]: missing key 'moving_image'" not in message
    assert "training[2]: missing key 'image'" in message and "validation[0]: fixed_image '" in message


def test_qform_and_sform_that_disagree_are_refused_from_the_header(pair, tmp_path):
    """nibabel follows the sform, ITK may follow the qform: a file whose two placements differ by 10 mm would give
    transforms right here and wrong in ANTs, so it is refused up front, naming both matrices and the fix."""
    volume, affine = load_sample("fixed_image")
    image = nib.Nifti1Image(volume, affine)
    shifted = affine.copy()
    shifted[0, 3] += 10.0
    image.set_qform(shifted, code=1)
    image.set_sform(affine, code=2)
    path = tmp_path / "two_placements.nii.gz"
    nib.save(image, str(path))
    pair["fixed_image"] = str(path)
    pair.pop("fixed_label")
    with pytest.raises(RegistrationInputError) as info:
        CheckRegistrationHeadersd()(pair)  # header only: nothing decoded
    message = str(info.value)
    assert "fixed image '" in message and "two_placements.nii.gz' has a qform [" in message
    assert "(code 1) and an sform [" in message and "(code 2) that disagree (by up to 10 mm" in message
    assert "set_qform(img.get_sform(), code=1)" in message and len(message.splitlines()) == 1
    image.set_qform(affine + 1e-5, code=1)  # float32 rounding: the same placement
    nib.save(image, str(path))
    _validate(pair)
    image.set_qform(shifted, code=0)  # an unset qform does not count
    nib.save(image, str(path))
    _validate(pair)


def test_sheared_grid_is_refused_from_the_header(pair, tmp_path):
    """A gantry-tilted CT has non-perpendicular voxel axes, which no ITK transform can describe."""
    volume, affine = load_sample("moving_image")
    sheared = affine.copy()
    sheared[:3, 2] += 0.3 * affine[:3, 1]  # the slice axis leans along the second axis
    image = nib.Nifti1Image(volume, sheared)
    image.set_qform(None, code=0)  # a shear lives in the sform only
    image.set_sform(sheared, code=1)
    path = tmp_path / "tilted.nii.gz"
    nib.save(image, str(path))
    pair["moving_image"] = str(path)
    pair.pop("moving_label"), pair.pop("fixed_label")
    with pytest.raises(RegistrationInputError, match=r"moving image '.*tilted.nii.gz' has a sheared voxel grid .*"
                       r"expected perpendicular voxel axes.*gantry tilt"):
        CheckRegistrationHeadersd()(pair)
