# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""Inferer that runs a registration network at a reduced resolution and returns a full-resolution displacement field."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from monai.inferers import Inferer

__all__ = ["ResolutionInferer", "network_grid_size", "resize_displacement"]


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
    factors = [(t - 1) / (s - 1) if s > 1 else 1.0 for s, t in zip(source, target)]
    resized = F.interpolate(ddf, size=target, mode="trilinear", align_corners=True)
    return resized * torch.tensor(factors, dtype=ddf.dtype, device=ddf.device).view(1, 3, 1, 1, 1)


class ResolutionInferer(Inferer):
    """
    Run a registration network on a resampled copy of its input and return the displacement on the input's grid.

    CPU training and inference of SACB-Net at full brain-MRI resolution are slow; at ``network_scale=0.5`` the network
    sees an 8x smaller volume. The input (B, 2, D, H, W) is resized with trilinear interpolation (align_corners=True;
    with ``antialias`` it is first smoothed by a centred box filter to limit aliasing), the network predicts a
    displacement on that grid and :py:func:`resize_displacement` brings it back, scaling each component by the exact
    per-axis ratio ``(D - 1) / (d - 1)``. With ``network_scale=1`` the network is called directly. The result is float32
    also under ``torch.autocast`` (MONAI engines with ``amp=True``). A diffeomorphic network's velocity is resized
    and integrated on the input grid instead (see :py:meth:`to_input_grid`); it is kept in :py:attr:`last_velocity`.

    Args:
        network_scale: resolution of the network grid relative to the input, one number or one per axis, in (0, 1]
            typically (values above 1 upsample).
        antialias: smooth with a centred box of odd width before downsampling (only where an axis shrinks 2x or more).

    Example::

        inferer = ResolutionInferer(network_scale=0.5)
        ddf = inferer(image, network)  # image (B, 2, 160, 192, 160) -> ddf (B, 3, 160, 192, 160)
    """

    def __init__(self, network_scale: float | Sequence[float] = 1.0, antialias: bool = True) -> None:
        super().__init__()
        self.network_scale = _per_axis(network_scale, "network_scale")
        self.antialias = antialias
        self.last_velocity: torch.Tensor | None = None

    def downsample(self, inputs: torch.Tensor) -> torch.Tensor:
        """(B, C, D, H, W) -> (B, C, d, h, w) on the network grid."""
        target = network_grid_size(inputs.shape[2:], self.network_scale)
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
        if inputs.ndim != 5:
            raise ValueError(f"inputs must have shape (B, C, D, H, W), got {tuple(inputs.shape)}.")
        ddf = network(self.downsample(inputs), *args, **kwargs)
        return self.to_input_grid(network, ddf, inputs.shape[2:])

    def to_input_grid(self, network: Callable[..., torch.Tensor], ddf: torch.Tensor, spatial_shape: Sequence[int]) -> torch.Tensor:
        """
        The network's displacement on its own grid -> the displacement on the input grid, in float32 (also when the
        network ran under ``torch.autocast``).

        A diffeomorphic network (one with ``diffeomorphic`` set and a ``last_velocity``, see
        :py:class:`scripts.networks.sacb_net.SACBNet`) is handled through its velocity: the velocity is resized
        (:py:func:`resize_displacement`) and integrated on the input grid by the network's own ``integrate``, so the
        output is ``exp(v)`` there and ``exp(-v)`` its inverse; the resized velocity is kept in
        :py:attr:`last_velocity` ((B, 3, D, H, W), voxels of the input grid; None for other networks).

        Args:
            network: the network that produced ``ddf`` (possibly wrapped in DataParallel/DDP).
            ddf: (B, 3, d, h, w) displacement in voxels of the network grid.
            spatial_shape: the input grid (D, H, W).

        Returns:
            (B, 3, D, H, W) displacement in voxels of the input grid.
        """
        if ddf.dtype in (torch.float16, torch.bfloat16):
            ddf = ddf.float()
        module = getattr(network, "module", network)  # DataParallel / DistributedDataParallel
        velocity = getattr(module, "last_velocity", None) if getattr(module, "diffeomorphic", False) else None
        if not isinstance(velocity, torch.Tensor) or velocity.shape != ddf.shape:
            self.last_velocity = None
            return resize_displacement(ddf, spatial_shape)
        with torch.autocast(device_type=ddf.device.type, enabled=False):
            self.last_velocity = resize_displacement(velocity.float(), spatial_shape)
            if list(self.last_velocity.shape[2:]) == list(ddf.shape[2:]):
                return ddf  # already exp(velocity) on this grid
            return module.integrate(self.last_velocity)


def _centre_pad(kernel: Sequence[int]) -> list[int]:
    """F.pad amounts (last axis first) that keep the size through a stride-1 'valid' pooling with odd ``kernel``."""
    pads: list[int] = []
    for k in reversed(list(kernel)):
        pads += [(k - 1) // 2, (k - 1) // 2]
    return pads
