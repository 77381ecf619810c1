# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""Registration objective: image similarity of the warped moving image plus field smoothness, optionally plus a
weakly supervised label-overlap term (VoxelMorph-style, off by default)."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

__all__ = ["RegistrationLoss"]


class RegistrationLoss(nn.Module):
    """
    ``image_loss(warp(moving, ddf), fixed) + regularization_weight * regularization(ddf)`` (SACB-Net's NCC + lambda * grad),
    plus ``label_weight * label_loss(warp(moving_labels, ddf), fixed_labels)`` when ``label_weight > 0``.

    It has the ``loss_function(pred, target)`` signature of MONAI's ``SupervisedTrainer``: ``pred`` is the predicted
    displacement and ``target`` the image pair the network saw (the training preprocessing copies ``image`` to
    ``label``), so no custom trainer is needed. For the weakly supervised term the preprocessing appends the one-hot
    labels of both images to ``target`` (see ``configs/presets/mal2012_brain_dice.json``); the moving one-hot maps are
    warped with the same (bilinear) ``warp``, so the overlap is differentiable in the field.

    Args:
        image_loss: callable ``(warped, fixed) -> scalar`` (e.g. ``scripts.losses.ncc.LocalNCCLoss``).
        regularization: callable ``(ddf) -> scalar`` (e.g. ``scripts.losses.regularization.GradientLoss``).
        warp: callable ``(image, ddf) -> warped`` (e.g. ``scripts.layers.warp.Warp``).
        regularization_weight: lambda >= 0.
        label_loss: callable ``(warped_onehot, fixed_onehot) -> scalar`` on (B, K, D, H, W) soft one-hot maps, e.g.
            MONAI's ``DiceLoss``; needed when ``label_weight > 0``.
        label_weight: weight >= 0 of the label term; 0 (default) trains unsupervised and ignores any label channels.

    Shapes:
        pred (B, 3, D, H, W) displacement in voxels; target (B, 2, D, H, W), channel 0 moving, 1 fixed, or with labels
        (B, 2 + 2K, D, H, W): then channels 2 .. 2+K are the moving one-hot labels and the last K the fixed ones
        -> scalar.
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

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if pred.ndim != 5 or pred.shape[1] != 3:
            raise ValueError(f"pred must be a (B, 3, D, H, W) displacement, got {tuple(pred.shape)}.")
        if target.ndim != 5 or target.shape[1] < 2 or target.shape[1] % 2 or target.shape[2:] != pred.shape[2:]:
            raise ValueError(
                "target must be the (B, 2, D, H, W) image pair, or (B, 2 + 2K, D, H, W) with K one-hot labels per "
                f"image, on the ddf grid {tuple(pred.shape[2:])}; got {tuple(target.shape)}."
            )
        warped = self.warp(target[:, :1], pred)
        loss = self.image_loss(warped, target[:, 1:2]) + self.regularization_weight * self.regularization(pred)
        if self.label_weight > 0:
            loss = loss + self.label_weight * self._label_term(pred, target)
        return loss

    def _label_term(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        n_labels = (target.shape[1] - 2) // 2
        if n_labels == 0:
            raise ValueError(
                "label_weight > 0 but the target holds only the image pair: add the one-hot labels of both images "
                "to the training target (moving_label, fixed_label in the datalist and the label transforms)."
            )
        moving, fixed = target[:, 2 : 2 + n_labels], target[:, 2 + n_labels :]
        return self.label_loss(self.warp(moving, pred), fixed)
