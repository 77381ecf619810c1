# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""The optional weakly supervised Dice term of training (RegistrationLoss.label_weight, presets/mal2012_brain_dice.json),
the labels reaching it by name through RegistrationPrepareBatch, and the nearest-neighbour label path of
DownsampleToNetworkGridd that feeds it."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from ignite.engine import Events
from monai.losses import DiceLoss
from workflow_data import run_bundle_workflow, write_small_pair

from scripts.layers.warp import Warp
from scripts.losses import GradientLoss, LocalNCCLoss, RegistrationLoss, registration_target
from scripts.networks import SACBNet
from scripts.workflow import RegistrationPrepareBatch
from scripts.workflow.grid_transforms import DownsampleToNetworkGridd
from scripts.workflow.metric_transforms import OneHotLabelsd

LABEL_IDS = list(range(1, 9))


@pytest.fixture(scope="module")
def small_pair(tmp_path_factory):
    """The shipped real pair (Colin27 -> MNI152, seg8) at 4 mm: images in [0, 1], labels as (1, D, H, W) maps."""
    paths = write_small_pair(tmp_path_factory.mktemp("pair"), factor=4)
    volumes = {k: torch.as_tensor(np.asarray(nib.load(v).dataobj, dtype=np.float32))[None] for k, v in paths.items()}
    for key in ("moving_image", "fixed_image"):
        volumes[key] = volumes[key] / volumes[key].max()
    return paths, volumes


def _loss(label_weight: float = 0.0) -> RegistrationLoss:
    return RegistrationLoss(
        LocalNCCLoss(kernel_size=5),
        GradientLoss(),
        Warp(),
        regularization_weight=1.0,
        label_loss=DiceLoss(include_background=True, smooth_nr=1e-5, smooth_dr=1e-5),
        label_weight=label_weight,
    )


def _target(volumes, shift: int = 0) -> dict[str, torch.Tensor]:
    """The loss target with (1, K, D, H, W) one-hot labels: moving = fixed shifted by ``shift`` voxels along axis 0
    (images and labels alike)."""
    fixed_image, fixed_label = volumes["fixed_image"], volumes["fixed_label"]
    moving_image, moving_label = (torch.roll(v, shift, dims=1) for v in (fixed_image, fixed_label))
    onehot = OneHotLabelsd(["moving", "fixed"], LABEL_IDS)({"moving": moving_label, "fixed": fixed_label})
    pair = torch.cat([moving_image, fixed_image])[None]
    return registration_target(pair, onehot["moving_onehot"][None], onehot["fixed_onehot"][None])


def _grid(target: dict[str, torch.Tensor]) -> tuple[int, ...]:
    return tuple(target["fixed_image"].shape[2:])


def test_label_term_off_by_default_and_ignores_labels(small_pair):
    _, volumes = small_pair
    target = _target(volumes, shift=2)
    ddf = 0.3 * torch.randn(1, 3, *_grid(target), generator=torch.Generator().manual_seed(0))
    unsupervised = _loss(0.0)
    moving, fixed = target["moving_image"], target["fixed_image"]
    expected = LocalNCCLoss(kernel_size=5)(Warp()(moving, ddf), fixed) + GradientLoss()(ddf)
    torch.testing.assert_close(unsupervised(ddf, target), expected)
    torch.testing.assert_close(unsupervised(ddf, {"moving_image": moving, "fixed_image": fixed}), expected)


def test_label_term_is_the_dice_loss_of_the_warped_moving_labels(small_pair):
    _, volumes = small_pair
    target = _target(volumes, shift=2)
    ddf = torch.zeros(1, 3, *_grid(target))
    dice = DiceLoss(include_background=True, smooth_nr=1e-5, smooth_dr=1e-5)(target["moving_label"], target["fixed_label"])
    assert float(dice) > 0.1  # a 2-voxel shift at 4 mm really separates the structures
    torch.testing.assert_close(_loss(0.5)(ddf, target) - _loss(0.0)(ddf, target), 0.5 * dice)


def test_label_term_pulls_the_field_towards_the_true_shift(small_pair):
    """Moving = fixed rolled by +2 voxels along axis 0, so out(p) = moving(p + ddf) matches the fixed labels for a
    displacement of +2 along that axis: the label term must be lower there and its gradient must point that way."""
    _, volumes = small_pair
    target = _target(volumes, shift=2)
    label_only = RegistrationLoss(
        lambda a, b: a.sum() * 0, lambda d: d.sum() * 0, Warp(), 0.0, DiceLoss(smooth_nr=1e-5, smooth_dr=1e-5), 1.0
    )
    zero = torch.zeros(1, 3, *_grid(target), requires_grad=True)
    true = torch.zeros(1, 3, *_grid(target))
    true[:, 0] = 2.0
    at_zero = label_only(zero, target)
    assert float(label_only(true, target)) < 0.5 * float(at_zero.detach())
    at_zero.backward()
    assert float(zero.grad[:, 0].sum()) < 0  # descent increases the axis-0 displacement, towards +2
    step = -zero.grad / zero.grad.abs().max()  # at most one voxel anywhere
    assert float(label_only(step, target)) < float(at_zero.detach())


def test_label_term_needs_labels_and_a_loss():
    with pytest.raises(ValueError, match="label_loss"):
        RegistrationLoss(LocalNCCLoss(), GradientLoss(), Warp(), label_weight=1.0)
    with pytest.raises(ValueError, match="label_weight"):
        RegistrationLoss(LocalNCCLoss(), GradientLoss(), Warp(), label_weight=-1.0)
    pair, ddf = torch.rand(1, 2, 8, 8, 8), torch.zeros(1, 3, 8, 8, 8)
    with pytest.raises(ValueError, match="no 'moving_label' and 'fixed_label'"):
        _loss(1.0)(ddf, registration_target(pair))
    with pytest.raises(ValueError, match="must map 'moving_image' and 'fixed_image'.*got Tensor"):
        _loss(1.0)(ddf, torch.rand(1, 2 + 2 * 3, 8, 8, 8))  # labels packed as channels are not read any more
    labels = torch.rand(1, 3, 8, 8, 8)
    with pytest.raises(ValueError, match=r"target\['fixed_label'\].*3 channels.*\(1, 2, 8, 8, 8\)"):
        _loss(1.0)(ddf, registration_target(pair, labels, labels[:, :2]))
    with pytest.raises(ValueError, match=r"target\['moving_image'\].*\(1, 1, 8, 8, 9\)"):
        _loss(0.0)(ddf, registration_target(torch.rand(1, 2, 8, 8, 9)))
    with pytest.raises(ValueError, match="both images"):
        registration_target(pair, labels)


def test_nearest_downsampling_samples_labels_at_the_network_grid_centres():
    """A label volume whose value encodes its own index along each axis: after downsampling, network voxel j must
    hold the input index round(j * (N - 1) / (n - 1)), the align-corners position the images are resized to."""
    shape = (30, 41, 26)
    axes = torch.meshgrid(*[torch.arange(s) for s in shape], indexing="ij")
    code = (axes[0] * 10000 + axes[1] * 100 + axes[2]).to(torch.int32)[None]
    out = DownsampleToNetworkGridd(["moving_label"], network_scale=0.5, mode="nearest")({"moving_label": code})["moving_label"]
    assert out.shape == (1, 15, 20, 13) and out.dtype == torch.int32
    expected = [np.floor(np.arange(n) * (s - 1) / (n - 1) + 0.5).astype(int) for s, n in zip(shape, out.shape[1:])]
    decoded = out[0].numpy()
    np.testing.assert_array_equal(decoded // 10000, np.broadcast_to(expected[0][:, None, None], decoded.shape))
    np.testing.assert_array_equal(decoded // 100 % 100, np.broadcast_to(expected[1][None, :, None], decoded.shape))
    np.testing.assert_array_equal(decoded % 100, np.broadcast_to(expected[2][None, None, :], decoded.shape))
    with pytest.raises(ValueError, match="mode"):
        DownsampleToNetworkGridd(["a", "b"], network_scale=0.5, mode=["nearest"])


@pytest.mark.slow
def test_dice_preset_trains_with_the_label_target(small_pair, tmp_path):
    """train.json + mal2012_brain.json + mal2012_brain_dice.json on the real pair: the trainer's target carries the
    image pair and both one-hot label maps, the loss has the label term, and a best model is written."""
    paths, _ = small_pair
    pairs = [
        dict(paths),
        {"moving_image": paths["fixed_image"], "fixed_image": paths["moving_image"],
         "moving_label": paths["fixed_label"], "fixed_label": paths["moving_label"]},
    ]
    (tmp_path / "datalist.json").write_text(json.dumps({"training_labelled": pairs, "validation": [dict(paths)]}))
    seen = {}

    def record_targets(workflow):
        trainer = workflow.parser.get_parsed_content("train::trainer")
        seen["loss"] = trainer.loss_function

        def on_start(engine):  # the collated batch, before MONAI decollates it
            seen.setdefault("channels", []).append(engine.state.batch["label"].shape[1])

        def on_end(engine):
            seen.setdefault("loss_values", []).append(float(engine.state.output[0]["loss"]))

        trainer.add_event_handler(Events.ITERATION_STARTED, on_start)
        trainer.add_event_handler(Events.ITERATION_COMPLETED, on_end)

    run_bundle_workflow(
        ["train.json", "presets/mal2012_brain.json", "presets/mal2012_brain_dice.json"],
        workflow_type="train",
        prepare=record_targets,
        datalist=str(tmp_path / "datalist.json"),
        dataset_dir=str(tmp_path),
        run_dir=str(tmp_path / "run"),
        initial_weights="",
        max_epochs=1,
        val_interval=1,
        label_ids=LABEL_IDS,
        network_def={"_target_": "scripts.networks.SACBNet", "kmeans_iterations": 3},
        **{"train::trainer#epoch_length": 2, "train::augmentation#1#transforms#0#roi_size": [12, 12, 12]},
    )
    assert seen["loss"].label_weight == 1.0
    assert seen["channels"] == [2 + 2 * len(LABEL_IDS)] * 2
    assert all(np.isfinite(seen["loss_values"]))
    assert (tmp_path / "run" / "model.pt").exists()
