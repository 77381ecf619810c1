# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""Registration objective: image similarity of the warped moving image plus field smoothness, optionally plus a
weakly supervised label-overlap term (VoxelMorph-style, off by default)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Callable

import torch
from torch import nn

__all__ = ["RegistrationLoss", "registration_target"]

#: names of the entries of the loss target (:func:`registration_target`); the datalist keys of the same volumes
MOVING_IMAGE, FIXED_IMAGE, MOVING_LABEL, FIXED_LABEL = "moving_image", "fixed_image", "moving_label", "fixed_label"


def registration_target(
    pair: torch.Tensor, moving_label: torch.Tensor | None = None, fixed_label: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """
    The target :py:class:`RegistrationLoss` takes: the two images of the pair the network saw, and the labels of the
    weakly supervised term, each by name.

    Args:
        pair: (B, 2, D, H, W) network input, channel 0 moving, 1 fixed.
        moving_label, fixed_label: (B, K, D, H, W) soft one-hot maps of the K structures, both or neither.

    Returns:
        ``{"moving_image": (B, 1, D, H, W), "fixed_image": (B, 1, D, H, W)}`` (views of ``pair``), plus
        ``"moving_label"`` and ``"fixed_label"`` when given.
    """
    if pair.ndim != 5 or pair.shape[1] != 2:
        raise ValueError(f"pair must be the (B, 2, D, H, W) network input [moving, fixed], got {tuple(pair.shape)}.")
    if (moving_label is None) != (fixed_label is None):
        raise ValueError("give the one-hot labels of both images (moving_label and fixed_label) or of neither.")
    target = {MOVING_IMAGE: pair[:, :1], FIXED_IMAGE: pair[:, 1:2]}
    if moving_label is not None and fixed_label is not None:
        target[MOVING_LABEL], target[FIXED_LABEL] = moving_label, fixed_label
    return target


class RegistrationLoss(nn.Module):
    """
    ``image_loss(warp(moving, ddf), fixed) + regularization_weight * regularization(ddf)`` (SACB-Net's NCC + lambda * grad),
    plus ``label_weight * label_loss(warp(moving_label, ddf), fixed_label)`` when ``label_weight > 0``.

    It has the ``loss_function(pred, target)`` signature of MONAI's ``SupervisedTrainer``: ``pred`` is the predicted
    displacement and ``target`` holds the images and labels by name (:func:`registration_target`; in training
    ``scripts.workflow.RegistrationPrepareBatch`` builds it from the batch, the labels of the weakly supervised term
    included, see ``configs/presets/mal2012_brain_dice.json``), so no custom trainer is needed. The moving one-hot maps
    are warped with the same (bilinear) ``warp``, so the overlap is differentiable in the field.

    Args:
        image_loss: callable ``(warped, fixed) -> scalar`` (e.g. ``scripts.losses.ncc.LocalNCCLoss``).
        regularization: callable ``(ddf) -> scalar`` (e.g. ``scripts.losses.regularization.GradientLoss``).
        warp: callable ``(image, ddf) -> warped`` (e.g. ``scripts.layers.warp.Warp``).
        regularization_weight: lambda >= 0.
        label_loss: callable ``(warped_onehot, fixed_onehot) -> scalar`` on (B, K, D, H, W) soft one-hot maps, e.g.
            MONAI's ``DiceLoss``; needed when ``label_weight > 0``.
        label_weight: weight >= 0 of the label term; 0 (default) trains unsupervised and ignores any labels given.

    Shapes:
        pred (B, 3, D, H, W) displacement in voxels; target ``{"moving_image", "fixed_image"}`` (B, 1, D, H, W) each,
        and for the label term ``{"moving_label", "fixed_label"}`` (B, K, D, H, W) each -> scalar.
    """

    def __init__(
        self,
        image_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        regularization: Callable[[torch.Tensor], torch.Tensor],
        warp: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        regularization_weight: float = 1.0,
        label_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        label_weight: float = 0.0,
    ) -> None:
        super().__init__()
        if regularization_weight < 0:
            raise ValueError(f"regularization_weight must be >= 0, got {regularization_weight}.")
        if label_weight < 0:
            raise ValueError(f"label_weight must be >= 0, got {label_weight}.")
        if label_weight > 0 and label_loss is None:
            raise ValueError("label_weight > 0 needs a label_loss (e.g. monai.losses.DiceLoss).")
        self.image_loss = image_loss
        self.regularization = regularization
        self.warp = warp
        self.regularization_weight = float(regularization_weight)
        self.label_loss = label_loss
        self.label_weight = float(label_weight)

    def forward(self, pred: torch.Tensor, target: Mapping[str, torch.Tensor]) -> torch.Tensor:
        if pred.ndim != 5 or pred.shape[1] != 3:
            raise ValueError(f"pred must be a (B, 3, D, H, W) displacement, got {tuple(pred.shape)}.")
        if not isinstance(target, Mapping) or MOVING_IMAGE not in target or FIXED_IMAGE not in target:
            found = sorted(map(str, target)) if isinstance(target, Mapping) else type(target).__name__
            raise ValueError(
                f"target must map '{MOVING_IMAGE}' and '{FIXED_IMAGE}' to the images of the pair (and '{MOVING_LABEL}', "
                f"'{FIXED_LABEL}' to their one-hot labels for the label term), as scripts.losses.registration_target "
                f"and, in training, scripts.workflow.RegistrationPrepareBatch build it; got {found}."
            )
        moving, fixed = target[MOVING_IMAGE], target[FIXED_IMAGE]
        for name, image in ((MOVING_IMAGE, moving), (FIXED_IMAGE, fixed)):
            _check_volume(name, image, pred, "(B, 1, D, H, W) image", channels=1)
        warped = self.warp(moving, pred)
        loss = self.image_loss(warped, fixed) + self.regularization_weight * self.regularization(pred)
        if self.label_weight > 0:
            loss = loss + self.label_weight * self._label_term(pred, target)
        return loss

    def _label_term(self, pred: torch.Tensor, target: Mapping[str, torch.Tensor]) -> torch.Tensor:
        if MOVING_LABEL not in target or FIXED_LABEL not in target:
            raise ValueError(
                f"label_weight > 0 but the target has no '{MOVING_LABEL}' and '{FIXED_LABEL}': give the trainer the "
                "one-hot labels of both images (moving_label, fixed_label in the datalist, their one-hot transform and "
                "RegistrationPrepareBatch's moving_label_key / fixed_label_key, as configs/presets/mal2012_brain_dice.json)."
            )
        moving, fixed = target[MOVING_LABEL], target[FIXED_LABEL]
        _check_volume(MOVING_LABEL, moving, pred, "(B, K, D, H, W) one-hot map", channels=None)
        _check_volume(FIXED_LABEL, fixed, pred, "(B, K, D, H, W) one-hot map", channels=moving.shape[1])
        return self.label_loss(self.warp(moving, pred), fixed)


def _check_volume(name: str, volume: torch.Tensor, pred: torch.Tensor, expected: str, channels: int | None) -> None:
    """Raise unless ``volume`` is a floating (B, C, D, H, W) tensor on the grid and batch of ``pred`` (with ``channels``
    channels when given)."""
    good = (
        isinstance(volume, torch.Tensor)
        and volume.ndim == 5
        and volume.is_floating_point()
        and volume.shape[0] == pred.shape[0]
        and volume.shape[2:] == pred.shape[2:]
        and (channels is None or volume.shape[1] == channels)
    )
    if not good:
        got = f"{tuple(volume.shape)} {volume.dtype}" if isinstance(volume, torch.Tensor) else type(volume).__name__
        needs = f", {channels} channels" if channels is not None and channels != 1 else ""
        raise ValueError(
            f"target['{name}'] must be a floating {expected} on the ddf's batch and grid (B = {pred.shape[0]}, "
            f"(D, H, W) = {tuple(pred.shape[2:])}{needs}); got {got}."
        )
