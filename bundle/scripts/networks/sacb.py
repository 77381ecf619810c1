# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""Spatial-Awareness Convolution Block (SACB): a 3-D convolution whose kernel adapts to feature clusters."""

from __future__ import annotations

import math
from typing import Tuple

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from torch import nn

from scripts.networks.conv import ChannelsLastConv3d
from scripts.networks.kmeans import kmeans

__all__ = ["SACB", "conv_in_lrelu"]


def conv_in_lrelu(in_channels: int, out_channels: int, negative_slope: float = 0.1) -> Convolution:
    """
    3x3x3 convolution (with bias) -> InstanceNorm3d -> LeakyReLU, the unit every SACB-Net conv layer uses.

    MONAI's ``Convolution`` block with its convolution swapped for :py:class:`scripts.networks.conv.ChannelsLastConv3d` (same
    parameters and state-dict keys, faster on CPU).
    """
    block = Convolution(
        spatial_dims=3,
        in_channels=in_channels,
        out_channels=out_channels,
        kernel_size=3,
        act=("leakyrelu", {"negative_slope": negative_slope, "inplace": True}),
        norm="instance",
        bias=True,
    )
    block.conv = ChannelsLastConv3d(in_channels, out_channels, kernel_size=3, padding=1, bias=True)
    return block


class SACB(nn.Module):
    """
    Spatial-Awareness Convolution Block of SACB-Net (Cheng et al., CVPR 2025).

    The block projects its input with a conv layer, groups the voxels by k-means on their 3x3x3 patch-mean feature,
    and convolves each group with its own kernel: one shared learnable 3x3x3 kernel whose 27 taps are scaled by gains
    predicted from the cluster centroid, plus a bias predicted from the centroid. The result goes through LeakyReLU
    and is added to the block input::

        z = proj_in(x);  labels, centroids = kmeans(boxmean_3x3x3(z))
        out = x + LeakyReLU( sum_i [labels == i] * (conv(z, W * sigmoid(mlp_w(c_i))) + mlp_b(c_i)) )

    Clustering runs per batch item, without gradient and with a deterministic initialisation; the kernel and bias
    MLPs see centroid values (not cluster ids), so ``num_clusters`` may change between training and inference.

    Args:
        channels: feature channels C (input = output).
        num_clusters: k, the number of voxel clusters (and kernels).
        kmeans_iterations: cap on Lloyd iterations.
        kmeans_tol: convergence tolerance on the summed squared centroid shift.
        kernel_hidden: width of the tap-gain MLP (128 in the paper).
        bias_hidden: width of the bias MLP (64 in the paper).
        negative_slope: LeakyReLU slope (0.1 in the paper).

    Shapes:
        input (B, C, D, H, W) -> output (B, C, D, H, W).
    """

    def __init__(
        self,
        channels: int,
        num_clusters: int = 7,
        kmeans_iterations: int = 10,
        kmeans_tol: float = 1e-4,
        kernel_hidden: int = 128,
        bias_hidden: int = 64,
        negative_slope: float = 0.1,
    ) -> None:
        super().__init__()
        if channels < 1:
            raise ValueError(f"channels must be >= 1, got {channels}.")
        if num_clusters < 1:
            raise ValueError(f"num_clusters must be >= 1, got {num_clusters}.")
        if kmeans_iterations < 0:
            raise ValueError(f"kmeans_iterations must be >= 0, got {kmeans_iterations}.")
        self.kernel_size = 3
        taps = self.kernel_size**3
        self.channels = channels
        self.num_clusters = num_clusters
        self.kmeans_iterations = kmeans_iterations
        self.kmeans_tol = kmeans_tol
        self.proj_in = conv_in_lrelu(channels, channels, negative_slope)
        self.weight = nn.Parameter(torch.empty(channels, channels, taps))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        self.kernel_mlp = nn.Sequential(
            nn.Linear(channels, kernel_hidden),
            nn.ReLU(),
            nn.Linear(kernel_hidden, kernel_hidden),
            nn.ReLU(),
            nn.Linear(kernel_hidden, taps),
        )
        self.bias_mlp = nn.Sequential(
            nn.Linear(channels, bias_hidden),
            nn.ReLU(),
            nn.Linear(bias_hidden, bias_hidden),
            nn.ReLU(),
            nn.Linear(bias_hidden, channels),
        )
        self.act = nn.LeakyReLU(negative_slope)

    def cluster(self, features: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """
        Cluster voxels on their 3x3x3 patch mean (zeros counted at the border, as an unfolded zero-padded patch).

        Args:
            features: (B, C, D, H, W) projected features.

        Returns:
            labels (B, D*H*W) and centroids (B, K, C).
        """
        # Pad explicitly: avg_pool3d rejects inputs smaller than its kernel even when padded.
        descriptor = F.avg_pool3d(F.pad(features, (1, 1, 1, 1, 1, 1)), kernel_size=3, stride=1)
        points = descriptor.flatten(2).transpose(1, 2)
        return kmeans(points, self.num_clusters, self.kmeans_iterations, self.kmeans_tol)

    def modulated_conv(self, features: torch.Tensor, labels: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
        """
        Convolve each cluster's voxels with the cluster's modulated kernel and add its bias.

        Args:
            features: (B, C, D, H, W).
            labels: (B, D*H*W) cluster index per voxel.
            centroids: (B, K, C).

        Returns:
            (B, C, D, H, W) pre-activation output.
        """
        batch, channels = features.shape[0], features.shape[1]
        spatial = features.shape[2:]
        gains = torch.sigmoid(self.kernel_mlp(centroids))  # (B, K, 27), one gain per tap shared by all channels
        biases = self.bias_mlp(centroids)  # (B, K, C)
        # Batch items have different kernels: fold the batch into channel groups and run one grouped conv per cluster.
        grouped = features.reshape(1, batch * channels, spatial[0], spatial[1], spatial[2])
        out = torch.zeros_like(features)
        for i in range(centroids.shape[1]):
            kernel = self.weight.unsqueeze(0) * gains[:, i].reshape(batch, 1, 1, -1)
            kernel = kernel.reshape(batch * channels, channels, self.kernel_size, self.kernel_size, self.kernel_size)
            response = F.conv3d(grouped, kernel, padding=1, groups=batch).reshape(features.shape)
            response = response + biases[:, i].reshape(batch, channels, 1, 1, 1)
            mask = (labels == i).reshape(batch, 1, spatial[0], spatial[1], spatial[2])
            out = torch.where(mask, response, out)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x: (B, C, D, H, W) features.

        Returns:
            (B, C, D, H, W) features, ``x + LeakyReLU(SAC(proj_in(x)))``.
        """
        if x.dim() != 5 or x.shape[1] != self.channels:
            raise ValueError(f"expected input (B, {self.channels}, D, H, W), got shape {list(x.shape)}.")
        z = self.proj_in(x)
        labels, centroids = self.cluster(z)
        return self.act(self.modulated_conv(z, labels, centroids)) + x
