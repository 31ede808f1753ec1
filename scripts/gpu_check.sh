#!/usr/bin/env bash
# One prepared GPU check, from a fresh device to a report in under 8 minutes: the wheels'
# install (seconds), the CUDA tests (at most 200 s), then the CUDA benchmarks (at most
# 240 s), reported as JSON + Markdown rewritten after every benchmark step.
#
#   scripts/gpu_check.sh [--dry-run] [--wheelhouse DIR] [OUT_DIR]
#
# On the lent device (the session's `run` tool), with the wheels copied here once into the
# git-ignored .whl/ folder:
#
#   mkdir -p .whl && cp ../shared/wheels/torch-2.11.0-cu130-cp312/*.whl .whl/
#   run(command="scripts/gpu_check.sh", carry=[".whl"], timeout_s=540)
#
# OUT_DIR: argument, else $OUT (the device machine's return folder), else ./gpu-check.
# Python: $PYTHON, else .venv/bin/python, else python3 on the PATH. Nothing is downloaded
# (the machine may be offline): the interpreter must already have torch with CUDA,
# pyarrow and pytest; torch-geometric, torch-sparse/torch-scatter (or pyg-lib) may come
# from the wheelhouse; a missing one is named and the script stops.
# --wheelhouse DIR (default ./.whl, else ./wheels, if present): its wheels are installed
# with pip --no-index --target into a folder put first on PYTHONPATH (the interpreter's
# own site-packages stay untouched). Its sdists (torch-scatter, torch-sparse for a torch
# without a prebuilt wheel) are built CPU-only (neighbour sampling runs on the CPU)
# against the interpreter's torch, in parallel, and the built wheels are kept in
# OUT_DIR/wheels so a rerun can carry them instead of building again.
#
# Writes OUT_DIR/cuda-tests.xml, cuda-tests.log, gpu_check.json, gpu_check.md.
# --dry-run: the same steps on CPU with a small graph (CUDA tests skip with their reason);
# it checks the script where no GPU is present and its numbers are not GPU numbers.
set -euo pipefail
cd "$(dirname "$0")/.."

dry_run=0
out_dir=""
wheelhouse=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) dry_run=1 ;;
    --wheelhouse) [[ $# -ge 2 ]] || { echo "gpu_check: --wheelhouse needs a folder" >&2; exit 2; }
                  wheelhouse=$2; shift ;;
    -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
    -*) echo "gpu_check: unknown option '$1' (expected --dry-run, --wheelhouse DIR or an output folder)" >&2; exit 2 ;;
    *) out_dir="$1" ;;
  esac
  shift
done
if [[ -z "$wheelhouse" ]]; then
  if [[ -d .whl ]]; then wheelhouse=.whl; elif [[ -d wheels ]]; then wheelhouse=wheels; fi
fi
[[ -z "$wheelhouse" || -d "$wheelhouse" ]] || { echo "gpu_check: no wheelhouse folder '$wheelhouse'" >&2; exit 2; }
out_dir=${out_dir:-${OUT:-gpu-check}}
mkdir -p "$out_dir"

py=${PYTHON:-}
if [[ -z "$py" ]]; then
  if [[ -x .venv/bin/python ]]; then py=.venv/bin/python; else py=$(command -v python3 || true); fi
fi
[[ -n "$py" && -x "$(command -v "$py")" ]] || { echo "gpu_check: no python interpreter (set PYTHON)" >&2; exit 2; }
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

if [[ -n "$wheelhouse" ]]; then
  built="$out_dir/wheels"
  mkdir -p "$built"
  t0=$(date +%s)
  for sdist in "$wheelhouse"/*.tar.gz; do
    [[ -e "$sdist" ]] || continue
    name=$(basename "$sdist" .tar.gz)             # e.g. torch_sparse-0.6.18
    if compgen -G "$wheelhouse/${name}-*.whl" >/dev/null || compgen -G "$built/${name}-*.whl" >/dev/null; then
      continue                                    # built on an earlier run and carried back
    fi
    echo "gpu_check: building $name (CPU-only, against this torch)"
    FORCE_ONLY_CPU=1 MAX_JOBS=$(( $(nproc) / 2 + 1 )) "$py" -m pip wheel -q --no-index --no-deps \
      --no-build-isolation -w "$built" "$sdist" >"${TMPDIR:-/tmp}/gpu_check-build-$name.log" 2>&1 &
  done
  wait || true
  echo "gpu_check: wheelhouse ready in $(( $(date +%s) - t0 ))s"
  shopt -s nullglob
  wheels=("$wheelhouse"/*.whl "$built"/*.whl)
  shopt -u nullglob
  site="${TMPDIR:-/tmp}/gpu_check-site"
  if [[ ${#wheels[@]} -gt 0 ]]; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$site" "${wheels[@]}" \
      || echo "gpu_check: installing the wheelhouse failed (see above)" >&2
    export PYTHONPATH="$PWD:$site${PYTHONPATH#"$PWD"}"
  fi
  echo "gpu_check: wheelhouse installed in $(( $(date +%s) - t0 ))s"
fi

missing=$("$py" - <<'EOF'
import importlib.util
need = ["torch", "torch_geometric", "pyarrow", "numpy", "pytest", "tqdm", "arango", "filelock", "psutil", "pyuca"]
missing = [m for m in need if importlib.util.find_spec(m) is None]
if importlib.util.find_spec("pyg_lib") is None:  # neighbour sampling: pyg-lib, else torch-sparse
    missing += [m for m in ("torch_sparse", "torch_scatter") if importlib.util.find_spec(m) is None]
print(" ".join(missing))
EOF
)
if [[ -n "$missing" ]]; then
  echo "gpu_check: $py lacks: $missing (no network here; bring them in the venv or a --wheelhouse)" >&2
  tail -n 20 "${TMPDIR:-/tmp}"/gpu_check-build-*.log 2>/dev/null >&2 || true
  exit 2
fi

"$py" - <<EOF
import torch
print(f"gpu_check: python {__import__('sys').version.split()[0]}, torch {torch.__version__}, "
      f"CUDA {torch.version.cuda}, devices: {[torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}")
if not torch.cuda.is_available() and not $dry_run:
    raise SystemExit("gpu_check: torch sees no CUDA device (a CPU-only torch build, or no GPU); --dry-run checks the script on CPU")
EOF
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out_dir/nvidia-smi.csv" || true

started=$(date +%s)
# Every CUDA-marked test, in the files that mark one (skipped with its reason without a GPU). A failure is reported, not fatal:
# the benchmarks still run and the report says what failed.
set +e
mapfile -t cuda_tests < <(grep -lE 'pytest\.mark\.cuda|^@cuda|^pytestmark = .*cuda' tests/test_*.py)
OMP_NUM_THREADS=${OMP_NUM_THREADS:-4} timeout 200 "$py" -m pytest "${cuda_tests[@]}" -m cuda \
  -q -rs -p no:cacheprovider -p no:randomly --junitxml "$out_dir/cuda-tests.xml" 2>&1 | tee "$out_dir/cuda-tests.log"
tests_rc=${PIPESTATUS[0]}
set -e
echo "gpu_check: CUDA tests exit code $tests_rc ($(( $(date +%s) - started ))s)"

bench_args=(--out "$out_dir" --tests-xml "$out_dir/cuda-tests.xml")
[[ $dry_run == 1 ]] && bench_args+=(--dry-run)
timeout 240 "$py" benchmarks/gpu_check.py "${bench_args[@]}" || bench_rc=$?
[[ ${bench_rc:-0} == 124 ]] && echo "gpu_check: the benchmarks ran out of time; the report holds the steps that finished" >&2
echo "gpu_check: done in $(( $(date +%s) - started ))s; report in $out_dir/gpu_check.md and gpu_check.json"
exit "$tests_rc"
