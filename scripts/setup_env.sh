#!/usr/bin/env bash
# Creates (once) and prints the path of a virtual environment keyed by the dependency spec.
#
#   venv=$(scripts/setup_env.sh)        # then "$venv/bin/scalable-rec ..."
#
# The environment lives outside the checkout, in $SCALABLE_REC_VENV_ROOT (default
# ~/.cache/scalable-rec), named by a hash of pyproject.toml and this script, so a warm
# machine reuses it across clones and a changed spec builds a new one. It is only used
# once the marker file .complete exists, so an interrupted install is redone, never used;
# concurrent setups of one environment take turns (flock).
#
# Neighbor sampling: pyg-lib is used wherever it installs for this torch; otherwise
# torch-sparse + torch-scatter, taken from $SCALABLE_REC_WHEELS (a --find-links folder of
# prebuilt wheels, default ../shared/wheels/torch-2.13.0-cpu-cp311) and built from source
# (about 30 minutes on 2 cores) when no matching wheel is there.
#
# Another point of the supported range (docs/support.md) is built by overriding, all of which
# are part of the key:
#   PYTHON                  interpreter of the environment (default python3.11, else python3)
#   SCALABLE_REC_TORCH      torch requirement (default torch==2.13.0)
#   SCALABLE_REC_PINS       further requirements installed with torch, space-separated
#                           (e.g. "torch-geometric==2.8.*"; default none: the newest allowed)
#   SCALABLE_REC_WHEELS     --find-links folder for torch-sparse/torch-scatter
#   SCALABLE_REC_VENV_LINK  symlink in the checkout pointing at the environment (default .venv;
#                           empty: none)
# scripts/test_floor.sh builds the floor this way.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
command -v "$PY" >/dev/null || { echo "setup: no Python interpreter '$PY' found (set PYTHON)" >&2; exit 1; }
TORCH_SPEC=${SCALABLE_REC_TORCH:-torch==2.13.0}
read -ra PINS <<<"${SCALABLE_REC_PINS:-}"
WHEELS=${SCALABLE_REC_WHEELS:-$root/../shared/wheels/torch-2.13.0-cpu-cp311}
LINK=${SCALABLE_REC_VENV_LINK-.venv}

# The spec: the project's dependencies, this script, the interpreter's version, the overrides
# and the wheels on offer (by name: the folder's path differs from clone to clone).
pyversion=$("$PY" -c 'import sys; print(sys.version)')
key=$({ cat pyproject.toml scripts/setup_env.sh; echo "$pyversion|$TORCH_SPEC|${PINS[*]}"; ls "$WHEELS" 2>/dev/null || true; } \
  | sha256sum | cut -c1-16)
venv_root=${SCALABLE_REC_VENV_ROOT:-${XDG_CACHE_HOME:-$HOME/.cache}/scalable-rec}
venv=$venv_root/venv-$key
log=$venv_root/install-$key.log
mkdir -p "$venv_root"
# One setup at a time per environment: a second clone's setup (or a second CI job on the
# same machine) waits for the first build instead of racing it, then reuses it.
if command -v flock >/dev/null; then
  exec 9>"$venv_root/.lock-$key"
  flock 9
fi

if [ ! -f "$venv/.complete" ]; then
  echo "setup: building $venv (log: $log)" >&2
  rm -rf "$venv"
  "$PY" -m venv "$venv"
  pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
  {
    "${pip[@]}" install -U pip setuptools wheel
    "${pip[@]}" install "$TORCH_SPEC" "${PINS[@]}"
    findlinks=()
    [ -d "$WHEELS" ] && findlinks=(--find-links "$WHEELS")
    if ! "${pip[@]}" install pyg-lib -f "https://data.pyg.org/whl/$("$venv/bin/python" -c 'import torch;print("torch-"+torch.__version__)').html" 2>/dev/null; then
      # --no-build-isolation: the sdists compile against the torch installed above.
      "${pip[@]}" install --no-build-isolation "${findlinks[@]}" torch-scatter==2.1.2 torch-sparse==0.6.18
    fi
    "${pip[@]}" install -e ".[test]"
    "$venv/bin/python" -c 'import torch_geometric.typing as t; assert t.WITH_PYG_LIB or t.WITH_TORCH_SPARSE, "no neighbor sampler backend (pyg-lib or torch-sparse) imports"'
  } >"$log" 2>&1 || { echo "setup: install failed, see $log" >&2; tail -n 30 "$log" >&2; exit 1; }
  touch "$venv/.complete"
  # Each spec change builds a new environment (~1.8 GB); keep this one and the previous.
  ls -dt "$venv_root"/venv-*/ 2>/dev/null | tail -n +3 | xargs -r rm -rf
else
  # The environment is shared between clones: point the editable install at this one.
  "$venv/bin/python" -m pip --disable-pip-version-check -q install --no-deps --no-build-isolation -e . \
    >"$venv_root/editable.log" 2>&1 || { echo "setup: editable install failed, see $venv_root/editable.log" >&2; exit 1; }
fi
[ -z "$LINK" ] || ln -sfn "$venv" "$LINK"
echo "$venv"
