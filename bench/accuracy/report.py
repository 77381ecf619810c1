"""Render one or more accuracy ``results.json`` files as the Markdown shown in ``docs/results.md``.

``python -m bench.accuracy.report OUT/results.json [MORE.json ...]`` prints the table (rows in file order), then the
machine and versions of the first file, then the skipped folders.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench.accuracy.run import TABLE_HEADER, format_row

__all__ = ["render", "main"]


def render(reports: list[dict]) -> str:
    """Markdown for the given reports (the dicts written by ``run_benchmark``)."""
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
    machine, versions = reports[0]["machine"], reports[0]["versions"]
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


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("results", nargs="+", help="results.json files")
    args = parser.parse_args(argv)
    text = render([json.loads(Path(p).read_text()) for p in args.results])
    print(text)
    return text


if __name__ == "__main__":
    main()
