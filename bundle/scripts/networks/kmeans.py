# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""Batched, deterministic k-means used by SACB to group voxels with similar local features."""

from __future__ import annotations

from typing import Tuple

import torch

__all__ = ["kmeans", "maximin_init"]


def _squared_distances(points: torch.Tensor, squared_norms: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """(B, N, C) points with their (B, N, 1) squared norms and (B, K, C) centroids -> (B, N, K) squared distances."""
    cross = torch.bmm(points, centroids.transpose(1, 2))
    return (squared_norms - 2.0 * cross + (centroids * centroids).sum(-1).unsqueeze(1)).clamp_min(0.0)


def maximin_init(points: torch.Tensor, num_clusters: int) -> torch.Tensor:
    """
    Deterministic farthest-point initialisation.

    The first centroid is the point nearest to the mean of all points; each next one is the point farthest from the
    centroids chosen so far. Unlike a random draw of voxels this needs no seed, gives the same result for the same
    input on every run and device, and never starts two clusters on the same feature vector when distinct ones exist.

    Args:
        points: (B, N, C) feature vectors.
        num_clusters: number of centroids K (K <= N).

    Returns:
        (B, K, C) initial centroids.
    """
    batch = points.shape[0]
    batch_index = torch.arange(batch, device=points.device)
    squared_norms = (points * points).sum(-1, keepdim=True)
    mean = points.mean(dim=1, keepdim=True)
    first = _squared_distances(points, squared_norms, mean).squeeze(-1).argmin(dim=1)
    chosen = [points[batch_index, first]]
    nearest = _squared_distances(points, squared_norms, chosen[0].unsqueeze(1)).squeeze(-1)
    for _ in range(1, num_clusters):
        farthest = nearest.argmax(dim=1)
        centroid = points[batch_index, farthest]
        chosen.append(centroid)
        distance = _squared_distances(points, squared_norms, centroid.unsqueeze(1)).squeeze(-1)
        nearest = torch.minimum(nearest, distance)
    return torch.stack(chosen, dim=1)


def kmeans(
    points: torch.Tensor, num_clusters: int, max_iterations: int = 10, tol: float = 1e-4
) -> Tuple[torch.Tensor, torch.Tensor]:
    """
    Lloyd's k-means on every batch item independently, without gradient.

    Args:
        points: (B, N, C) feature vectors (one row per voxel).
        num_clusters: requested number of clusters; clamped to N when the volume has fewer voxels.
        max_iterations: cap on Lloyd updates (SACB-Net's reference runs to convergence, which is slow at fine levels).
        tol: stop once the summed squared centroid shift of every batch item is at most ``tol``.

    Returns:
        labels (B, N) int64 cluster index per point, and centroids (B, K, C) with K = min(num_clusters, N), float32
        for half-precision points (the clustering always runs in at least float32, also under ``torch.autocast``).
        A cluster that loses all its points keeps its previous centroid.
    """
    if points.dim() != 3:
        raise ValueError(f"points must be (B, N, C), got shape {list(points.shape)}.")
    if num_clusters < 1:
        raise ValueError(f"num_clusters must be >= 1, got {num_clusters}.")
    if max_iterations < 0:
        raise ValueError(f"max_iterations must be >= 0, got {max_iterations}.")
    if torch.jit.is_scripting():
        return _kmeans(points, num_clusters, max_iterations, tol)
    return _kmeans_without_autocast(points, num_clusters, max_iterations, tol)


@torch.jit.unused
def _kmeans_without_autocast(
    points: torch.Tensor, num_clusters: int, max_iterations: int, tol: float
) -> Tuple[torch.Tensor, torch.Tensor]:
    """:py:func:`_kmeans` with autocast switched off: under mixed precision ``bmm`` would run in float16, where the
    cluster sums over ~10^6 voxels overflow (65,504) and distances lose the digits that decide the assignments."""
    with torch.autocast(device_type=points.device.type, enabled=False):
        return _kmeans(points, num_clusters, max_iterations, tol)


def _kmeans(points: torch.Tensor, num_clusters: int, max_iterations: int, tol: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """See :py:func:`kmeans`; half-precision points are clustered in float32."""
    points = points.detach()
    if points.dtype in (torch.float16, torch.bfloat16):
        points = points.float()
    # Items run one after another so that each item's result is bit-identical to clustering it alone (batched
    # matrix products round differently, and k-means labels flip on last-bit differences near cluster borders).
    k = min(num_clusters, points.shape[1])
    results = [_lloyd(points[b : b + 1], k, max_iterations, tol) for b in range(points.shape[0])]
    labels = torch.cat([r[0] for r in results], dim=0)
    centroids = torch.cat([r[1] for r in results], dim=0)
    return labels, centroids


def _assign(points: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Nearest centroid per point. |x|^2 is the same for every centroid, so argmin of |c|^2 - 2 x.c suffices."""
    scores = (centroids * centroids).sum(-1).unsqueeze(1) - 2.0 * torch.bmm(points, centroids.transpose(1, 2))
    return scores.argmin(dim=-1)


def _lloyd(points: torch.Tensor, k: int, max_iterations: int, tol: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Lloyd iterations for (B, N, C) points from the maximin seeds; see :py:func:`kmeans`."""
    points = points.contiguous()
    batch, count = points.shape[0], points.shape[1]
    centroids = maximin_init(points, k)
    labels = _assign(points, centroids)
    for _ in range(max_iterations):
        # Cluster sums and sizes as one (K x N) @ (N x C) product: much faster than scatter_add on CPU.
        members = torch.zeros(batch, k, count, dtype=points.dtype, device=points.device)
        members.scatter_(1, labels.unsqueeze(1), 1.0)  # (B, K, N) one-hot membership
        sums = torch.bmm(members, points)
        sizes = members.sum(dim=-1, keepdim=True)
        updated = torch.where(sizes > 0, sums / sizes.clamp_min(1.0), centroids)
        shift = (updated - centroids).pow(2).sum(dim=(1, 2)).max()
        centroids = updated
        labels = _assign(points, centroids)
        if bool(shift <= tol):
            break
    return labels, centroids
