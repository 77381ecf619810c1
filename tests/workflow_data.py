"""The shipped real Colin27 -> MNI152 pair at reduced size, for the workflow tests (bundle runs in seconds on CPU)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

from conftest import SAMPLE_DATA as SAMPLE_DIR
from conftest import SAMPLE_PAIR

PAIR_FILES = {key: path.name for key, path in SAMPLE_PAIR.items()}
#: run overrides of configs/inference.json for the network's forward pass alone (no affine stage, no refinement): what
#: the tests of the data path, the cohort machinery and the error handling run, in seconds
PLAIN_INFERENCE = {"affine_transform": "none", "refine_iterations": 0}
#: the same as ``python -m monai.bundle run`` arguments
PLAIN_INFERENCE_ARGS = [f"--{key}={value}" for key, value in PLAIN_INFERENCE.items()]


def downsample_volume(path: Path, factor: int, label: bool) -> nib.Nifti1Image:
    """Block-average an image (or take the centre voxel of each block of a label map) by an integer factor.

    Both keep the same voxel centres (the centre of each factor^3 block), so image and label stay aligned, and the
    affine is scaled and shifted to those centres.
    """
    image = nib.load(str(path))
    data = np.asarray(image.dataobj)
    size = [s // factor * factor for s in data.shape]
    data = data[: size[0], : size[1], : size[2]]
    if label:
        c = factor // 2
        small = data[c::factor, c::factor, c::factor].astype(np.uint8)
    else:
        volume = torch.as_tensor(data.astype(np.float32))[None, None]
        small = F.avg_pool3d(volume, factor, factor)[0, 0].numpy().astype(np.float32)
    affine = image.affine.copy()
    affine[:3, 3] = image.affine[:3, :3] @ np.full(3, (factor - 1) / 2.0) + image.affine[:3, 3]
    affine[:3, :3] = image.affine[:3, :3] * factor
    return nib.Nifti1Image(small, affine)


def write_small_pair(folder: Path, factor: int = 3) -> dict[str, str]:
    """Write the shipped pair downsampled by ``factor`` (3: 53x64x53 voxels of 3 mm) into ``folder``; returns paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for key, name in PAIR_FILES.items():
        target = folder / name
        nib.save(downsample_volume(SAMPLE_DIR / name, factor, label="label" in key), str(target))
        paths[key] = str(target)
    return paths


def run_bundle_workflow(config_files: list[str], workflow_type: str = "infer", prepare=None, **overrides):
    """Run bundle configs (paths relative to ``bundle/configs``) in-process through ``monai.bundle.ConfigWorkflow``,
    as ``python -m monai.bundle run`` does; ``prepare(workflow)`` may adjust parsed objects between initialize and run.
    Returns the workflow (finalized)."""
    from monai.bundle import ConfigWorkflow

    bundle = SAMPLE_DIR.parent
    workflow = ConfigWorkflow(
        config_file=[str(bundle / "configs" / f) for f in config_files],
        meta_file=str(bundle / "configs" / "metadata.json"),
        logging_file=str(bundle / "configs" / "logging.conf"),
        workflow_type=workflow_type,
        **{"bundle_root": str(bundle), **overrides},
    )
    workflow.initialize()
    if prepare is not None:
        prepare(workflow)
    workflow.run()
    workflow.finalize()
    return workflow


NATIVE_ANGLE = np.deg2rad(10.0)
#: fixed world point -> moving world point of the "native" sample pair: the moving header moved by it (10 degrees about
#: z and about 1 cm), so the moving scan lies in its own scanner space and the true world transform is known
NATIVE_TRUE_T = np.array(
    [
        [np.cos(NATIVE_ANGLE), -np.sin(NATIVE_ANGLE), 0, 8.0],
        [np.sin(NATIVE_ANGLE), np.cos(NATIVE_ANGLE), 0, -5.0],
        [0, 0, 1, 3.0],
        [0, 0, 0, 1],
    ]
)


def register_native_sample_pair(root: Path) -> dict:
    """The shipped pair at 3 mm with the moving header moved by :data:`NATIVE_TRUE_T`, registered by ``register``'s
    default pipeline (affine stage, one forward pass, refinement) with ``--inverse``.

    Returns:
        ``{"pair": paths of the moved pair, "aligned": the unmoved moving image/label, "out": output folder, "root"}``.
    """
    from scripts.cli import register

    root = Path(root)
    pair = write_small_pair(root / "data", factor=3)
    aligned = {k: str(root / "data" / f"aligned_{k}.nii.gz") for k in ("moving_image", "moving_label")}
    for key in ("moving_image", "moving_label"):
        image = nib.load(pair[key])
        nib.save(image, aligned[key])  # the original, aligned moving scan (the reference for the recovery check)
        nib.save(nib.Nifti1Image(np.asanyarray(image.dataobj), NATIVE_TRUE_T @ image.affine), pair[key])
    out = root / "out"
    register(fixed=pair["fixed_image"], moving=pair["moving_image"], out=str(out), moving_label=pair["moving_label"],
             fixed_label=pair["fixed_label"], iterations=0, inverse=True)
    return {"pair": pair, "aligned": aligned, "out": out, "root": root}
