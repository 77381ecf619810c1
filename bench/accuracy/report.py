# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""Markdown tables of accuracy-benchmark results JSON, as shown in ``docs/results.md`` and ``docs/usage.md``.

``python -m bench.accuracy.report RESULTS.json [MORE.json ...]``

* a folder-benchmark document (``python -m bench.accuracy``, it lists ``skipped`` folders): one row per (pair, method)
  in file order, then the machine and versions of the first file, then the skipped folders (:func:`render`);
* a native-pair document (``python -m bench.accuracy.native``; also ``python -m bench.accuracy.native_report``): for
  the native and the pre-aligned inputs, one row per method with means over the ``brain_mal2012`` test pairs it
  finished (seg14 Dice over the classes present in both, mean HD95 in mm over the same classes, subcortical Dice, %
  det J <= 0 and SDlogJ in the fixed brain, wall / CPU time, peak RSS) and the mean Dice over the pairs that *every*
  row of that table finished; then the per-pair Dice and HD95 of every method (the FreeSurfer pair is listed there,
  not averaged with the others: its labels come from FreeSurfer, not from the manual protocol), per-class Dice and
  HD95, and the machine of each run (:func:`render_native`). HD95 shows "—" for rows scored before it was recorded
  (``native_rescore`` adds it); its tables are left out when no row has it.

Both read the documents written before the two benchmarks shared one runner (``machine``/``versions`` at the top of a
folder document instead of ``runs``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

__all__ = ["NATIVE_ROWS", "PREALIGNED_ROWS", "SEG14_NAMES", "TABLE_HEADER", "format_row", "format_table", "main",
           "render", "render_native"]


# ---------------------------------------------------------------- folder benchmark


def _fmt(value, spec: str) -> str:
    return "—" if value is None or (isinstance(value, float) and np.isnan(value)) else format(value, spec)


def format_row(record: dict) -> str:
    groups = record.get("groups", {})
    names = list(groups)
    main = groups.get(names[0], {}) if names else {}
    second = groups.get(names[1], {}) if len(names) > 1 else {}
    cells = [
        record["pair"],
        record["method"],
        f"{names[0]}={_fmt(main.get('dice'), '.3f')}" if names else "—",
        f"{names[1]}={_fmt(second.get('dice'), '.3f')}" if len(names) > 1 else "—",
        _fmt(main.get("hd95_mm"), ".2f"),
        _fmt(record.get("fold_pct"), ".3f"),
        _fmt(record.get("wall_s"), ".1f"),
        _fmt(record.get("cpu_s"), ".1f"),
        _fmt(record.get("peak_rss_mib"), ".0f"),
        record.get("status", "") if record.get("status") == "ok" else f"{record.get('status')}: {record.get('reason', '')}",
    ]
    return "| " + " | ".join(cells) + " |"


TABLE_HEADER = (
    "| pair | method | Dice (primary) | Dice (secondary) | HD95 primary (mm) | % det J ≤ 0 | wall (s) | CPU (s) | peak RSS (MiB) | status |\n"
    "|---|---|---|---|---|---|---|---|---|---|"
)


def format_table(report: dict) -> str:
    """Markdown table of all results (primary label group first)."""
    return "\n".join([TABLE_HEADER] + [format_row(r) for r in report["results"]])


def _machine_of(report: dict) -> tuple[dict, dict]:
    """(machine, versions) of a folder document: its first run, or the top-level fields of an older document."""
    if "machine" in report:
        return report["machine"], report["versions"]
    run = report["runs"][0]
    return {**run, "date_utc": run["started_utc"]}, run["versions"]


def render(reports: list[dict]) -> str:
    """Markdown for the given folder-benchmark reports (the dicts written by ``runner.run_benchmark``)."""
    if not reports:
        raise ValueError("need at least one results report.")
    # group rows by pair; an identical (pair, method, settings) run seen twice (e.g. identity in two runs) shows once;
    # a method run with overrides shows them beside its name
    seen, keyed = set(), []
    for report in reports:
        for record in report["results"]:
            settings = report["methods"].get(record["method"], {})
            key = (record["pair"], record["method"], json.dumps(settings, sort_keys=True, default=str))
            if key in seen:
                continue
            seen.add(key)
            overrides = settings.get("overrides") or {}
            if overrides:
                label = ", ".join(f"{k}={v}" for k, v in overrides.items())
                record = {**record, "method": f"{record['method']} ({label})"}
            keyed.append(record)
    order = {pair: i for i, pair in enumerate(dict.fromkeys(r["pair"] for r in keyed))}
    rows = [format_row(r) for r in sorted(keyed, key=lambda r: order[r["pair"]])]
    lines = [TABLE_HEADER, *rows, ""]
    machine, versions = _machine_of(reports[0])
    lines.append(
        f"Machine: {machine['cpu']} ({machine['cpu_count']} logical CPUs), {machine['threads_per_method']} threads per "
        f"method, {machine['platform']}; commit {machine['git_commit']}, {machine['date_utc']}."
    )
    lines.append("Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()) + ".")
    skipped = {(s["pair"], s["reason"]) for report in reports for s in report["skipped"]}
    if skipped:
        lines.append("")
        lines.extend(f"- `{pair}`: {reason}" for pair, reason in sorted(skipped))
    return "\n".join(lines)


# ---------------------------------------------------------------- native pairs


NATIVE_ROWS = {
    "identity": "identity (world coordinates)",
    "ants_affine": "ANTs Affine",
    "ants_syn_60_30_10": "ANTs SyN (60,30,10)",
    "ants_syn_40_20_0": "ANTs SyN (40,20,0) antspyx default",
    "ants_syn_60_30_10_masks": "ANTs SyN (60,30,10) with brain masks",
    "bundle_affine_only": "bundle register --affine_only",
    "bundle_affine_only_masks": "bundle register --affine_only with brain masks",
    "bundle_native_it0": "bundle register --iterations 0 --refine_iterations 0",
    "bundle_default": "bundle register (default)",
    "bundle_default_masks": "bundle register (default) with brain masks",
}
PREALIGNED_ROWS = {
    "identity_after_affine": "identity after ANTs Affine",
    "ants_synonly_60_30_10": "ANTs SyNOnly (60,30,10)",
    "ants_synonly_40_20_0": "ANTs SyNOnly (40,20,0) antspyx default",
    "bundle_register_it0": "bundle register --affine none --iterations 0 --refine_iterations 0",
    "bundle_register": "bundle register --affine none (default)",
}
SEG14_NAMES = {
    1: "thalamus",
    2: "cerebellum cortex",
    3: "lateral ventricle",
    4: "cerebellum WM",
    5: "putamen",
    6: "caudate",
    7: "pallidum",
    8: "hippocampus",
    9: "amygdala",
    10: "cerebral cortex",
    11: "3rd ventricle",
    12: "4th ventricle",
    13: "brainstem",
    14: "cerebral WM",
}


def _ok(report: dict) -> dict[tuple[str, str], dict]:
    return {(r["pair"], r["method"]): r for r in report["results"] if r.get("status") == "ok"}


def _mean(values) -> float:
    values = [float(v) for v in values if v is not None and not np.isnan(float(v))]
    return float(np.mean(values)) if values else float("nan")


def _f(value, spec: str = ".3f") -> str:
    return "—" if value is None or np.isnan(value) else format(value, spec)


def _summary(report: dict, rows: dict[str, str], pairs: list[str]) -> list[str]:
    ok = _ok(report)
    shown = [m for m in rows if any((p, m) in ok for p in pairs)]
    common = [p for p in pairs if all((p, m) in ok for m in shown)]
    lines = [
        f"| method | pairs | Dice (14) | HD95 (mm) | Dice subcortical | Dice (14) on the {len(common)} common pairs | % det J ≤ 0 | SDlogJ | wall (s) | CPU (s) | peak RSS (MiB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in shown:
        recs = [ok[(p, m)] for p in pairs if (p, m) in ok]
        cells = [
            rows[m],
            str(len(recs)),
            _f(_mean(r["dice_mean"] for r in recs)),
            _f(_mean(r.get("hd95_mean") for r in recs), ".2f"),
            _f(_mean(r["dice_subcortical"] for r in recs)),
            _f(_mean(ok[(p, m)]["dice_mean"] for p in common)),
            _f(_mean(r.get("fold_pct") for r in recs), ".4f"),
            _f(_mean(r.get("sdlogj") for r in recs)),
            _f(_mean(r["wall_s"] for r in recs), ".0f"),
            _f(_mean(r["cpu_s"] for r in recs), ".0f"),
            _f(_mean(r["peak_rss_mib"] for r in recs), ".0f"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _method_columns_header(first: str, methods: list[str]) -> list[str]:
    """Header and rule of a table with a ``first`` column and one column per method (named as in the reports)."""
    labels = {**NATIVE_ROWS, **PREALIGNED_ROWS}
    return ["| " + first + " | " + " | ".join(labels[m] for m in methods) + " |", "|---" * (len(methods) + 1) + "|"]


def _per_pair(
    report: dict, methods: list[str], pairs: list[str], field: str = "dice_mean", spec: str = ".3f"
) -> list[str]:
    ok = _ok(report)
    lines = _method_columns_header("pair", methods)
    for p in pairs:
        cells = [_f(ok[(p, m)].get(field), spec) if (p, m) in ok else "·" for m in methods]
        lines.append(f"| {p} | " + " | ".join(cells) + " |")
    return lines


def _per_class(
    report: dict, methods: list[str], pairs: list[str], field: str = "dice_per_class", spec: str = ".3f"
) -> list[str]:
    ok = _ok(report)
    lines = _method_columns_header("class", methods)
    for c, name in SEG14_NAMES.items():
        cells = [_f(_mean(ok[(p, m)].get(field, {}).get(str(c)) for p in pairs if (p, m) in ok), spec) for m in methods]
        lines.append(f"| {c} {name} | " + " | ".join(cells) + " |")
    return lines


def render_native(report: dict) -> str:
    """The Markdown report of one native-pair results document (the dict ``runner.run_native`` writes)."""
    if "results" not in report or "pairs" not in report:
        raise ValueError("not a native-benchmark results document (needs 'pairs' and 'results').")
    names = list(report["pairs"])
    mal = [
        p
        for p in names
        if report["pairs"][p]["source"] == "brain_mal2012" and "retest" not in report["pairs"][p]["note"]
    ]
    ok = _ok(report)
    methods = [m for m in {**NATIVE_ROWS, **PREALIGNED_ROWS} if any((p, m) in ok for p in names)]
    out: list[str] = []
    if mal:
        out += [f"### Native pairs: means over the brain_mal2012 test pairs ({len(mal)} listed)", ""]
        out += _summary(report, NATIVE_ROWS, mal)
        out += ["", "### Pre-aligned pairs (moving scan resampled by the ANTs Affine result): same pairs", ""]
        out += _summary(report, PREALIGNED_ROWS, mal)
    fs = [p for p in names if report["pairs"][p]["source"] == "brain_freesurfer_native"]
    if fs:
        out += ["", f"### FreeSurfer pair ({', '.join(fs)}; FreeSurfer aseg labels, not averaged with the others)", ""]
        out += _summary(report, {**NATIVE_ROWS, **PREALIGNED_ROWS}, fs)
    # any other source (e.g. whole heads and their stripped twins) gets one table per kind of input (the pairs' note),
    # never averaged with the manual brain_mal2012 labels
    groups: dict[tuple[str, str], list[str]] = {}
    for p in names:
        if report["pairs"][p]["source"] not in ("brain_mal2012", "brain_freesurfer_native"):
            groups.setdefault((report["pairs"][p]["source"], report["pairs"][p].get("note", "")), []).append(p)
    for (source, note), group in groups.items():
        if out:
            out.append("")
        kind = f": {note}" if note else ""
        out += [f"### {source}{kind} ({', '.join(group)}; means over these pairs)", ""]
        out += _summary(report, {**NATIVE_ROWS, **PREALIGNED_ROWS}, group)
    has_hd95 = any("hd95_mean" in r for r in ok.values())
    out += ["", "### Dice (14 classes) per pair (· = not run yet)", ""] + _per_pair(report, methods, names)
    if has_hd95:
        out += ["", "### HD95 (mm, mean over the Dice classes) per pair (· = not run yet, — = not scored)", ""]
        out += _per_pair(report, methods, names, "hd95_mean", ".2f")
    if mal:
        out += ["", "### Dice per class, mean over the brain_mal2012 test pairs each method finished", ""]
        out += _per_class(report, methods, mal)
        if has_hd95:
            out += ["", "### HD95 (mm) per class, mean over the brain_mal2012 test pairs each method finished", ""]
            out += _per_class(report, methods, mal, "hd95_per_class", ".2f")
    out += ["", "Runs:"]
    for run in report["runs"]:
        v = run["versions"]
        out.append(
            f"- {run['started_utc']}: {run['cpu']} ({run['cpu_count']} CPUs), {run['threads_per_method']} threads per "
            f"method, 1-min load {run['loadavg_1min']:.2f}, nice {run['nice']}, commit {run['git_commit']}; "
            + ", ".join(f"{k} {val}" for k, val in v.items())
        )
    for entry in report.get("rescores", []):
        out.append(
            f"- {entry['started_utc']}: HD95 added to the rows scored before it by `native_rescore` (no registration "
            f"rerun), commit {entry.get('git_commit', '?')}, monai {entry.get('versions', {}).get('monai', '?')}"
        )
    failed = [r for r in report["results"] if r.get("status") != "ok"]
    out += [f"- failed: {r['pair']} / {r['method']}: {r.get('reason', '')}" for r in failed]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", help="results JSON files (one native-pair document, or folder documents)")
    args = parser.parse_args(argv)
    reports = [json.loads(Path(p).read_text()) for p in args.results]
    native = [r for r in reports if "skipped" not in r and "machine" not in r]
    if native and len(reports) > 1:
        raise ValueError("a native-pair results document is rendered alone; give one file.")
    text = render_native(reports[0]) if native else render(reports)
    print(text)
    return text


if __name__ == "__main__":
    main()
