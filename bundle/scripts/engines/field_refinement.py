# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""Refinement of a network's displacement by optimising a correction (velocity or displacement) on the pair itself."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from monai.data import MetaTensor
from monai.inferers import Inferer

from scripts.engines.resolution_inferer import ResolutionInferer, resize_displacement
from scripts.io.errors import NonFiniteLossError
from scripts.io.progress import Progress
from scripts.layers.sampling import compose_displacements, integrate_velocity, warp_image
from scripts.spatial.inversion import invert_displacement

__all__ = ["FieldRefinementInferer", "refine_displacement"]

logger = logging.getLogger(__name__)


PARAMETERIZATIONS = ("velocity", "displacement")


def _check_settings(
    iterations: int, learning_rate: float, regularization_weight: float, parameterization: str, integration_steps: int,
    symmetric: bool = False,
) -> None:
    if int(iterations) < 0 or not float(learning_rate) > 0 or float(regularization_weight) < 0:
        raise ValueError(
            f"need iterations >= 0, learning_rate > 0, regularization_weight >= 0; got {iterations}, {learning_rate}, "
            f"{regularization_weight}."
        )
    if parameterization not in PARAMETERIZATIONS:
        raise ValueError(f"parameterization must be one of {PARAMETERIZATIONS}, got {parameterization!r}.")
    if int(integration_steps) < 1:
        raise ValueError(f"integration_steps must be >= 1, got {integration_steps}.")
    if symmetric and parameterization != "velocity":
        raise ValueError("a symmetric refinement needs parameterization='velocity' (its inverse is exp(-c)), got "
                         f"{parameterization!r}.")


class _Correction:
    """The optimised correction ``c`` and how it joins the base field ``u`` (both on one grid, in its voxels).

    ``velocity``: ``u ∘ exp(c)`` (scaling and squaring), a diffeomorphism composed after the network's map, so the
    correction cannot fold and the smoothness term acts on ``c``. ``displacement``: ``u + c``, smoothness on the sum.
    ``symmetric`` (velocity only): the inverse map ``exp(-c) ∘ u^-1`` is kept at hand too, ``u^-1`` inverted once
    (Newton, ``scripts.spatial.invert_displacement``) since the correction never changes it.
    """

    def __init__(self, base: torch.Tensor, parameterization: str, integration_steps: int, symmetric: bool = False):
        self.base, self.parameterization, self.steps = base, parameterization, int(integration_steps)
        self.field = torch.zeros_like(base, requires_grad=True)
        self.base_inverse = invert_displacement(base).ddf if symmetric else None

    def total(self) -> torch.Tensor:
        if self.parameterization == "velocity":
            return compose_displacements(self.base, self._exp(), "border")
        return self.base + self.field

    def inverse_total(self) -> torch.Tensor:
        """The displacement of the inverse map ``exp(-c) ∘ u^-1``: it warps the fixed image onto the moving one."""
        inverse_correction = integrate_velocity(-self.field, self.steps, "zeros")
        return compose_displacements(inverse_correction, self.base_inverse, "border")

    def _exp(self) -> torch.Tensor:
        """exp(c), integrated as the network integrates (zero padding)."""
        return integrate_velocity(self.field, self.steps, "zeros")

    def smoothed(self) -> torch.Tensor:
        """The field the smoothness term is taken of."""
        return self.field if self.parameterization == "velocity" else self.total()

    def apply_to(self, ddf: torch.Tensor) -> torch.Tensor:
        """The correction, brought to ``ddf``'s grid, joined to ``ddf`` (no gradient)."""
        with torch.no_grad():
            if self.parameterization == "velocity":
                return compose_displacements(ddf, resize_displacement(self._exp(), ddf.shape[2:]), "border")
            return ddf + resize_displacement(self.field.detach(), ddf.shape[2:])


def refine_displacement(
    inputs: torch.Tensor,
    ddf: torch.Tensor,
    image_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    regularization: Callable[[torch.Tensor], torch.Tensor],
    regularization_weight: float = 1.0,
    iterations: int = 50,
    learning_rate: float = 2.0,
    scale: float | Sequence[float] = 0.5,
    log_interval: int = 0,
    parameterization: str = "velocity",
    integration_steps: int = 4,
    symmetric: bool = False,
) -> torch.Tensor:
    """
    Correct ``ddf`` by a field ``c`` optimised on a grid at ``scale`` of the input (Adam, fixed iteration count, zero
    start) and return the corrected displacement on the input grid. ``scale`` is taken as given (the inputs are plain
    tensors here); :py:class:`FieldRefinementInferer` makes it isotropic in mm for thick-slice inputs first.

    ``parameterization="velocity"`` (default): ``c`` is a stationary velocity and the result is ``ddf ∘ exp(c)``
    (the moving image is warped by the network's field, then by the diffeomorphism ``exp(c)``), minimising
    ``image_loss(warp(m, ddf ∘ exp(c)), f) + w * regularization(c)``; the correction adds no folding of its own.
    ``"displacement"``: the result is ``ddf + c``, minimising ``image_loss(warp(m, ddf + c), f) + w *
    regularization(ddf + c)``. The network's field keeps its full-resolution detail; the correction adds what the
    network (trained on other scans) missed on this pair.

    Args:
        inputs: (B, 2, D, H, W) pair (channel 0 moving, 1 fixed), intensities scaled as for the network.
        ddf: (B, 3, D, H, W) displacement in voxels of the input grid (from the network).
        image_loss: dissimilarity of (warped moving, fixed), both (B, 1, d, h, w).
        regularization: smoothness penalty of a (B, 3, d, h, w) displacement.
        regularization_weight: weight ``w`` of the penalty, >= 0.
        iterations: Adam steps (0 returns ``ddf`` unchanged).
        learning_rate: Adam step size, in voxels of the refinement grid.
        scale: refinement grid relative to the input (one number or one per axis).
        log_interval: log the loss every this many steps (0: never); on an interactive terminal a progress bar with
            the loss replaces these lines (``scripts.io.progress``).
        parameterization: "velocity" or "displacement", see above.
        integration_steps: scaling-and-squaring steps of the velocity (>= 1).
        symmetric: (velocity only) score both directions, the mean of ``image_loss(warp(m, ddf ∘ exp(c)), f)`` and
            ``image_loss(warp(f, exp(-c) ∘ ddf^-1), m)``: the forward objective alone is free to squeeze moving tissue
            that fits nowhere into a few fixed voxels, which the forward Dice hardly sees but the inverse (fixed labels
            on the moving scan) does. Scored both ways the inverse's Dice comes closer to the forward's (0.011-0.023
            higher on two native pairs, the forward kept; docs/usage.md, "Forward vs inverse Dice"), at about 1.7x the
            CPU time.

    Returns:
        (B, 3, D, H, W) refined displacement in voxels of the input grid (float32, no gradient).
    """
    if inputs.ndim != 5 or inputs.shape[1] != 2:
        raise ValueError(f"inputs must be (B, 2, D, H, W) moving + fixed, got {tuple(inputs.shape)}.")
    if ddf.shape != (inputs.shape[0], 3, *inputs.shape[2:]):
        raise ValueError(f"ddf must be (B, 3, D, H, W) on the inputs' grid, got {tuple(ddf.shape)}.")
    _check_settings(iterations, learning_rate, regularization_weight, parameterization, integration_steps, symmetric)
    # plain tensors: a MetaTensor (as MONAI engines pass) would make the optimised field a non-leaf
    inputs, ddf = (x.as_tensor() if isinstance(x, MetaTensor) else x for x in (inputs, ddf))
    ddf = ddf.detach().float()
    if iterations == 0:
        return ddf
    with torch.enable_grad(), torch.autocast(device_type=inputs.device.type, enabled=False):
        small = ResolutionInferer(network_scale=scale).downsample(inputs.detach().float())
        moving, fixed = small[:, :1], small[:, 1:]
        correction = _Correction(
            resize_displacement(ddf, small.shape[2:]), parameterization, integration_steps, symmetric
        )
        optimizer = torch.optim.Adam([correction.field], lr=learning_rate)
        with Progress(iterations, "field refinement") as bar:
            for step in range(iterations):
                penalty = regularization_weight * regularization(correction.smoothed())
                similarity = image_loss(warp_image(moving, correction.total()), fixed)
                if symmetric:
                    backward = image_loss(warp_image(fixed, correction.inverse_total()), moving)
                    similarity = 0.5 * (similarity + backward)
                loss = similarity + penalty
                if not torch.isfinite(loss):
                    raise NonFiniteLossError(f"field refinement: loss became {loss.item()} at step {step}.")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if bar.active:
                    bar.update(1, loss=loss.item())
                elif log_interval and (step + 1) % log_interval == 0:
                    logger.info("field refinement step %d/%d: loss %.5f", step + 1, iterations, loss.item())
        return correction.apply_to(ddf)


class FieldRefinementInferer(Inferer):
    """
    Run another inferer (the network, plain or instance-optimised) and refine its displacement on the pair with
    :py:func:`refine_displacement`: a correction (by default a diffeomorphism composed after the network's map) optimised at ``scale`` of the input
    resolution.

    The refinement grid is isotropic in mm like the network's (``isotropic``, see
    :py:class:`scripts.engines.ResolutionInferer`): on a 1 x 1 x 3 mm pair at ``scale`` 0.5 the correction lives on a
    2 mm grid, so its smoothness penalty, its NCC window and its step size (all in voxels) mean one distance per axis.

    Args:
        base_inferer: inferer producing the (B, 3, D, H, W) displacement, e.g.
            :py:class:`scripts.engines.ResolutionInferer` or :py:class:`scripts.engines.InstanceOptimizationInferer`.
        image_loss, regularization, regularization_weight, iterations, learning_rate, scale, log_interval,
            parameterization, integration_steps, symmetric: see :py:func:`refine_displacement`.
        isotropic: refine on a grid of one voxel size in mm when the inputs carry their spacing (a MetaTensor).

    Call:
        inputs: (B, 2, D, H, W) moving + fixed; network: passed to ``base_inferer``. Returns (B, 3, D, H, W).
    """

    def __init__(
        self,
        base_inferer: Inferer,
        image_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        regularization: Callable[[torch.Tensor], torch.Tensor],
        regularization_weight: float = 1.0,
        iterations: int = 50,
        learning_rate: float = 2.0,
        scale: float | Sequence[float] = 0.5,
        log_interval: int = 0,
        parameterization: str = "velocity",
        integration_steps: int = 4,
        isotropic: bool = True,
        symmetric: bool = False,
    ) -> None:
        super().__init__()
        if not callable(base_inferer):
            raise ValueError(f"base_inferer must be an inferer (callable), got {type(base_inferer).__name__}.")
        _check_settings(
            iterations, learning_rate, regularization_weight, parameterization, integration_steps, symmetric
        )
        self.base_inferer = base_inferer
        self.image_loss, self.regularization = image_loss, regularization
        #: the keyword arguments of :py:func:`refine_displacement` after the pair, the field and the two objectives
        self.settings = {
            "regularization_weight": float(regularization_weight),
            "iterations": int(iterations),
            "learning_rate": float(learning_rate),
            "scale": scale,
            "log_interval": int(log_interval),
            "parameterization": parameterization,
            "integration_steps": int(integration_steps),
            "symmetric": bool(symmetric),
        }
        #: the refinement grid: ``scale`` of the input, isotropic in mm for inputs that carry their spacing
        self.grid = ResolutionInferer(network_scale=scale, isotropic=isotropic)

    def __call__(self, inputs: torch.Tensor, network: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        ddf = self.base_inferer(inputs, network, *args, **kwargs)
        settings = dict(self.settings, scale=self.grid.scale_for(inputs))
        return refine_displacement(inputs, ddf, self.image_loss, self.regularization, **settings)
