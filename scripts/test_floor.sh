#!/usr/bin/env bash
# Runs the version-sensitive tests on the floor of the supported range (docs/support.md):
# Python 3.12, torch 2.11.0 and torch-geometric 2.8.x, in an environment of their own that
# scripts/setup_env.sh builds once (keyed by this spec) and reuses.
#
#   scripts/test_floor.sh [pytest args...]
#
# Python 3.12 comes from $SCALABLE_REC_FLOOR_PYTHON, else pyenv's 3.12; without one this fails.
# torch 2.11.0 comes from PyPI: its CUDA build, whose nvidia-* and triton packages the CPU
# tests never load (the environment takes 5.5 GB, and about 11 minutes to build on 2 busy
# cores); torch-sparse/torch-scatter from the prebuilt wheels in
# ../shared/wheels/torch-2.11.0-cu130-cp312 (built from source when absent).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

# The parts that depend on torch's and PyG's versions: the launcher and DDP (elastic agent,
# process groups, collectives), checkpoints (torch.load/save), autocast and the device code
# on CPU, the loaders and batches (PyG's samplers, torch-sparse), the graph store and the heap.
FLOOR_TESTS=(tests/test_launch.py tests/test_distributed.py tests/test_loop.py tests/test_cuda.py
             tests/test_batches.py tests/test_hetero.py tests/test_model.py tests/test_store.py
             tests/test_heap.py)
# The slow MovieLens runs (5 minutes) are left to the newest end: bf16 autocast is checked on
# the floor by tests/test_loop.py's small graph.

is_312() { [ -x "$1" ] && "$1" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; }
py=${SCALABLE_REC_FLOOR_PYTHON:-}
if [ -z "$py" ]; then
  for cand in "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3.12 "$(command -v python3.12 || true)"; do
    if is_312 "$cand"; then py=$cand; break; fi
  done
fi
if [ -n "${SCALABLE_REC_FLOOR_PYTHON:-}" ] && ! is_312 "$py"; then
  echo "test_floor: SCALABLE_REC_FLOOR_PYTHON='$py' is not a Python 3.12 interpreter" >&2
  exit 2
elif ! is_312 "$py"; then
  echo "test_floor: no Python 3.12 found (tried pyenv's 3.12.*, python3.12; or set SCALABLE_REC_FLOOR_PYTHON); install one, e.g. 'pyenv install 3.12'" >&2
  exit 2
fi

venv=$(PYTHON=$py SCALABLE_REC_TORCH=torch==2.11.0 SCALABLE_REC_PINS='torch-geometric==2.8.*' \
       SCALABLE_REC_WHEELS=${SCALABLE_REC_FLOOR_WHEELS:-$root/../shared/wheels/torch-2.11.0-cu130-cp312} \
       SCALABLE_REC_VENV_ROOT=${SCALABLE_REC_FLOOR_VENV_ROOT:-${XDG_CACHE_HOME:-$HOME/.cache}/scalable-rec/floor} \
       SCALABLE_REC_VENV_LINK= scripts/setup_env.sh)
"$venv/bin/python" -c 'import sys, torch, torch_geometric as pyg
print(f"test_floor: Python {sys.version.split()[0]}, torch {torch.__version__}, torch-geometric {pyg.__version__}")'
exec "$venv/bin/python" -m pytest -m "not slow" "${FLOOR_TESTS[@]}" "$@"
