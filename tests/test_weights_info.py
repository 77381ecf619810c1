"""The record of the resolution weights were trained at (``model.pt`` -> ``model.json``, ``scripts.io.weights``):
training writes it, install_weights carries it with the weights, inference warns when it runs at another scale."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from conftest import BUNDLE_ROOT, SAMPLE_PAIR
from monai.bundle import ConfigParser

from scripts.io import (
    RegistrationInputError,
    check_network_scale,
    install_weights,
    read_trained_network_scale,
    read_trained_spacing,
    trained_network_spacing,
    weights_info_path,
    write_weights_info,
)
from scripts.networks import SACBNet

LOGGER = "scripts.io.weights"


@pytest.fixture
def weights(tmp_path):
    """A small weights file (its content is irrelevant to the record)."""
    path = tmp_path / "run" / "model.pt"
    path.parent.mkdir()
    torch.save(SACBNet(base_channels=2).state_dict(), path)
    return path


def _warnings(caplog):
    return [r for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]


def test_record_path_write_and_read_round_trip(tmp_path):
    assert weights_info_path(tmp_path / "models" / "model.pt") == tmp_path / "models" / "model.json"
    with pytest.raises(ValueError, match="ends with .json"):
        weights_info_path(tmp_path / "model.json")
    target = tmp_path / "new" / "folder" / "model.pt"  # neither the folder nor the weights exist yet
    path = write_weights_info(target, 0.5, preset="oasis_brain")
    assert path == tmp_path / "new" / "folder" / "model.json"
    assert json.loads(path.read_text()) == {"network_scale": 0.5, "preset": "oasis_brain"}
    assert read_trained_network_scale(target) == (0.5, 0.5, 0.5)
    write_weights_info(target, [0.5, 0.5, 1])
    assert read_trained_network_scale(target) == (0.5, 0.5, 1.0)
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # written atomically, no temporary left
    assert read_trained_network_scale(tmp_path / "other.pt") is None  # no record: nothing known


@pytest.mark.parametrize("bad", [0, -0.5, 1.5, float("nan"), True, "0.5", [0.5, 0.5], None])
def test_write_refuses_an_invalid_scale(tmp_path, bad):
    with pytest.raises(ValueError, match=r"network_scale must be a number or 3 numbers in \(0, 1\]"):
        write_weights_info(tmp_path / "model.pt", bad)
    assert not (tmp_path / "model.json").exists()


@pytest.mark.parametrize(
    "text, message",
    [
        ("{not json", r"could not be read \(JSONDecodeError"),
        ("[0.5]", "holds list"),
        ('{"network_scale": 2}', r"network_scale must be a number or 3 numbers in \(0, 1\], got 2"),
        ('{"network_scale": [0.5, 0.5]}', "got \\[0.5, 0.5\\]"),
    ],
)
def test_an_invalid_record_is_a_clear_error_naming_the_file(weights, text, message):
    record = weights.with_suffix(".json")
    record.write_text(text)
    with pytest.raises(RegistrationInputError, match=message) as info:
        read_trained_network_scale(weights)
    assert str(record) in str(info.value)
    with pytest.raises(RegistrationInputError):
        check_network_scale(0.5, weights)


def test_record_without_a_scale_means_unknown(weights):
    weights.with_suffix(".json").write_text('{"network_scale": null, "note": "x"}')
    assert read_trained_network_scale(weights) is None


def test_check_warns_once_when_inference_runs_at_another_scale(weights, caplog):
    write_weights_info(weights, 0.5)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert check_network_scale(1.0, weights) is False
    (record,) = _warnings(caplog)
    message = record.getMessage()
    assert "inference runs at network_scale 1, but the weights" in message and str(weights) in message
    assert "trained at network_scale 0.5" in message and str(weights.with_suffix(".json")) in message
    assert "--network_scale 0.5" in message and "retrain" in message

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert check_network_scale(0.5, weights) is True
        assert check_network_scale([0.5, 0.5, 0.5 + 1e-7], weights) is True  # within the tolerance
        assert check_network_scale([0.5, 0.5, 1.0], weights) is False  # per axis
    assert len(_warnings(caplog)) == 1
    assert '--network_scale 0.5' in _warnings(caplog)[0].getMessage()


def test_check_passes_when_nothing_is_known(weights, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert check_network_scale(1.0, weights) is True  # no record
        write_weights_info(tmp_path / "absent.pt", 0.5)
        assert check_network_scale(1.0, tmp_path / "absent.pt") is True  # a record, but no weights file
        assert check_network_scale(1.0, None) is True and check_network_scale(1.0, "") is True
    assert not _warnings(caplog)


def test_install_weights_carries_the_record_and_never_keeps_a_stale_one(weights, tmp_path, caplog):
    target = tmp_path / "models" / "model.pt"
    target.parent.mkdir()
    torch.save(SACBNet(base_channels=2).state_dict(), target)
    write_weights_info(target, 0.5)  # the record of the weights about to be replaced

    write_weights_info(weights, 1.0, preset="lpba40")
    install_weights(weights, target, SACBNet(base_channels=2))
    assert json.loads(target.with_suffix(".json").read_text()) == {"network_scale": 1.0, "preset": "lpba40"}

    weights.with_suffix(".json").unlink()  # weights of an older run, without a record
    with caplog.at_level(logging.WARNING):
        install_weights(weights, target)
    assert target.read_bytes() == weights.read_bytes()
    assert not target.with_suffix(".json").exists()  # the 1.0 record described the replaced weights
    assert any("no record" in r.getMessage() and "cannot check" in r.getMessage() for r in caplog.records)
    assert not [p for p in target.parent.iterdir() if p.name.startswith(".")]


def test_install_weights_with_an_invalid_record_replaces_nothing(weights, tmp_path):
    target = tmp_path / "models" / "model.pt"
    target.parent.mkdir()
    torch.save(SACBNet(base_channels=2).state_dict(), target)
    write_weights_info(target, 0.5)
    before = target.read_bytes(), target.with_suffix(".json").read_text()
    weights.with_suffix(".json").write_text('{"network_scale": "half"}')
    with pytest.raises(RegistrationInputError, match="network_scale must be"):
        install_weights(weights, target)
    assert (target.read_bytes(), target.with_suffix(".json").read_text()) == before


def test_shipped_record_matches_the_inference_default():
    inference = ConfigParser.load_config_file(str(BUNDLE_ROOT / "configs" / "inference.json"))
    record = {"network_scale": 0.5, "spacing_mm": 1.0}  # trained on 1 mm scans (brain_mal2012, OASIS) at half resolution
    assert json.loads((BUNDLE_ROOT / "models" / "model.json").read_text()) == record
    assert inference["network_scale"] == 0.5
    assert read_trained_network_scale(BUNDLE_ROOT / "models" / "model.pt") == (0.5, 0.5, 0.5)
    assert trained_network_spacing(BUNDLE_ROOT / "models" / "model.pt") == (2.0, 2.0, 2.0)


def _check_item(parser: ConfigParser, name: str) -> str:
    """The id of the one ``initialize`` entry that calls ``scripts.io.<name>``."""
    items = [i for i, item in enumerate(parser.get("initialize")) if isinstance(item, str) and name in item]
    assert len(items) == 1, parser.get("initialize")
    return f"initialize#{items[0]}"


@pytest.mark.parametrize(
    "configs", [["inference"], ["inference", "evaluate"]]
)
def test_inference_configs_warn_at_another_scale(configs, caplog, tmp_path):
    """The check the registration configs run at initialize (no registration): weights whose record holds only their
    scale (0.5) warn at 1.0. The shipped record also gives the training spacing: then the per-pair check of the
    network voxel size (tests/test_thick_slices.py) replaces this one, and 1.0 alone is no reason to warn."""
    parser = ConfigParser()
    parser.read_config([str(BUNDLE_ROOT / "configs" / f"{name}.json") for name in configs])
    item = _check_item(parser, "check_network_scale")
    assert parser.get_parsed_content(item) is True  # the defaults: the shipped weights at their scale
    parser["network_scale"] = 1.0
    assert parser.get_parsed_content(item, lazy=False) is True  # the shipped record gives spacing_mm
    weights = tmp_path / "model.pt"
    weights.write_bytes((BUNDLE_ROOT / "models" / "model.pt").read_bytes())
    write_weights_info(weights, 0.5)  # an older record: the scale alone
    parser["ckpt_path"] = str(weights)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert parser.get_parsed_content(item, lazy=False) is False
    (record,) = _warnings(caplog)
    assert str(weights) in record.getMessage() and "trained at network_scale 0.5" in record.getMessage()


def test_training_records_its_network_scale_after_the_input_checks(tmp_path):
    """train.json writes ``<ckpt_dir>/model.json`` at initialize, after the input checks (a run refused by them
    writes nothing); with the oasis_brain preset (train::inferer at 1.0 on images already reduced by
    DownsampleToNetworkGridd) the recorded scale is the effective one, network_scale 0.5. The record also holds the
    training images' spacing (the presets' data are not here: their pairs are replaced by the shipped 1 mm pair)."""
    for presets, scale in (([], 0.5), (["oasis_brain"], 0.5), (["lpba40"], 1.0)):
        parser = ConfigParser()
        parser.read_config([str(BUNDLE_ROOT / "configs" / "train.json")]
                           + [str(BUNDLE_ROOT / "configs" / "presets" / f"{p}.json") for p in presets])
        ckpt = tmp_path / f"run_{scale}_{len(presets)}"
        parser["ckpt_dir"] = str(ckpt)  # does not exist yet
        if presets:
            parser["train::pairs"] = [{k: str(SAMPLE_PAIR[k]) for k in ("moving_image", "fixed_image")}]
        item = _check_item(parser, "write_weights_info")
        assert parser.get("initialize").index("@input_checks") < int(item.split("#")[1])
        parser.get_parsed_content(item)
        assert read_trained_network_scale(ckpt / "model.pt") == (scale,) * 3, presets
        assert read_trained_spacing(ckpt / "model.pt") == (1.0,) * 3, presets
