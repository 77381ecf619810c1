"""Region masks (issue 22: whole heads): the registration looks inside the masks only, the outputs stay whole.

A whole head is made from the shipped real brain pair by adding a bright skull-like shell around the moving brain; with
the brain masks, ``register`` must compute exactly what it computes on the stripped brains, while its
``warped_image.nii.gz`` still carries the shell.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from reliability_data import load_sample, save, small_pair
from scipy import ndimage

from scripts.cli import register
from scripts.io.errors import RegistrationInputError
from scripts.io.input_checks import CheckRegistrationContentd, CheckRegistrationHeadersd
from scripts.workflow.intensity import MaskImagesd


def test_mask_sets_the_background_outside_and_leaves_unmasked_images_alone():
    ct = MetaTensor(torch.linspace(-1024.0, 400.0, 2 * 4 * 5 * 6).reshape(2, 4, 5, 6), affine=torch.eye(4))
    fixed = MetaTensor(torch.rand(1, 4, 5, 6) + 3.0, affine=torch.eye(4))
    mask = torch.zeros(1, 4, 5, 6)
    mask[:, 1:3, 1:4, 2:5] = 1.0
    out = MaskImagesd()({"moving_image": ct, "fixed_image": fixed, "moving_mask": mask})
    inside = mask.expand_as(ct) > 0
    assert torch.equal(out["moving_image"][inside], ct[inside])
    assert (out["moving_image"][~inside] == -1024.0).all()  # the image's background, not 0 (water in HU)
    assert out["fixed_image"] is fixed  # no fixed mask given
    assert isinstance(out["moving_image"], MetaTensor) and torch.equal(out["moving_image"].affine, ct.affine)
    with pytest.raises(ValueError, match="not on the grid"):
        MaskImagesd()({"moving_image": ct, "fixed_image": fixed, "moving_mask": mask[:, :2]})


def test_masks_are_checked_like_labels(tmp_path):
    pair = small_pair(tmp_path / "pair")
    brain, affine = load_sample("moving_image")
    pair["moving_mask"] = str(save(tmp_path / "mask_2mm.nii.gz", *load_sample("moving_image", factor=2)))
    with pytest.raises(RegistrationInputError, match=r"moving mask '.*mask_2mm.nii.gz' is on a different grid"):
        CheckRegistrationHeadersd()(pair)
    with pytest.raises(RegistrationInputError, match=r"fixed mask 'data\['fixed_mask'\]' is empty \(no voxel > 0\)"):
        CheckRegistrationContentd()({"fixed_mask": torch.zeros(1, 4, 4, 4)})


@pytest.fixture(scope="module")
def head_pair(tmp_path_factory):
    """The shipped real pair at 4 mm; the moving brain wrapped in a bright 'skull' shell (a whole head) + brain masks."""
    folder = tmp_path_factory.mktemp("heads")
    pair = small_pair(folder)
    brain, affine = load_sample("moving_image")
    inside = brain > 0
    shell = ndimage.binary_dilation(inside, iterations=3) & ~ndimage.binary_dilation(inside, iterations=1)
    head = brain.astype(np.float32)
    head[shell] = 1.5 * float(brain.max())  # brighter than anything in the brain, as fat and skull are in T1
    pair["moving_head"] = str(save(folder / "moving_head.nii.gz", head, affine))
    pair["moving_mask"] = str(save(folder / "moving_brain_mask.nii.gz", inside.astype(np.uint8), affine))
    fixed, fixed_affine = load_sample("fixed_image")
    pair["fixed_mask"] = str(save(folder / "fixed_brain_mask.nii.gz", (fixed > 0).astype(np.uint8), fixed_affine))
    pair["shell"] = shell
    return pair


def _run(pair, moving, out, **masks):
    register(fixed=pair["fixed_image"], moving=moving, out=str(out), moving_label=pair["moving_label"],
             fixed_label=pair["fixed_label"], iterations=0, refine_iterations=5, **masks)
    return {name: np.asanyarray(nib.load(str(out / name)).dataobj) for name in
            ("warp.nii.gz", "warped_label.nii.gz", "warped_image.nii.gz")}


def test_a_masked_head_registers_as_its_stripped_brain_and_the_output_stays_whole(head_pair, tmp_path):
    stripped = _run(head_pair, head_pair["moving_image"], tmp_path / "stripped")
    masked = _run(head_pair, head_pair["moving_head"], tmp_path / "masked",
                  moving_mask=head_pair["moving_mask"], fixed_mask=head_pair["fixed_mask"])
    # the masks give the registration exactly the stripped brains (same affine stage, network and refinement)
    assert np.array_equal(masked["warp.nii.gz"], stripped["warp.nii.gz"])
    assert np.array_equal(masked["warped_label.nii.gz"], stripped["warped_label.nii.gz"])
    # ...while the written image is the whole head warped: the shell is there
    assert masked["warped_image.nii.gz"].max() > 1.2 * stripped["warped_image.nii.gz"].max()
    unmasked = _run(head_pair, head_pair["moving_head"], tmp_path / "unmasked")
    assert not np.array_equal(unmasked["warp.nii.gz"], stripped["warp.nii.gz"])  # the shell does change it unmasked
