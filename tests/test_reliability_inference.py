"""End-to-end inference through ``monai.bundle run`` (inference.json) on the real pair at reduced size:
bit-identical repeated runs, and the same world-space result whatever the storage orientation of the inputs."""

import json
from pathlib import Path

import monai.bundle
import nibabel as nib
import numpy as np
import pytest
from reliability_data import SAMPLE_FILES, load_sample, save
from workflow_data import PLAIN_INFERENCE

BUNDLE = Path(__file__).resolve().parents[1] / "bundle"
OUTPUTS = ("warped_image.nii.gz", "ddf.nii.gz", "warped_label.nii.gz", "jacobian_det.nii.gz", "metrics.json")


def run_inference(pair, output_dir, **overrides):
    """Run inference.json exactly as ``python -m monai.bundle run`` does, in this process."""
    monai.bundle.run(
        config_file=str(BUNDLE / "configs" / "inference.json"),
        meta_file=str(BUNDLE / "configs" / "metadata.json"),
        logging_file=str(BUNDLE / "configs" / "logging.conf"),
        bundle_root=str(BUNDLE),
        output_dir=str(output_dir),
        **pair,
        **{**PLAIN_INFERENCE, **overrides},
    )
    return Path(output_dir)


def write_pair(folder, transform=lambda key, data, affine: (data, affine)):
    """Write the subsampled real pair (40x48x40, 4 mm, LAS) after ``transform(key, data, affine)``."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for key, name in SAMPLE_FILES.items():
        data, affine = transform(key, *load_sample(key, factor=4))
        paths[key] = str(save(folder / name, np.ascontiguousarray(data), affine))
    return paths


def flip(data, affine, axis):
    """Store a volume in reverse order along ``axis``, with the affine that keeps every voxel at its world position."""
    index_map = np.eye(4)
    index_map[axis, axis] = -1.0
    index_map[axis, 3] = data.shape[axis] - 1
    return np.flip(data, axis), affine @ index_map


def read(path):
    image = nib.load(str(path))
    return np.asanyarray(image.dataobj), image.affine


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("reference")
    pair = write_pair(root / "pair")
    return pair, run_inference(pair, root / "out")


def test_two_runs_are_bit_identical(reference, tmp_path):
    pair, first = reference
    second = run_inference(pair, tmp_path / "again")
    for name in OUTPUTS:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name  # files, not only arrays, are equal
    data, _ = read(first / "warped_image.nii.gz")
    assert np.ptp(data) > 0  # a real, non-trivial output was compared


def test_lps_and_ras_inputs_give_the_same_world_space_result(reference, tmp_path):
    pair, base = reference

    def reorient(key, data, affine):
        # fixed (and its labels): LAS -> RAS by flipping axis 0; moving (and its labels): LAS -> LPS by flipping axis 1
        return flip(data, affine, 0) if key.startswith("fixed") else flip(data, affine, 1)

    flipped_pair = write_pair(tmp_path / "pair", reorient)
    assert "".join(nib.aff2axcodes(nib.load(flipped_pair["fixed_image"]).affine)) == "RAS"
    assert "".join(nib.aff2axcodes(nib.load(flipped_pair["moving_image"]).affine)) == "LPS"
    out = run_inference(flipped_pair, tmp_path / "out")
    fixed_affine = nib.load(flipped_pair["fixed_image"]).affine
    for name in ("warped_image.nii.gz", "warped_label.nii.gz", "jacobian_det.nii.gz"):
        expected, _ = read(base / name)
        got, affine = read(out / name)
        assert np.allclose(affine, fixed_affine)  # written on the (flipped) fixed grid
        back, back_affine = flip(got, affine, 0)  # read back in the reference's storage order
        assert np.allclose(back_affine, read(base / name)[1])
        np.testing.assert_allclose(back, expected, rtol=0, atol=1e-4 * max(1.0, float(np.abs(expected).max())), err_msg=name)
    ddf, _ = read(base / "ddf.nii.gz")
    ddf_flipped, _ = read(out / "ddf.nii.gz")
    back = np.flip(ddf_flipped, 0).copy()
    back[..., 0] *= -1  # a shift along the reversed axis 0 changes sign
    np.testing.assert_allclose(back, ddf, rtol=0, atol=1e-4)
    dice = json.loads((base / "metrics.json").read_text()), json.loads((out / "metrics.json").read_text())
    assert json.dumps(dice[0], sort_keys=True) == json.dumps(dice[1], sort_keys=True)


def test_oblique_inputs_give_the_same_world_space_result(reference, tmp_path):
    pair, base = reference
    angle = np.deg2rad(12.0)
    rotation = np.eye(4)
    rotation[:3, :3] = [[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]]
    rotation[:3, 3] = [3.0, -2.0, 5.0]

    # the whole scene (both images, both label maps) moved rigidly in world space: an oblique acquisition
    oblique_pair = write_pair(tmp_path / "pair", lambda key, data, affine: (data, rotation @ affine))
    out = run_inference(oblique_pair, tmp_path / "out")
    for name in ("warped_image.nii.gz", "warped_label.nii.gz", "jacobian_det.nii.gz", "ddf.nii.gz"):
        expected, expected_affine = read(base / name)
        got, affine = read(out / name)
        assert np.allclose(affine, rotation @ expected_affine, atol=1e-4)
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4 * max(1.0, float(np.abs(expected).max())), err_msg=name)
