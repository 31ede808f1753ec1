#!/usr/bin/env bash
# Installs everything (once; see setup_env.sh) and runs the scalable-rec CLI.
#   scripts/run.sh run                       # MovieLens (downloaded) → train → recommendations
#   scripts/run.sh run --data DIR --epochs 5
set -euo pipefail
cd "$(dirname "$0")/.."
venv=$(scripts/setup_env.sh)
exec "$venv/bin/scalable-rec" "$@"
