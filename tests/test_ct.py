"""CT as CT (issue 22 item 2): a CT in Hounsfield units keeps air, not 0 HU (soft tissue), wherever the moving field of
view ends, and is scaled by a fixed window; checked on the real TotalSegmentator abdominal CT of ``shared/data`` with a
known smooth deformation and a cut field of view, and piece by piece on small volumes."""

from __future__ import annotations

import json
import logging

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import BUNDLE_ROOT, SHARED_DATA
from monai.data import MetaTensor
from workflow_data import run_bundle_workflow

from scripts.engines.affine_registration import AffineRegistration
from scripts.layers.intensity import check_intensity_window, resolve_background, window_intensity
from scripts.layers.sampling import sample_at_voxels, voxel_grid
from scripts.spatial.inversion import invert_displacement
from scripts.workflow.grid_transforms import ResampleToFixedGridd
from scripts.workflow.intensity import ScaleRegistrationIntensityd
from scripts.workflow.transform_outputs import WarpFromSourced

CT_DIR = SHARED_DATA / "abdomen_ct_mr_totalseg"
AIR = -1024.0
#: TotalSegmentator "total" ids of the large organs scored (shared/data/README.md, section 5)
ORGANS = {1: "spleen", 2: "kidney_right", 3: "kidney_left", 5: "liver", 6: "stomach"}
#: the moving scan keeps fixed voxels x < CUT_X of the 122 along axis 0 (RAS: the patient's right side is cut off)
CUT_X = 100


def _ct_hu(shape=(12, 10, 8), seed=0) -> torch.Tensor:
    """A small CT-like volume in HU: air around a soft-tissue block with a bone core, (1, 1, *shape) float32."""
    volume = torch.full(shape, AIR)
    volume[2:-2, 2:-2, 1:-1] = 40.0 + 20.0 * torch.rand(shape[0] - 4, shape[1] - 4, shape[2] - 2,
                                                       generator=torch.Generator().manual_seed(seed))
    volume[5:7, 4:6, 3:5] = 700.0
    return volume[None, None]


def test_resampling_a_cut_field_of_view_fills_with_the_background():
    """The moving volume covers only part of the fixed grid (10 of 16 voxels along axis 0, offset by half a voxel):
    outside it the resampled image is the background exactly, at the edge a trilinear blend of the last voxel and the
    background, inside it what zero padding gives; a label map keeps 0 outside."""
    moving = _ct_hu((10, 10, 8))
    moving_affine = np.eye(4)
    fixed_affine = np.eye(4)
    fixed_affine[0, 3] = 0.5  # fixed voxel i sits at moving x = i + 0.5: voxel 9 straddles the moving edge (x = 9)
    image = MetaTensor(moving[0], affine=torch.as_tensor(moving_affine))
    label = MetaTensor((moving[0] > 0).to(torch.uint8), affine=torch.as_tensor(moving_affine))
    fixed = MetaTensor(torch.zeros(1, 16, 10, 8), affine=torch.as_tensor(fixed_affine))
    transform = ResampleToFixedGridd(["moving_image", "moving_label"], mode=["bilinear", "nearest"])
    out = transform({"moving_image": image, "moving_label": label, "fixed_image": fixed})
    resampled, labels = out["moving_image"][0], out["moving_label"][0]
    assert resolve_background(moving) == AIR  # "auto" (the default for images) is the minimum
    assert torch.all(resampled[10:] == AIR), "outside the field of view: air, not 0 HU"
    # float32 weights of 0.5 from grid_sample's normalised coordinates: equal to 0.01 HU
    torch.testing.assert_close(resampled[9], 0.5 * moving[0, 0, 9] + 0.5 * AIR, rtol=0, atol=0.01)  # half outside
    torch.testing.assert_close(resampled[:9], 0.5 * (moving[0, 0, :9] + moving[0, 0, 1:]), rtol=0, atol=0.01)
    assert labels.dtype == torch.uint8 and torch.all(labels[10:] == 0)
    # an explicit value, and zero padding where it was asked for
    given = ResampleToFixedGridd(["moving_image"], background=-1000)({"moving_image": image, "fixed_image": fixed})
    assert torch.all(given["moving_image"][0, 10:] == -1000.0)
    zeros = ResampleToFixedGridd(["moving_image"], background=0)({"moving_image": image, "fixed_image": fixed})
    assert torch.all(zeros["moving_image"][0, 10:] == 0.0)


def test_apply_fills_images_with_their_background_and_labels_with_zero(tmp_path):
    """``apply`` (saved transforms, like antsApplyTransforms) onto a fixed grid larger than the moving scan: the image's
    minimum outside it by default (as warped_image.nii.gz), a given value when asked, label maps 0."""
    from scripts.spatial import apply_transforms, save_transforms

    moving = _ct_hu((10, 10, 8))[0, 0].numpy()
    fixed = nib.Nifti1Image(np.zeros((14, 10, 8), np.float32), np.eye(4))
    save_transforms(tmp_path, np.eye(4), np.eye(4), np.zeros((3, 14, 10, 8), np.float32), inverse=False)
    image = nib.Nifti1Image(moving, np.eye(4))
    out = apply_transforms(fixed, image, tmp_path).get_fdata()
    np.testing.assert_allclose(out[:10], moving, atol=0.01)
    assert np.all(out[10:] == AIR)
    assert np.all(apply_transforms(fixed, image, tmp_path, background=-1000).get_fdata()[10:] == -1000.0)
    labels = nib.Nifti1Image((moving > 0).astype(np.uint8), np.eye(4))
    warped_labels = np.asarray(apply_transforms(fixed, labels, tmp_path, "nearest").dataobj)
    assert warped_labels.dtype == np.uint8 and np.all(warped_labels[10:] == 0) and warped_labels[:10].any()


def test_padding_value_is_exact_and_checked():
    """``sample_at_voxels`` with a padding value equals zero padding of the shifted image, shifted back; it refuses a
    padding value with another padding mode or a non-finite one."""
    image = _ct_hu()
    coords = voxel_grid([12, 10, 8]).unsqueeze(0) + torch.tensor([3.3, -1.7, 0.4]).view(1, 3, 1, 1, 1)
    padded = sample_at_voxels(image, coords, padding_value=AIR)
    torch.testing.assert_close(padded, sample_at_voxels(image - AIR, coords) + AIR)
    assert padded.min() >= AIR and padded[0, 0, -1, 0, 0] == AIR
    with pytest.raises(ValueError, match="padding_mode 'zeros'"):
        sample_at_voxels(image, coords, padding_mode="border", padding_value=AIR)
    with pytest.raises(ValueError, match="finite"):
        sample_at_voxels(image, coords, padding_value=float("nan"))


def test_window_and_background_options_are_checked():
    assert check_intensity_window("-1000,1000") == (-1000.0, 1000.0)
    assert check_intensity_window([-1000, 1000]) == (-1000.0, 1000.0) and check_intensity_window(None) is None
    for bad in ("1000,-1000", [0, 0], "a,b", [1.0], [-1000, float("inf")]):
        with pytest.raises(ValueError, match="intensity_window must be two finite numbers"):
            check_intensity_window(bad)
    with pytest.raises(ValueError, match="background must be 'auto'"):
        resolve_background(torch.zeros(3), "air")
    with pytest.raises(ValueError, match="background needs one entry per key"):
        ResampleToFixedGridd(["moving_image", "moving_label"], mode=["bilinear", "nearest"], background=[0])


def _padded_ct(padding=-3024.0) -> MetaTensor:
    """The small CT with a third of its voxels set to scanner padding (outside the reconstruction circle)."""
    volume = _ct_hu((12, 10, 8))[0]
    volume[:, :4] = padding
    return MetaTensor(volume, affine=torch.eye(4, dtype=torch.float64))


def test_percentiles_put_air_at_mid_grey_under_padding_and_the_window_does_not(caplog):
    """With -3024 HU padding, percentile scaling maps air (-1024) to about 0.5 and logs the hint; a numeric background
    clips the padding to it first (air -> 0), a window clips and scales linearly (air and padding -> 0, 1000 -> 1)."""
    image = _padded_ct()
    air = image[0] == AIR  # the padding is -3024, apart
    with caplog.at_level(logging.WARNING):
        percentiles = ScaleRegistrationIntensityd(["image"])({"image": image})["image"]
    assert 0.4 < float(percentiles[0][air].mean()) < 0.7
    assert "below -500" in caplog.text and "--intensity_window=-1000,1000" in caplog.text
    clipped = ScaleRegistrationIntensityd(["image"], background=AIR)({"image": image})["image"]
    assert float(clipped[0][air].max()) == 0.0
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        windowed = ScaleRegistrationIntensityd(["image"], window=[-1000, 1000])({"image": image})["image"]
    assert "below -500" not in caplog.text  # a window is set: no hint
    assert float(windowed.min()) == 0.0 and float(windowed[0][air].max()) == 0.0
    assert float(windowed[0, 5, 4, 3]) == pytest.approx(0.85)  # bone at 700 HU
    assert isinstance(windowed, MetaTensor) and torch.equal(windowed.affine, image.affine)
    mri = MetaTensor(torch.rand(1, 6, 6, 6) * 300.0, affine=torch.eye(4))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        ScaleRegistrationIntensityd(["image"])({"image": mri})
    assert "below -500" not in caplog.text


def test_affine_stage_scales_ct_by_the_window_and_reads_air_outside():
    """The affine stage's own intensity scale: with a window, padding and air are 0 and so is the value the moving
    image reads outside its field of view; without one, a numeric background keeps padding from setting the
    percentiles; "auto" keeps the previous scaling (MRI unchanged)."""
    image = _padded_ct()[None]
    scaled, fill = AffineRegistration(intensity_window=(-1000, 1000)).scaled_intensity(image)
    torch.testing.assert_close(scaled, window_intensity(image, (-1000, 1000)))
    assert fill == 0.0 and float(scaled[0, 0][image[0, 0] <= AIR].max()) == 0.0
    _, fill = AffineRegistration(intensity_window=(-1000, 1000), background=0).scaled_intensity(image)
    assert fill == pytest.approx(0.5)  # the background asked for, on the window's scale
    air = image[0, 0] == AIR
    auto, _ = AffineRegistration().scaled_intensity(image)
    clipped, fill = AffineRegistration(background=AIR).scaled_intensity(image)
    assert float(auto[0, 0][air].mean()) > 0.3 and float(clipped[0, 0][air].max()) == 0.0 and fill == 0.0


def _parsed(*config_files: str, **overrides):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(BUNDLE_ROOT / "configs" / f) for f in config_files])
    parser.update({"bundle_root": str(BUNDLE_ROOT), **overrides})
    return parser


def _postprocessing_step(parser, kind):
    """The one transform of type ``kind`` in the parsed config's postprocessing chain."""
    (step,) = [t for t in parser.get_parsed_content("postprocessing").transforms if isinstance(t, kind)]
    return step


def test_configs_wire_the_window_and_the_background():
    """inference.json: percentiles and each image's minimum by default, in every stage that scales or resamples;
    the abdomen_ct preset (on train.json) sets the CT window and -1024 HU."""
    parser = _parsed("inference.json")
    scaling = parser.get_parsed_content("intensity_transforms")[0]
    assert isinstance(scaling, ScaleRegistrationIntensityd) and scaling.window is None and scaling.background == "auto"
    assert parser.get_parsed_content("grid_transforms")[0].background == ["auto", 0.0, 0.0]
    affine = parser.get_parsed_content("affine_registration")
    assert affine.intensity_window is None and affine.background == "auto"
    warp_from_source = _postprocessing_step(parser, WarpFromSourced)
    assert warp_from_source.background == ["auto", 0.0]  # warped_image: the image's background, warped_label: 0
    parser = _parsed("inference.json", intensity_window=[-1000, 1000], background_value=-1024)
    assert parser.get_parsed_content("affine_registration").intensity_window == (-1000.0, 1000.0)
    assert _postprocessing_step(parser, WarpFromSourced).background == [-1024.0, 0.0]
    parser = _parsed("train.json", "presets/abdomen_ct.json")
    scaling = parser.get_parsed_content("intensity_transforms")[0]
    assert scaling.window == (-1000.0, 1000.0) and scaling.background == -1024.0
    assert parser.get_parsed_content("grid_transforms")[0].background == [-1024.0, 0.0, 0.0]


def _smooth_field(shape, amplitude, seed=3) -> torch.Tensor:
    """A smooth displacement (1, 3, *shape) in voxels: a 4 x 4 x 3 random grid upsampled trilinearly, each
    in-plane component scaled to at most ``amplitude`` voxels, the through-plane one (a 30-slice slab) to a third."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.randn(1, 3, 4, 4, 3, generator=generator, dtype=torch.float64)
    field = torch.nn.functional.interpolate(coarse, size=shape, mode="trilinear", align_corners=True)
    field = field / field.abs().amax(dim=(2, 3, 4), keepdim=True)
    return field * torch.tensor([amplitude, amplitude, amplitude / 3.0], dtype=torch.float64).view(1, 3, 1, 1, 1)


@pytest.fixture(scope="module")
def ct_case(tmp_path_factory):
    """Fixed: the real CT (3 mm, HU) and its labels. Moving: the CT deformed by a known smooth field ``v``
    (``moving(q) = fixed(q + v(q))``, air outside) and cut to ``x < CUT_X``, with its labels, on disk with the fixed
    affine (voxel ``[0:CUT_X]`` keeps its world position).
    The registration should recover ``u = inverse(v)`` (``moving(p + u(p)) = fixed(p)``) on the fixed grid."""
    if not (CT_DIR / "ct_img.nii.gz").is_file():
        pytest.skip(f"real CT not found under {CT_DIR}")
    folder = tmp_path_factory.mktemp("ct")
    image = nib.load(str(CT_DIR / "ct_img.nii.gz"))
    fixed = torch.as_tensor(np.asarray(image.dataobj, dtype=np.float64))[None, None]
    labels = torch.as_tensor(np.asarray(nib.load(str(CT_DIR / "ct_seg_total.nii.gz")).dataobj).astype(np.int64))
    v = _smooth_field(fixed.shape[2:], amplitude=6.0)  # up to 18 mm in-plane (det J of its inverse 0.72 to 1.60)
    coords = voxel_grid(list(fixed.shape[2:]), dtype=torch.float64).unsqueeze(0) + v
    moving = sample_at_voxels(fixed, coords, "bilinear", padding_value=AIR)[0, 0]
    moving_labels = sample_at_voxels(labels[None, None], coords, "nearest")[0, 0]
    inverse = invert_displacement(v.float(), iterations=200, tolerance=1e-5)
    # the known answer is known to 0.01 voxel on average (0.25 at worst, at the grid's faces, left out below)
    assert inverse.converged and float(inverse.error_mean) < 0.01 and float(inverse.error_max) < 0.25
    u = inverse.ddf[0].double()
    paths = {"fixed_image": folder / "fixed_ct.nii.gz", "fixed_label": folder / "fixed_seg.nii.gz",
             "moving_image": folder / "moving_ct.nii.gz", "moving_label": folder / "moving_seg.nii.gz"}
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj), image.affine), str(paths["fixed_image"]))
    nib.save(nib.Nifti1Image(labels.numpy().astype(np.uint8), image.affine), str(paths["fixed_label"]))
    nib.save(nib.Nifti1Image(moving[:CUT_X].numpy().astype(np.float32), image.affine), str(paths["moving_image"]))
    nib.save(nib.Nifti1Image(moving_labels[:CUT_X].numpy().astype(np.uint8), image.affine), str(paths["moving_label"]))
    return {"paths": {k: str(p) for k, p in paths.items()}, "u": u.numpy(), "fixed": fixed[0, 0].numpy(),
            "labels": labels.numpy(), "folder": folder}


def _dice(a: np.ndarray, b: np.ndarray, label: int) -> float:
    a, b = a == label, b == label
    return 2.0 * float(np.logical_and(a, b).sum()) / max(float(a.sum() + b.sum()), 1.0)


#: the CT settings of docs/usage.md ("CT"), and a refinement fitted to a 3 mm CT slab: full resolution, window 5
#: (15 mm), smoothness 2. The network stage is off: the shipped weights are brain-MRI weights, and on this CT their field is no
#: better than the identity (docs/usage.md, "CT"); the refinement registers from the zero field.
CT_OVERRIDES = {
    "affine_transform": "none",  # the pair shares its world space: no affine stage
    "intensity_window": [-1000, 1000],
    "background_value": -1024,
    "refinement#base_inferer": "@zero_field_inferer",
    "refine_iterations": 30,
    "refinement_scale": 1.0,
    "refinement_kernel_size": 5,
    "refinement_regularization_weight": 2.0,
}


@pytest.mark.slow
def test_ct_pair_with_a_cut_field_of_view_registers_as_ct(ct_case):
    """``inference.json`` with the CT settings on the real CT deformed by a known field (up to 18.6 mm) and cut to
    x < CUT_X: the recovered field matches the known one in the body where the moving scan has data, the organs' Dice
    rises, and warped_image.nii.gz holds air (-1024 HU) where the moving field of view ends, not 0 HU."""
    out = ct_case["folder"] / "out"
    run_bundle_workflow(["inference.json"], **ct_case["paths"], output_dir=str(out), **CT_OVERRIDES)

    ddf = np.moveaxis(nib.load(str(out / "ddf.nii.gz")).get_fdata(), -1, 0)  # (3, X, Y, Z) fixed voxels (RAS file)
    u = ct_case["u"]
    index = np.stack(np.meshgrid(*[np.arange(n) for n in u.shape[1:]], indexing="ij"))
    lands = index + u  # where each fixed voxel truly comes from, in moving (= fixed) voxel indices
    # body voxels whose source the cut moving scan still shows, 3 voxels in from its faces
    inside = (ct_case["fixed"] > -500) & (lands[0] <= CUT_X - 4) & (lands[0] >= 3)
    inside &= (lands[1] >= 3) & (lands[1] <= u.shape[2] - 4) & (lands[2] >= 3) & (lands[2] <= u.shape[3] - 4)
    error_mm = 3.0 * np.linalg.norm(ddf - u, axis=0)[inside]
    known_mm = 3.0 * np.linalg.norm(u, axis=0)[inside]
    print(f"\nfield error in the body: mean {error_mm.mean():.2f} mm, 90th percentile {np.percentile(error_mm, 90):.2f}"
          f" mm over {int(inside.sum())} voxels (known field: mean {known_mm.mean():.2f} mm, max {known_mm.max():.2f})")
    assert error_mm.mean() < 2.5 and error_mm.mean() < 0.6 * known_mm.mean()  # under a voxel, most of it recovered
    assert np.percentile(error_mm, 90) < 5.0

    warped_label = np.asarray(nib.load(str(out / "warped_label.nii.gz")).dataobj)
    identity = np.asarray(nib.load(ct_case["paths"]["moving_label"]).dataobj)  # on the fixed grid's first CUT_X
    fixed_label = ct_case["labels"][:CUT_X]
    before = {name: _dice(identity, fixed_label, i) for i, name in ORGANS.items()}
    after = {name: _dice(warped_label[:CUT_X], fixed_label, i) for i, name in ORGANS.items()}
    print("organ Dice before -> after: " + ", ".join(f"{n} {before[n]:.3f} -> {after[n]:.3f}" for n in before)
          + f"; mean {np.mean(list(before.values())):.3f} -> {np.mean(list(after.values())):.3f}")
    assert np.mean(list(after.values())) > np.mean(list(before.values())) + 0.03
    assert all(after[n] > before[n] for n in before)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["mean_dice"] > metrics["mean_dice_identity"]

    warped = nib.load(str(out / "warped_image.nii.gz")).get_fdata()
    outside = index[0] + ddf[0] >= CUT_X  # both trilinear corners beyond the moving scan's last voxel (CUT_X - 1)
    print(f"warped_image where the moving field of view ends ({int(outside.sum())} voxels): "
          f"max {warped[outside].max()} HU")
    assert outside.mean() > 0.1  # the cut is large: a tenth of the fixed grid
    assert warped[outside].max() <= -900.0 and np.all(warped[outside] == AIR)
