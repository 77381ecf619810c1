# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""Build more whole-head test data: the other CFMI subjects of ``brain_freesurfer_head``'s source repository.

``shared/data/brain_freesurfer_head`` holds two people (``sub-09``, ``sub-10``) of the GitHub repository
``hebbianloop/FreeSurfer-Training-Data``; the same repository holds FreeSurfer outputs of more people. This script
turns each person that has a whole-head ``T1.mgz``, a ``brainmask.mgz`` and an ``aseg.mgz`` at the pinned commit into
the same four files as the shared folder (same conversion: nibabel, affines and dtypes kept)::

    python -m bench.accuracy.cfmi_heads --repo CLONE --out DIR [--people sub-01,sub-02]

``CLONE`` is a clone (or bare mirror) of the repository; files are read from commit :data:`COMMIT` with ``git show``,
so the working tree's state does not matter. Written per person ``XX``: ``cfmi-subXX_head_t1.nii.gz`` (``T1.mgz``:
skull, scalp, neck, defaced), ``cfmi-subXX_brain_t1.nii.gz`` (``brainmask.mgz``), ``cfmi-subXX_aseg.nii.gz`` and
``cfmi-subXX_seg14.nii.gz`` (the common 14-class map of ``shared/data/README.md``, :data:`SEG14_FROM_ASEG`). Applied
to ``sub-09`` / ``sub-10`` it reproduces the shared folder's files voxel for voxel (checked when this was written).

Terms: the repository states no licence and the labels are FreeSurfer's automatic ``aseg``: research benchmarks only,
never shipped in the bundle. People without an ``aseg.mgz`` or with a missing ``T1.mgz`` blob at that commit
(``sub-03``, ``sub-05``) are reported and skipped.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np

__all__ = ["COMMIT", "SEG14_FROM_ASEG", "build_person", "main", "seg14_from_aseg"]

#: The commit of ``hebbianloop/FreeSurfer-Training-Data`` that ``shared/data/brain_freesurfer_head`` was taken from.
COMMIT = "75c00a779e30f19bb37ae7174bf569545539b254"

#: seg14 class -> FreeSurfer aseg ids (left, right), as in ``shared/data/README.md``.
SEG14_FROM_ASEG = {
    1: (10, 49), 2: (8, 47), 3: (4, 43), 4: (7, 46), 5: (12, 51), 6: (11, 50), 7: (13, 52),
    8: (17, 53), 9: (18, 54), 10: (3, 42), 11: (14,), 12: (15,), 13: (16,), 14: (2, 41),
}

SOURCES = {"head_t1": "T1.mgz", "brain_t1": "brainmask.mgz", "aseg": "aseg.mgz"}


def seg14_from_aseg(aseg: np.ndarray) -> np.ndarray:
    """The uint8 seg14 map of an aseg label array (any shape); every other aseg id becomes 0."""
    seg14 = np.zeros(aseg.shape, np.uint8)
    for cls, ids in SEG14_FROM_ASEG.items():
        seg14[np.isin(aseg, ids)] = cls
    return seg14


def _read_mgz(repo: Path, path: str) -> tuple[np.ndarray, np.ndarray]:
    """The voxel array and (4, 4) affine of ``path`` at :data:`COMMIT` (decoded from a temporary copy of the blob)."""
    blob = subprocess.run(["git", "-C", str(repo), "show", f"{COMMIT}:{path}"], capture_output=True, check=True).stdout
    with tempfile.NamedTemporaryFile(suffix=".mgz") as handle:
        handle.write(blob)
        handle.flush()
        image = nib.load(handle.name)
        return np.asanyarray(image.dataobj), image.affine


def _save(data: np.ndarray, affine: np.ndarray, path: Path) -> None:
    # not bench.accuracy.io.save_like: the shared folder's files carry qform and sform code 1 (scanner), which
    # save_like's plain Nifti1Image(array, affine) would not reproduce
    image = nib.Nifti1Image(data, affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    tmp = path.with_name(path.name + ".part.nii.gz")
    nib.save(image, str(tmp))
    tmp.replace(path)


def build_person(repo: Path, person: str, out_dir: Path) -> list[Path]:
    """Write the four files of ``person`` (e.g. ``sub-01``) into ``out_dir``; returns their paths."""
    name = "cfmi-" + person.replace("-", "")
    written = []
    for kind, source in SOURCES.items():
        data, affine = _read_mgz(repo, f"{person}/mri/{source}")
        data = data.astype(np.int16) if kind == "aseg" else data.astype(np.uint8)
        path = out_dir / f"{name}_{kind}.nii.gz"
        _save(data, affine, path)
        written.append(path)
        if kind == "aseg":
            path = out_dir / f"{name}_seg14.nii.gz"
            _save(seg14_from_aseg(data), affine, path)
            written.append(path)
    return written


def available_people(repo: Path) -> tuple[list[str], dict[str, str]]:
    """People with all three source files as real blobs at :data:`COMMIT`, and why each other one is skipped."""
    listing = subprocess.run(["git", "-C", str(repo), "ls-tree", "-r", COMMIT, "--name-only"], capture_output=True,
                             check=True, text=True).stdout.split()
    people = sorted({p.split("/")[0] for p in listing if p.startswith("sub-")})
    usable, skipped = [], {}
    for person in people:
        missing = []
        for source in SOURCES.values():
            path = f"{person}/mri/{source}"
            exists = path in listing and subprocess.run(
                ["git", "-C", str(repo), "cat-file", "-e", f"{COMMIT}:{path}"], capture_output=True).returncode == 0
            if not exists:
                missing.append(source)
        if missing:
            skipped[person] = "missing " + ", ".join(missing)
        else:
            usable.append(person)
    return usable, skipped


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", required=True, help="clone or bare mirror of hebbianloop/FreeSurfer-Training-Data")
    parser.add_argument("--out", required=True, help="output folder (created)")
    parser.add_argument("--people", default=None, help="comma-separated, e.g. sub-01,sub-02 (default: every usable)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    repo, out_dir = Path(args.repo), Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    usable, skipped = available_people(repo)
    for person, why in skipped.items():
        print(f"[skip] {person}: {why} at {COMMIT[:7]}", flush=True)
    wanted = [p.strip() for p in args.people.split(",")] if args.people else usable
    unusable = sorted(set(wanted) - set(usable))
    if unusable:
        raise ValueError(f"not usable at {COMMIT[:7]}: {unusable} ({[skipped.get(p, 'unknown') for p in unusable]}).")
    written = []
    for person in wanted:
        written += build_person(repo, person, out_dir)
        print(f"[ok] {person} -> {out_dir}", flush=True)
    return written


if __name__ == "__main__":
    main()
