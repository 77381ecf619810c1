"""Shared pytest setup: make ``scripts.<module>`` importable exactly as MONAI bundles expect (bundle root on sys.path)."""

import logging
import os
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
BUNDLE_ROOT = REPO_ROOT / "bundle"
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"

if str(BUNDLE_ROOT) not in sys.path:
    sys.path.insert(0, str(BUNDLE_ROOT))

# Two cores in CI: keep torch from oversubscribing them.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _no_stale_log_streams():
    """In-process workflows configure logging (configs/logging.conf) and ignite binds its own handlers to the
    sys.stdout/stderr of the test that ran first; pytest closes those captures afterwards. Point such handlers at the
    real stderr so a later test's log record is written instead of failing with "--- Logging error ---"."""
    loggers = [logging.getLogger()] + [
        item for item in logging.Logger.manager.loggerDict.values() if isinstance(item, logging.Logger)
    ]
    for item in loggers:
        for handler in item.handlers:
            if isinstance(handler, logging.StreamHandler) and getattr(handler.stream, "closed", False):
                handler.stream = sys.__stderr__  # setStream would flush the closed stream first
    yield


@pytest.fixture(autouse=True)
def _run_from_bundle_root(monkeypatch):
    """Run every test from the bundle root, as ``python -m monai.bundle run`` is run: the configs' ``%configs/...``
    macros (train.json taking network_def, warp and preprocessing from inference.json) are paths relative to it."""
    monkeypatch.chdir(BUNDLE_ROOT)


SAMPLE_DATA = BUNDLE_ROOT / "sample_data"
SAMPLE_PAIR = {
    "moving_image": SAMPLE_DATA / "moving_colin27_t1.nii.gz",
    "fixed_image": SAMPLE_DATA / "fixed_mni152_t1.nii.gz",
    "moving_label": SAMPLE_DATA / "moving_colin27_seg8.nii.gz",
    "fixed_label": SAMPLE_DATA / "fixed_mni152_seg8.nii.gz",
}


def load_sample_pair(spatial_size=(40, 48, 40)):
    """
    The shipped real Colin27 -> MNI152 pair as tensors resized to ``spatial_size`` (trilinear images, nearest labels).

    Returns:
        dict with "moving", "fixed" (1, 1, *spatial_size) float32 scaled to [0, 1] by the 99.5th percentile, and
        "moving_label", "fixed_label" (1, 1, *spatial_size) int64 with classes 0..8.
    """
    import nibabel as nib
    import torch.nn.functional as F

    def read(key):
        return torch.as_tensor(nib.load(str(SAMPLE_PAIR[key])).get_fdata(dtype="float32"))[None, None]

    out = {}
    for key, name in (("moving_image", "moving"), ("fixed_image", "fixed")):
        vol = read(key)
        vol = (vol / torch.quantile(vol[vol > 0], 0.995)).clamp(0, 1)
        out[name] = F.interpolate(vol, size=spatial_size, mode="trilinear", align_corners=False)
    for key, name in (("moving_label", "moving_label"), ("fixed_label", "fixed_label")):
        out[name] = F.interpolate(read(key), size=spatial_size, mode="nearest").long()
    return out


@pytest.fixture(scope="session")
def sample_pair_small():
    """The shipped real pair at 40x48x40 (about 4 mm voxels): fast enough for unit tests, real anatomy."""
    return load_sample_pair((40, 48, 40))


@pytest.fixture(scope="session")
def native_registration(tmp_path_factory):
    """One ``register --inverse`` of the shipped pair at 3 mm moved into its own scanner space
    (``workflow_data.register_native_sample_pair``), shared by the native-pipeline and ANTs tests."""
    from workflow_data import register_native_sample_pair

    return register_native_sample_pair(tmp_path_factory.mktemp("native"))


@pytest.fixture(scope="session")
def moved_pair_registration(tmp_path_factory):
    """One ``register`` (defaults) of the 4 mm pair with the atlas in its own scanner space
    (``ecosystem_utils.register_moved_pair``), the reference of both the MONAI Label and the MONAI Deploy app tests."""
    from ecosystem_utils import register_moved_pair

    return register_moved_pair(tmp_path_factory.mktemp("moved_pair"))
