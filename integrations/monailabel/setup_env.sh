#!/usr/bin/env bash
# Create (or reuse) the MONAI Label virtual environment described by requirements-label.txt.
#   usage: integrations/monailabel/setup_env.sh [VENV_DIR]    (default: <repo>/.venv-label, or $SACB_LABEL_VENV)
# Idempotent: a stamp file records the hash of requirements-label.txt; a matching stamp means nothing to do.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
venv="${1:-${SACB_LABEL_VENV:-$repo/.venv-label}}"
req="$repo/requirements-label.txt"
stamp="$venv/.requirements-label.sha256"
want="$(sha256sum "$req" | cut -d' ' -f1)"

if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    echo "MONAI Label venv up to date: $venv"
    exit 0
fi
python3 -m venv "$venv"
pip=("$venv/bin/pip" install --disable-pip-version-check -q)
# 1. everything but monailabel and sam2 (so torch, which the sam2 build needs), with their dependencies
grep -v -E '^(monailabel|sam2)==' "$req" > "$venv/.requirements-label-base.txt"
sed -E 's/\[[^]]*\]//' "$req" > "$venv/.constraints-label.txt"  # pip takes no extras in constraints
"${pip[@]}" setuptools==84.2.1
"${pip[@]}" -r "$venv/.requirements-label-base.txt"
# 2. monailabel with ALL its declared dependencies, held to the pins of step 1 (-c). sam2, one of them, is a source
# package whose build asks for torch: build it against the torch of step 1 (--no-build-isolation; an isolated build
# would download a second CUDA torch of ~4 GB) and without its optional CUDA kernels (no nvcc here; SAM2 runs without).
SAM2_BUILD_CUDA=0 "${pip[@]}" --no-build-isolation -c "$venv/.constraints-label.txt" \
    "$(grep '^monailabel==' "$req")" "$(grep '^sam2==' "$req")"
"$venv/bin/pip" check
"$venv/bin/python" -c "from monailabel.interfaces.app import MONAILabelApp; from monailabel.tasks.infer.bundle import BundleInferTask"
echo "$want" > "$stamp"
echo "MONAI Label venv ready: $venv"
