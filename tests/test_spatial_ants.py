"""ANTs applies what ``register`` writes for a native pair exactly as the bundle does: ``warp.nii.gz`` + ``affine.mat``
reproduce ``warped_label.nii.gz``, the inverse (``affine.mat`` inverted + ``inverse_warp.nii.gz``, the ANTs order) maps
the fixed labels back onto the moving scan as well as the forward maps the moving labels, and the one-file composites
``transform.h5`` / ``inverse_transform.h5`` give the same as the two-file pairs. ANTs' own registration files read back
too. antspyx is pinned in requirements-dev.txt, so none of this skips in CI.

The native pair is the shipped Colin27 -> MNI152 pair at 3 mm with the moving header moved by a rigid transform
(``conftest.native_registration``, one ``register --inverse`` shared with ``test_native_pipeline.py``)."""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pytest
from spatial_cases import brain_correlation, make_case

from scripts.spatial import apply_transforms

ants = pytest.importorskip("ants")

LABELS = range(1, 9)


def _array(path) -> np.ndarray:
    return np.asanyarray(nib.load(str(path)).dataobj)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    """Mean Dice over the 8 structures of the shipped pair (as ``metrics.json`` counts them: labels in either map)."""
    scores = [2 * ((a == k) & (b == k)).sum() / ((a == k).sum() + (b == k).sum()) for k in LABELS if (a == k).any()
              or (b == k).any()]
    return float(np.mean(scores))


@pytest.fixture(scope="module")
def native(native_registration):
    """Paths of the registered native pair and of its transform files, as ANTs takes them (strings)."""
    out = native_registration["out"]
    files = {name: str(out / name) for name in ("affine.mat", "warp.nii.gz", "inverse_warp.nii.gz", "transform.h5",
                                                "inverse_transform.h5")}
    return {**native_registration, **files}


def _forward(native, image_key: str, transforms: list[str], interpolator: str = "nearestNeighbor") -> np.ndarray:
    fixed, moving = ants.image_read(native["pair"]["fixed_image"]), ants.image_read(native["pair"][image_key])
    return ants.apply_transforms(fixed, moving, transforms, interpolator=interpolator).numpy()


def _inverse(native, transforms: list[str], invert: list[bool]) -> np.ndarray:
    moving, label = ants.image_read(native["pair"]["moving_image"]), ants.image_read(native["pair"]["fixed_label"])
    back = ants.apply_transforms(moving, label, transforms, whichtoinvert=invert, interpolator="nearestNeighbor")
    return back.numpy()


def test_ants_forward_reproduces_warped_label_and_image(native):
    theirs = _forward(native, "moving_label", [native["warp.nii.gz"], native["affine.mat"]])
    assert (theirs == _array(native["out"] / "warped_label.nii.gz")).mean() >= 0.995
    image = _forward(native, "moving_image", [native["warp.nii.gz"], native["affine.mat"]], "linear")
    brain = _array(native["pair"]["fixed_label"]) > 0
    assert brain_correlation(_array(native["out"] / "warped_image.nii.gz"), image, brain) >= 0.999


def test_ants_inverse_maps_fixed_labels_back_as_well_as_the_forward(native):
    """Fixed labels through [affine.mat inverted, inverse_warp.nii.gz] onto the moving scan: Dice with the moving
    labels within 0.01 of the forward Dice (warped moving labels against the fixed labels), and the bundle's own
    inverse ``apply`` gives the same map."""
    back = _inverse(native, [native["affine.mat"], native["inverse_warp.nii.gz"]], [True, False])
    forward = _dice(_array(native["out"] / "warped_label.nii.gz"), _array(native["pair"]["fixed_label"]))
    backward = _dice(back, _array(native["pair"]["moving_label"]))
    assert forward == pytest.approx(json.loads((native["out"] / "metrics.json").read_text())["mean_dice"], abs=1e-4)
    assert abs(backward - forward) <= 0.01, (forward, backward)
    ours = apply_transforms(native["pair"]["fixed_label"], native["pair"]["moving_image"], native["out"], "nearest",
                            inverse=True)
    assert (np.asanyarray(ours.dataobj) == back).mean() >= 0.995


def test_ants_applies_the_composite_files_like_the_two_file_pairs(native):
    pairs = _forward(native, "moving_label", [native["warp.nii.gz"], native["affine.mat"]])
    assert (_forward(native, "moving_label", [native["transform.h5"]]) == pairs).mean() >= 0.9999
    pairs = _inverse(native, [native["affine.mat"], native["inverse_warp.nii.gz"]], [True, False])
    assert (_inverse(native, [native["inverse_transform.h5"]], [False]) == pairs).mean() >= 0.9999


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    return make_case(tmp_path_factory.mktemp("spatial_ants"))


def _brain(path) -> np.ndarray:
    image = np.asarray(nib.load(str(path)).dataobj)
    return image > 0.2 * np.percentile(image, 99)


def test_ants_own_registration_files_read_back(case, tmp_path):
    """ANTs' 0GenericAffine.mat (float, with a centre), 1Warp and 1InverseWarp, renamed into a transform folder,
    reproduce ANTs' own warped images in both directions (a short SyN run, about 2 s)."""
    fixed, moving = ants.image_read(str(case["fixed"])), ants.image_read(str(case["moving"]))
    result = ants.registration(
        fixed, moving, "SyN", reg_iterations=(20, 10, 0), aff_iterations=(50, 20, 0, 0), outprefix=f"{tmp_path}/"
    )
    folder = tmp_path / "transforms"
    folder.mkdir()
    warp, affine = result["fwdtransforms"]
    shutil.copy(affine, folder / "affine.mat")
    shutil.copy(warp, folder / "warp.nii.gz")
    shutil.copy(result["invtransforms"][1], folder / "inverse_warp.nii.gz")
    ours = apply_transforms(case["fixed"], case["moving"], folder).get_fdata()
    brain = _brain(case["fixed"])
    assert brain_correlation(ours, result["warpedmovout"].numpy(), brain) >= 0.99
    assert np.abs(ours - result["warpedmovout"].numpy())[brain].max() < 1e-3 * ours.max()
    ours_inverse = apply_transforms(case["fixed"], case["moving"], folder, inverse=True).get_fdata()
    assert brain_correlation(ours_inverse, result["warpedfixout"].numpy(), _brain(case["moving"])) >= 0.99
