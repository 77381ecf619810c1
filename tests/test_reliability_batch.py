"""Batch runs go on past bad pairs and report them at the end (pair screening on the real pair made bad)."""

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from reliability_data import DecodeCounter, cohort_record, load_sample, loading_transforms, run_pairs, save, small_pair

from scripts.io.errors import BundleUserError, RegistrationInputError, find_user_error
from scripts.io.outputs import FAILED_PAIRS
from scripts.workflow.cohort import CohortDataset, CohortRecord


@pytest.fixture()
def batch(tmp_path):
    good = small_pair(tmp_path / "data")
    truncated = tmp_path / "data" / "truncated.nii.gz"
    data = open(good["fixed_image"], "rb").read()
    truncated.write_bytes(data[: len(data) // 2])
    volume, affine = load_sample("moving_image")
    volume = volume.astype(np.float32)
    volume[0, 0, 0] = np.nan
    nan_image = save(tmp_path / "data" / "nan.nii.gz", volume, affine)
    return [
        {**good, "pair_id": "p0"},
        {"moving_image": good["moving_image"], "fixed_image": str(truncated), "pair_id": "p1_truncated"},
        {"moving_image": str(nan_image), "fixed_image": good["fixed_image"], "pair_id": "p2_nan"},
        {"moving_image": good["moving_image"], "fixed_image": good["fixed_image"], "pair_id": "p3"},
        {"moving_image": str(tmp_path / "gone.nii.gz"), "fixed_image": good["fixed_image"], "pair_id": "p4_missing"},
    ]


def test_bad_pairs_are_skipped_and_reported_at_the_end(batch, tmp_path):
    out = tmp_path / "out"
    record = cohort_record(batch, out)
    assert not record.failed  # nothing is read before the run reaches a pair
    assert run_pairs(batch, loading_transforms(), out, record) == ["p0", "p3"]
    assert [p["pair_id"] for p in record.failed] == ["p1_truncated", "p2_nan", "p4_missing"]
    with pytest.raises(BundleUserError) as info:
        record.report()
    message = str(info.value)
    assert message.startswith("3 of 5 pairs were skipped because of bad inputs")
    assert "the other 2 were registered" in message
    assert "p1_truncated: fixed image" in message and "could not be read" in message and "truncated" in message
    assert "p2_nan: moving image" in message and "contains 1 NaN/Inf voxels" in message
    assert "p4_missing: moving image" in message and "does not exist" in message
    report = json.loads((out / FAILED_PAIRS).read_text())
    assert report["total"] == 5 and [r["pair_id"] for r in report["failed"]] == ["p1_truncated", "p2_nan", "p4_missing"]


def test_each_file_is_decoded_once_per_pair(batch, tmp_path, monkeypatch):
    counter = DecodeCounter(monkeypatch)
    good = [batch[0], {**batch[0], "pair_id": "p0_again"}]
    run_pairs(good, loading_transforms(pairs=good), tmp_path / "out")  # the loading of a run of these two pairs
    # four files, one pair after the other under the same keys: each decoded once for the whole run
    assert sorted(counter.counts.values()) == [1, 1, 1, 1]
    assert set(counter.counts) == {batch[0][k] for k in ("moving_image", "fixed_image", "moving_label", "fixed_label")}


def test_one_pair_run_keeps_no_decoded_copies(batch, tmp_path, monkeypatch):
    """A run of one pair has no next pair to hand a kept volume to: the loader keeps none (a CT-sized pair's four
    float32 copies stayed in memory through the whole registration); label maps keep their file's integer type."""
    counter = DecodeCounter(monkeypatch)
    single = {k: v for k, v in batch[0].items() if k != "pair_id"}
    transforms = loading_transforms(pairs=[single])
    loader = next(t for t in transforms.transforms if type(t).__name__ == "LoadRegistrationInputsd")
    assert not loader.keep_decoded
    item = transforms(dict(single))
    assert loader._last == {} and sorted(counter.counts.values()) == [1, 1, 1, 1]
    assert item["moving_label"].dtype == item["fixed_label"].dtype == torch.uint8  # as stored in the files
    assert item["moving_image"].dtype == torch.float32
    labels = nib.load(single["fixed_label"])
    assert labels.get_data_dtype() == np.uint8
    ras = np.asarray(nib.as_closest_canonical(labels).dataobj)  # the loading reorients to RAS
    np.testing.assert_array_equal(item["fixed_label"][0].numpy(), ras)
    kept = loading_transforms(pairs=[single, {**single, "pair_id": "again"}])
    assert next(t for t in kept.transforms if type(t).__name__ == "LoadRegistrationInputsd").keep_decoded


def test_single_bad_pair_fails_at_once_and_clean_batch_reports_nothing(batch, tmp_path):
    single = {k: v for k, v in batch[1].items() if k != "pair_id"}  # one pair from the run arguments
    with pytest.raises(RuntimeError) as info:  # MONAI's Compose wraps it; the CLI prints the user error inside
        CohortDataset([single], loading_transforms(), CohortRecord([single], tmp_path / "single", ["ddf.nii.gz"]))
    error = find_user_error(info.value)  # raised while the dataset is built: before any engine runs
    assert isinstance(error, RegistrationInputError) and "truncated.nii.gz' could not be read" in str(error)
    record = cohort_record(batch[1:2], tmp_path / "one")  # a datalist of one pair: recorded, reported at the end
    assert run_pairs(record.pairs, loading_transforms(), tmp_path / "one", record) == []
    with pytest.raises(BundleUserError, match="1 of 1 pairs were skipped"):
        record.report()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / FAILED_PAIRS).write_text("{}")  # left by an earlier run with a bad pair
    record = cohort_record([batch[0], batch[3]], tmp_path / "out")
    assert run_pairs(record.pairs, loading_transforms(), tmp_path / "out", record) == ["p0", "p3"]
    record.report()
    assert not (tmp_path / "out" / FAILED_PAIRS).exists()


def test_the_dataset_keeps_no_prepared_pair_while_the_engine_holds_its_batch(tmp_path):
    """The loader collates a copy of each prepared pair (``torch.stack``); the prepared pair itself must be gone by
    then, not held by the suspended dataset until the next pair is asked for (a second copy of every volume through
    the whole registration), for the single pair of the run arguments and for a datalist's pairs alike."""
    import gc
    import weakref

    from monai.data import DataLoader

    prepared = []

    def prepare(pair):
        volume = torch.zeros(1, 4, 4, 4)
        prepared.append(weakref.ref(volume))
        return {**pair, "image": volume}

    single = {"moving_image": "moving.nii.gz", "fixed_image": "fixed.nii.gz"}
    pairs = [{**single, "pair_id": f"p{i}"} for i in range(2)]
    for data, folder in (([single], "one"), (pairs, "many")):
        record = CohortRecord(data, tmp_path / folder, ["ddf.nii.gz"])
        prepared.clear()
        batches = iter(DataLoader(CohortDataset(record.start(), prepare, record), batch_size=1, num_workers=0))
        for count in range(1, len(data) + 1):
            batch = next(batches)  # held, as the engine holds it through the iteration
            gc.collect()
            assert len(prepared) == count and prepared[-1]() is None, f"{folder}: the prepared pair is still alive"
            assert batch["image"].shape == (1, 1, 4, 4, 4)
