#!/usr/bin/env bash
# Create (or reuse) the separate virtual environments of the MONAI Deploy and MONAI Label integrations.
# They are separate because both SDKs would change the main environment (see requirements-deploy.txt and
# requirements-label.txt). Idempotent: an up-to-date environment is left as it is.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
bash "$here/deploy/setup_env.sh"
bash "$here/monailabel/setup_env.sh"
