# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""The training batch -> the network input and the registration loss's target, the labels passed by name."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from monai.engines.utils import PrepareBatch

from scripts.losses.registration_loss import registration_target

__all__ = ["RegistrationPrepareBatch"]


class RegistrationPrepareBatch(PrepareBatch):
    """
    ``prepare_batch`` of MONAI's ``SupervisedTrainer`` for registration: ``(inputs, targets)`` with ``inputs`` the
    image pair the network sees and ``targets`` the dictionary :py:class:`scripts.losses.RegistrationLoss` reads by name
    (:func:`scripts.losses.registration_target`): the moving and the fixed image of that pair and, for the weakly
    supervised term, the one-hot labels of both images. Nothing is packed into extra channels of a tensor, and no
    placeholder ``label`` is needed in the batch.

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
