"""Atomic writing: a failed or killed write never damages the existing file; existing outputs need an explicit overwrite."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import nibabel as nib
import numpy as np
import pytest
import torch
from reliability_data import load_sample

from scripts.io.atomic import OutputExistsError, atomic_path, check_outputs_writable, save_nifti, save_torch, temporary_path, write_json
from scripts.io.errors import RegistrationInputError


def test_temporary_name_keeps_the_format_suffix(tmp_path):
    tmp = temporary_path(tmp_path / "warped_image.nii.gz")
    assert tmp.parent == tmp_path and tmp.name.startswith(".warped_image.tmp-") and tmp.name.endswith(".nii.gz")
    assert temporary_path(tmp_path / "model.pt").suffix == ".pt"


def test_save_nifti_round_trip_is_gzipped(tmp_path):
    volume, affine = load_sample("fixed_image")
    path = save_nifti(nib.Nifti1Image(volume, affine), tmp_path / "out" / "warped_image.nii.gz")
    assert path.read_bytes()[:2] == b"\x1f\x8b"  # nibabel saw the .nii.gz suffix of the temporary name
    back = nib.load(str(path))
    assert np.array_equal(np.asanyarray(back.dataobj), volume) and np.allclose(back.affine, affine)
    assert sorted(p.name for p in path.parent.iterdir()) == ["warped_image.nii.gz"]  # no temporary left behind


def test_failed_write_leaves_the_old_file_untouched(tmp_path):
    path = write_json({"dice": 0.8}, tmp_path / "metrics.json")
    before = path.read_bytes()
    with pytest.raises(TypeError):
        write_json({"dice": object()}, path)  # cannot be serialised
    with pytest.raises(RuntimeError):
        with atomic_path(path) as tmp:
            tmp.write_text('{"dice": 0.')  # half written, then the writer crashes
            raise RuntimeError("disk full")
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_existing_outputs_need_overwrite(tmp_path):
    existing = write_json({}, tmp_path / "metrics.json")
    planned = [existing, tmp_path / "ddf.nii.gz"]
    with pytest.raises(OutputExistsError, match=r"output file\(s\) already exist: .*metrics.json; .*--overwrite") as info:
        check_outputs_writable(planned)
    assert isinstance(info.value, RegistrationInputError) and "ddf.nii.gz" not in str(info.value)
    check_outputs_writable(planned, overwrite=True)
    check_outputs_writable([tmp_path / "ddf.nii.gz"])


WRITER = textwrap.dedent(
    """
    import sys, torch
    sys.path.insert(0, {bundle!r})
    from scripts.io.atomic import save_torch
    step = 0
    while True:
        step += 1
        # ~16 MB per save, so a kill lands inside a write most of the time
        save_torch({{"step": step, "weights": torch.full((4_000_000,), float(step))}}, {path!r})
        print(step, flush=True)
    """
)


def test_checkpoint_survives_sigkill_during_save(tmp_path):
    """Kill a process that keeps overwriting a checkpoint at several moments: the file on disk always loads whole."""
    path = tmp_path / "checkpoint.pt"
    bundle = os.path.join(os.path.dirname(__file__), os.pardir, "bundle")
    script = WRITER.format(bundle=os.path.abspath(bundle), path=str(path))
    for delay in (0.07, 0.23):
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        proc.stdout.readline()  # one save completed
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        checkpoint = torch.load(path, weights_only=True)
        assert torch.equal(checkpoint["weights"], torch.full((4_000_000,), float(checkpoint["step"])))
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "checkpoint.pt"]
    assert all(name.startswith(".checkpoint.tmp-") for name in leftovers)  # a killed writer may leave a hidden temp only


def test_save_torch_round_trip(tmp_path):
    state = {"model": torch.nn.Conv3d(2, 3, 3).state_dict()}
    path = save_torch(state, tmp_path / "ckpt" / "model.pt")
    loaded = torch.load(path, weights_only=True)
    assert all(torch.equal(loaded["model"][k], v) for k, v in state["model"].items())
