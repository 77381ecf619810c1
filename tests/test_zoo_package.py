"""Model-zoo release: ``tools/package_bundle.py`` builds ``<name>_v<version>.zip``; the zip is served over HTTP on
127.0.0.1, fetched with ``python -m monai.bundle download --url``, and the downloaded bundle runs inference on the real
pair and loads with ``monai.bundle.load``."""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import sys
import threading
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import BUNDLE_ROOT, REPO_ROOT
from ecosystem_utils import bundle_copy_with_weights, run_bundle_command, run_checked
from reliability_data import small_pair

sys.path.insert(0, str(REPO_ROOT / "tools"))
from package_bundle import LARGE_FILE_BYTES, bundle_name, package_bundle  # noqa: E402

METADATA = json.loads((BUNDLE_ROOT / "configs" / "metadata.json").read_text())
NAME = bundle_name(METADATA)
VERSION = METADATA["version"]


def _tiny_bundle(folder: Path, changelog=None) -> Path:
    """Smallest bundle tree the packager accepts (content irrelevant to the packaging rules under test)."""
    for rel, text in {
        "LICENSE": "Apache-2.0",
        "configs/inference.json": "{}",
        "docs/README.md": "# card",
        "docs/data_license.txt": "data terms",
        "scripts/__init__.py": "",
        "scripts/__pycache__/x.cpython-311.pyc": "bytecode",
    }.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_text(text)
    metadata = {"name": "Tiny Reg-Net (test)", "version": "1.2.0"}
    metadata["changelog"] = changelog if changelog is not None else {"1.0.0": "first", "1.2.0": "latest"}
    (folder / "configs" / "metadata.json").write_text(json.dumps(metadata))
    return folder


def test_bundle_name_from_display_name():
    assert bundle_name({"name": "SACB-Net deformable brain MRI registration"}) == (
        "sacb_net_deformable_brain_mri_registration"
    )
    assert bundle_name({}, name="sacb_net") == "sacb_net"
    with pytest.raises(ValueError, match="lower-case"):
        bundle_name({}, name="Bad Name")


def test_package_layout_and_reproducible(tmp_path):
    root = _tiny_bundle(tmp_path / "tiny")
    first = package_bundle(root, tmp_path / "a")
    second = package_bundle(root, tmp_path / "b")
    assert first.name == "tiny_reg_net_test_v1.2.0.zip"
    assert first.read_bytes() == second.read_bytes()
    with zipfile.ZipFile(first) as archive:
        names = archive.namelist()
        assert all(n.startswith("tiny_reg_net_test/") for n in names)
        assert "tiny_reg_net_test/scripts/__pycache__/x.cpython-311.pyc" not in names
        assert "tiny_reg_net_test/large_files.yml" not in names
        changelog = archive.read("tiny_reg_net_test/changelog").decode()
    assert changelog.index("1.2.0") < changelog.index("1.0.0")  # newest first


def test_large_weights_go_to_large_files_yml(tmp_path):
    root = _tiny_bundle(tmp_path / "tiny")
    big = root / "models" / "model.pt"
    big.parent.mkdir()
    with open(big, "wb") as f:
        f.write(b"\1" * (LARGE_FILE_BYTES + 1))
    (root / "models" / "small.pt").write_bytes(b"\2" * 10)
    with pytest.raises(ValueError, match="over 25 MB"):
        package_bundle(root, tmp_path / "out")
    archive_path = package_bundle(root, tmp_path / "out", weights_url="https://example.org/w/")
    with zipfile.ZipFile(archive_path) as archive:
        names = archive.namelist()
        listing = archive.read("tiny_reg_net_test/large_files.yml").decode()
    assert "tiny_reg_net_test/models/model.pt" not in names
    assert "tiny_reg_net_test/models/small.pt" in names
    assert 'path: "models/model.pt"' in listing and 'url: "https://example.org/w/model.pt"' in listing
    assert f'hash_val: "{hashlib.md5(big.read_bytes()).hexdigest()}"' in listing


@pytest.mark.parametrize(
    "changelog, message", [({"1.0.0": "first"}, "entry for version '1.2.0'"), ("1.2.0", "must be an object")]
)
def test_changelog_must_hold_version(tmp_path, changelog, message):
    root = _tiny_bundle(tmp_path / "tiny", changelog=changelog)
    with pytest.raises(ValueError, match=message):
        package_bundle(root, tmp_path / "out")


def test_missing_model_card_is_an_error(tmp_path):
    root = _tiny_bundle(tmp_path / "tiny")
    (root / "docs" / "README.md").unlink()
    with pytest.raises(ValueError, match="docs/README.md"):
        package_bundle(root, tmp_path / "out")


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep pytest output clean
        pass


@pytest.fixture
def served_release(tmp_path):
    """Build the real bundle's release zip and serve its folder on 127.0.0.1 (free port); yields (url, zip path)."""
    archive = package_bundle(bundle_copy_with_weights(tmp_path / "src"), tmp_path / "dist")
    handler = functools.partial(_QuietHandler, directory=str(archive.parent))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/{archive.name}", archive
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_release_zip_of_the_real_bundle(served_release):
    _, archive = served_release
    assert archive.name == f"{NAME}_v{VERSION}.zip"
    with zipfile.ZipFile(archive) as archive_file:
        names = set(archive_file.namelist())
        changelog = archive_file.read(f"{NAME}/changelog").decode()
    for required in ("LICENSE", "changelog", "configs/metadata.json", "configs/inference.json", "configs/train.json",
                     "docs/README.md", "docs/data_license.txt", "models/model.pt", "scripts/__init__.py",
                     "scripts/networks/sacb_net.py", "scripts/layers/warp.py"):
        assert f"{NAME}/{required}" in names, required
    assert all(n.startswith(f"{NAME}/") for n in names)
    assert not any("__pycache__" in n for n in names)
    assert VERSION in changelog


@pytest.mark.slow
def test_download_from_local_server_then_infer_and_load(served_release, tmp_path):
    url, _ = served_release
    downloads = tmp_path / "downloads"
    run_checked(
        [sys.executable, "-m", "monai.bundle", "download", "--name", NAME, "--url", url,
         "--bundle_dir", str(downloads)],
        cwd=tmp_path,
        env={"NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"},
    )
    bundle = downloads / NAME
    assert (bundle / "configs" / "inference.json").is_file() and (bundle / "models" / "model.pt").is_file()

    # inference of the downloaded bundle on the real pair (every 4th voxel: 40x48x40, 4 mm)
    pair = small_pair(tmp_path / "pair", factor=4)
    out = tmp_path / "out"
    overrides = [f"--{key}={value}" for key, value in pair.items()]
    run_bundle_command(
        ["run", "--config_file", "configs/inference.json", "--output_dir", str(out), *overrides], bundle
    )
    warped_files = list(out.rglob("warped_image.nii.gz"))
    assert len(warped_files) == 1, sorted(p.name for p in out.rglob("*"))
    warped, fixed = nib.load(str(warped_files[0])), nib.load(pair["fixed_image"])
    assert warped.shape[:3] == fixed.shape[:3]
    np.testing.assert_allclose(warped.affine, fixed.affine, atol=1e-5)
    assert np.asarray(warped.dataobj).std() > 0
    assert (warped_files[0].parent / "ddf.nii.gz").is_file()

    # monai.bundle.load of the downloaded bundle, importing ITS scripts (own process: no repo bundle on sys.path)
    check = (
        "import sys, torch, scripts; from monai.bundle import load\n"
        f"net = load({NAME!r}, bundle_dir={str(downloads)!r}, workflow_type='inference', device='cpu')\n"
        f"ref = torch.load({str(bundle / 'models' / 'model.pt')!r}, weights_only=True)\n"
        "assert type(net).__name__ == 'SACBNet', type(net)\n"
        f"assert scripts.__file__.startswith({str(bundle)!r}), scripts.__file__\n"
        "assert all(torch.equal(v, ref[k]) for k, v in net.state_dict().items())\n"
        "print('loaded', type(net).__module__, sum(p.numel() for p in net.parameters()))\n"
    )
    result = run_checked([sys.executable, "-c", check], cwd=bundle, env={"PYTHONPATH": str(bundle)})
    assert "loaded scripts.networks.sacb_net 1105591" in result.stdout
