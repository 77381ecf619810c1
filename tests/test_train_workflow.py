"""Training workflow (configs/train.json) on the real pair at reduced size: an interrupted run resumes from its last
checkpoint with the epoch counter, optimiser and scheduler state carried over; the best model is a plain state dict."""

from __future__ import annotations

import json

import pytest
import torch
from ignite.engine import Events
from workflow_data import run_bundle_workflow, write_small_pair

from scripts.io.weights import latest_checkpoint
from scripts.io.datalist import make_pairs, training_pairs
from scripts.networks.sacb_net import SACBNet


def test_make_pairs_all_ordered_pairs_and_atlas():
    images = [{"image": f"s{i}.nii.gz", "label": f"l{i}.nii.gz"} for i in range(3)]
    pairs = make_pairs(images, "all_pairs")
    assert len(pairs) == 6 and {(p["moving_image"], p["fixed_image"]) for p in pairs} == {
        (f"s{i}.nii.gz", f"s{j}.nii.gz") for i in range(3) for j in range(3) if i != j
    }
    atlas = make_pairs(images, "atlas", atlas={"image": "atlas.nii.gz", "label": "atlas_seg.nii.gz"})
    assert [p["moving_image"] for p in atlas] == ["atlas.nii.gz"] * 3
    assert [p["fixed_label"] for p in atlas] == ["l0.nii.gz", "l1.nii.gz", "l2.nii.gz"]
    with pytest.raises(ValueError, match="atlas"):
        make_pairs(images, "atlas")


def test_latest_checkpoint_picks_highest_epoch(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    for epoch in (2, 10, 9):
        (tmp_path / f"checkpoint_epoch={epoch}.pt").write_bytes(b"x")
    (tmp_path / ".checkpoint_epoch=11.tmp-1234.pt").write_bytes(b"partial")  # interrupted save
    assert latest_checkpoint(tmp_path).endswith("checkpoint_epoch=10.pt")


@pytest.fixture(scope="module")
def train_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    pair = write_small_pair(root / "data", factor=4)
    datalist = {
        "training": [{"image": pair["moving_image"]}, {"image": pair["fixed_image"]}],
        "validation": [dict(pair)],
    }
    (root / "datalist.json").write_text(json.dumps(datalist))
    return root


def _overrides(root):
    return {
        "datalist": str(root / "datalist.json"),
        "run_dir": str(root / "run"),  # checkpoints, best model and TensorBoard files of this run
        "max_epochs": 2,
        "network_scale": 0.5,
        "label_ids": [1, 2, 3, 4, 5, 6, 7, 8],
        "network_def": {"_target_": "scripts.networks.SACBNet", "kmeans_iterations": 3},
    }


@pytest.mark.slow
def test_training_resumes_from_last_checkpoint(train_setup):
    root = train_setup
    assert len(training_pairs(str(root / "datalist.json"), "training")) == 2  # both ordered pairs

    def stop_after_first_epoch(workflow):  # as if the job were killed after epoch 1's checkpoint
        trainer = workflow.parser.get_parsed_content("train::trainer")
        trainer.add_event_handler(Events.EPOCH_COMPLETED(once=1), lambda engine: engine.terminate())

    run_bundle_workflow(["train.json"], workflow_type="train", prepare=stop_after_first_epoch, **_overrides(root))
    first = latest_checkpoint(root / "run")
    assert first.endswith("checkpoint_epoch=1.pt")
    state = torch.load(first, weights_only=False)
    assert state["trainer"]["iteration"] == 2 and state["trainer"]["epoch_length"] == 2  # = end of epoch 1
    adam_steps = [int(s["step"]) for s in state["optimizer"]["state"].values()]
    assert adam_steps and set(adam_steps) == {2}
    assert state["lr_scheduler"]["last_epoch"] == 1

    epochs_run = []

    def record_epochs(workflow):
        trainer = workflow.parser.get_parsed_content("train::trainer")
        trainer.add_event_handler(Events.EPOCH_STARTED, lambda engine: epochs_run.append(engine.state.epoch))

    run_bundle_workflow(["train.json"], workflow_type="train", prepare=record_epochs, **_overrides(root))
    assert epochs_run == [2]  # resumed: epoch 1 was not trained again
    final = torch.load(latest_checkpoint(root / "run"), weights_only=False)
    assert final["trainer"]["iteration"] == 4  # = end of epoch 2
    assert {int(s["step"]) for s in final["optimizer"]["state"].values()} == {4}  # Adam state carried over
    assert final["lr_scheduler"]["last_epoch"] == 2
    assert final["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.0, abs=1e-12)  # poly decay to the end
    assert any(not torch.equal(final["model"][k], state["model"][k]) for k in state["model"])  # epoch 2 trained

    best = torch.load(root / "run" / "model.pt", weights_only=True)
    net = SACBNet(kmeans_iterations=3)
    net.load_state_dict(best, strict=True)  # plain state dict of network_def
    assert any(p.name.startswith("events.out.tfevents") for p in (root / "run").iterdir())  # TensorBoard, same folder


def test_training_downsampling_gives_the_network_what_inference_gives_it():
    """Training at network_scale (DownsampleToNetworkGridd) must feed the network the same input as inference
    (ResolutionInferer.downsample), or a model trained at half resolution would see other images at inference."""
    from monai.data import MetaTensor

    from scripts.engines.resolution_inferer import ResolutionInferer
    from scripts.workflow.grid_transforms import DownsampleToNetworkGridd

    generator = torch.Generator().manual_seed(0)
    moving, fixed = torch.rand(2, 1, 30, 41, 26, generator=generator)
    out = DownsampleToNetworkGridd(["moving_image", "fixed_image"], network_scale=0.5)(
        {"moving_image": MetaTensor(moving, affine=torch.diag(torch.tensor([2.0, 2.0, 2.0, 1.0]))), "fixed_image": fixed}
    )
    expected = ResolutionInferer(network_scale=0.5).downsample(torch.stack([moving, fixed]))
    assert out["moving_image"].shape == (1, 15, 20, 13) and not isinstance(out["moving_image"], MetaTensor)
    torch.testing.assert_close(out["moving_image"], expected[0])
    torch.testing.assert_close(out["fixed_image"], expected[1])
    with pytest.raises(ValueError, match=r"\(C, D, H, W\)"):
        DownsampleToNetworkGridd(["moving_image"], network_scale=0.5)({"moving_image": torch.rand(30, 41, 26)})


@pytest.mark.slow
def test_training_starts_from_initial_weights(train_setup, tmp_path):
    """--initial_weights loads a plain state dict (e.g. the shipped model.pt) before the first epoch; with lr 0 the
    trained model must still be exactly those weights."""
    start = SACBNet(kmeans_iterations=3)
    torch.nn.init.constant_(start.flow_out.bias, 0.25)  # a visible marker, unlike any initialisation
    torch.save(start.state_dict(), tmp_path / "start.pt")
    overrides = dict(_overrides(train_setup), run_dir=str(tmp_path / "run"))
    overrides.update(max_epochs=1, learning_rate=0.0, initial_weights=str(tmp_path / "start.pt"))
    run_bundle_workflow(["train.json"], workflow_type="train", **overrides)
    trained = torch.load(latest_checkpoint(tmp_path / "run"), weights_only=False)["model"]
    assert all(torch.equal(trained[k], v) for k, v in start.state_dict().items())
