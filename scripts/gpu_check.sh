#!/usr/bin/env bash
# One prepared GPU check (under 10 minutes on one GPU): the CUDA tests and the CUDA
# benchmarks, reported as JSON + Markdown.
#
#   scripts/gpu_check.sh [--dry-run] [OUT_DIR]
#
# OUT_DIR: argument, else $OUT (the device machine's return folder), else ./gpu-check.
# Python: $PYTHON, else .venv/bin/python, else python3 on the PATH. Nothing is downloaded
# (the machine may be offline): the interpreter must already have torch with CUDA,
# torch-geometric, torch-sparse/torch-scatter, pyarrow and pytest; a missing one is
# named and the script stops. If the repo carries a wheelhouse (./wheels), missing
# packages are installed from it with pip --no-index first.
#
# Writes OUT_DIR/cuda-tests.xml, cuda-tests.log, gpu_check.json, gpu_check.md.
# --dry-run: the same steps on CPU with a small graph (CUDA tests skip with their reason);
# it checks the script where no GPU is present and its numbers are not GPU numbers.
set -euo pipefail
cd "$(dirname "$0")/.."

dry_run=0
out_dir=""
for arg in "$@"; do
  case "$arg" in
    --dry-run) dry_run=1 ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    -*) echo "gpu_check: unknown option '$arg' (expected --dry-run or an output folder)" >&2; exit 2 ;;
    *) out_dir="$arg" ;;
  esac
done
out_dir=${out_dir:-${OUT:-gpu-check}}
mkdir -p "$out_dir"

py=${PYTHON:-}
if [[ -z "$py" ]]; then
  if [[ -x .venv/bin/python ]]; then py=.venv/bin/python; else py=$(command -v python3 || true); fi
fi
[[ -n "$py" && -x "$(command -v "$py")" ]] || { echo "gpu_check: no python interpreter (set PYTHON)" >&2; exit 2; }
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

missing=$("$py" - <<'EOF'
import importlib.util
need = ["torch", "torch_geometric", "torch_sparse", "torch_scatter", "pyarrow", "numpy", "pytest", "tqdm"]
print(" ".join(m for m in need if importlib.util.find_spec(m) is None))
EOF
)
if [[ -n "$missing" && -d wheels ]]; then
  echo "gpu_check: installing from ./wheels (offline): $missing"
  "$py" -m pip install --no-index --find-links wheels ${missing//_/-} || true
  missing=$("$py" -c 'import importlib.util,sys; print(" ".join(m for m in sys.argv[1:] if importlib.util.find_spec(m) is None))' $missing)
fi
if [[ -n "$missing" ]]; then
  echo "gpu_check: $py lacks: $missing (no network here; bring them in the venv or ./wheels)" >&2
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
# CUDA tests (skipped with their reason without a GPU). A failure is reported, not fatal:
# the benchmarks still run and the report says what failed.
set +e
OMP_NUM_THREADS=${OMP_NUM_THREADS:-4} timeout 300 "$py" -m pytest tests/test_cuda.py -q -rs -p no:cacheprovider \
  --junitxml "$out_dir/cuda-tests.xml" 2>&1 | tee "$out_dir/cuda-tests.log"
tests_rc=${PIPESTATUS[0]}
set -e
echo "gpu_check: CUDA tests exit code $tests_rc ($(( $(date +%s) - started ))s)"

bench_args=(--out "$out_dir" --tests-xml "$out_dir/cuda-tests.xml")
[[ $dry_run == 1 ]] && bench_args+=(--dry-run)
timeout 420 "$py" benchmarks/gpu_check.py "${bench_args[@]}"
echo "gpu_check: done in $(( $(date +%s) - started ))s; report in $out_dir/gpu_check.md and gpu_check.json"
exit "$tests_rc"
