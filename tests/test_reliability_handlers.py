"""NaN-loss guard and atomic checkpoint saver on a small real training loop (shipped pair, subsampled)."""

import pytest
import torch
from ignite.engine import Engine, Events
from reliability_data import load_sample

from scripts.io.errors import BundleUserError
from scripts.workflow.handlers import AtomicCheckpointSaver, NonFiniteLossError, NonFiniteLossGuard, all_finite, loss_from_output


def _pair_batches(nan_at=None, count=3):
    """``count`` batches of the real pair (moving, fixed) scaled to [0, 1]; batch ``nan_at`` has NaN voxels."""
    moving = torch.as_tensor(load_sample("moving_image", factor=8)[0], dtype=torch.float32)
    fixed = torch.as_tensor(load_sample("fixed_image", factor=8)[0], dtype=torch.float32)
    image = torch.stack([moving / moving.max(), fixed / fixed.max()])[None]  # (1, 2, 20, 24, 20)
    batches = [image.clone() for _ in range(count)]
    if nan_at is not None:
        batches[nan_at][0, 0, 5:7, 5:7, 5:7] = float("nan")
    return batches


def _trainer(network, optimizer):
    def step(engine, image):
        optimizer.zero_grad()
        ddf = network(image)
        loss = torch.nn.functional.mse_loss(image[:, :1] + ddf.mean(1, keepdim=True), image[:, 1:]) + ddf.pow(2).mean()
        loss.backward()
        optimizer.step()
        return {"loss": loss.detach()}

    return Engine(step)


def test_loss_extraction():
    assert loss_from_output({"loss": torch.tensor(2.0)}) == 2.0
    assert loss_from_output([{"loss": torch.tensor(3.0)}, {"loss": torch.tensor(3.0)}]) == 3.0
    assert loss_from_output(torch.tensor(float("nan"))) != loss_from_output(torch.tensor(float("nan")))


def test_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(tmp_path):
    torch.manual_seed(0)
    network = torch.nn.Conv3d(2, 3, 3, padding=1)
    optimizer = torch.optim.Adam(network.parameters(), lr=1e-3)
    trainer = _trainer(network, optimizer)
    save_dict = {"model": network, "optimizer": optimizer, "trainer": trainer}
    NonFiniteLossGuard(ckpt_dir=str(tmp_path)).attach(trainer)  # first, so nothing after it sees the NaN iteration
    AtomicCheckpointSaver(str(tmp_path), save_dict, save_final=True, final_filename="model_final.pt",
                          save_interval=1, n_saved=1).attach(trainer)
    good = {}
    trainer.add_event_handler(
        Events.EPOCH_COMPLETED, lambda e: good.update({e.state.epoch: {k: v.clone() for k, v in network.state_dict().items()}})
    )
    data = _pair_batches() + _pair_batches(nan_at=1)  # epoch 2 hits a NaN in its second batch
    with pytest.raises(NonFiniteLossError) as info:
        trainer.run(data, max_epochs=3, epoch_length=3)
    message = str(info.value)
    assert "training stopped: the loss became nan at epoch 2, iteration 5" in message
    assert f"last good checkpoint in '{tmp_path}' was kept" in message
    assert isinstance(info.value, BundleUserError)
    assert not all_finite(network)  # the optimiser step of the bad iteration poisoned the weights in memory ...
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_epoch=1.pt"]  # ... but none reached the disk
    checkpoint = torch.load(tmp_path / "checkpoint_epoch=1.pt", weights_only=True)
    assert all(torch.equal(checkpoint["model"][k], v) for k, v in good[1].items())
    assert checkpoint["trainer"]["iteration"] == 3 and "state" in checkpoint["optimizer"]


def test_saver_replaces_old_checkpoints_only_after_the_new_one_is_complete(tmp_path, monkeypatch):
    torch.manual_seed(0)
    network = torch.nn.Conv3d(2, 3, 3, padding=1)
    optimizer = torch.optim.Adam(network.parameters(), lr=1e-3)
    trainer = _trainer(network, optimizer)
    saver = AtomicCheckpointSaver(str(tmp_path), {"model": network, "trainer": trainer}, save_interval=1, n_saved=1)
    saver.attach(trainer)
    trainer.run(_pair_batches(count=2), max_epochs=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_epoch=1.pt"]

    import scripts.workflow.handlers as handlers

    def crash(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(handlers, "save_torch", crash)  # the next save fails half-way
    with pytest.raises(OSError):
        trainer.run(_pair_batches(count=2), max_epochs=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_epoch=1.pt"]  # the old one was not deleted first
    assert torch.load(tmp_path / "checkpoint_epoch=1.pt", weights_only=True)["trainer"]["iteration"] == 2


def test_n_saved_also_applies_to_checkpoints_of_earlier_runs(tmp_path):
    """A resumed run must not leave the previous run's numbered checkpoint behind forever (one per restart)."""
    torch.manual_seed(0)
    network = torch.nn.Conv3d(2, 3, 3, padding=1)
    optimizer = torch.optim.Adam(network.parameters(), lr=1e-3)
    trainer = _trainer(network, optimizer)
    earlier = {"checkpoint_epoch=1.pt": b"from the run before the restart", "model.pt": b"best", "notes.txt": b"x"}
    for name, content in earlier.items():
        (tmp_path / name).write_bytes(content)
    AtomicCheckpointSaver(str(tmp_path), {"model": network, "trainer": trainer}, save_interval=1, n_saved=2).attach(trainer)
    trainer.run(_pair_batches(count=1), max_epochs=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_epoch=1.pt", "model.pt", "notes.txt"]
    assert (tmp_path / "checkpoint_epoch=1.pt").read_bytes() != earlier["checkpoint_epoch=1.pt"]  # replaced whole
    trainer.run(_pair_batches(count=1), max_epochs=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_epoch=2.pt", "checkpoint_epoch=3.pt", "model.pt",
                                                          "notes.txt"]
