#!/usr/bin/env bash
# Start the MONAI Label server of the SACB-Net app (this folder) with the MONAI Label venv's own interpreter.
#   usage: integrations/monailabel/start_server.sh --studies DIR [--port 8000] [--host 0.0.0.0] [--conf KEY VALUE ...]
#          (any `monailabel start_server` option; the venv: $SACB_LABEL_VENV, default <repo>/.venv-label)
# The venv's `monailabel` wrapper runs whatever `python` is first on PATH (`No module named 'monailabel'` outside an
# activated venv); this script names the interpreter instead. It listens on 127.0.0.1 unless --host says otherwise
# (the last --host wins), and `exec`s the server: its PID is this script's.
# start_server creates model/, logs/ (app.log), bin/ and lib/ in the app folder; .gitignore covers them.
set -euo pipefail
app="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="${SACB_LABEL_VENV:-$(cd "$app/../.." && pwd)/.venv-label}"
if [[ ! -x "$venv/bin/python" ]]; then
    echo "MONAI Label venv not found at $venv: run integrations/monailabel/setup_env.sh first" >&2
    exit 1
fi
exec "$venv/bin/python" -m monailabel.main start_server --app "$app" --host 127.0.0.1 "$@"
