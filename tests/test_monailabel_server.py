"""MONAI Label server started for real (``integrations/monailabel/start_server.sh``) and driven over HTTP the way 3D
Slicer's MONAI Label module drives it: ``GET /info/``, ``GET /datastore/?output=all``,
``POST /infer/<model>?image=<id>`` (multipart ``params`` field; multipart answer: ``params`` JSON + label image), the
registration's other outputs downloaded with ``GET /datastore/label``, and ``POST /train/<model>`` polled with
``GET /train/``.

The datastore holds two real studies at 4 mm (MNI152 and Colin27, both with final labels); the server's atlas is the
4 mm Colin27 with its labels. The label map, the warped atlas image and the transform the server returns for MNI152
are checked against ``python -m scripts.cli register`` on the same pair (same bundle copy, same config).

Needs ``integrations/monailabel/setup_env.sh`` (``$SACB_LABEL_VENV`` or ``.venv-label``)."""

from __future__ import annotations

import contextlib
import email
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import REPO_ROOT
from ecosystem_utils import bundle_copy_with_weights, run_checked
from monailabel_utils import APP_DIR, LABEL_VENV, MODEL, fast_affine_stage, label_venv_missing, write_pair
from spatial_cases import mean_dice

pytestmark = [pytest.mark.label, pytest.mark.slow]

if label_venv_missing():
    pytest.skip(label_venv_missing(), allow_module_level=True)

LAUNCHER = APP_DIR / "start_server.sh"
STUDY = "mni152"
#: what start_server creates in the app folder (all ignored by git)
SERVER_STATE = ("model", "logs", "bin")
#: datastore tag of each extra output (main.OUTPUT_TAGS) and the file `register` writes for it
OUTPUTS = {"warped_atlas_image": "warped_image.nii.gz", "transform": "transform.h5"}
READY_TIMEOUT_S, INFER_TIMEOUT_S, TRAIN_TIMEOUT_S = 300, 600, 600


def _free_port() -> int:
    """A port the OS has just handed out on 127.0.0.1 (free now; the server binds it right after)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LabelServer:
    """
    One ``start_server.sh`` process in its own process group, writing to ``log``; a small HTTP client for it.

    Args:
        process: the launcher process (it ``exec``s the server: same PID, leader of the group).
        url: ``http://127.0.0.1:<port>``.
        log: the file receiving the server's stdout and stderr.
    """

    def __init__(self, process: subprocess.Popen, url: str, log: Path) -> None:
        self.process, self.url, self.log = process, url, log

    def log_tail(self, chars: int = 12000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.is_file() else "(no log)"

    @contextlib.contextmanager
    def log_on_failure(self):
        """Print the end of the server's log when the block fails (pytest shows it with the failure)."""
        try:
            yield
        except Exception:
            print(f"---- MONAI Label server log ({self.log}), last lines ----\n{self.log_tail()}")
            raise

    def request(self, method: str, path: str, body: bytes | None = None, content_type: str | None = None,
                timeout: float = 60) -> tuple[int, str, bytes]:
        """``(status, content type, body)`` of one request; HTTP errors are answers too, not exceptions."""
        headers = {"Content-Type": content_type} if content_type else {}
        call = urllib.request.Request(self.url + path, data=body, method=method, headers=headers)
        try:
            with urllib.request.urlopen(call, timeout=timeout) as answer:
                return answer.status, answer.headers.get("Content-Type", ""), answer.read()
        except urllib.error.HTTPError as error:
            return error.code, error.headers.get("Content-Type", ""), error.read()

    def get_json(self, path: str) -> dict:
        status, _, body = self.request("GET", path)
        assert status == 200, f"GET {path}: {status} {body[:2000]!r}"
        return json.loads(body)

    def stop(self) -> None:
        """SIGTERM to the server's process group (the server and any training subprocess), SIGKILL if it lingers."""
        if self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)


def _start_server(studies: Path, conf: dict, log: Path) -> LabelServer:
    """Start the documented launcher on a free port and wait until ``GET /info/`` answers 200."""
    port = _free_port()
    command = [str(LAUNCHER), "--studies", str(studies), "--port", str(port)]
    for key, value in conf.items():
        command += ["--conf", key, str(value)]
    # the server's temporary files (uploads, the extra outputs before they enter the datastore) in a folder of its own
    (studies.parent / "server_tmp").mkdir(exist_ok=True)
    env = dict(os.environ, SACB_LABEL_VENV=str(LABEL_VENV), TMPDIR=str(studies.parent / "server_tmp"))
    env.pop("VIRTUAL_ENV", None)  # as from a plain shell: the launcher must not depend on an activated venv
    with open(log, "wb") as out:
        process = subprocess.Popen(command, cwd=str(studies.parent), env=env, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    server = LabelServer(process, f"http://127.0.0.1:{port}", log)
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        if process.poll() is not None:
            raise AssertionError(f"the server exited with {process.returncode} before answering:\n{server.log_tail()}")
        with contextlib.suppress(OSError):
            if server.request("GET", "/info/", timeout=10)[0] == 200:
                return server
        if time.monotonic() > deadline:
            server.stop()
            raise AssertionError(f"no answer from {server.url}/info/ in {READY_TIMEOUT_S} s:\n{server.log_tail()}")
        time.sleep(1.0)


def _multipart(fields: dict[str, str]) -> tuple[bytes, str]:
    """``multipart/form-data`` body of plain text fields, as the Slicer module's client posts them."""
    boundary = uuid.uuid4().hex
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'
             for name, value in fields.items()]
    return ("".join(parts) + f"--{boundary}--\r\n").encode(), f"multipart/form-data; boundary={boundary}"


def _parse_multipart(content_type: str, body: bytes) -> dict[str, tuple[str | None, bytes]]:
    """Field name -> (file name, bytes) of a ``multipart/form-data`` answer."""
    message = email.message_from_bytes(f"Content-Type: {content_type}\r\n\r\n".encode() + body)
    assert message.is_multipart(), f"not a multipart answer: {content_type}"
    return {part.get_param("name", header="content-disposition"): (part.get_filename(), part.get_payload(decode=True))
            for part in message.get_payload()}


def _server_paths(text: str, *roots: Path) -> list[str]:
    """The given server folders (and the server's temporary folder) that occur in ``text``."""
    candidates = {str(root) for root in roots} | {tempfile.gettempdir() + os.sep}
    return sorted(root for root in candidates if root in text)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The running server (a bundle copy, two labelled 4 mm studies, the 4 mm atlas) and the CLI's ``register`` of
    the atlas onto the study, from the same bundle copy."""
    work = tmp_path_factory.mktemp("label_server")
    bundle = bundle_copy_with_weights(work)
    fast_affine_stage(bundle)
    pair = write_pair(work / "atlas", factor=4)
    studies = work / "studies"
    (studies / "labels" / "final").mkdir(parents=True)
    for image, label, name in (("fixed_image", "fixed_label", STUDY), ("moving_image", "moving_label", "colin27")):
        Path(studies / f"{name}.nii.gz").write_bytes(Path(pair[image]).read_bytes())
        Path(studies / "labels" / "final" / f"{name}.nii.gz").write_bytes(Path(pair[label]).read_bytes())
    reference = work / "cli_out"
    run_checked([sys.executable, "-m", "scripts.cli", "register", "--fixed", str(studies / f"{STUDY}.nii.gz"),
                 "--moving", pair["moving_image"], "--moving_label", pair["moving_label"], "--out", str(reference),
                 "--device", "cpu"], cwd=bundle)
    conf = {"bundle_path": bundle, "atlas_image": pair["moving_image"], "atlas_label": pair["moving_label"],
            "weights_dir": work / "weights"}  # not the app folder's model/: no weights trained by an earlier run
    server = _start_server(studies, conf, work / "server.log")
    try:
        yield {"server": server, "work": work, "bundle": bundle, "studies": studies, "atlas": pair,
               "reference": reference, "weights_dir": work / "weights"}
    finally:
        server.stop()


@pytest.fixture(scope="module")
def inferred(served):
    """``POST /infer/<model>?image=<study id>`` as the Slicer module sends it; the label and params of the answer."""
    server = served["server"]
    body, content_type = _multipart({"params": json.dumps({"device": "cpu"})})
    with server.log_on_failure():
        status, answer_type, answer = server.request("POST", f"/infer/{MODEL}?image={STUDY}", body, content_type,
                                                     timeout=INFER_TIMEOUT_S)
        assert status == 200, f"{status}: {answer[:2000]!r}"
        fields = _parse_multipart(answer_type, answer)
    # the extra outputs moved into the datastore: their temporary folder is gone
    assert not list((served["work"] / "server_tmp").glob("sacb_net_label_*"))
    label_file = served["work"] / "answer_label.nii.gz"
    label_file.write_bytes(fields["image"][1])
    return {"label": label_file, "params": json.loads(fields["params"][1]), "raw_params": fields["params"][1].decode()}


#: run in the Label venv: every declared dependency of monailabel (monai's extras included) installed at a version its
#: requirement accepts, and the modules behind what the server offers (mlflow tracking, DICOM, SAM2) importable
DEPENDENCY_CHECK = """
import json
from importlib.metadata import PackageNotFoundError, requires, version
from packaging.requirements import Requirement

def unmet(name, extras=()):
    found = []
    for line in requires(name) or []:
        req = Requirement(line)
        if req.marker is not None and not any(req.marker.evaluate({"extra": e}) for e in ("", *extras)):
            continue
        try:
            if not req.specifier.contains(version(req.name), prereleases=True):
                found.append(f"{req} (installed: {version(req.name)})")
        except PackageNotFoundError:
            found.append(f"{req} (not installed)")
            continue
        found += unmet(req.name, tuple(req.extras))
    return found

import mlflow, pynetdicom, httpx, sklearn, sam2
print("RESULT " + json.dumps(unmet("monailabel")))
"""


def test_monailabel_is_installed_with_its_declared_dependencies(tmp_path):
    result = run_checked([str(LABEL_VENV / "bin" / "python"), "-c", DEPENDENCY_CHECK], cwd=tmp_path)
    assert result.stdout.strip().splitlines()[-1] == "RESULT []", result.stdout[-3000:]
    run_checked([str(LABEL_VENV / "bin" / "pip"), "check"], cwd=tmp_path)


def test_launcher_starts_the_server_and_its_state_stays_out_of_git(served):
    server = served["server"]
    assert server.process.poll() is None
    if not (REPO_ROOT / ".git").exists():
        pytest.skip("not a git checkout: nothing to ask git about the server's files")
    with server.log_on_failure():
        assert all((APP_DIR / name).is_dir() for name in SERVER_STATE)  # start_server made them...
        untracked = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all", "--", str(APP_DIR)],
                                   cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout.splitlines()
        assert [line for line in untracked if line.startswith("??")] == []  # ...and git ignores them


def test_info_and_datastore_as_the_slicer_module_reads_them(served):
    server = served["server"]
    with server.log_on_failure():
        info = server.get_json("/info/")
        model = info["models"][MODEL]
        assert model["type"] == "segmentation"
        assert model["labels"] == {"thalamus": 1, "caudate": 2, "putamen": 3, "pallidum": 4, "hippocampus": 5,
                                   "amygdala": 6, "cerebellum": 7, "cerebral cortex": 8}
        assert MODEL in info["trainers"] and "mlflow" in info["trainers"][MODEL]["config"]["tracking"]
        datastore = server.get_json("/datastore/?output=all")
        assert set(datastore["objects"]) >= {STUDY, "colin27"}
        assert all("final" in item["labels"] for item in datastore["objects"].values())
        for text in (json.dumps(info), json.dumps(datastore)):
            assert _server_paths(text, served["work"], REPO_ROOT) == []


def test_infer_answers_the_cli_registration_on_the_study_grid(served, inferred):
    server, reference = served["server"], served["reference"]
    with server.log_on_failure():
        label = nib.load(inferred["label"])
        study = nib.load(served["studies"] / f"{STUDY}.nii.gz")
        assert label.shape == study.shape and label.get_data_dtype() == np.uint8
        np.testing.assert_allclose(label.affine, study.affine, atol=1e-4)
        data = np.asarray(label.dataobj)
        expected = np.asarray(nib.load(str(reference / "warped_label.nii.gz")).dataobj)
        # the venv's torch (2.14 vs 2.13) rounds differently; ~200 optimisation steps carry that into boundary voxels
        # (see test_monailabel.py): the same registration, not bit for bit
        agreement, dice = (data == expected).mean(), mean_dice(expected, data)
        assert agreement > 0.98 and dice > 0.95, (agreement, dice)
        params = inferred["params"]
        assert 0.0 <= params["percent_non_positive_jacobian"] < 100.0
        assert params["atlas_label"] == "colin27_seg.nii.gz"  # the file's name: no server path in the answer
        assert _server_paths(inferred["raw_params"], served["work"], REPO_ROOT) == []


def test_registration_outputs_are_downloadable_from_the_datastore(served, inferred):
    server, reference = served["server"], served["reference"]
    outputs = inferred["params"]["outputs"]
    assert set(outputs) == set(OUTPUTS)
    downloaded = {}
    with server.log_on_failure():
        for name, file in OUTPUTS.items():
            assert outputs[name]["label"] == STUDY
            status, _, body = server.request("GET", f"/datastore/label?label={STUDY}&tag={outputs[name]['tag']}")
            assert status == 200, f"{name}: {status} {body[:500]!r}"
            downloaded[name] = served["work"] / f"downloaded_{file}"
            downloaded[name].write_bytes(body)
        # the warped atlas image: the CLI's warped_image.nii.gz on the same grid, up to the torch versions' rounding
        image = nib.load(downloaded["warped_atlas_image"])
        expected = nib.load(str(reference / "warped_image.nii.gz"))
        np.testing.assert_allclose(image.affine, expected.affine, atol=1e-4)
        correlation = np.corrcoef(np.asarray(image.dataobj).ravel(), np.asarray(expected.dataobj).ravel())[0, 1]
        assert correlation > 0.99, correlation
        # the transform (ITK: study -> atlas points, as 3D Slicer, SimpleITK and ANTs read it) applied to the atlas
        # gives exactly what the server answered: its label map and its warped atlas image
        transform = sitk.ReadTransform(str(downloaded["transform"]))
        study = sitk.ReadImage(str(served["studies"] / f"{STUDY}.nii.gz"))
        atlas_label, atlas_image = (sitk.ReadImage(served["atlas"][key]) for key in ("moving_label", "moving_image"))
        resampled_label = sitk.GetArrayFromImage(
            sitk.Resample(atlas_label, study, transform, sitk.sitkNearestNeighbor, 0, atlas_label.GetPixelID()))
        answered_label = sitk.GetArrayFromImage(sitk.ReadImage(str(inferred["label"])))
        assert (resampled_label == answered_label).mean() > 0.999
        resampled_image = sitk.GetArrayFromImage(
            sitk.Resample(atlas_image, study, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32))
        answered_image = sitk.GetArrayFromImage(sitk.ReadImage(str(downloaded["warped_atlas_image"])))
        assert np.corrcoef(resampled_image.ravel(), answered_image.ravel())[0, 1] > 0.9999
        # and it moves the study's brain points as the CLI's transform.h5 does: the same registration up to the
        # torch versions' rounding (measured: median 0.33 mm, RMS 1.0 mm of 4 mm voxels, mean displacement 6.3 mm)
        labels = nib.load(served["studies"] / "labels" / "final" / f"{STUDY}.nii.gz")
        brain_ras = nib.affines.apply_affine(labels.affine, np.argwhere(np.asarray(labels.dataobj) > 0))
        brain_lps = brain_ras * np.array([-1.0, -1.0, 1.0])
        moved = {}
        for key, path in (("server", downloaded["transform"]), ("cli", reference / "transform.h5")):
            loaded = sitk.ReadTransform(str(path))
            moved[key] = np.array([loaded.TransformPoint(tuple(point)) for point in brain_lps])
        displacement = np.linalg.norm(moved["cli"] - brain_lps, axis=1)
        error = np.linalg.norm(moved["server"] - moved["cli"], axis=1)
        assert displacement.mean() > 2.0  # a real registration, not an identity
        assert np.median(error) < 0.5 and np.sqrt(np.mean(error**2)) < 2.0, (np.median(error), displacement.mean())


def _sha256(path: Path) -> str:
    """A file's checksum as MONAI Label's ``GET /model/info/<model>`` states it."""
    return "SHA256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def test_train_task_over_http_trains_the_served_weights_outside_the_bundle(served, inferred):
    server, shipped = served["server"], served["bundle"] / "models" / "model.pt"
    trained = served["weights_dir"] / "model.pt"
    shipped_before = shipped.read_bytes()
    request = {"max_epochs": 1, "val_split": 0.0, "device": "cpu", "multi_gpu": False}
    with server.log_on_failure():
        assert server.get_json(f"/model/info/{MODEL}")["checksum"] == _sha256(shipped)  # served: the bundle's
        status, _, body = server.request("POST", f"/train/{MODEL}", json.dumps(request).encode(), "application/json")
        assert status == 200, f"{status}: {body[:2000]!r}"
        deadline = time.monotonic() + TRAIN_TIMEOUT_S
        task = json.loads(body)
        while task.get("status") in ("SUBMITTED", "RUNNING") and time.monotonic() < deadline:
            time.sleep(2.0)
            task = server.get_json("/train/")
        assert task.get("status") == "DONE", json.dumps(task)[-4000:]
        # the training wrote the app's weights, started from the shipped ones and changed them; the bundle is as it was
        assert shipped.read_bytes() == shipped_before
        before, after = (torch.load(path, weights_only=True) for path in (shipped, trained))
        assert set(before) == set(after)
        assert any(not torch.equal(before[k], after[k]) for k in before), "training did not change the weights"
        # and the server now serves them
        assert server.get_json(f"/model/info/{MODEL}")["checksum"] == _sha256(trained)
