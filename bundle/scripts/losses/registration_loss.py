# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""Unsupervised registration objective: image similarity of the warped moving image plus field smoothness."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

__all__ = ["RegistrationLoss"]


class RegistrationLoss(nn.Module):
    """
    ``image_loss(warp(moving, ddf), fixed) + regularization_weight * regularization(ddf)`` (SACB-Net's NCC + lambda * grad).

    It has the ``loss_function(pred, target)`` signature of MONAI's ``SupervisedTrainer``: ``pred`` is the predicted
    displacement and ``target`` the image pair the network saw (the training preprocessing copies ``image`` to
    ``label``), so no custom trainer is needed.

    Args:
        image_loss: callable ``(warped, fixed) -> scalar`` (e.g. ``scripts.losses.ncc.LocalNCCLoss``).
        regularization: callable ``(ddf) -> scalar`` (e.g. ``scripts.losses.regularization.GradientLoss``).
        warp: callable ``(image, ddf) -> warped`` (e.g. ``scripts.layers.warp.Warp``).
        regularization_weight: lambda >= 0.

    Shapes:
        pred (B, 3, D, H, W) displacement in voxels; target (B, 2, D, H, W), channel 0 moving, 1 fixed -> scalar.
    """

    def __init__(
        self,
        image_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        regularization: Callable[[torch.Tensor], torch.Tensor],
        warp: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        regularization_weight: float = 1.0,
    ) -> None:
        super().__init__()
        if regularization_weight < 0:
            raise ValueError(f"regularization_weight must be >= 0, got {regularization_weight}.")
        self.image_loss = image_loss
        self.regularization = regularization
        self.warp = warp
        self.regularization_weight = float(regularization_weight)

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if pred.ndim != 5 or pred.shape[1] != 3:
            raise ValueError(f"pred must be a (B, 3, D, H, W) displacement, got {tuple(pred.shape)}.")
        if target.ndim != 5 or target.shape[1] != 2 or target.shape[2:] != pred.shape[2:]:
            raise ValueError(f"target must be the (B, 2, D, H, W) pair on the ddf grid, got {tuple(target.shape)}.")
        warped = self.warp(target[:, :1], pred)
        return self.image_loss(warped, target[:, 1:]) + self.regularization_weight * self.regularization(pred)
