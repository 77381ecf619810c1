"""Model-zoo verification of the bundle, offline: ``verify_metadata`` against the shipped copy of the 20240725 schema's
required fields and types, and ``verify_net_in_out --net_id network_def`` from the bundle root."""

from __future__ import annotations

import copy
import json

import pytest
from jsonschema import Draft7Validator
from conftest import BUNDLE_ROOT, REPO_ROOT
from ecosystem_utils import run_bundle_command
from monai.bundle import verify_metadata

SCHEMA = REPO_ROOT / "tests" / "schema" / "meta_schema_20240725.json"
METADATA = BUNDLE_ROOT / "configs" / "metadata.json"
# The required fields documented for meta_schema_20240725 (MONAI bundle specification).
DOCUMENTED_REQUIRED = [
    "schema",
    "version",
    "monai_version",
    "pytorch_version",
    "numpy_version",
    "required_packages_version",
    "task",
    "description",
    "authors",
    "copyright",
    "network_data_format",
]
TENSOR_REQUIRED = ["type", "format", "num_channels", "spatial_shape", "dtype", "value_range"]


def _metadata() -> dict:
    return json.loads(METADATA.read_text())


def _verify(metadata: dict, tmp_path) -> None:
    meta_file = tmp_path / "metadata.json"
    meta_file.write_text(json.dumps(metadata))
    verify_metadata(meta_file=str(meta_file), filepath=str(SCHEMA))


def _schema_errors(metadata: dict) -> list:
    return [error.message for error in Draft7Validator(json.loads(SCHEMA.read_text())).iter_errors(metadata)]


def test_schema_encodes_documented_fields():
    schema = json.loads(SCHEMA.read_text())
    assert schema["required"] == DOCUMENTED_REQUIRED
    assert schema["definitions"]["tensor"]["required"] == TENSOR_REQUIRED
    assert _metadata()["schema"].endswith("/meta_schema_20240725.json")
    assert _schema_errors(_metadata()) == []


def test_verify_metadata_cli_offline():
    result = run_bundle_command(
        ["verify_metadata", "--meta_file", "configs/metadata.json", "--filepath", str(SCHEMA)], BUNDLE_ROOT
    )
    assert "metadata is verified with no error" in result.stdout + result.stderr


@pytest.mark.parametrize("field", DOCUMENTED_REQUIRED)
def test_schema_rejects_missing_required_field(field, tmp_path):
    metadata = _metadata()
    del metadata[field]
    assert _schema_errors(metadata) == [f"'{field}' is a required property"]
    # verify_metadata itself stops earlier without "schema" (it needs the URL), after validation otherwise
    with pytest.raises(ValueError, match=f"'{field}' is a required property|must provide the `{field}` field"):
        _verify(metadata, tmp_path)


@pytest.mark.parametrize("field", TENSOR_REQUIRED)
def test_schema_rejects_tensor_spec_missing_field(field, tmp_path):
    metadata = _metadata()
    del metadata["network_data_format"]["outputs"]["pred"][field]
    assert _schema_errors(metadata) == [f"'{field}' is a required property"]
    with pytest.raises(ValueError, match=f"'{field}' is a required property"):
        _verify(metadata, tmp_path)


@pytest.mark.parametrize(
    "path, bad_value",
    [
        (("version",), 1.0),
        (("required_packages_version",), ["nibabel==5.4.2"]),
        (("references",), "one string instead of a list"),
        (("network_data_format", "inputs", "image", "num_channels"), "2"),
        (("network_data_format", "inputs", "image", "spatial_shape"), [16.5, 16, 16]),
    ],
)
def test_schema_rejects_wrong_types(path, bad_value, tmp_path):
    metadata = _metadata()
    _verify(copy.deepcopy(metadata), tmp_path)  # the shipped metadata passes, so the failure below is the edit's
    node = metadata
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = bad_value
    with pytest.raises(ValueError, match="Failed validating"):
        _verify(metadata, tmp_path)


def test_verify_net_in_out_cli():
    result = run_bundle_command(
        [
            "verify_net_in_out",
            "--net_id",
            "network_def",
            "--meta_file",
            "configs/metadata.json",
            "--config_file",
            "configs/inference.json",
            "--device",
            "cpu",
            "--n",
            "2",
        ],
        BUNDLE_ROOT,
    )
    assert "data shape of network is verified with no error" in result.stdout + result.stderr


def test_required_packages_are_the_pinned_runtime_packages():
    """metadata.json names the packages an inference run imports beyond MONAI/torch/numpy (SimpleITK writes the
    transforms), at the versions requirements.txt pins and the tests ran with."""
    pins = dict(
        line.split("==", 1) for line in (REPO_ROOT / "requirements.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    )
    required = _metadata()["required_packages_version"]
    assert "SimpleITK" in required and "nibabel" in required
    assert {name: pins.get(name) for name in required} == required
