# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""
Build the model-zoo release archive ``<name>_v<version>.zip`` of the bundle.

``<name>`` is the zoo-style folder name: ``--name``, or else metadata ``name`` (a display name such as
"SACB-Net deformable brain MRI registration") in lower case with every run of other characters turned into ``_``
("sacb_net_deformable_brain_mri_registration"); ``<version>`` is metadata ``version``.
The archive holds one top folder ``<name>/`` (what ``python -m monai.bundle download --name <name> --url ...`` expects),
with the bundle's ``LICENSE``, ``configs/``, ``scripts/``, ``docs/`` (``README.md`` model card and
``data_license.txt`` are required), ``models/`` and ``sample_data/``, plus two generated files:

* ``changelog``: the ``changelog`` of ``configs/metadata.json`` as text, newest version first. The zoo requires the
  released ``version`` to appear in it, so packaging fails otherwise.
* ``large_files.yml``: only when a file under ``models/`` is larger than the zoo's 25 MB limit. Such a file is left out
  of the archive and listed with its ``path``, ``url`` (``--weights_url`` + file name) and md5 ``hash_val``, which is
  how ``ci/verify_bundle.py`` and ``monai.bundle`` users fetch it.

Usage, from the repository root::

    python tools/package_bundle.py --bundle_dir bundle --output_dir dist

The archive is reproducible (sorted entries, fixed timestamps) and written atomically (temporary file + os.replace).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

__all__ = [
    "LARGE_FILE_BYTES",
    "bundle_name",
    "bundle_files",
    "changelog_text",
    "large_files_yaml",
    "package_bundle",
    "main",
]

LARGE_FILE_BYTES = 25 * 1024 * 1024  # model-zoo limit for files stored in the repository / archive
REQUIRED_FILES = (
    "LICENSE",
    "configs/metadata.json",
    "configs/inference.json",
    "docs/README.md",
    "docs/data_license.txt",
)
SHIPPED_FOLDERS = ("configs", "scripts", "docs", "models", "sample_data")
SKIPPED_NAMES = re.compile(r"(__pycache__|\.pyc$|\.pyo$|^\.|~$)")
NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_]*$")
VERSION_PATTERN = re.compile(r"^[0-9]+\.[0-9]+\.[0-9]+$")
ZIP_TIMESTAMP = (2020, 1, 1, 0, 0, 0)  # fixed so that the same bundle gives the same archive bytes


def bundle_name(metadata: Dict, name: Optional[str] = None) -> str:
    """
    Zoo folder name of the bundle: ``name`` if given, else metadata ``name`` in lower case with ``_`` for other runs.

    Raises:
        ValueError: if the result is empty or, for an explicit ``name``, not lower-case letters, digits and ``_``.
    """
    if name is None:
        display = metadata.get("name")
        if not isinstance(display, str):
            raise ValueError(f"metadata 'name' must be a string when --name is not given, got {display!r}.")
        name = re.sub(r"[^a-z0-9]+", "_", display.lower()).strip("_")
    if not NAME_PATTERN.match(name):
        raise ValueError(f"bundle name must be lower-case letters, digits and '_', got {name!r}.")
    return name


def _version_key(version: str) -> Tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


def changelog_text(metadata: Dict) -> str:
    """
    Render ``metadata["changelog"]`` (version -> description) as text, newest version first.

    Raises:
        ValueError: when ``version`` is missing or malformed, or is not an entry of the changelog.
    """
    version = metadata.get("version")
    if not isinstance(version, str) or not VERSION_PATTERN.match(version):
        raise ValueError(f"metadata 'version' must be a 'MAJOR.MINOR.PATCH' string, got {version!r}.")
    changelog = metadata.get("changelog")
    if not isinstance(changelog, dict) or version not in changelog:
        raise ValueError(f"metadata 'changelog' must be an object with an entry for version {version!r}.")
    versions = sorted(changelog, key=lambda v: _version_key(v) if VERSION_PATTERN.match(v) else (-1,), reverse=True)
    return "".join(f"{v}\n    {changelog[v]}\n" for v in versions)


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def large_files_yaml(entries: Sequence[Tuple[str, str, str]]) -> str:
    """``large_files.yml`` text for ``(path in bundle, url, md5)`` entries, the format of the zoo's bundles."""
    lines = ["large_files:"]
    for path, url, md5 in entries:
        lines += [f'  - path: "{path}"', f'    url: "{url}"', f'    hash_val: "{md5}"', '    hash_type: "md5"']
    return "\n".join(lines) + "\n"


def bundle_files(bundle_dir: Path) -> Iterator[Path]:
    """Files of the bundle that belong in a release, relative to ``bundle_dir``, in sorted order."""
    if (bundle_dir / "LICENSE").is_file():
        yield Path("LICENSE")
    for folder in SHIPPED_FOLDERS:
        root = bundle_dir / folder
        if not root.is_dir():
            continue
        for path in sorted(root.rglob("*")):
            relative = path.relative_to(bundle_dir)
            if path.is_file() and not any(SKIPPED_NAMES.search(part) for part in relative.parts):
                yield relative


def _check_bundle(bundle_dir: Path) -> Dict:
    missing = [f for f in REQUIRED_FILES if not (bundle_dir / f).is_file()]
    if missing:
        raise ValueError(f"bundle {bundle_dir} lacks required file(s): {', '.join(missing)}.")
    with open(bundle_dir / "configs" / "metadata.json") as f:
        return json.load(f)


def package_bundle(
    bundle_dir: str | Path, output_dir: str | Path, weights_url: Optional[str] = None, name: Optional[str] = None
) -> Path:
    """
    Write ``<output_dir>/<name>_v<version>.zip`` and return its path.

    Args:
        bundle_dir: bundle root (the folder holding ``configs/metadata.json``).
        output_dir: folder for the archive (created if needed).
        weights_url: base URL under which files over 25 MB in ``models/`` are hosted; required only if there are such
            files.
        name: zoo folder name; defaults to :py:func:`bundle_name` of the metadata.

    Raises:
        ValueError: for a missing required file, a bad name/version/changelog, or a large file without ``weights_url``.
    """
    bundle_dir, output_dir = Path(bundle_dir), Path(output_dir)
    metadata = _check_bundle(bundle_dir)
    name, version = bundle_name(metadata, name), metadata["version"]
    changelog = changelog_text(metadata)

    members: List[Tuple[str, Path]] = []
    large: List[Tuple[str, str, str]] = []
    for relative in bundle_files(bundle_dir):
        path = bundle_dir / relative
        if relative.parts[0] == "models" and path.stat().st_size > LARGE_FILE_BYTES:
            if not weights_url:
                raise ValueError(f"{relative} is over 25 MB: give --weights_url to list it in large_files.yml.")
            large.append((relative.as_posix(), f"{weights_url.rstrip('/')}/{relative.name}", _md5(path)))
        else:
            members.append((relative.as_posix(), path))

    output_dir.mkdir(parents=True, exist_ok=True)
    target = output_dir / f"{name}_v{version}.zip"
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=output_dir)
    os.close(fd)
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            generated = {"changelog": changelog}
            if large:
                generated["large_files.yml"] = large_files_yaml(large)
            entries = [(arc, path.read_bytes()) for arc, path in members]
            entries += [(arc, text.encode()) for arc, text in generated.items()]
            for arc, data in sorted(entries):
                info = zipfile.ZipInfo(f"{name}/{arc}", date_time=ZIP_TIMESTAMP)
                info.compress_type = zipfile.ZIP_DEFLATED
                info.external_attr = 0o644 << 16
                archive.writestr(info, data)
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return target


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[1], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--bundle_dir", default="bundle", help="bundle root (default: bundle)")
    parser.add_argument("--output_dir", default="dist", help="where to write <name>_v<version>.zip (default: dist)")
    parser.add_argument("--name", default=None, help="zoo folder name (default: from metadata 'name')")
    parser.add_argument("--weights_url", default=None, help="base URL hosting model files over 25 MB")
    args = parser.parse_args(argv)
    print(package_bundle(args.bundle_dir, args.output_dir, args.weights_url, args.name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
