# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""Refinement of a network's displacement by optimising a correction (velocity or displacement) on the pair itself."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from monai.data import MetaTensor
from monai.inferers import Inferer

from scripts.engines.resolution_inferer import ResolutionInferer, _per_axis, network_grid_size, resize_displacement
from scripts.io.errors import NonFiniteLossError
from scripts.io.progress import Progress
from scripts.layers.sampling import (
    compose_displacements,
    compose_displacements_in_slabs,
    integrate_velocity,
    warp_image,
)
from scripts.spatial.inversion import invert_displacement

__all__ = ["FieldRefinementInferer", "loss_has_converged", "refine_displacement", "scale_within_voxel_budget"]

logger = logging.getLogger(__name__)


PARAMETERIZATIONS = ("velocity", "displacement")


def _check_settings(
    iterations: int,
    learning_rate: float,
    regularization_weight: float,
    parameterization: str,
    integration_steps: int,
    tolerance: float = 0.0,
    tolerance_window: int = 1,
    max_voxels: int = 0,
    symmetric: bool = False,
) -> None:
    if not float(tolerance) >= 0 or int(tolerance_window) < 1:
        raise ValueError(
            f"need tolerance >= 0 (0: no early stop) and tolerance_window >= 1 steps; got {tolerance}, "
            f"{tolerance_window}."
        )
    if int(max_voxels) < 0 or (0 < int(max_voxels) < 8):
        raise ValueError(f"max_voxels must be 0 (no budget) or at least 8 (a 2x2x2 grid), got {max_voxels}.")
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


def scale_within_voxel_budget(
    spatial_shape: Sequence[int], scale: float | Sequence[float], max_voxels: int
) -> tuple[float, float, float]:
    """
    The refinement scale per axis, lowered by one common factor (so an isotropic grid stays isotropic) until the grid
    :py:func:`scripts.engines.network_grid_size` makes of ``spatial_shape`` holds at most ``max_voxels`` voxels.

    The refinement's cost grows with its grid; a whole head's foreground box holds 2-3x the voxels of its stripped
    brain, and the budget keeps its refinement about as costly as the brain's by refining it on coarser voxels.
    A grid already within the budget keeps ``scale`` exactly (the same floats: results stay bit-identical).

    Args:
        spatial_shape: the input (D, H, W) the refinement grid is taken of.
        scale: refinement grid relative to the input, one number or one per axis.
        max_voxels: largest number of grid voxels, 0 for no budget.

    Returns:
        the scale per axis.
    """
    scales = _per_axis(scale, "scale")
    if int(max_voxels) <= 0 or _voxels(spatial_shape, scales) <= int(max_voxels):
        return scales
    # the continuous solution first, then small steps down: rounding each axis may overshoot by a few voxels
    factor = (int(max_voxels) / _voxels(spatial_shape, scales)) ** (1.0 / 3.0)
    while factor > 0 and _voxels(spatial_shape, [s * factor for s in scales]) > int(max_voxels):
        if all(n == 2 for n in network_grid_size(spatial_shape, [s * factor for s in scales])):
            break  # the smallest grid there is (2 voxels per axis)
        factor *= 0.99
    return scales[0] * factor, scales[1] * factor, scales[2] * factor


def _rounded(scale: Sequence[float]) -> str:
    return "(" + ", ".join(f"{s:.3f}" for s in scale) + ")"


def _voxels(spatial_shape: Sequence[int], scale: Sequence[float]) -> int:
    d, h, w = network_grid_size(spatial_shape, scale)
    return d * h * w


def loss_has_converged(losses: Sequence[float], tolerance: float, window: int) -> bool:
    """
    Whether the optimisation has stopped making progress: the mean loss of the last ``window`` steps improved on the
    mean of the ``window`` steps before them, but by less than ``tolerance`` relative to the earlier mean's magnitude.

    Means over windows, not single steps, because Adam's loss wanders from one step to the next. A window *worse* than
    the one before is not convergence: Adam's first steps (about ``learning_rate`` voxels everywhere, whatever the
    gradient's size) disturb a good starting field before the loss comes down again, and stopping there would return a
    field worse than the start; such a run goes on (at most to its step count). The rule depends on the loss values
    alone, so a run stops at the same step every time. False until ``2 * window`` losses are known and always False
    for ``tolerance`` 0.

    Args:
        losses: the loss of every step so far, oldest first.
        tolerance: smallest relative improvement per window that keeps the optimisation going (0: never stop).
        window: steps per window (>= 1).
    """
    if tolerance <= 0 or len(losses) < 2 * window:
        return False
    earlier = sum(losses[-2 * window : -window]) / window
    latest = sum(losses[-window:]) / window
    return 0.0 <= (earlier - latest) < tolerance * max(abs(earlier), 1e-12)


class _Correction:
    """The optimised correction ``c`` and how it joins the base field ``u`` (both on one grid, in its voxels).

    ``velocity``: ``u ∘ exp(c)`` (scaling and squaring) composed after the network's map; ``exp(c)`` is a
    diffeomorphism in the continuum, but a few squaring steps of a discrete field do not guarantee an invertible map:
    the smoothness term, which acts on ``c``, is what keeps it from folding. ``displacement``: ``u + c``, smoothness on the sum.
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
        return compose_displacements(self._exp(inverse=True), self.base_inverse, "border")

    def _exp(self, inverse: bool = False) -> torch.Tensor:
        """exp(c), or exp(-c) with ``inverse``, integrated as the network integrates (zero padding)."""
        return integrate_velocity(-self.field if inverse else self.field, self.steps, "zeros")

    def smoothed(self) -> torch.Tensor:
        """The field the smoothness term is taken of."""
        return self.field if self.parameterization == "velocity" else self.total()

    def apply_to(self, ddf: torch.Tensor) -> torch.Tensor:
        """The correction, brought to ``ddf``'s grid, joined to ``ddf`` (no gradient).

        ``ddf``'s grid is the full-resolution one (the whole foreground box of a CT: 10**8 voxels), so it is composed
        slab by slab (:func:`compose_displacements_in_slabs`, the same values bit for bit): three full-resolution
        fields beside ``ddf`` instead of the six coordinate-map temporaries of a whole-grid warp on top."""
        with torch.no_grad():
            if self.parameterization == "velocity":
                return compose_displacements_in_slabs(ddf, resize_displacement(self._exp(), ddf.shape[2:]), "border")
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
    tolerance: float = 0.0,
    tolerance_window: int = 10,
    max_voxels: int = 0,
    symmetric: bool = False,
    return_info: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, dict[str, Any]]:
    """
    Correct ``ddf`` by a field ``c`` optimised on a grid at ``scale`` of the input (Adam, at most ``iterations``
    steps, zero start) and return the corrected displacement on the input grid. ``scale`` is taken as given (the inputs are plain
    tensors here); :py:class:`FieldRefinementInferer` makes it isotropic in mm for thick-slice inputs first.

    ``parameterization="velocity"`` (default): ``c`` is a stationary velocity and the result is ``ddf ∘ exp(c)``
    (the moving image is warped by the network's field, then by the diffeomorphism ``exp(c)``), minimising
    ``image_loss(warp(m, ddf ∘ exp(c)), f) + w * regularization(c)``; with the smoothness term the correction
    adds next to no folding (docs/usage.md gives the measured figures; without it, it folds).
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
        tolerance: early stop: end the optimisation once the mean loss of the last ``tolerance_window`` steps improved
            on the window before by less than this fraction (:py:func:`loss_has_converged`); 0 runs every step.
        tolerance_window: steps per window of the early stop (>= 1).
        max_voxels: voxel budget of the refinement grid: a grid at ``scale`` holding more voxels is made coarser by
            one factor on every axis (:py:func:`scale_within_voxel_budget`, logged); 0 for no budget.
        symmetric: (velocity only) score both directions, the mean of ``image_loss(warp(m, ddf ∘ exp(c)), f)`` and
            ``image_loss(warp(f, exp(-c) ∘ ddf^-1), m)``: the forward objective alone is free to squeeze moving tissue
            that fits nowhere into a few fixed voxels, which the forward Dice hardly sees but the inverse (fixed labels
            on the moving scan) does. Scored both ways the inverse's Dice comes closer to the forward's (0.011-0.023
            higher on two native pairs, the forward kept; docs/usage.md, "Forward vs inverse Dice"), at about 1.7x the
            CPU time.
        return_info: also return what the run did (below).

    Returns:
        (B, 3, D, H, W) refined displacement in voxels of the input grid (float32, no gradient); with ``return_info``
        a tuple of it and a dict: ``grid`` (the refinement grid's (d, h, w)), ``scale`` (per axis, after the budget),
        ``steps`` (Adam steps taken) and ``losses`` (the objective before each step).
    """
    if inputs.ndim != 5 or inputs.shape[1] != 2:
        raise ValueError(f"inputs must be (B, 2, D, H, W) moving + fixed, got {tuple(inputs.shape)}.")
    if ddf.shape != (inputs.shape[0], 3, *inputs.shape[2:]):
        raise ValueError(f"ddf must be (B, 3, D, H, W) on the inputs' grid, got {tuple(ddf.shape)}.")
    _check_settings(
        iterations, learning_rate, regularization_weight, parameterization, integration_steps, tolerance,
        tolerance_window, max_voxels, symmetric,
    )
    # plain tensors: a MetaTensor (as MONAI engines pass) would make the optimised field a non-leaf
    inputs, ddf = (x.as_tensor() if isinstance(x, MetaTensor) else x for x in (inputs, ddf))
    ddf = ddf.detach().float()
    requested = _per_axis(scale, "scale")
    scale = scale_within_voxel_budget(inputs.shape[2:], requested, max_voxels)
    grid = network_grid_size(inputs.shape[2:], scale)
    info: dict[str, Any] = {"grid": tuple(grid), "scale": scale, "steps": 0, "losses": []}
    if iterations == 0:
        return (ddf, info) if return_info else ddf
    if scale != requested:
        logger.info(
            "field refinement: the grid at scale %s would hold %d voxels, more than the budget of %d (max_voxels); "
            "refining on %s voxels at scale %s instead.", _rounded(requested),
            _voxels(inputs.shape[2:], requested), int(max_voxels), "x".join(map(str, grid)), _rounded(scale),
        )
    losses: list[float] = info["losses"]
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
                losses.append(loss.item())
                if bar.active:
                    bar.update(1, loss=losses[-1])
                elif log_interval and (step + 1) % log_interval == 0:
                    logger.info("field refinement step %d/%d: loss %.5f", step + 1, iterations, losses[-1])
                if loss_has_converged(losses, tolerance, tolerance_window):
                    break
        info["steps"] = len(losses)
        refined = correction.apply_to(ddf)
    # one line per refinement: what it cost (grid, steps) is what the budget and the early stop are tuned by
    logger.info(
        "field refinement: %d of %d steps on a %s grid (scale %s), loss %.5f -> %.5f%s.", len(losses), iterations,
        "x".join(map(str, grid)), _rounded(scale), losses[0], losses[-1],
        f"; converged (mean loss over {tolerance_window} steps improved by less than {tolerance:g})"
        if len(losses) < iterations else "",
    )
    return (refined, info) if return_info else refined


class FieldRefinementInferer(Inferer):
    """
    Run another inferer (the network, plain or instance-optimised) and refine its displacement on the pair with
    :py:func:`refine_displacement`: a correction (by default a diffeomorphism composed after the network's map) optimised
    at ``scale`` of the input resolution, within a voxel budget, until its loss stops improving.

    The refinement grid is isotropic in mm like the network's (``isotropic``, see
    :py:class:`scripts.engines.ResolutionInferer`): on a 1 x 1 x 3 mm pair at ``scale`` 0.5 the correction lives on a
    2 mm grid, so its smoothness penalty, its NCC window and its step size (all in voxels) mean one distance per axis.

    Args:
        base_inferer: inferer producing the (B, 3, D, H, W) displacement, e.g.
            :py:class:`scripts.engines.ResolutionInferer` or :py:class:`scripts.engines.InstanceOptimizationInferer`.
        image_loss, regularization, regularization_weight, iterations, learning_rate, scale, log_interval,
            parameterization, integration_steps, tolerance, tolerance_window, max_voxels, symmetric: see
            :py:func:`refine_displacement` (the voxel budget applies after the grid was made isotropic, and keeps it
            isotropic).
        isotropic: refine on a grid of one voxel size in mm when the inputs carry their spacing (a MetaTensor).

    Call:
        inputs: (B, 2, D, H, W) moving + fixed; network: passed to ``base_inferer``. Returns (B, 3, D, H, W);
        :py:meth:`refine` returns what the refinement did as well.
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
        tolerance: float = 0.0,
        tolerance_window: int = 10,
        max_voxels: int = 0,
        symmetric: bool = False,
    ) -> None:
        super().__init__()
        if not callable(base_inferer):
            raise ValueError(f"base_inferer must be an inferer (callable), got {type(base_inferer).__name__}.")
        _check_settings(
            iterations, learning_rate, regularization_weight, parameterization, integration_steps, tolerance,
            tolerance_window, max_voxels, symmetric,
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
            "tolerance": float(tolerance),
            "tolerance_window": int(tolerance_window),
            "max_voxels": int(max_voxels),
            "symmetric": bool(symmetric),
        }
        #: the refinement grid: ``scale`` of the input, isotropic in mm for inputs that carry their spacing
        self.grid = ResolutionInferer(network_scale=scale, isotropic=isotropic)

    def __call__(self, inputs: torch.Tensor, network: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.refine(inputs, network, *args, **kwargs)[0]

    def refine(
        self, inputs: torch.Tensor, network: Any, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """The call's (B, 3, D, H, W) displacement and what its refinement did: ``grid``, ``scale``, ``steps`` and
        ``losses`` (:py:func:`refine_displacement`'s ``return_info``), e.g. for a settings sweep."""
        ddf = self.base_inferer(inputs, network, *args, **kwargs)
        settings = dict(self.settings, scale=self.grid.scale_for(inputs))
        return refine_displacement(inputs, ddf, self.image_loss, self.regularization, return_info=True, **settings)
