"""Small real test inputs for the reliability tests: the shipped Colin27 -> MNI152 pair, subsampled, written to tmp."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import nibabel as nib
import numpy as np

from conftest import SAMPLE_DATA as SAMPLE_DIR
from conftest import SAMPLE_PAIR

SAMPLE_FILES = {key: path.name for key, path in SAMPLE_PAIR.items()}


@lru_cache(maxsize=4)
def _full_resolution(key: str) -> tuple[np.ndarray, np.ndarray]:
    image = nib.load(str(SAMPLE_DIR / SAMPLE_FILES[key]))
    return np.asanyarray(image.dataobj), image.affine


def load_sample(key: str, factor: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """A shipped volume subsampled by ``factor`` (every factor-th voxel: real values, labels stay integer) and its
    correctly adjusted affine (a fresh copy each call)."""
    data, affine = _full_resolution(key)
    subsampled = np.ascontiguousarray(data[::factor, ::factor, ::factor]).copy()
    return subsampled, affine @ np.diag([factor, factor, factor, 1.0])


def save(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


def small_pair(folder: Path, factor: int = 4) -> dict[str, str]:
    """Write the subsampled real pair with its label maps into ``folder``; return the data dict of paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for key, name in SAMPLE_FILES.items():
        data, affine = load_sample(key, factor)
        paths[key] = str(save(folder / name, data, affine))
    return paths


def loading_transforms(**overrides):
    """The ``loading_transforms`` of ``configs/inference.json`` (checks and loading of a pair), as a Compose."""
    from monai.bundle import ConfigParser
    from monai.transforms import Compose

    from conftest import BUNDLE_ROOT

    parser = ConfigParser()
    parser.read_config(str(BUNDLE_ROOT / "configs" / "inference.json"))
    parser.update({"bundle_root": str(BUNDLE_ROOT), **overrides})
    return Compose(parser.get_parsed_content("loading_transforms"))


def cohort_record(pairs, output_dir: Path):
    """The ``CohortRecord`` of a run over ``pairs`` whose only output is ``warped_image.nii.gz`` (see run_pairs)."""
    from scripts.workflow.cohort import CohortRecord

    return CohortRecord(pairs, output_dir, ["warped_image.nii.gz"])


def run_pairs(pairs, transform, output_dir: Path, record=None):
    """Drive a ``CohortDataset`` over ``pairs`` as an engine with the record attached would: each loaded pair is
    started, gets a stand-in output and is finished.

    Returns:
        the ids of the pairs that were loaded, in order.
    """
    from scripts.workflow.cohort import CohortDataset

    record = record if record is not None else cohort_record(pairs, output_dir)
    loaded = []
    for item in CohortDataset(record.start(), transform, record):
        loaded.append(item["pair_id"])
        record.started(item["pair_id"])
        (Path(output_dir) / item["pair_id"] / "warped_image.nii.gz").write_bytes(b"stand-in")
        record.finished(item["pair_id"])
    return loaded


class DecodeCounter:
    """Counts how many times nibabel decodes each file's voxels (``ArrayProxy`` reads), whoever asks for them."""

    def __init__(self, monkeypatch) -> None:
        from collections import Counter

        from nibabel.arrayproxy import ArrayProxy

        self.counts: Counter = Counter()
        original = ArrayProxy._get_scaled

        def counted(proxy, *args, **kwargs):
            self.counts[str(proxy.file_like)] += 1
            return original(proxy, *args, **kwargs)

        monkeypatch.setattr(ArrayProxy, "_get_scaled", counted)
