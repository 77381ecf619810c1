# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""The affine stage's foreground overlap check (``scripts.workflow.alignment``): a pair whose foregrounds do not overlap
once their centres of mass coincide is refused before any optimisation, with one message naming the check; real
pairs pass with a wide margin, also when their headers put them centimetres apart."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import BUNDLE_ROOT, SHARED_DATA
from monai.data import MetaTensor
from reliability_data import load_sample, save
from spatial_cases import rotation_ras

from scripts.engines import AffineRegistration
from scripts.io.errors import RegistrationInputError
from scripts.workflow.alignment import MIN_FOREGROUND_OVERLAP, AffineAlignd, foreground_overlap

CHECK_NAME = "foreground overlap check failed"
REAL_PAIRS = (  # (moving, fixed) in their own scanner spaces: within and across the two native data sets
    ("brain_mal2012/mal1009_t1.nii.gz", "brain_mal2012/mal1002_t1.nii.gz"),
    ("brain_mal2012/mal1128_t1.nii.gz", "brain_freesurfer_native/bert_t1.nii.gz"),
    ("brain_freesurfer_native/fsdemo_subject1_t1.nii.gz", "brain_freesurfer_native/bert_t1.nii.gz"),
)


def _tensor(data: np.ndarray, affine: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.as_tensor(np.asarray(data, dtype=np.float32)), torch.as_tensor(affine, dtype=torch.float64)


def _blob_like(data: np.ndarray) -> np.ndarray:
    """A moving image of the fixed grid whose only content is a 3-voxel cube of brain intensity."""
    blob = np.zeros_like(data, dtype=np.float32)
    centre = [s // 2 for s in data.shape]
    blob[tuple(slice(c - 1, c + 2) for c in centre)] = float(np.percentile(data[data > 0], 90))
    return blob


def _moved(affine: np.ndarray, data: np.ndarray) -> np.ndarray:
    """The header ``affine`` moved by a rigid transform (12 deg, 4.5 cm): the same anatomy in another scanner space."""
    centre = nib.affines.apply_affine(affine, (np.array(data.shape) - 1) / 2)
    return rotation_ras(centre, degrees_z=12.0, degrees_x=-6.0, translation=(45.0, -20.0, 15.0)) @ affine


def test_centring_is_what_makes_moved_scans_overlap():
    fixed, affine = load_sample("fixed_image", factor=4)
    moving, moving_affine = load_sample("moving_image", factor=4)
    moved = _moved(moving_affine, moving)
    centred = foreground_overlap(*_tensor(moving, moved), *_tensor(fixed, affine))
    where_they_lie = foreground_overlap(*_tensor(moving, moved), *_tensor(fixed, affine), centre=False)
    assert centred > 0.8 > where_they_lie + 0.2
    assert foreground_overlap(*_tensor(fixed, affine), *_tensor(fixed, affine)) == pytest.approx(1.0)


def test_a_tiny_blob_covers_almost_nothing_of_the_fixed_brain():
    fixed, affine = load_sample("fixed_image", factor=4)
    assert foreground_overlap(*_tensor(_blob_like(fixed), affine), *_tensor(fixed, affine)) < 0.01
    # one bright voxel that the sampling of a large image (every 3rd voxel of 160x192x160) misses: no foreground
    # found, so no overlap (not an error)
    full, full_affine = load_sample("fixed_image", factor=1)
    speck = np.zeros_like(full, dtype=np.float32)
    speck[80, 95, 80] = 100.0
    assert foreground_overlap(*_tensor(speck, full_affine), *_tensor(fixed, affine)) == 0.0


@pytest.mark.parametrize("moving, fixed", REAL_PAIRS, ids=lambda p: Path(p).name.split("_t1")[0])
def test_real_native_pairs_pass_with_margin(moving, fixed):
    if not (SHARED_DATA / moving).is_file() or not (SHARED_DATA / fixed).is_file():
        pytest.skip(f"real data not found under {SHARED_DATA}")
    images = [nib.load(str(SHARED_DATA / name)) for name in (moving, fixed)]
    moving_image, fixed_image = (_tensor(image.dataobj, image.affine) for image in images)
    overlap = foreground_overlap(*moving_image, *fixed_image)
    assert overlap > 4 * MIN_FOREGROUND_OVERLAP


def test_transform_refuses_before_optimising_and_checks_its_settings():
    fixed, affine = load_sample("fixed_image", factor=4)

    class Untouchable(AffineRegistration):
        def forward(self, *args):
            raise AssertionError("the optimisation ran although the overlap check should have refused the pair")

    align = AffineAlignd(registration=Untouchable(levels_mm=[8.0], iterations=[1]))
    data = {key: MetaTensor(torch.as_tensor(array, dtype=torch.float32)[None], affine=torch.as_tensor(affine))
            for key, array in (("moving_image", _blob_like(fixed)), ("fixed_image", fixed))}
    with pytest.raises(RegistrationInputError, match=f"{CHECK_NAME}.*affine_min_overlap"):
        align(data)
    for bad in ({"min_overlap": 1.5}, {"min_overlap": -0.1}, {"foreground_threshold": 1.0}):
        with pytest.raises(ValueError, match="min_overlap must be in"):
            AffineAlignd(registration=AffineRegistration(), **bad)


@pytest.mark.slow
def test_cli_refuses_a_blob_with_the_check_named_and_writes_nothing(tmp_path):
    fixed, affine = load_sample("fixed_image", factor=4)
    paths = {"fixed": save(tmp_path / "fixed.nii.gz", fixed, affine),
             "moving": save(tmp_path / "blob.nii.gz", _blob_like(fixed), _moved(affine, fixed))}
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "scripts.cli", "register", "--fixed", str(paths["fixed"]), "--moving",
         str(paths["moving"]), "--out", str(out), "--device", "cpu"],
        cwd=BUNDLE_ROOT, capture_output=True, text=True, timeout=600, check=False,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert CHECK_NAME in result.stderr and "blob.nii.gz" in result.stderr and "Traceback" not in result.stderr
    assert not out.exists() or not any(out.iterdir())
