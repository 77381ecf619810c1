# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""Output writing of one pair: ``ConcurrentWriter`` (files on a few threads, the first error named), the NIfTI outputs
(``SaveRegistrationOutputsd``) and the transform files (``SaveTransformsd``) byte-identical (the ``.h5`` composites
value-identical) whether written one after the other or concurrently, and ``WarpFromSourced`` sharing the mapped
points of sources on one grid only."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from scripts.io.atomic import OutputExistsError, write_text
from scripts.io.writer import ConcurrentWriter, SaveRegistrationOutputsd
from scripts.workflow.transform_outputs import SaveTransformsd, WarpFromSourced

SHAPE = (12, 10, 8)
AFFINE = np.array([[-2.0, 0, 0, 30], [0, 2.0, 0, -40], [0, 0, 2.5, -10], [0, 0, 0, 1]])


@pytest.fixture(scope="module")
def outputs():
    """One pair's outputs on a small fixed grid: ddf (3, X, Y, Z), image, label, Jacobian (1, X, Y, Z)."""
    generator = torch.Generator().manual_seed(3)
    meta = lambda t: MetaTensor(t, affine=torch.as_tensor(AFFINE))
    label = torch.randint(0, 5, (1, *SHAPE), generator=generator).float()
    return {
        "pred": meta(torch.randn(3, *SHAPE, generator=generator)),
        "warped_image": meta(torch.rand(1, *SHAPE, generator=generator)),
        "warped_label": meta(label),
        "jacobian_det": meta(1.0 + 0.1 * torch.randn(1, *SHAPE, generator=generator)),
        "fixed_image": meta(torch.rand(1, *SHAPE, generator=generator)),
    }


def _files(folder):
    """File name -> content: the bytes, except for ITK ``.h5`` transforms, whose HDF5 headers carry the write time:
    their transforms' parameters (field values included) and fixed parameters (grid) instead."""
    import SimpleITK as sitk

    def content(path):
        if path.suffix != ".h5":
            return path.read_bytes()
        composite = sitk.CompositeTransform(sitk.ReadTransform(str(path)))
        parts = [composite.GetNthTransform(i) for i in range(composite.GetNumberOfTransforms())]
        return [(t.GetName(), t.GetParameters(), t.GetFixedParameters()) for t in parts]

    return {p.name: content(p) for p in sorted(folder.iterdir())}


def test_outputs_identical_sequential_and_concurrent(outputs, tmp_path):
    for workers in (1, 2):
        folder = tmp_path / f"w{workers}"
        d = SaveTransformsd(folder, inverse=True, max_workers=workers)(outputs)
        assert sorted(d["output_files"]) == ["affine", "inverse_transform", "inverse_warp", "transform", "warp"]
        assert "inverse_consistency" in d["transform_metrics"]
        d = SaveRegistrationOutputsd(folder, max_workers=workers)(d)
        assert sorted(d["output_files"]) == ["jacobian_det", "pred", "warped_image", "warped_label"]
    one, two = _files(tmp_path / "w1"), _files(tmp_path / "w2")
    assert one.keys() == two.keys() and all(one[k] == two[k] for k in one), "files differ between 1 and 2 threads"
    assert not any(name.startswith(".") for name in one), "a temporary file was left behind"
    label = nib.load(str(tmp_path / "w2" / "warped_label.nii.gz"))
    assert label.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asarray(label.dataobj), outputs["warped_label"][0].numpy())
    with pytest.raises(OutputExistsError, match="ddf.nii.gz"):  # nothing is replaced without overwrite
        SaveRegistrationOutputsd(tmp_path / "w2", max_workers=2)(outputs)


def _failing(message):
    def write(*_):
        raise OSError(message)

    return write


@pytest.mark.parametrize("workers", [1, 2])
def test_first_error_is_raised_with_its_file(tmp_path, workers):
    with pytest.raises(OSError, match="first") as raised, ConcurrentWriter(workers) as writer:
        writer.submit(tmp_path / "good.txt", write_text, "ok", tmp_path / "good.txt")
        writer.submit(tmp_path / "bad.nii.gz", _failing("disk full (first)"))
        writer.submit(tmp_path / "late.nii.gz", _failing("disk full (second)"))  # reported: the earliest failed
    assert f"while writing {tmp_path / 'bad.nii.gz'}" in raised.value.__notes__
    assert (tmp_path / "good.txt").read_text() == "ok"
    assert [p.name for p in tmp_path.iterdir()] == ["good.txt"]


def test_writer_returns_results_in_order(tmp_path):
    writer = ConcurrentWriter(2)
    for name in ("a.txt", "b.txt", "c.txt"):
        writer.submit(tmp_path / name, write_text, name, tmp_path / name)
    assert [p.name for p in writer.wait()] == ["a.txt", "b.txt", "c.txt"]
    assert writer.wait() == []  # nothing left; the threads are gone


def test_warp_from_sources_maps_each_grid(outputs):
    """The image and label of one grid share mapped points; a label on a shifted grid gets its own."""
    generator = torch.Generator().manual_seed(5)
    shifted = AFFINE.copy()
    shifted[:3, 3] += [2.0, 0.0, 0.0]  # one voxel along the first axis
    source = torch.rand(1, *SHAPE, generator=generator)
    label = torch.randint(0, 4, (1, *SHAPE), generator=generator)
    data = dict(outputs)
    data["pred"] = MetaTensor(torch.zeros(3, *SHAPE), affine=torch.as_tensor(AFFINE))
    data.update(
        moving_source=MetaTensor(source, affine=torch.as_tensor(AFFINE)),
        same_grid_label=MetaTensor(label, affine=torch.as_tensor(AFFINE)),
        shifted_label=MetaTensor(label, affine=torch.as_tensor(shifted)),
    )
    warp = WarpFromSourced(
        ["moving_source", "same_grid_label", "shifted_label"], ["image", "same", "shifted"],
        mode=["bilinear", "nearest", "nearest"],
    )
    out = warp(data)
    torch.testing.assert_close(out["image"].as_tensor(), source)  # zero field, same grid: the source itself
    assert torch.equal(out["same"].as_tensor(), label)
    assert torch.equal(out["shifted"].as_tensor()[:, :-1], label[:, 1:])  # fixed voxel i is voxel i + 1 of that grid


def test_outputs_keep_the_fixed_images_placement_codes(outputs, tmp_path):
    """A fixed image in MNI space (NIfTI sform code 4) gives outputs that still say so; none given means scanner (1)."""
    fixed = outputs["fixed_image"].clone()
    fixed.meta["qform_code"], fixed.meta["sform_code"] = np.array(2, np.int16), np.array(4, np.int16)
    SaveRegistrationOutputsd(tmp_path / "mni")({**outputs, "fixed_image": fixed})
    SaveRegistrationOutputsd(tmp_path / "plain")({k: v for k, v in outputs.items() if k != "fixed_image"})
    for name in ("warped_image.nii.gz", "ddf.nii.gz", "warped_label.nii.gz", "jacobian_det.nii.gz"):
        header = nib.load(str(tmp_path / "mni" / name)).header
        assert (int(header["qform_code"]), int(header["sform_code"])) == (2, 4), name
        assert np.allclose(nib.load(str(tmp_path / "mni" / name)).affine, AFFINE)
        header = nib.load(str(tmp_path / "plain" / name)).header
        assert (int(header["qform_code"]), int(header["sform_code"])) == (1, 1), name


def test_large_grids_write_one_file_after_the_other_with_the_same_files(outputs, tmp_path, monkeypatch):
    """Above ``PARALLEL_WRITE_MAX_VOXELS`` (lowered here to this grid's size - 1) every file of a pair is written in
    the calling thread, one after the other, whatever ``max_workers`` says; the files equal the concurrent ones."""
    import threading

    import scripts.io.atomic
    import scripts.io.writer
    import scripts.spatial.transform_set as transform_set

    threads = []

    def recorded(write):
        def wrapper(*args, **kwargs):
            threads.append(threading.current_thread() is threading.main_thread())
            return write(*args, **kwargs)

        return wrapper

    for name in ("write_itk_affine", "write_itk_displacement", "write_itk_composite"):
        monkeypatch.setattr(transform_set, name, recorded(getattr(transform_set, name)))
    monkeypatch.setattr(scripts.io.writer, "save_nifti", recorded(scripts.io.atomic.save_nifti))

    def write(folder):
        threads.clear()
        d = SaveTransformsd(folder, inverse=False, max_workers=2)(outputs)
        SaveRegistrationOutputsd(folder, max_workers=2)(d)
        return list(threads)

    assert scripts.io.writer.write_workers(int(np.prod(SHAPE)), 2) == 2
    concurrent = write(tmp_path / "small")
    assert len(concurrent) == 7 and not any(concurrent)  # 3 transform files + 4 NIfTI outputs, on writer threads
    monkeypatch.setattr(scripts.io.writer, "PARALLEL_WRITE_MAX_VOXELS", int(np.prod(SHAPE)) - 1)
    assert scripts.io.writer.write_workers(int(np.prod(SHAPE)), 2) == 1
    assert all(write(tmp_path / "large")) and len(threads) == 7  # each in the calling thread
    small, large = _files(tmp_path / "small"), _files(tmp_path / "large")
    assert small.keys() == large.keys() and all(small[k] == large[k] for k in small)


def test_gzip_nifti_holds_nibabels_bytes_and_reads_everywhere(tmp_path):
    """``save_nifti`` compresses ``.nii.gz`` with ISA-L instead of nibabel's zlib: the decompressed file must be byte for
    byte what ``nib.save`` writes (header, vector intent, the 5-D ITK field layout), the gzip stream must be standard
    (Python's gzip and SimpleITK, i.e. ITK's zlib reader, open it) and equal images must give equal files (no time
    stamp or temporary name in the gzip header)."""
    import gzip

    import SimpleITK as sitk

    from scripts.io.atomic import save_nifti

    generator = np.random.default_rng(5)
    field = np.cumsum(generator.normal(size=(9, 7, 6, 1, 3)), axis=0).astype(np.float32)  # smooth-ish, compressible
    image = nib.Nifti1Image(field, AFFINE)
    image.header.set_intent("vector")
    nib.save(image, str(tmp_path / "reference.nii.gz"))
    save_nifti(image, tmp_path / "a.nii.gz")
    save_nifti(image, tmp_path / "b.nii.gz")

    ours = gzip.decompress((tmp_path / "a.nii.gz").read_bytes())
    assert ours == gzip.decompress((tmp_path / "reference.nii.gz").read_bytes())
    assert (tmp_path / "a.nii.gz").read_bytes() == (tmp_path / "b.nii.gz").read_bytes()
    assert b"tmp-" not in (tmp_path / "a.nii.gz").read_bytes()[:64]
    read = sitk.ReadImage(str(tmp_path / "a.nii.gz"))
    assert read.GetSize() == (9, 7, 6) and read.GetNumberOfComponentsPerPixel() == 3
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read), np.transpose(field[:, :, :, 0, :], (2, 1, 0, 3)))
    assert not list(tmp_path.glob(".*"))  # no temporary file left behind
