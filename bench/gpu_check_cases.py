# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""
The GPU check's own cases (``bench/gpu_check.py`` runs them beside ``bench/benchmark.py``'s):

- ``io_step``: one instance-optimisation step (``InstanceOptimizationInferer.optimize``: forward, LNCC + Grad, backward,
  Adam) of the shipped weights on the real pair, time per step and peak GPU memory, with and without autocast;
- ``amp_agreement``: plain inference of the shipped weights on the real pair in float32 and under autocast: how far
  the fields and the Dice of the warped labels differ (the figure that decides whether ``amp`` may default to on).

Autocast is float16 on CUDA (MONAI's ``amp=True``) and bfloat16 on CPU (the dry run).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F

BUNDLE_ROOT = Path(__file__).resolve().parents[1] / "bundle"
SAMPLE = BUNDLE_ROOT / "sample_data"
PAIR_FILES = ("moving_colin27_t1.nii.gz", "fixed_mni152_t1.nii.gz", "moving_colin27_seg8.nii.gz", "fixed_mni152_seg8.nii.gz")
DICE_CLASSES = list(range(1, 8))  # the primary classes of the shipped pair (see sample_data/README.md)

__all__ = ["real_pair", "shipped_network", "io_step", "amp_agreement"]


def _autocast(device: torch.device, enabled: bool):
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=enabled)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def real_pair(size, device: torch.device) -> dict[str, torch.Tensor]:
    """The shipped pair resized to ``size``: images (1, 1, *size) in [0, 1] (99.5th percentile), labels nearest."""
    import nibabel as nib

    out = {}
    for name, key in zip(PAIR_FILES, ("moving", "fixed", "moving_label", "fixed_label")):
        volume = torch.as_tensor(nib.load(str(SAMPLE / name)).get_fdata(dtype="float32"))[None, None]
        if "label" in key:
            out[key] = F.interpolate(volume, size=tuple(size), mode="nearest").to(device)
        else:
            volume = (volume / torch.quantile(volume[volume > 0], 0.995)).clamp(0, 1)
            out[key] = F.interpolate(volume, size=tuple(size), mode="trilinear", align_corners=False).to(device)
    return out


def shipped_network(device: torch.device):
    """``network_def`` of inference.json with ``models/model.pt`` (its initialisation when the file is missing)."""
    from scripts.networks import SACBNet

    torch.manual_seed(0)
    net = SACBNet()
    weights = BUNDLE_ROOT / "models" / "model.pt"
    if weights.is_file():
        net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True), strict=True)
    return net.to(device), weights.is_file()


def io_step(device: torch.device, size, amp: bool, network_scale: float, repeats: int, warmup: int) -> dict:
    """Time per instance-optimisation step (the bundle's own inferer code, its loss scaler included)."""
    from scripts.engines import InstanceOptimizationInferer
    from scripts.layers import Warp
    from scripts.losses import GradientLoss, LocalNCCLoss

    net, trained = shipped_network(device)
    pair = real_pair(size, device)
    image = torch.cat([pair["moving"], pair["fixed"]], dim=1)
    inferer = InstanceOptimizationInferer(LocalNCCLoss(9), GradientLoss(), Warp(), iterations=max(warmup, 1),
                                          learning_rate=2e-4, network_scale=network_scale, log_interval=0)
    small = inferer.downsample(image)
    with _autocast(device, amp):
        inferer.optimize(net, small)  # warm-up (also records the starting weights)
        _sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        inferer.iterations = repeats
        start = time.perf_counter()
        history = inferer.optimize(net, small)
        _sync(device)
        seconds = (time.perf_counter() - start) / repeats
    result = {"case": "sacbnet_io_step", "size": list(size), "network_grid": list(small.shape[2:]),
              "network_scale": network_scale, "amp": amp, "mean_step_s": seconds, "steps": repeats,
              "loss_first": history[0], "loss_last": history[-1], "trained_weights": trained,
              "finite": all(torch.isfinite(torch.tensor(history)).tolist())}
    if device.type == "cuda":
        result["peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return result


def amp_agreement(device: torch.device, size, network_scale: float = 1.0) -> dict:
    """Plain inference in float32 vs under autocast on the real pair: field differences and Dice (classes 1-7)."""
    from scripts.engines import ResolutionInferer
    from scripts.layers import Warp, jacobian_determinant
    from scripts.workflow.metrics import dice_per_label

    net, trained = shipped_network(device)
    net.eval()
    pair = real_pair(size, device)
    image = torch.cat([pair["moving"], pair["fixed"]], dim=1)
    inferer, warp = ResolutionInferer(network_scale=network_scale), Warp(mode="nearest")
    fields, seconds = {}, {}
    for amp in (False, True, False, True):  # the second round is timed (the first warms up)
        with torch.no_grad(), _autocast(device, amp):
            _sync(device)
            start = time.perf_counter()
            fields[amp] = inferer(image, net)
            _sync(device)
            seconds[amp] = time.perf_counter() - start
    difference = (fields[True] - fields[False]).abs().flatten().float()

    def dice(ddf):
        warped = warp(pair["moving_label"].cpu(), ddf.float().cpu())
        values = dice_per_label(warped[0], pair["fixed_label"][0].cpu(), DICE_CLASSES)
        return sum(values) / len(values)

    dice_fp32, dice_amp = dice(fields[False]), dice(fields[True])
    return {
        "case": "amp_agreement", "size": list(size), "network_scale": network_scale, "trained_weights": trained,
        "autocast_dtype": "float16" if device.type == "cuda" else "bfloat16",
        "output_dtype": str(fields[True].dtype), "finite": bool(torch.isfinite(fields[True]).all()),
        "ddf_mean_abs_diff": float(difference.mean()), "ddf_p99_abs_diff": float(torch.quantile(difference[::7], 0.99)),
        "ddf_max_abs_diff": float(difference.max()), "dice_fp32": dice_fp32, "dice_amp": dice_amp,
        "dice_abs_diff": abs(dice_fp32 - dice_amp),
        "min_det_j_amp": float(jacobian_determinant(fields[True]).min()),
        "infer_s_fp32": seconds[False], "infer_s_amp": seconds[True],
    }
