# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""A fixed split *by person* of ``shared/data/brain_mal2012`` (23 native T1 scans of 20 people) and its test pairs.

``python -m bench.accuracy.native_split [--data DIR] [--write]`` prints (and with ``--write`` stores) the split in
``bench/accuracy/splits/mal2012_split.json``. The split never changes unless :data:`SPLIT_SEED` or the rules change:

* a person is one key of :data:`PEOPLE`; the rescans (1025 = 1005, 1038 = 1018, 1039 = 1019, per the data README)
  are listed with their person, so the two scans of one person always land in the same part;
* the three people with a rescan go one to each part (``train``, ``tuning``, ``test``), so every part holds one
  test-retest pair; which goes where is drawn with :data:`SPLIT_SEED`;
* the 17 other people are shuffled with the same seed and fill ``test`` (4 more), ``tuning`` (3 more) and ``train``
  (the remaining 10): 11 / 4 / 5 people in all;
* test pairs are every unordered pair of different test people (5 people give 10 pairs), each person represented by
  its first (lowest-id) scan; in a pair the scan with the higher id is moving, the lower id fixed. The test-retest
  pair of the test person is listed separately.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import numpy as np

__all__ = [
    "PEOPLE",
    "SPLIT_PATH",
    "SPLIT_SEED",
    "check_split",
    "load_split",
    "make_split",
    "retest_pairs",
    "scan_files",
    "test_pairs",
]

SPLIT_SEED = 2012
SPLIT_PATH = Path(__file__).resolve().parent / "splits" / "mal2012_split.json"
PARTS = ("train", "tuning", "test")
EXTRA_SINGLE = {"test": 4, "tuning": 3}  # the rest of the single-scan people go to train

# person id (its first scan) -> every scan of that person, first scan first (rescans from shared/data/README.md)
PEOPLE: dict[str, tuple[str, ...]] = {
    **{
        p: (p,)
        for p in (
            "1000",
            "1001",
            "1002",
            "1006",
            "1007",
            "1008",
            "1009",
            "1010",
            "1011",
            "1012",
            "1013",
            "1014",
            "1015",
            "1017",
            "1036",
            "1125",
            "1128",
        )
    },
    "1005": ("1005", "1025"),
    "1018": ("1018", "1038"),
    "1019": ("1019", "1039"),
}


def make_split(people: dict[str, tuple[str, ...]] | None = None, seed: int = SPLIT_SEED) -> dict[str, list[str]]:
    """Assign people to ``train`` / ``tuning`` / ``test`` with the rules of the module docstring.

    Args:
        people: person id -> scan ids (default :data:`PEOPLE`); needs at least 3 people with a rescan and more
            single-scan people than ``test`` and ``tuning`` take.
        seed: seed of the ``numpy.random.default_rng`` shuffles.

    Returns:
        ``{part: sorted person ids}``.
    """
    people = PEOPLE if people is None else people
    rescanned = sorted(p for p, scans in people.items() if len(scans) > 1)
    single = sorted(p for p, scans in people.items() if len(scans) == 1)
    if len(rescanned) < len(PARTS):
        raise ValueError(f"need at least {len(PARTS)} people with a rescan, got {rescanned}.")
    if len(single) <= sum(EXTRA_SINGLE.values()):
        raise ValueError(f"need more than {sum(EXTRA_SINGLE.values())} single-scan people, got {len(single)}.")
    rng = np.random.default_rng(seed)
    rescanned = [rescanned[i] for i in rng.permutation(len(rescanned))]
    single = [single[i] for i in rng.permutation(len(single))]
    split = {part: [rescanned[i]] for i, part in enumerate(PARTS)}
    split["train"] += rescanned[len(PARTS) :]
    start = 0
    for part in ("test", "tuning"):
        split[part] += single[start : start + EXTRA_SINGLE[part]]
        start += EXTRA_SINGLE[part]
    split["train"] += single[start:]
    return {part: sorted(split[part]) for part in PARTS}


def test_pairs(test_people: list[str]) -> list[tuple[str, str]]:
    """Every unordered pair of different test people as ``(moving scan, fixed scan)``: higher id moving.

    Args:
        test_people: person ids of the test part (each stands for its first scan).

    Returns:
        pairs sorted by (fixed, moving) scan id.
    """
    people = sorted(set(test_people))
    if len(people) < 2:
        raise ValueError(f"need at least 2 test people for a pair, got {people}.")
    return [(b, a) for a, b in itertools.combinations(people, 2)]


test_pairs.__test__ = False  # not a pytest test despite the name


def retest_pairs(part_people: list[str], people: dict[str, tuple[str, ...]] | None = None) -> list[tuple[str, str]]:
    """The test-retest pairs (rescan moving -> first scan fixed) of the given people."""
    people = PEOPLE if people is None else people
    return [(people[p][k], people[p][0]) for p in sorted(part_people) for k in range(1, len(people[p]))]


def check_split(split: dict, people: dict[str, tuple[str, ...]] | None = None) -> None:
    """Raise ``ValueError`` if a person is missing, unknown or in two parts, or a part's scan list is inconsistent."""
    people = PEOPLE if people is None else people
    seen: dict[str, str] = {}
    for part in PARTS:
        for person in split[part]:
            if person not in people:
                raise ValueError(f"{part}: unknown person {person!r}.")
            if person in seen:
                raise ValueError(f"person {person} is in both {seen[person]} and {part}.")
            seen[person] = part
    missing = sorted(set(people) - set(seen))
    if missing:
        raise ValueError(f"people {missing} are in no part.")
    scans = split.get("scans")
    if scans is not None:
        for part in PARTS:
            expected = sorted(s for p in split[part] for s in people[p])
            if sorted(scans[part]) != expected:
                raise ValueError(f"{part}: scans {scans[part]} do not match its people's scans {expected}.")


def scan_files(data_dir: str | Path, scan: str) -> dict[str, Path]:
    """The T1, seg14 and full label files of one ``brain_mal2012`` scan id."""
    data_dir = Path(data_dir)
    files = {
        "image": data_dir / f"mal{scan}_t1.nii.gz",
        "label": data_dir / f"mal{scan}_seg14.nii.gz",
        "label_nmm": data_dir / f"mal{scan}_labels_nmm.nii.gz",
    }
    missing = [str(p) for p in files.values() if not p.exists()]
    if missing:
        raise ValueError(f"scan {scan}: missing {missing}.")
    return files


def build_split_document(seed: int = SPLIT_SEED) -> dict:
    """The JSON document stored in :data:`SPLIT_PATH`."""
    split = make_split(seed=seed)
    doc = {
        "dataset": "shared/data/brain_mal2012 (MICCAI 2012 multi-atlas labelling, OASIS-1 T1; CC BY-NC, research only)",
        "rule": (
            "split by person; rescans stay with their person; one rescanned person per part; the other people "
            f"shuffled with numpy default_rng({seed}); see bench/accuracy/native_split.py"
        ),
        "seed": seed,
        "people": {p: list(s) for p, s in sorted(PEOPLE.items())},
        **split,
        "scans": {part: sorted(s for p in split[part] for s in PEOPLE[p]) for part in PARTS},
        "test_pairs": [{"moving": m, "fixed": f} for m, f in test_pairs(split["test"])],
        "retest_pairs": {part: [{"moving": m, "fixed": f} for m, f in retest_pairs(split[part])] for part in PARTS},
        "labels": "seg14 (14 classes, left/right merged); table in shared/data/README.md",
    }
    check_split(doc)
    return doc


def load_split(path: str | Path = SPLIT_PATH) -> dict:
    """Read and check a stored split document."""
    doc = json.loads(Path(path).read_text())
    check_split(doc, {p: tuple(s) for p, s in doc["people"].items()})
    return doc


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=None, help="brain_mal2012 folder: check every listed scan exists")
    parser.add_argument("--write", action="store_true", help=f"write {SPLIT_PATH}")
    args = parser.parse_args(argv)
    doc = build_split_document()
    if args.data:
        for scans in PEOPLE.values():
            for scan in scans:
                scan_files(args.data, scan)
    if args.write:
        from bench.accuracy.io import write_json_atomic

        write_json_atomic(doc, SPLIT_PATH)
    print(json.dumps({k: doc[k] for k in ("train", "tuning", "test", "test_pairs")}, indent=1))
    return doc


if __name__ == "__main__":
    main()
