"""SACB block: equals a per-voxel reference, reduces to one modulated conv for k = 1, gradients where expected."""

import torch
import torch.nn.functional as F

from scripts.networks.sacb import SACB


def _reference_modulated_conv(block, z, labels, centroids):
    """Naive SACB: unfold 3x3x3 zero-padded patches and apply each voxel's own cluster kernel and bias."""
    batch, channels = z.shape[:2]
    patches = F.pad(z, (1, 1, 1, 1, 1, 1)).unfold(2, 3, 1).unfold(3, 3, 1).unfold(4, 3, 1)
    patches = patches.reshape(batch, channels, -1, 27)  # (B, C_in, V, 27 taps)
    gains = torch.sigmoid(block.kernel_mlp(centroids))  # (B, K, 27)
    biases = block.bias_mlp(centroids)  # (B, K, C)
    out = torch.empty(batch, channels, patches.shape[2])
    for b in range(batch):
        kernels = block.weight[None] * gains[b][:, None, None, :]  # (K, C_out, C_in, 27)
        per_voxel = kernels[labels[b]]  # (V, C_out, C_in, 27)
        out[b] = torch.einsum("voct,cvt->ov", per_voxel, patches[b]) + biases[b][labels[b]].T
    return out.reshape(z.shape)


def test_modulated_conv_equals_per_voxel_reference():
    block = SACB(channels=6, num_clusters=3)
    x = torch.randn(2, 6, 6, 7, 5)
    z = block.proj_in(x)
    labels, centroids = block.cluster(z)
    assert torch.unique(labels).numel() == 3  # every cluster in use, so every kernel is checked
    ours = block.modulated_conv(z, labels, centroids)
    assert torch.allclose(ours, _reference_modulated_conv(block, z, labels, centroids), atol=1e-5)


def test_single_cluster_is_one_modulated_convolution():
    block = SACB(channels=4, num_clusters=1)
    x = torch.randn(1, 4, 8, 8, 8)
    z = block.proj_in(x)
    centroid = F.avg_pool3d(F.pad(z, (1,) * 6), 3, stride=1).mean(dim=(2, 3, 4))  # (1, C): mean of all descriptors
    gains = torch.sigmoid(block.kernel_mlp(centroid))[0]
    kernel = (block.weight * gains).reshape(4, 4, 3, 3, 3)
    expected = F.leaky_relu(F.conv3d(z, kernel, block.bias_mlp(centroid)[0], padding=1), 0.1) + x
    assert torch.allclose(block(x), expected, atol=1e-5)


def test_gradients_reach_kernel_mlps_and_projection_not_centroids():
    block = SACB(channels=4, num_clusters=3)
    x = torch.randn(2, 4, 6, 6, 6, requires_grad=True)
    block(x).square().mean().backward()
    for name, param in block.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert x.grad is not None
    labels, centroids = block.cluster(block.proj_in(x))
    assert not centroids.requires_grad


def test_batch_items_clustered_and_convolved_independently():
    block = SACB(channels=4, num_clusters=4)
    z = block.proj_in(torch.randn(3, 4, 6, 7, 8))
    labels, centroids = block.cluster(z)
    together = block.modulated_conv(z, labels, centroids)
    for i in range(3):
        labels_i, centroids_i = block.cluster(z[i : i + 1])
        assert torch.equal(labels_i[0], labels[i])
        alone = block.modulated_conv(z[i : i + 1], labels_i, centroids_i)
        assert torch.allclose(alone[0], together[i], atol=1e-5)
