#!/usr/bin/env bash
# Builds adbpyg-adapter's own virtual environment for benchmarks/bench_arango.py (it pins
# python-arango 7.x, which the package's 8.x venv cannot hold). Idempotent: exits at once when
# the venv already imports adbpyg_adapter. Prints the venv's python on success.
#
#   benchmarks/adbpyg_venv.sh [VENV]      # default ~/.cache/scalable-rec/adbpyg-venv
#
# adbpyg-adapter 1.1.4 declares torch-sparse and torch-scatter but never imports them (its
# source has no import of either); both are sdists that compile against torch for tens of
# minutes on 2 cores, so the adapter is installed with --no-deps and its other declared
# dependencies are installed by name below (python-arango~=7.6, pandas, rich, requests,
# numpy, torch, torch-geometric).
set -euo pipefail
VENV="${1:-${SCALABLE_REC_ADBPYG_VENV:-$HOME/.cache/scalable-rec/adbpyg-venv}}"
PY="${ADBPYG_BASE_PYTHON:-python3.11}"
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c 'import adbpyg_adapter, psutil' 2>/dev/null; then
  echo "$VENV/bin/python"; exit 0
fi
"$PY" -m venv "$VENV"
"$VENV/bin/pip" install -q torch==2.13.0 >&2
"$VENV/bin/pip" install -q --no-deps adbpyg-adapter==1.1.4 >&2
"$VENV/bin/pip" install -q 'python-arango~=7.6' 'pandas>=1.3.5' 'rich>=12.5.1' 'requests>=2.27.1' \
  'numpy>=2.2.6' torch-geometric psutil setuptools >&2
"$VENV/bin/python" -c 'import adbpyg_adapter, arango, torch_geometric' >&2
echo "$VENV/bin/python"
