#!/usr/bin/env bash
# Installs everything (once; see setup_env.sh) and runs the test suite.
#   scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
venv=$(scripts/setup_env.sh)
exec "$venv/bin/python" -m pytest tests "$@"
