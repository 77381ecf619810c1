# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""Mixed precision: ``amp`` is a config option of every engine (by default on for CUDA training, off for inference and
on CPU: measured on an H200, docs/benchmarks.md "GPU"); under autocast
k-means, the cross-similarity head, NCC and the Jacobian run in float32, and the network's result stays within
tolerance of float32 (checked on CPU with bfloat16 autocast, on the real pair with the shipped weights)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import BUNDLE_ROOT, load_sample_pair
from monai.bundle import ConfigParser

from scripts.engines import InstanceOptimizationInferer, ResolutionInferer
from scripts.engines.instance_optimization import _grad_scaler
from scripts.io.errors import NonFiniteLossError
from scripts.layers import Warp, jacobian_determinant
from scripts.losses import GradientLoss, LocalNCCLoss
from scripts.networks import CrossSimilarityFlow, SACBNet, kmeans
from scripts.workflow.metrics import dice_per_label

SHIPPED = BUNDLE_ROOT / "models" / "model.pt"
BF16 = dict(device_type="cpu", dtype=torch.bfloat16)


def _parser(*files: str, **overrides) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(BUNDLE_ROOT / "configs" / f) for f in files])
    parser.update(overrides)
    return parser


@pytest.mark.parametrize("files", [("inference.json",),
                                   ("inference.json", "evaluate.json"), ("train.json",),
                                   ("train.json", "multi_gpu_train.json")])
def test_amp_is_a_config_option_of_every_engine(files):
    """Every engine reads ``amp``; the default is on for CUDA training only (inference: float32 was as fast on a GPU);
    an override reaches it (the trainer of a real run: tests/test_new_user.py)."""
    training = "train.json" in files
    engines = ["train::trainer", "validate::evaluator"] if training else ["evaluator"]
    parser = _parser(*files)
    if "multi_gpu_train.json" not in files:  # its device needs LOCAL_RANK (torchrun)
        assert parser.get_parsed_content("amp") is (training and torch.cuda.is_available())
    for engine in engines:
        assert parser[engine]["amp"] == "@amp", engine
    for value in (True, False):
        assert _parser(*files, amp=value, device="$torch.device('cpu')").get_parsed_content("amp") is value


def test_kmeans_runs_in_float32_under_autocast():
    generator = torch.Generator().manual_seed(0)
    points = torch.randn(1, 200_000, 8, generator=generator) * 30 + 100  # cluster sums far above float16's 65,504
    with torch.autocast(device_type="cpu", dtype=torch.float16):
        members = torch.zeros(1, 7, points.shape[1])
        members[:, 0] = 1.0
        assert not torch.isfinite(torch.bmm(members, points)).all()  # what an unguarded Lloyd update would do
        labels, centroids = kmeans(points.half(), 7, max_iterations=5)
    expected_labels, expected_centroids = kmeans(points.half().float(), 7, max_iterations=5)
    assert centroids.dtype == torch.float32 and torch.isfinite(centroids).all()
    assert torch.equal(labels, expected_labels) and torch.equal(centroids, expected_centroids)


def test_cross_similarity_ncc_and_jacobian_are_float32_under_autocast(sample_pair_small):
    moving, fixed = sample_pair_small["moving"], sample_pair_small["fixed"]
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(2, 8, 12, 14, 12, generator=generator)
    head = CrossSimilarityFlow()
    expected_flow = head(features[:1].bfloat16().float(), features[1:].bfloat16().float())
    loss = LocalNCCLoss(9)
    expected_loss = loss(moving, fixed)
    field = torch.randn(1, 3, 10, 12, 10, generator=generator) * 0.3
    with torch.autocast(**BF16):
        flow = head(features[:1].bfloat16(), features[1:].bfloat16())
        value = loss(moving, fixed)
        det = jacobian_determinant(field.bfloat16())
    assert flow.dtype == torch.float32 and torch.equal(flow, expected_flow)
    assert value.dtype == torch.float32 and value.item() == pytest.approx(expected_loss.item(), abs=1e-6)
    assert det.dtype == torch.float32 and torch.equal(det, jacobian_determinant(field.bfloat16().float()))


@pytest.fixture(scope="module")
def shipped_network():
    if not SHIPPED.is_file():
        pytest.skip("no shipped weights (bundle/models/model.pt)")
    net = SACBNet()
    net.load_state_dict(torch.load(SHIPPED, map_location="cpu", weights_only=True), strict=True)
    return net.eval()


def test_network_under_bfloat16_autocast_matches_float32_on_the_real_pair(shipped_network):
    pair = load_sample_pair((48, 56, 48))  # the weights' 2 mm-ish grid, small enough for a unit test
    image = torch.cat([pair["moving"], pair["fixed"]], dim=1)
    with torch.no_grad():
        reference = shipped_network(image)
        with torch.autocast(**BF16):
            mixed = shipped_network(image)
    assert mixed.dtype == torch.float32 and torch.isfinite(mixed).all()
    difference = (mixed - reference).abs()
    assert reference.abs().max() > 1.0  # a real deformation
    assert difference.mean() < 0.05 and torch.quantile(difference.flatten(), 0.99) < 0.3, (
        difference.mean().item(), difference.max().item())
    warp, ids = Warp(mode="nearest"), list(range(1, 8))
    dice = [sum(dice_per_label(warp(pair["moving_label"], ddf)[0], pair["fixed_label"][0], ids)) / len(ids)
            for ddf in (reference, mixed)]
    assert abs(dice[0] - dice[1]) < 0.01, dice


@pytest.mark.xfail(reason="open bug: after some other test modules (tests/test_accuracy_harness.py + test_affine_registration.py), the bfloat16 backward of the grouped conv3d in SACB.modulated_conv returns NaN weight gradients (autograd anomaly mode: ConvolutionBackward0, output 1) on CPU; the instance optimisation now stops with NonFiniteLossError instead of writing a NaN field", raises=(AssertionError, NonFiniteLossError), strict=False)
def test_inferers_return_float32_and_instance_optimisation_steps_under_autocast(shipped_network, sample_pair_small):
    image = torch.cat([sample_pair_small["moving"], sample_pair_small["fixed"]], dim=1)  # 40x48x40
    with torch.no_grad(), torch.autocast(**BF16):
        ddf = ResolutionInferer(network_scale=0.5)(image, shipped_network)
    assert ddf.dtype == torch.float32 and ddf.shape == (1, 3, 40, 48, 40)
    # the shipped weights (a copy): a random-init network can diverge to NaN under bfloat16 depending on its draw
    net = copy.deepcopy(shipped_network)
    inferer = InstanceOptimizationInferer(LocalNCCLoss(5), GradientLoss(), Warp(), iterations=3, learning_rate=1e-3,
                                          network_scale=0.5, log_interval=0)
    with torch.no_grad(), torch.autocast(**BF16):
        history = inferer.optimize(net, inferer.downsample(image))  # the losses, returned explicitly
        ddf = inferer(image, net)  # restarts from the same weights and repeats those steps
    assert ddf.dtype == torch.float32 and torch.isfinite(ddf).all()
    assert len(history) == 3 and all(torch.isfinite(torch.tensor(history)))
    assert history[-1] < history[0]


def test_loss_scaling_only_under_float16_autocast():
    cpu = torch.device("cpu")
    assert not _grad_scaler(cpu).is_enabled()
    with torch.autocast(**BF16):
        assert not _grad_scaler(cpu).is_enabled()  # bfloat16 has float32's range: no scaling
    with torch.autocast(device_type="cpu", dtype=torch.float16):
        assert _grad_scaler(cpu).is_enabled()
