# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""Inferer that runs a registration network at a reduced resolution and returns a full-resolution displacement field."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.inferers import Inferer

from scripts.io.input_checks import voxel_spacing
from scripts.layers.sampling import integrate_velocity

__all__ = [
    "ISOTROPY_TOLERANCE",
    "ResolutionInferer",
    "input_spacing",
    "isotropic_network_scale",
    "network_grid_size",
    "network_fields",
    "resize_displacement",
    "symmetric_network_fields",
]

#: network-grid axes at most this much (relative) coarser than the finest keep the scale they were given: header
#: rounding (float32 spacings) and near-isotropic scans (1 x 1 x 1.005 mm) are left as they are, voxel for voxel
ISOTROPY_TOLERANCE = 0.01


def _per_axis(value: float | Sequence[float], name: str) -> tuple[float, float, float]:
    """Expand a scalar or a 3-sequence to three positive floats."""
    values = [float(value)] * 3 if isinstance(value, (int, float)) else [float(v) for v in value]
    if len(values) != 3 or min(values) <= 0:
        raise ValueError(f"{name} must be a positive number or 3 positive numbers, got {value!r}.")
    return values[0], values[1], values[2]


def network_grid_size(spatial_shape: Sequence[int], scale: float | Sequence[float]) -> list[int]:
    """
    Size of the grid the network runs on: ``round(size * scale)`` per axis, at least 2 voxels (so that the
    align-corners mapping between the grids is defined).

    Args:
        spatial_shape: full-resolution (D, H, W).
        scale: network resolution relative to the image, a number or one per axis (1.0 = full resolution).
    """
    scales = _per_axis(scale, "network_scale")
    return [max(2, int(round(int(s) * f))) for s, f in zip(spatial_shape, scales)]


def input_spacing(inputs: torch.Tensor) -> tuple[float, float, float] | None:
    """
    Voxel spacing (mm) along the three spatial axes of a MetaTensor, from its affine (the lengths of its columns, so
    oblique grids are measured right); None for a plain tensor, whose grid is unknown.

    Args:
        inputs: (C, D, H, W) or (B, C, D, H, W); a batch's affine is (B, 4, 4), one (4, 4) serves every item.

    Raises:
        ValueError: the items of a batch have different spacings (one network grid serves the whole batch).
    """
    if not isinstance(inputs, MetaTensor):
        return None
    affines = np.asarray(inputs.affine.detach().cpu(), dtype=np.float64).reshape(-1, 4, 4)
    spacings = np.stack([voxel_spacing(affine) for affine in affines])
    if not np.allclose(spacings, spacings[0], rtol=1e-4, atol=0.0):
        raise ValueError(
            f"the items of one batch have different voxel spacings ({spacings.round(4).tolist()} mm); expected one "
            "spacing per batch, as one network grid serves it: use batch_size 1."
        )
    return float(spacings[0][0]), float(spacings[0][1]), float(spacings[0][2])


def isotropic_network_scale(
    scale: float | Sequence[float], spacing: Sequence[float], tolerance: float = ISOTROPY_TOLERANCE
) -> tuple[float, float, float]:
    """
    Per-axis ``network_scale`` that gives the network grid the same voxel size (mm) along every axis: the finest
    network-grid axis (``spacing_i / scale_i``) keeps its scale, the coarser ones are resampled to its voxel size.

    The network was trained on near-isotropic voxels; on a thick-slice scan (1 x 1 x 3 mm) a uniform scale would show it
    2 x 2 x 6 mm voxels, where its 3x3x3 kernels, its reach and its smoothness penalty (all in voxels) mean three times
    the distance along one axis. Here that axis is upsampled instead (scale 0.5 x 3 = 1.5), so the network sees 2 mm
    voxels everywhere; the displacement comes back to the input grid as usual (:py:func:`resize_displacement`).
    An isotropic input (or an explicit per-axis scale that already makes the network grid isotropic) is returned as it
    was given, bit for bit.

    Args:
        scale: the configured network resolution relative to the input, a number or one per axis.
        spacing: the input's voxel spacing (mm) per axis.
        tolerance: axes whose network voxel is at most this much (relative) larger than the finest keep their scale.

    Returns:
        the scale per axis.
    """
    scales = _per_axis(scale, "network_scale")
    spacing = _per_axis(spacing, "spacing")
    network = [s / k for s, k in zip(spacing, scales)]
    finest = min(network)
    adjusted = [k if n <= finest * (1.0 + tolerance) else s / finest for k, s, n in zip(scales, spacing, network)]
    return adjusted[0], adjusted[1], adjusted[2]


def resize_displacement(ddf: torch.Tensor, spatial_shape: Sequence[int]) -> torch.Tensor:
    """
    Resample a displacement field given in voxels of its own grid onto another grid covering the same extent.

    The grids are related with align-corners semantics (first and last voxel centres coincide), so voxel index ``j`` of
    an ``n``-voxel axis sits at ``j * (N - 1) / (n - 1)`` on the ``N``-voxel axis, and a shift of ``d`` voxels becomes
    ``d * (N - 1) / (n - 1)`` voxels: each channel is scaled by its own axis factor after trilinear interpolation.

    Args:
        ddf: (B, 3, d, h, w) displacement in voxels of the (d, h, w) grid, channel i along array axis i.
        spatial_shape: target (D, H, W).

    Returns:
        (B, 3, D, H, W) displacement in voxels of the target grid.
    """
    if ddf.ndim != 5 or ddf.shape[1] != 3:
        raise ValueError(f"ddf must have shape (B, 3, D, H, W), got {tuple(ddf.shape)}.")
    target = [int(s) for s in spatial_shape]
    if len(target) != 3 or min(target) < 1:
        raise ValueError(f"spatial_shape must be 3 positive sizes, got {spatial_shape!r}.")
    source = [int(s) for s in ddf.shape[2:]]
    if source == target:
        return ddf
    factors = torch.tensor([(t - 1) / (s - 1) if s > 1 else 1.0 for s, t in zip(source, target)], dtype=ddf.dtype,
                           device=ddf.device).view(1, 3, 1, 1, 1)
    resized = F.interpolate(ddf, size=target, mode="trilinear", align_corners=True)
    if resized.requires_grad:
        return resized * factors
    # in place where no gradient is recorded: the target is often the full-resolution grid (a CT's 10**8 voxels),
    # where a second (B, 3, D, H, W) copy is 1.3 GB; the same products either way
    return resized.mul_(factors)


def network_fields(
    network: Callable[..., Any], pair: torch.Tensor, *args: Any, **kwargs: Any
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """
    Run a registration network on a pair and return its displacement and, for a diffeomorphic network, its velocity.

    A network built with ``diffeomorphic`` set (see :py:class:`scripts.networks.sacb_net.SACBNet`) is called with
    ``return_velocity=True`` and returns the velocity with the field; any other network (a plain SACB-Net, its
    TorchScript export, another model) is called as it is. The call goes through ``network`` itself, so DataParallel
    and DistributedDataParallel wrappers still see the forward pass; the setting is read from the wrapped module.

    Args:
        network: callable mapping (B, 2, d, h, w) to a (B, 3, d, h, w) displacement in voxels.
        pair: (B, 2, d, h, w), channel 0 moving, 1 fixed.
        args, kwargs: passed on to ``network``.

    Returns:
        ddf (B, 3, d, h, w) and velocity (B, 3, d, h, w) with ``ddf = exp(velocity)``, or None for a network that
        predicts a displacement.
    """
    module = getattr(network, "module", network)  # DataParallel / DistributedDataParallel
    if getattr(module, "diffeomorphic", False):  # a constructor setting, absent from networks without the mode
        ddf, velocity = network(pair, *args, return_velocity=True, **kwargs)
        return ddf, velocity
    return network(pair, *args, **kwargs), None


def symmetric_network_fields(
    network: Callable[..., Any], pair: torch.Tensor, integration_steps: int = 7, *args: Any, **kwargs: Any
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """
    An inverse-consistent field from a network that registers one way: the network runs on the pair (moving to fixed,
    field ``a``) and on the pair swapped (fixed to moving, field ``b``), and the result is ``exp((a - b) / 2)``,
    whose inverse is ``exp((b - a) / 2)`` (the same network run the other way gives the inverse, to the integration's
    accuracy). ``a`` and ``b`` are the velocities of a diffeomorphic network, or the displacements of a plain one taken
    as velocities (first order: ``exp(-b)`` is close to the inverse of the map ``b`` describes).

    Why: a one-way objective (NCC on the fixed grid) is free to squeeze moving tissue that fits nowhere into a few fixed
    voxels; the forward Dice, counted on fixed voxels, hardly sees it, but fixed labels mapped back onto the moving scan
    do. Run both ways and averaged, neither direction's squeeze survives alone: on a native brain pair the network's
    field alone went from forward / inverse Dice 0.816 / 0.780 to 0.800 / 0.799 (docs/usage.md, "Forward vs inverse
    Dice"). It costs a second forward pass.

    Args:
        network: callable mapping (B, 2, d, h, w) to a (B, 3, d, h, w) displacement in voxels (see
            :py:func:`network_fields`).
        pair: (B, 2, d, h, w), channel 0 moving, 1 fixed.
        integration_steps: scaling-and-squaring steps for a plain network's averaged field (a diffeomorphic network
            integrates with its own steps).
        args, kwargs: passed on to ``network``.

    Returns:
        ddf (B, 3, d, h, w) = ``exp(velocity)`` and velocity (B, 3, d, h, w) for a diffeomorphic network, or None for a
        plain one (as :py:func:`network_fields`).
    """
    forward, forward_velocity = network_fields(network, pair, *args, **kwargs)
    backward, backward_velocity = network_fields(network, pair.flip(1), *args, **kwargs)
    if forward_velocity is not None:  # one network, so both calls return a velocity or neither does
        velocity = 0.5 * (forward_velocity.float() - backward_velocity.float())
        module = getattr(network, "module", network)
        return module.integrate(velocity), velocity
    with torch.autocast(device_type=pair.device.type, enabled=False):
        return integrate_velocity(0.5 * (forward.float() - backward.float()), integration_steps, "zeros"), None


class ResolutionInferer(Inferer):
    """
    Run a registration network on a resampled copy of its input and return the displacement on the input's grid.

    CPU training and inference of SACB-Net at full brain-MRI resolution are slow; at ``network_scale=0.5`` the network
    sees an 8x smaller volume. The input (B, 2, D, H, W) is resized with trilinear interpolation (align_corners=True;
    with ``antialias`` it is first smoothed by a centred box filter to limit aliasing), the network predicts a
    displacement on that grid and :py:func:`resize_displacement` brings it back, scaling each component by the exact
    per-axis ratio ``(D - 1) / (d - 1)``. With ``network_scale=1`` the network is called directly. The result is float32
    also under ``torch.autocast`` (MONAI engines with ``amp=True``). A diffeomorphic network's velocity is resized
    and integrated on the input grid instead (see :py:meth:`to_input_grid`); :py:meth:`displacement_and_velocity`
    returns it with the field (``exp(-velocity)`` is the inverse), the call itself only the field.

    With ``symmetric``, the network runs both ways and the field is made inverse-consistent
    (:py:func:`symmetric_network_fields`): what ``register --inverse`` runs, so that fixed labels mapped back onto the
    moving scan score as well as the forward.

    With ``isotropic`` (default) and an input whose voxel spacing is known (a MetaTensor, as MONAI engines pass the
    preprocessed pair), the network grid has the same voxel size in mm along every axis:
    :py:func:`isotropic_network_scale` applies ``network_scale`` to the finest axis and upsamples thick-slice axes to
    match (a 1 x 1 x 3 mm pair at 0.5 runs on a 2 mm isotropic grid, not 2 x 2 x 6 mm). Isotropic inputs and plain
    tensors (training, whose pairs are already on the network grid) run at ``network_scale`` as given.

    Args:
        network_scale: resolution of the network grid relative to the input, one number or one per axis, in (0, 1]
            typically (values above 1 upsample).
        antialias: smooth with a centred box of odd width before downsampling (only where an axis shrinks 2x or more).
        isotropic: make the network grid isotropic in mm for anisotropic inputs (see above).
        symmetric: run the network on the pair and on the swapped pair and return the inverse-consistent field of
            both (see above); twice the network's time.
        integration_steps: scaling-and-squaring steps of the symmetric field of a plain network (>= 1).

    Example::

        inferer = ResolutionInferer(network_scale=0.5)
        ddf = inferer(image, network)  # image (B, 2, 160, 192, 160) -> ddf (B, 3, 160, 192, 160)
        ddf, velocity = inferer.displacement_and_velocity(image, network)  # velocity None unless diffeomorphic
    """

    def __init__(
        self,
        network_scale: float | Sequence[float] = 1.0,
        antialias: bool = True,
        isotropic: bool = True,
        symmetric: bool = False,
        integration_steps: int = 7,
    ) -> None:
        super().__init__()
        self.network_scale = _per_axis(network_scale, "network_scale")
        self.antialias = antialias
        for name, value in (("isotropic", isotropic), ("symmetric", symmetric)):
            if not isinstance(value, bool):  # a string "false" from a command line would silently mean True
                raise ValueError(f"{name} must be True or False, got {value!r} (on the command line a Python literal, "
                                 "e.g. False).")
        if int(integration_steps) < 1:
            raise ValueError(f"integration_steps must be >= 1, got {integration_steps}.")
        self.isotropic, self.symmetric, self.integration_steps = isotropic, symmetric, int(integration_steps)

    def scale_for(self, inputs: torch.Tensor) -> tuple[float, float, float]:
        """The network scale per axis for these inputs: ``network_scale``, made isotropic in mm when ``isotropic`` is
        set and the inputs carry their spacing (:py:func:`input_spacing`)."""
        spacing = input_spacing(inputs) if self.isotropic else None
        return self.network_scale if spacing is None else isotropic_network_scale(self.network_scale, spacing)

    def downsample(self, inputs: torch.Tensor, scale: Sequence[float] | None = None) -> torch.Tensor:
        """(B, C, D, H, W) -> (B, C, d, h, w) on the network grid: at ``scale`` per axis when given, else at
        :py:meth:`scale_for` of the inputs. A plain tensor either way: the network needs no metadata, and a
        MetaTensor's affine would no longer describe the resized grid."""
        target = network_grid_size(inputs.shape[2:], self.scale_for(inputs) if scale is None else scale)
        inputs = inputs.as_tensor() if isinstance(inputs, MetaTensor) else inputs
        if target == list(inputs.shape[2:]):
            return inputs
        x = inputs
        if self.antialias:
            # Centred (odd) box smoothing where an axis shrinks >= 2x, then trilinear resizing; the odd width keeps
            # both images unshifted, so the measured displacement is not biased.
            kernel = [2 * (int(s) // (2 * t)) + 1 for s, t in zip(inputs.shape[2:], target)]
            if max(kernel) > 1:
                x = F.avg_pool3d(F.pad(x, _centre_pad(kernel), mode="replicate"), kernel_size=kernel, stride=1)
        return F.interpolate(x, size=target, mode="trilinear", align_corners=True)

    def __call__(self, inputs: torch.Tensor, network: Callable[..., torch.Tensor], *args: Any, **kwargs: Any) -> torch.Tensor:
        """
        Args:
            inputs: (B, 2, D, H, W) image pair, channel 0 moving, 1 fixed.
            network: callable mapping (B, 2, d, h, w) to a (B, 3, d, h, w) displacement in voxels.
            args, kwargs: passed on to ``network``.

        Returns:
            (B, 3, D, H, W) displacement in voxels of the input grid.
        """
        return self.displacement_and_velocity(inputs, network, *args, **kwargs)[0]

    def displacement_and_velocity(
        self, inputs: torch.Tensor, network: Callable[..., Any], *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """
        As the call, and also the velocity of a diffeomorphic network on the input grid (see :py:func:`network_fields`).

        Args:
            inputs: (B, 2, D, H, W) image pair, channel 0 moving, 1 fixed.
            network: callable mapping (B, 2, d, h, w) to a (B, 3, d, h, w) displacement in voxels.
            args, kwargs: passed on to ``network``.

        Returns:
            ddf (B, 3, D, H, W) and velocity (B, 3, D, H, W) with ``ddf = exp(velocity)`` and ``exp(-velocity)`` its
            inverse, both in voxels of the input grid; velocity None for a network that predicts a displacement.
        """
        if inputs.ndim != 5:
            raise ValueError(f"inputs must have shape (B, C, D, H, W), got {tuple(inputs.shape)}.")
        ddf, velocity = self.predict(network, self.downsample(inputs), *args, **kwargs)
        return self.to_input_grid(network, ddf, velocity, inputs.shape[2:])

    def predict(
        self, network: Callable[..., Any], pair: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The fields on the network grid for a (B, 2, d, h, w) pair already there: :py:func:`network_fields`, or
        with ``symmetric`` :py:func:`symmetric_network_fields`."""
        if self.symmetric:
            return symmetric_network_fields(network, pair, self.integration_steps, *args, **kwargs)
        return network_fields(network, pair, *args, **kwargs)

    def to_input_grid(
        self,
        network: Callable[..., Any],
        ddf: torch.Tensor,
        velocity: torch.Tensor | None,
        spatial_shape: Sequence[int],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """
        The network's fields on its own grid -> the fields on the input grid, in float32 (also when the network ran
        under ``torch.autocast``).

        A displacement is resized (:py:func:`resize_displacement`). A diffeomorphic network's field is handled through
        its velocity: the velocity is resized and integrated on the input grid by the network's own ``integrate``, so
        the output is ``exp(v)`` there and ``exp(-v)`` its inverse (resizing ``exp(v)`` instead would not keep it
        invertible by the resized velocity).

        Args:
            network: the network that produced the fields (possibly wrapped in DataParallel/DDP).
            ddf: (B, 3, d, h, w) displacement in voxels of the network grid.
            velocity: (B, 3, d, h, w) the velocity ``ddf`` integrates, or None (see :py:func:`network_fields`).
            spatial_shape: the input grid (D, H, W).

        Returns:
            ddf (B, 3, D, H, W) and velocity (B, 3, D, H, W) or None, in voxels of the input grid.
        """
        if ddf.dtype in (torch.float16, torch.bfloat16):
            ddf = ddf.float()
        if velocity is None:
            return resize_displacement(ddf, spatial_shape), None
        module = getattr(network, "module", network)  # DataParallel / DistributedDataParallel
        with torch.autocast(device_type=ddf.device.type, enabled=False):
            velocity = resize_displacement(velocity.float(), spatial_shape)
            if list(velocity.shape[2:]) == list(ddf.shape[2:]):
                return ddf, velocity  # already exp(velocity) on this grid
            return module.integrate(velocity), velocity


def _centre_pad(kernel: Sequence[int]) -> list[int]:
    """F.pad amounts (last axis first) that keep the size through a stride-1 'valid' pooling with odd ``kernel``."""
    pads: list[int] = []
    for k in reversed(list(kernel)):
        pads += [(k - 1) // 2, (k - 1) // 2]
    return pads
