# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""SharedPairPrepareBatch: the scaled images become views of the network input, with the same values and metadata."""

import torch
from monai.data import MetaTensor, list_data_collate

from scripts.workflow import SharedPairPrepareBatch


def _collated_batch(fixed_differs: bool = False) -> dict:
    """One preprocessed pair as the DataLoader collates it: scaled images and their (1, 2, ...) concatenation."""
    generator = torch.Generator().manual_seed(0)
    affine = torch.diag(torch.tensor([0.8, 0.8, 1.25, 1.0], dtype=torch.float64))
    moving, fixed = (torch.rand(1, 6, 5, 4, generator=generator) for _ in range(2))
    item = {
        "moving_image": MetaTensor(moving, affine=affine, meta={"filename_or_obj": "moving.nii.gz"}),
        "fixed_image": MetaTensor(fixed, affine=affine, meta={"filename_or_obj": "fixed.nii.gz"}),
        "image": MetaTensor(torch.cat([moving, fixed + (0.5 if fixed_differs else 0.0)]), affine=affine),
        "moving_source": MetaTensor(moving * 1000.0, affine=affine),
    }
    return list_data_collate([item])


def test_scaled_images_become_views_of_the_network_input_with_their_values_and_metadata():
    batch = _collated_batch()
    before = {key: batch[key].as_tensor().clone() for key in ("moving_image", "fixed_image", "moving_source")}
    source = batch["moving_source"]
    pair, target = SharedPairPrepareBatch()(batch, torch.device("cpu"))
    assert target is None and pair is batch["image"]
    for channel, key in enumerate(("moving_image", "fixed_image")):
        shared = batch[key]
        assert isinstance(shared, MetaTensor)
        assert shared.data_ptr() == pair[:, channel : channel + 1].data_ptr()  # no copy of its own
        assert torch.equal(shared.as_tensor(), before[key])
        assert shared.meta["filename_or_obj"] == [f"{key.split('_')[0]}.nii.gz"]
        assert torch.equal(torch.as_tensor(shared.affine), torch.as_tensor(pair.affine))
        assert shared.is_batch
    assert batch["moving_source"] is source  # other keys untouched


def test_a_channel_that_differs_from_its_image_is_left_as_it_is():
    batch = _collated_batch(fixed_differs=True)
    fixed = batch["fixed_image"]
    SharedPairPrepareBatch()(batch, torch.device("cpu"))
    assert batch["fixed_image"] is fixed
    assert batch["moving_image"].data_ptr() == batch["image"].data_ptr()


def test_a_converted_input_shares_nothing():
    batch = _collated_batch()
    moving = batch["moving_image"]
    pair, _ = SharedPairPrepareBatch()(batch, torch.device("cpu"), dtype=torch.float64)
    assert pair.dtype == torch.float64 and batch["moving_image"] is moving
