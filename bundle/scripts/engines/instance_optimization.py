# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""Test-time instance optimisation: fine-tune the registration network on the one pair it is asked to register."""

from __future__ import annotations

import copy
import logging
import time
from typing import Any, Callable, Sequence

import torch
from torch import nn

from scripts.engines.resolution_inferer import ResolutionInferer
from scripts.io.errors import NonFiniteLossError
from scripts.io.progress import Progress
from scripts.losses.registration_loss import RegistrationLoss, registration_target

__all__ = ["InstanceOptimizationInferer"]

logger = logging.getLogger(__name__)


def _check_gradients(optimizer: torch.optim.Optimizer, step: int) -> None:
    """Raise before a step that would write non-finite values into the weights (and a NaN field into the outputs)."""
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if grads and not bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()):
        raise NonFiniteLossError(
            f"instance optimisation stopped: the gradients became non-finite at step {step} (the loss was finite). "
            "Nothing was written for this pair. Under bfloat16 autocast on CPU this is a known issue of a convolution's "
            "backward pass: run with amp off; otherwise lower the learning rate (--learning_rate)."
        )


class InstanceOptimizationInferer(ResolutionInferer):
    """
    Inferer that first optimises the network's weights on the pair it is given, then predicts its displacement.

    For each call (one batch of pairs), the network is reset to the weights it had when the inferer first saw it (the
    bundle weights, or its initialisation when none are shipped), then trained for ``iterations`` Adam steps on the
    unsupervised objective ``image_loss(warp(moving, ddf), fixed) + regularization_weight * regularization(ddf)`` at the
    network resolution (see :py:class:`scripts.engines.resolution_inferer.ResolutionInferer`), and finally run once more to predict the
    field, which is resized to the input grid. Gradients are enabled locally, so it works inside MONAI evaluators
    (which run under ``torch.no_grad``). After the call the network keeps the optimised weights. Under a float16
    ``torch.autocast`` (an evaluator with ``amp=True`` on CUDA) the steps use a gradient scaler; k-means, the flow
    heads and the loss run in float32 (see :py:class:`scripts.networks.sacb_net.SACBNet`).

    Args:
        image_loss: callable ``(warped, fixed) -> loss``, e.g. ``scripts.losses.ncc.LocalNCCLoss``.
        regularization: callable ``(ddf) -> loss``, e.g. ``scripts.losses.regularization.GradientLoss``.
        warp: callable ``(image, ddf) -> warped``, e.g. ``scripts.layers.warp.Warp``.
        regularization_weight: lambda of the smoothness term.
        iterations: optimisation steps per pair (0: plain inference).
        learning_rate: Adam learning rate.
        network_scale: network resolution relative to the input (per axis or one number).
        antialias: smooth before downsampling.
        isotropic: a network grid of one voxel size in mm for thick-slice inputs (see
            :py:class:`scripts.engines.resolution_inferer.ResolutionInferer`).
        symmetric, integration_steps: predict the inverse-consistent field of the network run both ways (after the
            optimisation, which trains the one way); see :py:class:`scripts.engines.resolution_inferer.ResolutionInferer`.
        log_interval: log the loss every this many iterations (0: only first and last); on an interactive terminal
            a progress bar with the loss replaces these lines (``scripts.io.progress``).
        frozen_prefixes: parameter-name prefixes kept fixed during the optimisation (e.g. ``["encoder.0"]``: the
            full-resolution encoder level, whose backward pass is the most expensive part on CPU).

    Shapes:
        inputs (B, 2, D, H, W), channel 0 moving, 1 fixed, in [0, 1] -> ddf (B, 3, D, H, W) in voxels.
    """

    def __init__(
        self,
        image_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        regularization: Callable[[torch.Tensor], torch.Tensor],
        warp: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        regularization_weight: float = 1.0,
        iterations: int = 100,
        learning_rate: float = 1e-3,
        network_scale: float | Sequence[float] = 0.5,
        antialias: bool = True,
        log_interval: int = 10,
        frozen_prefixes: Sequence[str] = (),
        isotropic: bool = True,
        symmetric: bool = False,
        integration_steps: int = 7,
    ) -> None:
        super().__init__(network_scale=network_scale, antialias=antialias, isotropic=isotropic, symmetric=symmetric,
                         integration_steps=integration_steps)
        if iterations < 0:
            raise ValueError(f"iterations must be >= 0, got {iterations}.")
        if learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {learning_rate}.")
        # The training objective itself (it also validates regularization_weight), so both optimise the same thing.
        self.loss = RegistrationLoss(image_loss, regularization, warp, regularization_weight)
        self.iterations = int(iterations)
        self.learning_rate = float(learning_rate)
        self.log_interval = int(log_interval)
        self.frozen_prefixes = tuple(frozen_prefixes)
        self._initial_state: dict[str, torch.Tensor] | None = None
        self._initial_owner: int | None = None

    def _reset(self, network: nn.Module) -> None:
        """Restore the weights the network had at the first call (each pair starts from the same model)."""
        if self._initial_owner != id(network):
            self._initial_state = copy.deepcopy(network.state_dict())
            self._initial_owner = id(network)
        else:
            network.load_state_dict(self._initial_state)

    def objective(self, network: nn.Module, pair: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Loss of the network on a (B, 2, d, h, w) pair and the predicted (B, 3, d, h, w) field."""
        ddf = network(pair)
        return self.loss(ddf, registration_target(pair)), ddf

    def optimize(self, network: nn.Module, pair: torch.Tensor) -> list[float]:
        """Run the Adam steps on one (B, 2, d, h, w) pair at network resolution; returns the loss per step."""
        if self.iterations == 0:  # a plain forward pass: the weights are neither changed nor copied
            return []
        self._reset(network)
        trainable = self.trainable_parameters(network)
        optimizer = torch.optim.Adam(trainable, lr=self.learning_rate)
        requires_grad = {name: p.requires_grad for name, p in network.named_parameters()}
        frozen = {id(p) for p in network.parameters()} - {id(p) for p in trainable}
        for p in network.parameters():
            p.requires_grad_(id(p) not in frozen)
        start = time.time()
        try:
            history = self._steps(network, pair, optimizer, start)
        finally:
            for name, p in network.named_parameters():
                p.requires_grad_(requires_grad[name])
        return history

    def trainable_parameters(self, network: nn.Module) -> list[nn.Parameter]:
        """Parameters the optimisation updates (all but those under ``frozen_prefixes``)."""
        params = [p for n, p in network.named_parameters() if not (self.frozen_prefixes and n.startswith(self.frozen_prefixes))]
        if not params:
            raise ValueError(f"frozen_prefixes {self.frozen_prefixes} freeze every parameter: nothing to optimise.")
        return params

    def _steps(self, network: nn.Module, pair: torch.Tensor, optimizer: torch.optim.Optimizer, start: float) -> list[float]:
        history: list[float] = []
        scaler = _grad_scaler(pair.device)
        with torch.enable_grad(), Progress(self.iterations, "instance optimisation") as bar:
            for step in range(1, self.iterations + 1):
                optimizer.zero_grad(set_to_none=True)
                loss, _ = self.objective(network, pair)
                if not torch.isfinite(loss):
                    raise NonFiniteLossError(
                        f"instance optimisation stopped: the loss became {loss.item()} at step {step}; expected a finite "
                        "loss. Nothing was written for this pair. Lower the learning rate (--learning_rate) or raise "
                        "--regularization_weight, and check the inputs."
                    )
                scaler.scale(loss).backward()
                if not scaler.is_enabled():  # float16's scaler skips such steps itself
                    _check_gradients(optimizer, step)
                scaler.step(optimizer)
                scaler.update()
                history.append(float(loss.detach()))
                if bar.active:  # the bar shows the loss; the log lines below are for logs that are not a terminal
                    bar.update(1, loss=history[-1])
                elif step == 1 or step == self.iterations or (self.log_interval and step % self.log_interval == 0):
                    logger.info(
                        "instance optimisation step %d/%d: loss %.4f (%.1f s)", step, self.iterations, history[-1], time.time() - start
                    )
        return history

    def displacement_and_velocity(
        self, inputs: torch.Tensor, network: Callable[..., Any], *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """
        Optimise the network on the pair, then predict as
        :py:meth:`scripts.engines.resolution_inferer.ResolutionInferer.displacement_and_velocity` (the call returns the
        displacement of this).

        Args:
            inputs: (B, 2, D, H, W) pair, channel 0 moving, 1 fixed.
            network: the registration network (an ``nn.Module``; its weights are optimised in place).

        Returns:
            ddf (B, 3, D, H, W) in voxels of the input grid, and the velocity it integrates for a diffeomorphic
            network (None otherwise).
        """
        if self.iterations > 0 and not isinstance(network, nn.Module):  # 0 steps: a plain forward pass, any network
            raise ValueError(
                f"instance optimisation needs an nn.Module network whose weights it can tune, got "
                f"{type(network).__name__} (e.g. a TorchScript export); use instance_optimization_iterations 0 with it."
            )
        if inputs.ndim != 5 or inputs.shape[1] != 2:
            raise ValueError(f"inputs must have shape (B, 2, D, H, W), got {tuple(inputs.shape)}.")
        pair = self.downsample(inputs).detach()
        self.optimize(network, pair)  # the loss per step is logged; call optimize() itself to get it as a list
        with torch.no_grad():
            ddf, velocity = self.predict(network, pair, *args, **kwargs)
        return self.to_input_grid(network, ddf, velocity, inputs.shape[2:])


def _grad_scaler(device: torch.device) -> torch.amp.GradScaler:
    """A loss scaler, enabled only under float16 autocast (a MONAI engine with ``amp=True`` on CUDA): float16
    gradients of a loss around -0.5 underflow without one. bfloat16 and float32 need none (a disabled scaler steps as
    usual)."""
    active = torch.is_autocast_enabled(device.type) and torch.get_autocast_dtype(device.type) == torch.float16
    return torch.amp.GradScaler(device.type, enabled=active)
