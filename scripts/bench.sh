#!/usr/bin/env bash
# The benchmark suite: every stage on the real code paths, with its reference in the same run.
#
#   scripts/bench.sh                      # default sizes (~1M synthetic edges), CPU (+CUDA if present)
#   SCALABLE_REC_BENCH_EDGES=100000 scripts/bench.sh -k score
#
# Writes benchmarks/results/<time>.json (pytest-benchmark) plus .md/.png renderings, and
# links latest.json. Compare two runs: python scripts/bench_report.py OLD.json NEW.json
set -euo pipefail
cd "$(dirname "$0")/.."
venv=$(scripts/setup_env.sh)
mkdir -p benchmarks/results
out=benchmarks/results/$(date +%Y%m%d-%H%M%S).json
"$venv/bin/python" -m pytest benchmarks --benchmark-json="$out" --benchmark-columns=median,ops "$@"
ln -sfn "$(basename "$out")" benchmarks/results/latest.json
"$venv/bin/python" scripts/bench_report.py "$out"
