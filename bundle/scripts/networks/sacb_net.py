# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""SACB-Net: coarse-to-fine deformable registration with spatial-awareness convolutions (Cheng et al., CVPR 2025)."""

from __future__ import annotations

from typing import List, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from scripts.layers.sampling import compose_displacements, warp_image
from scripts.layers.velocity_integration import VelocityIntegration
from scripts.networks.conv import ChannelsLastConv3d
from scripts.networks.cross_similarity import CrossSimilarityFlow
from scripts.networks.sacb import SACB, conv_in_lrelu

__all__ = ["SACBNet"]


class _EncoderLevel(nn.Module):
    """Optional 2x average pooling followed by conv layers (conv3x3x3 -> IN -> LeakyReLU each)."""

    def __init__(self, channels: Sequence[int], pool: bool) -> None:
        super().__init__()
        self.pool = nn.AvgPool3d(2) if pool else nn.Identity()
        self.convs = nn.Sequential(*[conv_in_lrelu(cin, cout) for cin, cout in zip(channels[:-1], channels[1:])])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.convs(self.pool(x))


class SACBNet(nn.Module):
    """
    SACB-Net for 3-D deformable image registration, with MONAI's bundle interface.

    A shared 5-level encoder (widths 2c, 4c, 8c, 16c, 16c; 4 average-pooling layers) runs on the moving and the fixed
    image. From the coarsest level (1/16) to 1/2, an SACB block (same weights for both images) refines the fixed
    features and the moving features warped by the current field, a parameter-free cross-similarity head predicts a
    residual flow ``d`` in (-1, 1) voxel, and the field is composed (``U <- U(p + d(p)) + d(p)``), doubled and upsampled.
    At full resolution a small conv head predicts the last residual. The output is the dense displacement field.

    With the defaults the network has 1,105,591 parameters (the paper's 1.11 M).

    Args:
        base_channels: encoder base width c (4 in the paper).
        num_clusters: k-means clusters of the SACB blocks, one per level from the finest (1/2) to the coarsest (1/16);
            an int applies to all four levels. The paper trains with 7.
        kmeans_iterations: cap on the Lloyd iterations of every SACB clustering.
        kmeans_tol: k-means convergence tolerance (summed squared centroid shift).
        diffeomorphic: if True, the decoder builds a stationary velocity field instead of a displacement (our
            extension beyond the paper, whose model is not diffeomorphic): every level adds its residual to the
            velocity (``v <- v + d``, the first-order form of composing ``exp(v)`` with ``exp(d)``), and wherever a
            transform is applied it is the integrated field ``exp(v)`` (scaling and squaring): the moving features
            of the next level are warped by it, and the output is ``exp(v)``. ``forward(image, return_velocity=True)``
            returns the velocity with the field; ``integrate(-velocity)`` is the inverse transform. Same parameters
            and state-dict keys as the plain mode, so the same weights load into both.
        integration_steps: scaling-and-squaring steps in diffeomorphic mode.

    Shapes:
        image (B, 2, D, H, W), channel 0 = moving, 1 = fixed, intensities about [0, 1], any D, H, W >= 1
        (padded internally to a multiple of 16, at least 32, and cropped back)
        -> ddf (B, 3, D, H, W) in voxels of the input grid, channel i = shift along array axis i, such that
        ``warped(p) = moving(p + ddf(p))`` (see :py:class:`scripts.layers.warp.Warp`); float32 also under
        ``torch.autocast`` (k-means and the flow heads run in float32, the convolutions in the autocast dtype).
        With ``return_velocity=True`` (diffeomorphic mode): the tuple (ddf, velocity), both (B, 3, D, H, W) in voxels,
        ``ddf = integrate(velocity)``.
    """

    def __init__(
        self,
        base_channels: int = 4,
        num_clusters: int | Sequence[int] = 7,
        kmeans_iterations: int = 10,
        kmeans_tol: float = 1e-4,
        diffeomorphic: bool = False,
        integration_steps: int = 7,
    ) -> None:
        super().__init__()
        if base_channels < 1:
            raise ValueError(f"base_channels must be >= 1, got {base_channels}.")
        clusters = [int(num_clusters)] * 4 if isinstance(num_clusters, int) else [int(k) for k in num_clusters]
        if len(clusters) != 4 or min(clusters) < 1:
            raise ValueError(f"num_clusters must be a positive int or 4 positive ints (levels 1/2..1/16), got {num_clusters}.")
        c = base_channels
        widths = [2 * c, 4 * c, 8 * c, 16 * c, 16 * c]
        self.levels = len(widths)
        self.size_multiple = 2 ** (self.levels - 1)
        self.encoder = nn.ModuleList(
            [_EncoderLevel([1, c, widths[0], widths[0]], pool=False)]
            + [_EncoderLevel([widths[i - 1], widths[i], widths[i]], pool=True) for i in range(1, self.levels)]
        )
        # Ordered as the decoder visits them, coarsest (1/16) first; num_clusters is given finest first.
        self.sacb = nn.ModuleList(
            [SACB(widths[i], clusters[i - 1], kmeans_iterations, kmeans_tol) for i in range(self.levels - 1, 0, -1)]
        )
        self.similarity_flow = CrossSimilarityFlow()
        self.refine = nn.Sequential(conv_in_lrelu(widths[0], widths[0]), conv_in_lrelu(widths[0], widths[0]))
        self.fuse = nn.Sequential(conv_in_lrelu(2 * widths[0], widths[0]), conv_in_lrelu(widths[0], widths[0]))
        self.flow_out = ChannelsLastConv3d(widths[0], 3, kernel_size=3, padding=1)
        self.diffeomorphic = bool(diffeomorphic)
        self.integrate = VelocityIntegration(integration_steps)

    def _padding(self, spatial: List[int]) -> List[int]:
        """F.pad amounts (last axis first) that bring every axis to a multiple of 16 and at least 32 voxels."""
        pads: List[int] = []
        for size in spatial[::-1]:
            target = max(2 * self.size_multiple, -(-size // self.size_multiple) * self.size_multiple)
            before = (target - size) // 2
            pads += [before, target - size - before]
        return pads

    def _encode(self, volumes: torch.Tensor) -> List[torch.Tensor]:
        """(N, 1, D, H, W) -> the features of the 5 levels, full resolution first."""
        features: List[torch.Tensor] = []
        x = volumes
        for level in self.encoder:
            x = level(x)
            features.append(x)
        return features

    @staticmethod
    def _upsample(flow: torch.Tensor) -> torch.Tensor:
        """Double the resolution and the displacement (trilinear, align_corners=True, as the reference)."""
        return F.interpolate(2.0 * flow, scale_factor=2.0, mode="trilinear", align_corners=True)

    @staticmethod
    def _float32(x: torch.Tensor) -> torch.Tensor:
        """Half-precision (autocast) conv outputs -> float32, so that fields are sampled and composed in float32."""
        return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x

    def forward(
        self, image: torch.Tensor, return_velocity: bool = False
    ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        """
        Args:
            image: (B, 2, D, H, W), channel 0 = moving, 1 = fixed.
            return_velocity: diffeomorphic mode only: also return the stationary velocity the field integrates (what
                an inferer needs to integrate on another grid, or to form the inverse ``integrate(-velocity)``).
                A switch of the call rather than of the network, so the one network serves both kinds of callers.

        Returns:
            (B, 3, D, H, W) displacement field in voxels (in diffeomorphic mode ``integrate(velocity)``); with
            ``return_velocity`` the tuple (displacement, velocity), both (B, 3, D, H, W) in voxels.
        """
        if image.dim() != 5 or image.shape[1] != 2:
            raise ValueError(
                f"expected image of shape (B, 2, D, H, W) with channels [moving, fixed], got {list(image.shape)}."
            )
        if return_velocity and not self.diffeomorphic:
            raise ValueError(
                "return_velocity=True needs a diffeomorphic network (diffeomorphic=True): the plain mode predicts a "
                "displacement, not a velocity."
            )
        # Pairs are registered one at a time: k-means labels are discontinuous in the features, so the last-bit
        # differences of batched convolutions could flip voxels between clusters. This keeps every pair's result
        # identical whether it is run alone or in a batch.
        fields = [self._register(image[b : b + 1]) for b in range(image.shape[0])]
        if not self.diffeomorphic:
            return torch.cat(fields, dim=0)
        ddf = torch.cat([self.integrate(v) for v in fields], dim=0)
        if return_velocity:
            return ddf, torch.cat(fields, dim=0)
        return ddf

    def _register(self, image: torch.Tensor) -> torch.Tensor:
        """(1, 2, D, H, W) -> (1, 3, D, H, W) displacement, or velocity in diffeomorphic mode; see :py:meth:`forward`."""
        spatial = [int(s) for s in image.shape[2:]]
        pads = self._padding(spatial)
        padded = F.pad(image, pads)
        # The shared-weight layers see moving and fixed stacked along the batch when gradients are on (one pass is
        # faster to train), and one after the other otherwise (the same result, as instance norm and k-means are
        # per item, with full-resolution temporaries half as large). Features are popped as they are consumed.
        stacked = torch.is_grad_enabled()
        if stacked:
            both = self._encode(torch.cat([padded[:, 0:1], padded[:, 1:2]], dim=0))
            moving_features = [f[:1] for f in both]
            fixed_features = [f[1:] for f in both]
        else:
            moving_features = self._encode(padded[:, 0:1])
            fixed_features = self._encode(padded[:, 1:2])
        del padded  # the encoders' input (two volumes of the network grid) is not read again

        # field: the displacement so far (plain) or the velocity so far (diffeomorphic); transform: the displacement
        # the next level's moving features are warped with (the field itself, or its integral exp(field)).
        field = torch.zeros(1)
        transform = torch.zeros(1)
        for step, block in enumerate(self.sacb):
            moving, fixed = moving_features.pop(), fixed_features.pop()
            if step > 0:
                moving = warp_image(moving, transform, "bilinear", "zeros")
            if stacked:
                both = block(torch.cat([moving, fixed], dim=0))
                moving, fixed = both[:1], both[1:]
            else:
                moving, fixed = block(moving), block(fixed)
            residual = self.similarity_flow(fixed, moving)
            if step == 0:
                field = residual
            elif self.diffeomorphic:
                field = field + residual
            else:
                field = compose_displacements(field, residual, "zeros")
            field = self._upsample(field)
            transform = self.integrate(field) if self.diffeomorphic else field

        moving = warp_image(moving_features.pop(), transform, "bilinear", "zeros")
        fixed = fixed_features.pop()
        if stacked:
            both = self.refine(torch.cat([fixed, moving], dim=0))
            moving, fixed = both[1:], both[:1]
        else:  # one statement each: the warped moving features are released before the fixed ones are refined
            moving = self.refine(moving)
            fixed = self.refine(fixed)
        # The full-resolution features go into the concatenation and are released with it: named tensors would stay
        # alive through the whole fuse head (16 channels of the largest grid, ~1 GB on a 256 x 256 x 267 CT grid).
        pair = [fixed, moving]
        del fixed, moving
        residual = self._float32(self.flow_out(self.fuse(torch.cat([pair.pop(0), pair.pop(0)], dim=1))))
        field = field + residual if self.diffeomorphic else compose_displacements(field, residual, "zeros")

        depth, height, width = spatial[0], spatial[1], spatial[2]
        return field[:, :, pads[4] : pads[4] + depth, pads[2] : pads[2] + height, pads[0] : pads[0] + width]
