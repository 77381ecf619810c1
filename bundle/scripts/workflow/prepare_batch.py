# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""Engine batches -> network inputs: the training batch with the registration loss's target (labels passed by name),
and the inference batch whose two scaled images become views of the network input instead of copies beside it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from monai.data import MetaTensor
from monai.engines.utils import PrepareBatch

from scripts.losses.registration_loss import registration_target

__all__ = ["RegistrationPrepareBatch", "SharedPairPrepareBatch"]


class RegistrationPrepareBatch(PrepareBatch):
    """
    ``prepare_batch`` of MONAI's ``SupervisedTrainer`` for registration: ``(pair, target)``, ``target`` the dictionary
    :py:class:`scripts.losses.RegistrationLoss` reads by name (:func:`scripts.losses.registration_target`): the two
    images of the pair and, for the weakly supervised term, the one-hot labels of both (no extra channels packed).

    Args:
        image_key: batch key of the (B, 2, D, H, W) pair, channel 0 moving, 1 fixed (``network_input_transforms``).
        moving_label_key, fixed_label_key: batch keys of the (B, K, D, H, W) one-hot label maps of the moving and the
            fixed image (e.g. ``moving_label_onehot`` from ``scripts.workflow.OneHotLabelsd``), both or neither; None
            (default): unsupervised training, no labels are moved to the device.

    Call:
        ``(batchdata, device, non_blocking, **to_kwargs)`` as MONAI's ``PrepareBatch``; returns
        ``(pair, {"moving_image", "fixed_image"[, "moving_label", "fixed_label"]})`` on ``device``.
    """

    def __init__(
        self, image_key: str = "image", moving_label_key: str | None = None, fixed_label_key: str | None = None
    ) -> None:
        if (moving_label_key is None) != (fixed_label_key is None):
            raise ValueError(
                "give both moving_label_key and fixed_label_key (the one-hot label maps of the two images) or neither, "
                f"got {moving_label_key!r} and {fixed_label_key!r}."
            )
        self.image_key = image_key
        self.label_keys = (moving_label_key, fixed_label_key) if moving_label_key is not None else ()

    def __call__(
        self,
        batchdata: Mapping[str, Any],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if not isinstance(batchdata, Mapping):
            raise ValueError(f"expected the collated batch dictionary, got {type(batchdata).__name__}.")
        missing = [k for k in (self.image_key, *self.label_keys) if not isinstance(batchdata.get(k), torch.Tensor)]
        if missing:
            raise ValueError(
                f"the training batch has no tensor under {missing} (keys: {sorted(map(str, batchdata))}); expected the "
                f"image pair under '{self.image_key}'"
                + (" and the one-hot labels under the label keys (train_with_labels and the one-hot transform, as "
                   "configs/presets/mal2012_brain_dice.json)." if self.label_keys else ".")
            )
        pair, *labels = [
            batchdata[key].to(device=device, non_blocking=non_blocking, **kwargs) for key in (self.image_key, *self.label_keys)
        ]
        return pair, registration_target(pair, *labels)


class SharedPairPrepareBatch(PrepareBatch):
    """
    ``prepare_batch`` of the inference ``SupervisedEvaluator``: ``(image, None)`` as MONAI's default, with the batch's
    scaled ``moving_image`` and ``fixed_image`` (B, 1, D, H, W) replaced by views of the channels of ``image``
    (B, 2, D, H, W), each keeping its own metadata.

    Why: ``ConcatItemsd`` copies the two images into ``image`` and the batch keeps all three until the iteration ends,
    so the pair was stored twice through the network, the refinement and every writer (0.84 GB on a 512 x 512 x 400
    CT). A key is replaced only where sharing changes nothing: the input stays on its own device (moved, the copy would
    take the post-processing with it), and the key holds a MetaTensor equal to its channel (shape, dtype, values).

    Args:
        image_key: batch key of the (B, 2, D, H, W) network input.
        channel_keys: the batch keys of its channels, in order (moving, then fixed).
    """

    def __init__(
        self, image_key: str = "image", channel_keys: tuple[str, ...] = ("moving_image", "fixed_image")
    ) -> None:
        self.image_key, self.channel_keys = image_key, tuple(channel_keys)

    def __call__(
        self,
        batchdata: dict[str, Any],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        if not isinstance(batchdata, Mapping) or not isinstance(batchdata.get(self.image_key), torch.Tensor):
            raise ValueError(f"expected the collated batch dictionary with the network input under '{self.image_key}'.")
        source = batchdata[self.image_key]
        pair = source.to(device=device, non_blocking=non_blocking, **kwargs)
        if pair.data_ptr() != source.data_ptr() or pair.ndim != 5 or pair.shape[1] != len(self.channel_keys):
            return pair, None
        plain = pair.as_tensor() if isinstance(pair, MetaTensor) else pair
        for channel, key in enumerate(self.channel_keys):
            image = batchdata.get(key)
            view = plain[:, channel : channel + 1]
            if isinstance(image, MetaTensor) and image.shape == view.shape and image.dtype == view.dtype and bool(
                torch.equal(image.as_tensor(), view)
            ):
                shared = MetaTensor(view)
                shared.copy_meta_from(image)
                batchdata[key] = shared
        return pair, None
