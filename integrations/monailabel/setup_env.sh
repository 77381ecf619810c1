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
# everything but monailabel, with dependencies; then monailabel alone (see requirements-label.txt for why)
grep -v '^monailabel==' "$req" > "$venv/.requirements-no-monailabel.txt"
"$venv/bin/pip" install --disable-pip-version-check -q -r "$venv/.requirements-no-monailabel.txt"
"$venv/bin/pip" install --disable-pip-version-check -q --no-deps "$(grep '^monailabel==' "$req")"
"$venv/bin/python" -c "from monailabel.interfaces.app import MONAILabelApp; from monailabel.tasks.infer.bundle import BundleInferTask"
echo "$want" > "$stamp"
echo "MONAI Label venv ready: $venv"
