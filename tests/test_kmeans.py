"""k-means: recovers separated groups, deterministic, batched, robust to tiny inputs."""

import pytest
import torch

from scripts.networks.kmeans import kmeans


def _blobs(generator, centres, per_blob=50, spread=0.05):
    points = [c + spread * torch.randn(per_blob, c.numel(), generator=generator) for c in centres]
    return torch.cat(points)[torch.randperm(per_blob * len(centres), generator=generator)]


def test_recovers_well_separated_groups():
    generator = torch.Generator().manual_seed(0)
    centres = [torch.tensor([0.0, 0.0]), torch.tensor([3.0, 0.0]), torch.tensor([0.0, 3.0])]
    points = _blobs(generator, centres)[None]
    labels, centroids = kmeans(points, 3, max_iterations=20)
    assert centroids.shape == (1, 3, 2)
    # Each true centre has exactly one centroid close to it, and each group gets one label.
    distances = torch.cdist(torch.stack(centres)[None], centroids)[0]
    assert (distances.min(dim=1).values < 0.1).all()
    assert torch.unique(distances.argmin(dim=1)).numel() == 3
    nearest_true = torch.cdist(points[0], torch.stack(centres)).argmin(dim=1)
    for group in range(3):
        assert torch.unique(labels[0][nearest_true == group]).numel() == 1


def test_deterministic_and_batch_items_independent():
    generator = torch.Generator().manual_seed(1)
    a = torch.randn(1, 500, 4, generator=generator)
    b = torch.randn(1, 500, 4, generator=generator) * 2 + 1
    labels_ab, centroids_ab = kmeans(torch.cat([a, b]), 5)
    labels_a, centroids_a = kmeans(a, 5)
    labels_b, centroids_b = kmeans(b, 5)
    assert torch.equal(labels_ab[0], labels_a[0]) and torch.equal(labels_ab[1], labels_b[0])
    assert torch.allclose(centroids_ab[1], centroids_b[0], atol=1e-6)
    again = kmeans(torch.cat([a, b]), 5)
    assert torch.equal(again[0], labels_ab) and torch.equal(again[1], centroids_ab)


def test_more_clusters_than_points_and_constant_input():
    labels, centroids = kmeans(torch.randn(2, 3, 4), 7)
    assert centroids.shape == (2, 3, 4) and labels.shape == (2, 3)
    labels, centroids = kmeans(torch.zeros(1, 100, 3), 4)  # identical points: no NaN, all in one cluster
    assert torch.isfinite(centroids).all() and torch.unique(labels).numel() == 1


def test_iteration_cap_and_no_gradient():
    points = torch.randn(1, 200, 3, requires_grad=True)
    labels, centroids = kmeans(points, 4, max_iterations=0)
    assert not centroids.requires_grad
    # Zero iterations: centroids are the initial seeds, i.e. actual data points.
    assert (torch.cdist(centroids[0], points[0].detach()).min(dim=1).values < 1e-5).all()


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"\(B, N, C\)"):
        kmeans(torch.randn(10, 3), 2)
    with pytest.raises(ValueError, match="num_clusters"):
        kmeans(torch.randn(1, 10, 3), 0)
