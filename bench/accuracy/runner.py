# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""The one runner of the accuracy benchmark, for pre-aligned folder pairs and native pairs alike.

A benchmark is a sequence of :class:`Task` (one method on one pair). :func:`run_tasks` runs each in its own process
with every thread pool capped (``OMP_NUM_THREADS``, ``MKL_NUM_THREADS``, ``OPENBLAS_NUM_THREADS``,
``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS``), takes its wall time, and its CPU time and peak RSS from ``os.wait4`` in a
small launcher (``measure.py``: a child started by the runner itself would inherit the runner's peak RSS),
scores its outputs (``scoring.py``) and rewrites the results JSON atomically after every task. The document is the same
for both benchmarks: ``runs`` (machine, versions, threads, load of each run), ``pairs``, ``methods``, ``results`` (one
row per (pair, method)) and, for folder runs, ``skipped``.

* :func:`run_benchmark` (``python -m bench.accuracy``): every method on every pair found in the data folders; a fresh
  document per run (the same method name may be rerun with other overrides).
* :func:`run_native` (``python -m bench.accuracy.native``): the native pairs and their pre-aligned twins in
  :func:`~bench.accuracy.methods.task_order`; resumable (a rerun skips every (pair, method) already ``ok``), the
  pre-aligned inputs written by ``ants_affine`` to ``OUT/prealigned/<pair>/`` and listed in
  ``OUT/prealigned/datalist.json``.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from bench.accuracy import BUNDLE_ROOT
from bench.accuracy.io import write_json_atomic
from bench.accuracy.methods import METHODS, Method, NativeMethod, task_order
from bench.accuracy.pairs import NativePair, Skipped, discover_pairs, prealigned_pair
from bench.accuracy.report import format_row
from bench.accuracy.scoring import score_outputs, score_pair

__all__ = [
    "Task",
    "done_tasks",
    "execute",
    "load_report",
    "machine_info",
    "reuse_prealigned",
    "run_benchmark",
    "run_native",
    "run_task",
    "run_tasks",
    "task_command",
    "thread_env",
    "write_datalist",
]

REPO_ROOT = BUNDLE_ROOT.parent
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS")
VERSIONS_OF = ("numpy", "scipy", "nibabel", "antspyx", "torch", "monai", "matplotlib")


# ---------------------------------------------------------------- one process, measured


def thread_env(threads: int) -> dict[str, str]:
    """The child environment: every thread pool capped at ``threads``, the repository importable."""
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}.")
    env = dict(os.environ, **{key: str(threads) for key in THREAD_VARS})
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def machine_info(threads: int, argv: list[str]) -> dict:
    """Machine, versions, threads and the 1-minute load average, recorded at the start of each run."""
    cpu = platform.processor()
    try:
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    versions = {"python": platform.python_version()}
    for dist in VERSIONS_OF:
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], check=False, cwd=REPO_ROOT, capture_output=True, text=True
    ).stdout.strip()
    return {
        "started_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "argv": argv,
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "threads_per_method": threads,
        "loadavg_1min": os.getloadavg()[0],
        "nice": os.nice(0),
        "git_commit": commit,
        "versions": versions,
    }


def run_task(argv: list[str], cwd: Path, threads: int, log_path: Path) -> dict:
    """
    Run one method process; return its exit code, wall time, CPU time (user + system) and peak RSS.

    The process is started through ``bench.accuracy.measure`` (see there why), which reports its CPU time and peak
    RSS; the wall time is taken here, so it includes that launcher's start (~0.05 s).
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    usage_path = log_path.with_name(log_path.name + ".usage.json")
    usage_path.unlink(missing_ok=True)
    launcher = [sys.executable, "-m", "bench.accuracy.measure", str(usage_path), "--", *argv]
    load = os.getloadavg()[0]
    with open(log_path, "w") as log:
        start = time.perf_counter()
        done = subprocess.run(launcher, cwd=cwd, env=thread_env(threads), stdout=log, stderr=subprocess.STDOUT)
        returncode = done.returncode
        wall = time.perf_counter() - start
    if not usage_path.exists():  # the launcher itself failed (its message is in the log)
        return {"returncode": returncode or 1, "wall_s": wall, "cpu_s": float("nan"), "peak_rss_mib": float("nan"),
                "loadavg_1min_at_start": load, "log": str(log_path), "command": argv}
    usage = json.loads(usage_path.read_text())
    usage_path.unlink()
    return {
        "returncode": usage["returncode"],
        "wall_s": wall,
        "cpu_s": usage["cpu_s"],  # robust to other load on a shared machine, unlike wall time
        "peak_rss_mib": usage["peak_rss_mib"],
        "loadavg_1min_at_start": load,
        "log": str(log_path),
        "command": argv,
    }


@dataclass
class Task:
    """One method on one pair.

    Args:
        pair, method: the row's key in the results JSON.
        score: scores the outputs in the given folder (None: nothing ran, e.g. identity on pre-aligned pairs).
        command: (argv, working directory) of the method's process; None = scored in-process without running.
        method_dir: the folder the process writes into (its log is ``method_dir.log``).
        fields: more fields of the row (e.g. the inputs it ran on).
        not_run: why the method cannot run here (antspyx or weights missing); the row records it.
    """

    pair: str
    method: str
    score: Callable[[Path | None], dict]
    command: tuple[list[str], Path] | None = None
    method_dir: Path | None = None
    fields: dict = field(default_factory=dict)
    not_run: str = ""


def execute(task: Task, threads: int) -> dict:
    """Run and score one task; returns its row (``status`` ok, failed or not run)."""
    record = {"pair": task.pair, "method": task.method, **task.fields}
    if task.not_run:
        record.update(status="not run", reason=task.not_run)
    elif task.command is None:
        record.update(status="ok", wall_s=0.0, peak_rss_mib=None, **task.score(None))
    else:
        argv, cwd = task.command
        task.method_dir.mkdir(parents=True, exist_ok=True)
        record.update(run_task(argv, cwd, threads, task.method_dir.with_suffix(".log")))
        if record["returncode"] != 0:
            record.update(status="failed", reason=f"exit {record['returncode']}, see {record['log']}")
        else:
            try:
                record.update(status="ok", **task.score(task.method_dir))
            except (OSError, ValueError) as err:
                record.update(status="failed", reason=f"scoring: {err}")
            info = task.method_dir / "method.json"
            if info.exists():
                record["method_info"] = json.loads(info.read_text())
    record["finished_utc"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    return record


# ---------------------------------------------------------------- the results document


def load_report(path: Path) -> dict:
    """The results document at ``path``, or an empty one."""
    if path.exists():
        report = json.loads(path.read_text())
        if {"runs", "results"} <= set(report):
            return report
    return {"runs": [], "pairs": {}, "methods": {}, "results": []}


def done_tasks(report: dict) -> set[tuple[str, str]]:
    """(pair, method) of every ``ok`` row."""
    return {(r["pair"], r["method"]) for r in report["results"] if r.get("status") == "ok"}


def _store(report: dict, record: dict) -> None:
    """Put a row in the document, replacing an earlier row of the same (pair, method)."""
    key = (record["pair"], record["method"])
    report["results"] = [r for r in report["results"] if (r["pair"], r["method"]) != key] + [record]


def _done_line(record: dict) -> str:
    nan = float("nan")
    return (
        f"[done] {record['pair']} / {record['method']}: {record['status']} dice={record.get('dice_mean', nan):.3f} "
        f"hd95={record.get('hd95_mean', nan):.2f}mm sdlogj={record.get('sdlogj', nan):.3f} "
        f"wall={record.get('wall_s', nan):.0f}s cpu={record.get('cpu_s', nan):.0f}s "
        f"rss={record.get('peak_rss_mib') or nan:.0f}MiB {record.get('reason', '')}"
    )


def run_tasks(
    tasks: Iterable[Task],
    report: dict,
    json_path: Path,
    threads: int,
    resume: bool = True,
    show: Callable[[dict], str] = _done_line,
    on_done: Callable[[dict], None] | None = None,
) -> dict:
    """
    Execute every task in order and write the document to ``json_path`` after each (a long run keeps its partial
    results). ``tasks`` may be a generator that looks at ``report`` as it fills (e.g. to wait for a pre-alignment).

    Args:
        resume: skip tasks whose (pair, method) is already ``ok`` in ``report``.
        show: the line printed for a finished row.
        on_done: called with every finished row after it is written.
    """
    for task in tasks:
        if resume and (task.pair, task.method) in done_tasks(report):
            continue
        if task.command is not None and not task.not_run:
            print(f"[run] {task.pair} / {task.method} (load {os.getloadavg()[0]:.2f}) ...", flush=True)
        record = execute(task, threads)
        if resume:
            _store(report, record)
        else:
            report["results"].append(record)
        write_json_atomic(report, json_path)
        if on_done is not None:
            on_done(record)
        print(show(record), flush=True)
    return report


# ---------------------------------------------------------------- pre-aligned folder pairs


def _folder_tasks(
    report: dict, data_dirs: list[Path], methods: list[Method], out_dir: Path, include_unlabeled: bool
) -> Iterator[Task]:
    """Every method on every pair found in ``data_dirs``; skipped folders and the pairs are noted in ``report``."""
    for data_dir in data_dirs:
        for item in discover_pairs(data_dir, include_unlabeled=include_unlabeled):
            if isinstance(item, Skipped):
                report["skipped"].append({"pair": item.name, "reason": item.reason})
                print(f"[skip] {item.name}: {item.reason}", flush=True)
                continue
            report["pairs"][item.name] = item.as_dict()
            for method in methods:
                method_dir = out_dir / item.name.replace("/", "__") / method.name
                command = None if method.command is None else method.command(item, method_dir)
                yield Task(
                    item.name,
                    method.name,
                    score=lambda folder, pair=item: score_pair(pair, folder),
                    command=None if command is None else (command, method.cwd or REPO_ROOT),
                    method_dir=method_dir,
                    fields={"primary": item.primary.name if item.primary else None},
                    not_run="" if method.available else method.why_not,
                )


def run_benchmark(
    data_dirs: list[Path],
    methods: list[Method],
    out_dir: Path,
    threads: int = 2,
    include_unlabeled: bool = False,
    json_path: Path | None = None,
    argv: list[str] | None = None,
) -> dict:
    """Run every available method on every pair found in ``data_dirs``; a fresh document at ``json_path`` (default
    ``OUT/results.json``), written after each run."""
    report = {"runs": [machine_info(threads, argv or [])], "pairs": {}, "methods": {}, "skipped": [], "results": []}
    for method in methods:
        report["methods"][method.name] = {"available": method.available, "why_not": method.why_not, **method.settings}
    json_path = json_path or out_dir / "results.json"
    tasks = _folder_tasks(report, [Path(d) for d in data_dirs], methods, out_dir, include_unlabeled)
    run_tasks(tasks, report, json_path, threads, resume=False, show=format_row)
    write_json_atomic(report, json_path)  # also when no pair was found
    return report


# ---------------------------------------------------------------- native pairs


def write_datalist(report: dict, out_dir: Path) -> Path:
    """``OUT/prealigned/datalist.json``: every pair whose ``ants_affine`` is done, with its pre-aligned inputs."""
    entries = []
    done = done_tasks(report)
    for name, pair in report["pairs"].items():
        if (name, "ants_affine") not in done:
            continue
        aligned = prealigned_pair(NativePair(**pair), out_dir / "prealigned" / name)
        entries.append(
            {
                "id": name,
                **{k: getattr(aligned, k) for k in ("fixed_image", "moving_image", "fixed_label", "moving_label")},
            }
        )
    path = out_dir / "prealigned" / "datalist.json"
    note = "moving scan and seg14 labels resampled into the fixed space by ANTs Affine (bench/accuracy/native.py)"
    write_json_atomic({"note": note, "pairs": entries}, path)
    return path


def reuse_prealigned(source_dir: Path, out_dir: Path, pair_names: list[str]) -> list[str]:
    """
    Start ``out_dir`` from another run's ANTs ``Affine`` results: copy its ``ants_affine`` and
    ``identity_after_affine`` records (status ok) and the pre-aligned files of ``pair_names`` that ``out_dir`` lacks,
    so candidate weights are scored on the very same pre-aligned inputs without rerunning ANTs.

    Returns:
        the pairs whose pre-aligned inputs were copied.
    """
    source, report = load_report(source_dir / "results.json"), load_report(out_dir / "results.json")
    done, copied = done_tasks(report), []
    for name in pair_names:
        if (name, "ants_affine") in done or (name, "ants_affine") not in done_tasks(source):
            continue
        shutil.copytree(source_dir / "prealigned" / name, out_dir / "prealigned" / name, dirs_exist_ok=True)
        for record in source["results"]:
            if record["pair"] == name and record["method"] in ("ants_affine", "identity_after_affine"):
                _store(report, {**record, "reused_from": str(source_dir)})
        report["pairs"][name] = source["pairs"][name]
        copied.append(name)
    for name in ("ants_affine", "identity_after_affine"):
        if name in source["methods"]:
            report["methods"].setdefault(name, source["methods"][name])
    write_json_atomic(report, out_dir / "results.json")
    write_datalist(report, out_dir)
    return copied


def task_command(
    method: NativeMethod, pair: NativePair, method_dir: Path, prealigned_dir: Path, seed: int, weights: str | None
) -> tuple[list[str], Path]:
    """(argv, working directory) of one task: ``ants_affine`` also writes the pre-aligned inputs, bundle methods get
    ``--weights`` when candidate weights are given."""
    argv, cwd = method.command(pair, method_dir, seed)
    if method.name == "ants_affine":
        argv += ["--prealigned_dir", str(prealigned_dir)]
    if weights and method.mode == "bundle":
        argv += ["--weights", weights]
    return argv, cwd


def _native_tasks(
    report: dict, pairs: list[NativePair], method_names: list[str], out_dir: Path, seed: int, weights: str | None
) -> Iterator[Task]:
    """The tasks in :func:`task_order`; a pre-aligned task waits (is left out) until its pair's ``ants_affine`` is
    ``ok``, which this generator sees as the runner fills ``report``."""
    for native, method in task_order(pairs, method_names):
        if (native.name, method.name) in done_tasks(report):
            continue
        pair = native
        if method.inputs == "prealigned":
            if (native.name, "ants_affine") not in done_tasks(report):
                print(f"[wait] {native.name} / {method.name}: needs ants_affine first", flush=True)
                continue
            pair = prealigned_pair(native, out_dir / "prealigned" / native.name)
        method_dir = out_dir / native.name / method.name
        yield Task(
            native.name,
            method.name,
            # scored against the native pair: the fixed side is the same, the moving labels' classes are the original
            score=lambda folder, native=native, method=method: score_outputs(native, method.deformable, folder),
            command=task_command(method, pair, method_dir, out_dir / "prealigned" / native.name, seed, weights),
            method_dir=method_dir,
            fields={"inputs": method.inputs},
        )


def run_native(
    pairs: list[NativePair],
    method_names: list[str],
    out_dir: Path,
    threads: int,
    seed: int,
    argv: list[str],
    weights: str | None = None,
) -> dict:
    """
    Do every native task not yet ``ok`` in ``OUT/results.json``, in :func:`task_order`; returns the report.

    ``weights`` (a state dict) replaces ``bundle/models/model.pt`` in every bundle method (``register --weights``);
    it is recorded with the methods, so give candidate weights their own ``OUT``.
    """
    json_path = out_dir / "results.json"
    report = load_report(json_path)
    report["runs"].append(machine_info(threads, argv))
    report["pairs"].update({p.name: p.as_dict() for p in pairs})
    for name in method_names:
        m = METHODS[name]
        report["methods"][name] = {
            "inputs": m.inputs,
            "mode": m.mode,
            "deformable": m.deformable,
            "random_seed": seed,
            **m.settings,
            **({"weights": weights} if weights and m.mode == "bundle" else {}),
        }
    write_json_atomic(report, json_path)

    def after(record: dict) -> None:
        if record["method"] == "ants_affine" and record["status"] == "ok":
            write_datalist(report, out_dir)

    tasks = _native_tasks(report, pairs, method_names, out_dir, seed, weights)
    return run_tasks(tasks, report, json_path, threads, on_done=after)
