#!/usr/bin/env bash
# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
#
# The one prepared GPU check (see bench/gpu_check.py): CUDA tests, AMP agreement, speed and peak GPU memory with and
# without AMP at 160x192x224 beside MONAI VoxelMorph / LNCC / Warp. Writes OUT_DIR/gpu_check.json and gpu_check.md.
# Runs in one go and stops itself after GPU_CHECK_TIMEOUT seconds (default 470, under 8 minutes).
#
#   bash bench/gpu_check.sh OUT_DIR              # on a machine with CUDA (without one: a "skipped" report, exit 0)
#   bash bench/gpu_check.sh OUT_DIR --dry-run    # every step on the CPU at 32^3, to check the script itself
set -euo pipefail
if [ $# -lt 1 ]; then
    echo "usage: bash bench/gpu_check.sh OUT_DIR [--dry-run]" >&2
    exit 2
fi
cd "$(dirname "$0")/.."
exec timeout --kill-after=15 "${GPU_CHECK_TIMEOUT:-470}" "${PYTHON:-python}" bench/gpu_check.py "$@"
