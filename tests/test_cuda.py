# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""CUDA vs CPU (``pytest -m cuda``, run by ``bench/gpu_check.sh``; skipped without a GPU): network, NCC, warp,
k-means, Jacobian, affine stage and instance optimisation agree within tolerance, the AMP paths stay finite and close
to float32, the CLI and a training epoch run on CUDA. The CPU dry run of the GPU check itself is tested here too
(not marked: it runs everywhere)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import BUNDLE_ROOT, REPO_ROOT, load_sample_pair
from monai.losses import LocalNormalizedCrossCorrelationLoss
from workflow_data import SAMPLE_DIR, downsample_volume, run_bundle_workflow, write_small_pair

from scripts.engines import AffineRegistration, InstanceOptimizationInferer, ResolutionInferer
from scripts.layers import Warp, jacobian_determinant
from scripts.losses import GradientLoss, LocalNCCLoss
from scripts.networks import SACBNet, kmeans
from scripts.workflow.metrics import dice_per_label

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
GPU = torch.device("cuda")
SHIPPED = BUNDLE_ROOT / "models" / "model.pt"
FP16 = dict(device_type="cuda", dtype=torch.float16)


def _mean_dice(ddf: torch.Tensor, pair: dict) -> float:
    warped = Warp(mode="nearest")(pair["moving_label"], ddf.float().cpu())
    values = dice_per_label(warped[0], pair["fixed_label"][0], list(range(1, 8)))
    return sum(values) / len(values)


@pytest.fixture(scope="module")
def shipped():
    net = SACBNet()
    if SHIPPED.is_file():
        net.load_state_dict(torch.load(SHIPPED, map_location="cpu", weights_only=True), strict=True)
    return net.eval()


@pytest.fixture(scope="module")
def pair():
    return load_sample_pair((80, 96, 80))  # the shipped pair at about 2 mm, the weights' training grid


# ------------------------------------------------------------------------------------------------ CUDA vs CPU (GPU)
@pytest.mark.cuda
@CUDA
def test_network_on_cuda_matches_cpu_and_amp_stays_close(shipped, pair):
    image = torch.cat([pair["moving"], pair["fixed"]], dim=1)
    gpu_net = SACBNet().to(GPU).eval()
    gpu_net.load_state_dict(shipped.state_dict())
    with torch.no_grad():
        cpu = shipped(image)
        gpu = gpu_net(image.to(GPU))
        with torch.autocast(**FP16):
            mixed = gpu_net(image.to(GPU))
    assert gpu.dtype == mixed.dtype == torch.float32 and torch.isfinite(mixed).all()
    for field, mean_tol, dice_tol in ((gpu, 0.05, 0.01), (mixed, 0.1, 0.02)):
        difference = (field.cpu() - cpu).abs()
        assert difference.mean() < mean_tol, difference.mean().item()
        assert abs(_mean_dice(field, pair) - _mean_dice(cpu, pair)) < dice_tol


@pytest.mark.cuda
@CUDA
def test_ncc_on_cuda_matches_cpu_and_monai(pair):
    moving, fixed = pair["moving"], pair["fixed"]
    loss = LocalNCCLoss(9)
    values, grads = [], []
    for device in ("cpu", "cuda"):
        pred = moving.to(device).clone().requires_grad_(True)
        value = loss(pred, fixed.to(device))
        value.backward()
        values.append(value.item())
        grads.append(pred.grad.cpu())
    reference = LocalNormalizedCrossCorrelationLoss(3, 9, "rectangular")(moving.to(GPU), fixed.to(GPU)).item()
    assert values[1] == pytest.approx(values[0], abs=1e-5) and values[1] == pytest.approx(reference, abs=1e-4)
    torch.testing.assert_close(grads[1], grads[0], atol=1e-7, rtol=1e-3)
    with torch.autocast(**FP16):
        assert loss(moving.to(GPU), fixed.to(GPU)).item() == pytest.approx(values[0], abs=1e-5)


@pytest.mark.cuda
@CUDA
def test_warp_and_jacobian_on_cuda_match_cpu(pair):
    generator = torch.Generator().manual_seed(0)
    ddf = torch.nn.functional.interpolate(torch.randn(1, 3, 5, 6, 5, generator=generator) * 3, size=(80, 96, 80),
                                          mode="trilinear", align_corners=True)
    image_cpu = Warp()(pair["moving"], ddf)
    image_gpu = Warp()(pair["moving"].to(GPU), ddf.to(GPU)).cpu()
    assert (image_gpu - image_cpu).abs().max() < 1e-4
    label_cpu = Warp(mode="nearest")(pair["moving_label"], ddf)
    label_gpu = Warp(mode="nearest")(pair["moving_label"].to(GPU), ddf.to(GPU)).cpu()
    assert (label_gpu == label_cpu).float().mean() > 0.9999  # ties at exactly half a voxel may round apart
    det_cpu, det_gpu = jacobian_determinant(ddf), jacobian_determinant(ddf.to(GPU)).cpu()
    torch.testing.assert_close(det_gpu, det_cpu, atol=1e-5, rtol=1e-5)
    with torch.autocast(**FP16):
        assert jacobian_determinant(ddf.to(GPU).half()).dtype == torch.float32


@pytest.mark.cuda
@CUDA
def test_kmeans_on_cuda_matches_cpu_and_is_float32_under_amp():
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(6, 16, generator=generator) * 4
    points = (centres[torch.randint(0, 6, (300_000,), generator=generator)] +
              torch.randn(300_000, 16, generator=generator))[None] * 20
    labels_cpu, centroids_cpu = kmeans(points, 6)
    labels_gpu, centroids_gpu = kmeans(points.to(GPU), 6)
    assert (labels_gpu.cpu() == labels_cpu).float().mean() > 0.999
    torch.testing.assert_close(centroids_gpu.cpu(), centroids_cpu, atol=1e-2, rtol=1e-3)
    with torch.autocast(**FP16):
        labels_amp, centroids_amp = kmeans(points.to(GPU).half(), 6)  # sums over 3e5 voxels overflow float16
    assert centroids_amp.dtype == torch.float32 and torch.isfinite(centroids_amp).all()
    assert (labels_amp.cpu() == labels_cpu).float().mean() > 0.99


@pytest.mark.cuda
@CUDA
def test_affine_stage_on_cuda_matches_cpu():
    fixed = downsample_volume(SAMPLE_DIR / "fixed_mni152_t1.nii.gz", 3, label=False)
    moving = downsample_volume(SAMPLE_DIR / "moving_colin27_t1.nii.gz", 3, label=False)
    tensors = [torch.as_tensor(np.asarray(v.dataobj))[None, None] for v in (moving, fixed)]
    settings = {"levels_mm": (8.0, 4.0), "iterations": (60, 30), "search_iterations": 10}
    results = []
    for device in ("cpu", "cuda"):
        registration = AffineRegistration(transform="affine", **settings)
        results.append(registration(*(t.to(device) for t in tensors), moving.affine, fixed.affine).cpu())
    data = np.asarray(fixed.dataobj)
    brain = np.argwhere(data > np.percentile(data[data > 0], 10))
    points = np.c_[brain, np.ones(len(brain))] @ fixed.affine.T
    shift = points @ (results[1][0].numpy() - results[0][0].numpy()).T
    assert np.sqrt((shift[:, :3] ** 2).sum(1).mean()) < 0.5  # mm, RMS over the brain


@pytest.mark.cuda
@CUDA
def test_instance_optimisation_on_cuda_matches_cpu_and_steps_under_amp(shipped, pair):
    image = torch.cat([pair["moving"], pair["fixed"]], dim=1)

    def run(device, amp=False):
        net = SACBNet().to(device)
        net.load_state_dict(shipped.state_dict())
        inferer = InstanceOptimizationInferer(LocalNCCLoss(9), GradientLoss(), Warp(), iterations=5,
                                              learning_rate=2e-4, network_scale=0.5, log_interval=0)
        with torch.no_grad(), torch.autocast(**FP16, enabled=amp):
            history = inferer.optimize(net, inferer.downsample(image.to(device)))  # the losses, returned explicitly
            ddf = inferer(image.to(device), net)  # restarts from the same weights and repeats those steps
        return ddf.cpu(), history

    ddf_cpu, history_cpu = run("cpu")
    ddf_gpu, history_gpu = run(GPU)
    assert np.allclose(history_gpu, history_cpu, rtol=2e-2, atol=2e-3), (history_gpu, history_cpu)
    # Not the fields voxel by voxel: Adam's first steps move each weight by about lr * sign(gradient), so rounding
    # decides the weights with near-zero gradients. On the CPU alone, a 1e-6 perturbation of the input moves this
    # field by 0.08 voxel on average (float64 vs float32: 0.07); CUDA's TF32 convolutions differ by more (0.32 on an
    # H200). What must agree is the loss history (above) and the registration it gives.
    assert abs(_mean_dice(ddf_gpu, pair) - _mean_dice(ddf_cpu, pair)) < 0.01
    ddf_amp, history_amp = run(GPU, amp=True)  # float16 autocast with the inferer's loss scaler
    assert ddf_amp.dtype == torch.float32 and torch.isfinite(ddf_amp).all() and np.isfinite(history_amp).all()
    assert history_amp[-1] < history_amp[0] and abs(history_amp[0] - history_cpu[0]) < 1e-2


@pytest.mark.cuda
@CUDA
def test_plain_inferer_and_diffeomorphic_mode_on_cuda(shipped, pair):
    image = torch.cat([pair["moving"], pair["fixed"]], dim=1).to(GPU)
    net = SACBNet(diffeomorphic=True).to(GPU).eval()
    net.load_state_dict(shipped.state_dict())
    inferer = ResolutionInferer(network_scale=1.0)
    with torch.no_grad(), torch.autocast(**FP16):
        ddf = inferer(image, net)
    assert ddf.dtype == torch.float32 and jacobian_determinant(ddf).min() > 0


@pytest.mark.cuda
@CUDA
@pytest.mark.slow
def test_cli_register_and_a_training_epoch_on_cuda(tmp_path):
    data = write_small_pair(tmp_path / "data", factor=3)
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "scripts.cli", "register", "--fixed", data["fixed_image"], "--moving", data["moving_image"],
         "--moving_label", data["moving_label"], "--fixed_label", data["fixed_label"], "--out", str(out),
         "--iterations", "3", "--affine", "none", "--device", "cuda"],
        cwd=BUNDLE_ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert json.loads((out / "metrics.json").read_text())["mean_dice"] > 0.3
    seen = {}

    def record(workflow):
        trainer = workflow.parser.get_parsed_content("train::trainer")
        seen.update(amp=trainer.amp, device=str(next(trainer.network.parameters()).device))

    run_bundle_workflow(["train.json"], workflow_type="train", prepare=record, run_dir=str(tmp_path / "run"),
                        dataset_dir=str(tmp_path / "data"), max_epochs=1, val_interval=1)
    assert seen == {"amp": True, "device": "cuda:0"}  # training's amp defaults to on for CUDA (inference's to off)
    assert (tmp_path / "run" / "model.pt").is_file()


# --------------------------------------------------------------------------------- the GPU check itself (any machine)
def _gpu_check(out, *args, timeout=900):
    return subprocess.run(["bash", str(REPO_ROOT / "bench" / "gpu_check.sh"), str(out), *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CUDA-less path")
def test_gpu_check_without_cuda_writes_a_skipped_report(tmp_path):
    result = _gpu_check(tmp_path / "out")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert report["status"] == "skipped" and "CUDA is not available" in report["reason"]
    assert "Skipped: CUDA is not available" in (tmp_path / "out" / "gpu_check.md").read_text()


@pytest.mark.slow
def test_gpu_check_dry_run_runs_every_step_on_cpu(tmp_path):
    out = tmp_path / "out"
    result = _gpu_check(out, "--dry-run")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["dry_run"] is True and report["environment"]["device"] == "cpu"
    assert report["tests"]["tests"] >= 8 and report["tests"]["failures"] == report["tests"]["errors"] == 0
    rows = {r["case"]: r for r in report["summary"]["rows"]}
    assert set(rows) >= {"sacbnet_infer", "voxelmorph_infer", "sacbnet_train", "voxelmorph_train", "ncc_ours_fwd_bwd",
                         "ncc_monai_fwd_bwd", "warp_ours_image", "warp_monai_image"}
    for row in rows.values():
        assert not row["error"] and row["fp32_s"] > 0 and row["amp_s"] > 0 and row["amp_speedup"] > 0, row
    assert rows["sacbnet_infer"]["reference"] == "voxelmorph_infer" and rows["sacbnet_infer"]["fp32_ratio_vs_reference"]
    assert [(r["network_scale"], r["amp"]) for r in report["io_step"]] == [(1.0, False), (1.0, True), (0.5, False),
                                                                          (0.5, True)]
    assert all(r["finite"] and r["mean_step_s"] > 0 for r in report["io_step"])
    agreement = report["amp_agreement"]
    assert agreement["autocast_dtype"] == "bfloat16" and agreement["finite"] and agreement["output_dtype"] == "torch.float32"
    assert isinstance(report["summary"]["amp_default"]["justified"], bool)
    table = (out / "gpu_check.md").read_text()
    assert "| sacbnet_train |" in table and "sacbnet_io_step" in table and "AMP agreement" in table
