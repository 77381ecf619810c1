# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""The writer of a pair's volumes (``SaveRegistrationOutputsd``): atomic NIfTI files that never replace earlier results
unless asked. A pair's output files are independent of each other, so they are written on a few threads
(:class:`ConcurrentWriter`): most of the time goes into compression and file IO, which release the GIL.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Hashable, Mapping, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from types import TracebackType
from typing import Any, Self

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import MapTransform

from scripts.io.atomic import check_outputs_writable, save_nifti
from scripts.io.outputs import VOLUME_OUTPUTS, pair_output_dir

logger = logging.getLogger(__name__)

#: threads writing one pair's files: two keep both cores of a small machine compressing, more only add memory
DEFAULT_WRITE_WORKERS = 2

#: grids of more voxels than this (a 256^3 volume) write their files one after the other: each writer holds its own
#: encoding copies (``transform.h5`` alone 4 float32 copies of the field while SimpleITK writes it as float64), and
#: for a CT-sized grid two at once cost gigabytes more than the seconds they save
PARALLEL_WRITE_MAX_VOXELS = 1 << 24


def write_workers(voxels: int, max_workers: int = DEFAULT_WRITE_WORKERS) -> int:
    """Writer threads for files of a grid of ``voxels`` voxels: ``max_workers``, or 1 above
    :py:data:`PARALLEL_WRITE_MAX_VOXELS` (the same files, one after the other)."""
    return max_workers if voxels <= PARALLEL_WRITE_MAX_VOXELS else 1


class ConcurrentWriter:
    """
    Write independent files on a few threads; :meth:`wait` (or leaving the ``with`` block) returns when all are done.

    Each write is a callable that writes one file atomically (e.g. :func:`scripts.io.atomic.save_nifti`), so a failed
    write never leaves a partial file under its final name. When writes fail, the error of the earliest failed file
    in submission order is raised (its own type, with a note naming the file) after the other running writes have
    finished; writes not yet started are cancelled. Build what is written (tensor work included) in the calling
    thread, so the writer threads only encode and save it.

    Args:
        max_workers: number of threads; 1 (or 0) writes each file at once in the calling thread, as a plain loop would.

    Example::

        with ConcurrentWriter(2) as writer:
            writer.submit("a.nii.gz", save_nifti, image_a, "a.nii.gz")
            writer.submit("b.nii.gz", save_nifti, image_b, "b.nii.gz")
    """

    def __init__(self, max_workers: int = DEFAULT_WRITE_WORKERS) -> None:
        self.max_workers = int(max_workers)
        self._executor = ThreadPoolExecutor(self.max_workers, "write") if self.max_workers > 1 else None
        self._jobs: list[tuple[str, Future]] = []

    def submit(self, path: str | os.PathLike, write: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        """Start ``write(*args, **kwargs)``, the writer of ``path`` (named in its error)."""
        if self._executor is None:
            future: Future = Future()
            try:
                future.set_result(write(*args, **kwargs))
            except Exception as error:
                _name_file(error, path)
                raise
        else:
            future = self._executor.submit(write, *args, **kwargs)
        self._jobs.append((str(path), future))

    def wait(self) -> list[Any]:
        """Wait for every submitted write.

        Returns:
            the writers' results in submission order.

        Raises:
            the first (in submission order) write's error, once no write is running any more.
        """
        jobs, self._jobs = self._jobs, []
        try:
            done, _ = wait([future for _, future in jobs], return_when=FIRST_EXCEPTION)
            if any(future.exception() is not None for future in done):
                for _, future in jobs:
                    future.cancel()
                wait([future for _, future in jobs])
            for path, future in jobs:
                error = None if future.cancelled() else future.exception()
                if error is not None:
                    raise _name_file(error, path)
            return [future.result() for _, future in jobs]
        finally:
            self._shutdown()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if exc is None:
            self.wait()
            return
        for _, future in self._jobs:  # the caller failed: drop what has not started, let running writes finish
            future.cancel()
        self._shutdown()

    def _shutdown(self) -> None:
        """Wait for the running writes and release the threads (the writer is done after this)."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None


def _name_file(error: BaseException, path: str | os.PathLike) -> BaseException:
    """Add a note naming the output file to ``error`` (kept as it is, so callers still catch it by type)."""
    note = f"while writing {path}"
    if note not in getattr(error, "__notes__", ()):
        error.add_note(note)
    return error


def nifti_image(
    array: torch.Tensor | np.ndarray,
    affine: np.ndarray | torch.Tensor,
    dtype: np.dtype | type | None = None,
    vector: bool = False,
    name: str = "the output",
    xform_codes: tuple[int, int] = (1, 1),
) -> nib.Nifti1Image:
    """
    A channel-first volume as an in-memory NIfTI image (built in the calling thread, so that only saving it, with
    :func:`scripts.io.atomic.save_nifti`, runs on a writer thread).

    Args:
        array: (C, D, H, W) volume; one channel becomes a 3-D image (D, H, W), several a (D, H, W, C) image.
        affine: 4x4 voxel-to-world affine of the grid.
        dtype: on-disk data type (default: the array's, float64 stored as float32).
        vector: mark the image as a vector field (NIfTI intent "vector").
        name: file name for the error message.
        xform_codes: NIfTI (qform, sform) codes of the placement (1: scanner, 2: aligned, 3: Talairach, 4: MNI152);
            outputs on the fixed grid keep the fixed image's, so an MNI-space result still says it is in MNI space.
    """
    qform_code, sform_code = (int(c) if int(c) > 0 else 1 for c in xform_codes)  # always placed: never "unknown"
    data = array.detach().cpu().numpy() if isinstance(array, torch.Tensor) else np.asarray(array)
    if data.ndim != 4:
        raise ValueError(f"expected a channel-first (C, D, H, W) array for {name}, got shape {data.shape}.")
    data = data[0] if data.shape[0] == 1 else np.moveaxis(data, 0, -1)
    if dtype is None:
        dtype = np.float32 if data.dtype == np.float64 else data.dtype
    affine = np.asarray(affine.detach().cpu() if isinstance(affine, torch.Tensor) else affine, dtype=np.float64)
    image = nib.Nifti1Image(data.astype(dtype, copy=False), affine)
    image.header.set_qform(affine, code=qform_code)
    image.header.set_sform(affine, code=sform_code)
    if vector:
        image.header.set_intent("vector")
    return image


class SaveRegistrationOutputsd(MapTransform):
    """
    Save one pair's outputs (already on the fixed image's grid) into its output folder, atomically.

    All target files are checked first: if any exists and ``overwrite`` is False, nothing is written and
    ``scripts.io.atomic.OutputExistsError`` names the files. Each file is written under a temporary name and renamed.

    Args:
        output_dir: root output folder.
        names: data key -> file name (default :py:data:`scripts.io.outputs.VOLUME_OUTPUTS`); missing keys are skipped.
        vector_keys: keys written as vector fields (the displacement).
        label_keys: keys written as integer label maps.
        pair_id_key: data key holding the pair's sub-folder name (empty/absent: write into ``output_dir``).
        reference_key: data key of the loaded fixed image, whose NIfTI qform/sform codes the outputs keep (scanner
            space, 1, when it carries none).
        overwrite: replace existing outputs.
        max_workers: threads writing the files at the same time (:class:`ConcurrentWriter`; 1 writes them one after
            the other; grids above :py:data:`PARALLEL_WRITE_MAX_VOXELS` always do). The files are the same either way.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        names: Mapping[str, str] | None = None,
        vector_keys: Sequence[str] = ("pred",),
        label_keys: Sequence[str] = ("warped_label",),
        pair_id_key: str = "pair_id",
        overwrite: bool = False,
        max_workers: int = DEFAULT_WRITE_WORKERS,
        reference_key: str = "fixed_image",
    ) -> None:
        self.names = dict(names) if names is not None else dict(VOLUME_OUTPUTS)
        super().__init__(list(self.names.keys()), allow_missing_keys=True)
        self.output_dir = output_dir
        self.vector_keys = set(vector_keys)
        self.label_keys = set(label_keys)
        self.pair_id_key = pair_id_key
        self.overwrite = overwrite
        self.max_workers = max_workers
        self.reference_key = reference_key

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        folder = pair_output_dir(self.output_dir, d.get(self.pair_id_key))
        keys = list(self.key_iterator(d))
        check_outputs_writable([folder / self.names[k] for k in keys], self.overwrite)
        written = {}
        meta = getattr(d.get(self.reference_key), "meta", None) or {}
        codes = (int(meta.get("qform_code", 1)), int(meta.get("sform_code", 1)))
        largest = max((int(np.prod(d[k].shape[1:])) for k in keys), default=0)
        with ConcurrentWriter(write_workers(largest, self.max_workers)) as writer:
            for key in keys:
                value = d[key]
                affine = value.affine if isinstance(value, MetaTensor) else np.eye(4)
                if key in self.label_keys:
                    value = torch.round(torch.as_tensor(value).float())
                dtype = _label_dtype(value) if key in self.label_keys else np.float32
                path = folder / self.names[key]
                image = nifti_image(value, affine, dtype, key in self.vector_keys, path.name, codes)
                writer.submit(path, save_nifti, image, path)
                written[key] = str(path)
        d["output_files"] = written
        logger.info("wrote %s", ", ".join(written.values()))
        return d


def _label_dtype(value: torch.Tensor) -> type:
    """Smallest unsigned/signed integer type holding the label values."""
    array = torch.as_tensor(value)
    low, high = (int(array.min()), int(array.max())) if array.numel() else (0, 0)
    if low >= 0 and high <= 255:
        return np.uint8
    if -32768 <= low and high <= 32767:
        return np.int16
    return np.int32
