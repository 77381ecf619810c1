#!/usr/bin/env bash
# Create (or reuse) the MONAI Deploy virtual environment described by requirements-deploy.txt.
#   usage: integrations/deploy/setup_env.sh [VENV_DIR]    (default: <repo>/.venv-deploy, or $SACB_DEPLOY_VENV)
# Idempotent: a stamp file records the hash of requirements-deploy.txt and requirements.txt.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
venv="${1:-${SACB_DEPLOY_VENV:-$repo/.venv-deploy}}"
stamp="$venv/.requirements-deploy.sha256"
want="$(cat "$repo/requirements-deploy.txt" "$repo/requirements.txt" | sha256sum | cut -d' ' -f1)"

if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    echo "MONAI Deploy venv up to date: $venv"
    exit 0
fi
python3 -m venv "$venv"
(cd "$repo" && "$venv/bin/pip" install --disable-pip-version-check -q -r requirements-deploy.txt)
# Holoscan asks for a 32 MB stack; the SDK's operators import only with pydicom and highdicom present.
(ulimit -s 32768 && "$venv/bin/python" -c "from monai.deploy.operators.monai_bundle_inference_operator import MonaiBundleInferenceOperator")
echo "$want" > "$stamp"
echo "MONAI Deploy venv ready: $venv"
