# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""The shipped weights (bundle/models/model.pt): a plain state dict that loads strictly into the configs'
``network_def``, and one forward pass on real brain pairs registers them (Dice up over identity, no folding)."""

from __future__ import annotations

import nibabel as nib
import pytest
import torch
from conftest import BUNDLE_ROOT, SAMPLE_PAIR, SHARED_DATA
from monai.bundle import ConfigParser
from monai.transforms import ScaleIntensityRangePercentiles

from scripts.engines.resolution_inferer import ResolutionInferer
from scripts.layers.jacobian import folding_percentage, jacobian_determinant
from scripts.workflow.metrics import dice_per_label
from scripts.layers.warp import Warp

MODEL = BUNDLE_ROOT / "models" / "model.pt"
LAPIRN = SHARED_DATA / "brain_oasis_lapirn_weaklabels"


def _network(config: str = "inference.json") -> torch.nn.Module:
    parser = ConfigParser()
    parser.read_config(str(BUNDLE_ROOT / "configs" / config))
    network = parser.get_parsed_content("network_def")
    network.load_state_dict(torch.load(MODEL, map_location="cpu", weights_only=True), strict=True)
    return network.eval()


def _read(path, label: bool = False) -> torch.Tensor:
    """(1, 1, D, H, W): labels as int64, images scaled to [0, 1] as the bundle's preprocessing does."""
    volume = torch.as_tensor(nib.load(str(path)).get_fdata(dtype="float32"))[None]
    if label:
        return volume.round().long()[None]
    return ScaleIntensityRangePercentiles(0.5, 99.5, 0.0, 1.0, clip=True)(volume).as_tensor()[None].float()


def _register(moving, fixed, moving_label, fixed_label, label_ids):
    """Plain inference at the bundle's default network_scale; returns (Dice identity, Dice after, % det J <= 0)."""
    scale = ConfigParser.load_config_file(str(BUNDLE_ROOT / "configs" / "inference.json"))["network_scale"]
    with torch.inference_mode():
        ddf = ResolutionInferer(network_scale=scale)(torch.cat([moving, fixed], dim=1), _network())
        warped_label = Warp("nearest")(moving_label.float(), ddf).long()
        folding = float(folding_percentage(jacobian_determinant(ddf)))
    mean = lambda a, b: sum(dice_per_label(a[0], b[0], label_ids)) / len(label_ids)  # noqa: E731
    return mean(moving_label, fixed_label), mean(warped_label, fixed_label), folding


def test_shipped_weights_are_a_small_plain_state_dict_matching_network_def():
    assert MODEL.is_file(), f"{MODEL} is missing: the bundle ships trained weights (see bundle/docs/README.md)."
    assert MODEL.stat().st_size < 25 * 2**20
    state = torch.load(MODEL, map_location="cpu", weights_only=True)
    assert isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values())
    assert all(torch.isfinite(v).all() for v in state.values())
    for config in ("inference.json", "train.json"):
        _network(config)  # strict key and shape matching, same architecture in both configs


def test_one_forward_pass_registers_the_shipped_real_pair():
    """Colin27 -> MNI152 at full size (network at the default half resolution); classes 1-7 (see sample_data)."""
    pair = {k: _read(v, label="label" in k) for k, v in SAMPLE_PAIR.items()}
    before, after, folding = _register(
        pair["moving_image"], pair["fixed_image"], pair["moving_label"], pair["fixed_label"], list(range(1, 8))
    )
    assert folding < 1.0, folding
    assert after > before + 0.01, (before, after)


@pytest.mark.skipif(not LAPIRN.is_dir(), reason="needs ../shared/data (OASIS LapIRN pair)")
def test_one_forward_pass_registers_an_oasis_pair_not_seen_in_training():
    """OASIS LapIRN pair B -> A (validation pair of the training preset, not a training pair): white matter Dice."""
    moving, fixed = _read(LAPIRN / "oasisLAP_B_t1.nii.gz"), _read(LAPIRN / "oasisLAP_A_t1.nii.gz")
    labels = [_read(LAPIRN / f"oasisLAP_{s}_seg.nii.gz", label=True) for s in ("B", "A")]
    before, after, folding = _register(moving, fixed, labels[0], labels[1], [2])
    assert folding < 1.0, folding
    assert after > before + 0.03, (before, after)
