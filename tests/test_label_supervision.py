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
from monai.engines import SupervisedTrainer
from monai.losses import DiceLoss
from workflow_data import run_bundle_workflow, write_small_pair

from scripts.layers.warp import Warp
from scripts.losses import GradientLoss, LocalNCCLoss, RegistrationLoss, registration_target
from scripts.networks import SACBNet
from scripts.workflow import RegistrationPrepareBatch
from scripts.workflow.grid_transforms import DownsampleToNetworkGridd
from scripts.workflow.metrics import OneHotLabelsd

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


def test_a_training_step_gets_its_labels_through_prepare_batch(small_pair):
    """One SupervisedTrainer iteration on the real pair: RegistrationPrepareBatch hands the loss the one-hot labels of
    the batch by name, unchanged, and the label term compares the fixed ones with the moving ones warped by the very
    field the network predicted in that step."""
    _, volumes = small_pair
    target = _target(volumes, shift=2)
    batch = {
        "image": torch.cat([target["moving_image"], target["fixed_image"]], dim=1),
        "moving_label_onehot": target["moving_label"],
        "fixed_label_onehot": target["fixed_label"],
    }
    dice, compared = DiceLoss(include_background=True, smooth_nr=1e-5, smooth_dr=1e-5), []

    def recording_dice(warped, fixed):
        compared.append((warped.detach().clone(), fixed))
        return dice(warped, fixed)

    net = SACBNet(base_channels=2, num_clusters=3, kmeans_iterations=3)
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=1,
        train_data_loader=[batch],
        network=net,
        optimizer=torch.optim.Adam(net.parameters(), lr=1e-3),
        loss_function=RegistrationLoss(LocalNCCLoss(5), GradientLoss(), Warp(), 1.0, recording_dice, 0.5),
        prepare_batch=RegistrationPrepareBatch("image", "moving_label_onehot", "fixed_label_onehot"),
        decollate=False,
    )
    outputs = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda engine: outputs.append(dict(engine.state.output)))
    trainer.run()

    assert len(compared) == len(outputs) == 1  # one iteration, one label term
    (warped, fixed), output = compared[0], outputs[0]
    assert set(output["label"]) == {"moving_image", "fixed_image", "moving_label", "fixed_label"}
    assert torch.equal(fixed, batch["fixed_label_onehot"])
    assert torch.equal(output["label"]["moving_label"], batch["moving_label_onehot"])
    assert torch.equal(output["label"]["moving_image"], batch["image"][:, :1])
    pred = output["pred"].detach()
    assert pred.abs().max() > 1e-3  # a real field, so the comparison below tells warped labels from unwarped ones
    torch.testing.assert_close(warped, Warp()(batch["moving_label_onehot"], pred))
    unsupervised = RegistrationLoss(LocalNCCLoss(5), GradientLoss(), Warp(), 1.0)(pred, output["label"])
    torch.testing.assert_close(output["loss"].detach(), unsupervised + 0.5 * dice(warped, fixed))


def test_prepare_batch_names_what_is_missing():
    batch = {"image": torch.rand(1, 2, 8, 8, 8), "moving_label_onehot": torch.rand(1, 3, 8, 8, 8)}
    inputs, target = RegistrationPrepareBatch()(batch)
    assert torch.equal(inputs, batch["image"]) and set(target) == {"moving_image", "fixed_image"}
    with pytest.raises(ValueError, match=r"no tensor under \['fixed_label_onehot'\]"):
        RegistrationPrepareBatch("image", "moving_label_onehot", "fixed_label_onehot")(batch)
    with pytest.raises(ValueError, match="both moving_label_key and fixed_label_key"):
        RegistrationPrepareBatch("image", "moving_label_onehot")


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
    """train.json + mal2012_brain.json + mal2012_brain_dice.json on the real pair: the trainer's prepare_batch hands
    the loss the image pair and both one-hot label maps by name, the loss has the label term, and a best model is
    written."""
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

        prepare_batch = trainer.prepare_batch

        def recording_prepare_batch(batchdata, *args, **kwargs):
            inputs, target = prepare_batch(batchdata, *args, **kwargs)
            seen.setdefault("targets", []).append({k: tuple(v.shape[:2]) for k, v in target.items()})
            return inputs, target

        trainer.prepare_batch = recording_prepare_batch

        def on_start(engine):  # the collated batch, before MONAI decollates it
            seen.setdefault("batch_keys", []).append(set(engine.state.batch))

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
    k = len(LABEL_IDS)
    assert seen["targets"] == [{"moving_image": (1, 1), "fixed_image": (1, 1), "moving_label": (1, k), "fixed_label": (1, k)}] * 2
    assert all("label" not in keys for keys in seen["batch_keys"])  # nothing packed into a placeholder target
    assert all(np.isfinite(seen["loss_values"]))
    assert (tmp_path / "run" / "model.pt").exists()
