# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""Run one command and record its own CPU time and peak resident memory.

``python -m bench.accuracy.measure USAGE_JSON -- COMMAND [ARG ...]``

Writes ``{"returncode", "cpu_s", "peak_rss_mib"}`` of COMMAND to USAGE_JSON and exits with COMMAND's exit code.

Why a launcher: Linux carries a process's peak RSS across fork and exec (at exec the high-water mark of the old
address space is kept as the new program's ``ru_maxrss``), so a method started directly by the runner would report at
least the runner's own peak: the runner holds torch, MONAI and the label volumes it scored. Started from this small
process (only the interpreter and the standard library), the method's peak RSS is its own, above a floor of this
launcher's ~10-20 MiB.
"""

import json
import os
import subprocess
import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if len(argv) < 3 or argv[1] != "--":
        raise SystemExit("usage: python -m bench.accuracy.measure USAGE_JSON -- COMMAND [ARG ...]")
    usage_path, command = argv[0], argv[2:]
    child = subprocess.Popen(command)
    _, status, usage = os.wait4(child.pid, 0)
    returncode = os.waitstatus_to_exitcode(status)
    record = {
        "returncode": returncode,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "peak_rss_mib": usage.ru_maxrss / 1024.0,  # Linux reports KiB
    }
    partial = f"{usage_path}.partial"
    with open(partial, "w") as handle:
        json.dump(record, handle)
    os.replace(partial, usage_path)
    return returncode


if __name__ == "__main__":
    sys.exit(main())
