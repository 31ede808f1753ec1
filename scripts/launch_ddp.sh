#!/usr/bin/env bash
# Single-node DDP: one process per GPU (or NPROC CPU processes with gloo).
#
#   scripts/launch_ddp.sh run --data ../shared/data/ml-latest-small
#   NPROC=2 scripts/launch_ddp.sh train --shards runs/shards/ml-latest-small --device cpu
#
# The same scalable-rec arguments work without torchrun; under it, rank 0 prepares the
# shards and features, all ranks train on disjoint slices of the training edges, and
# rank 0 evaluates, scores and writes the run directory.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=$(scripts/setup_env.sh)
NPROC=${NPROC:-$("$venv/bin/python" -c 'import torch; print(torch.cuda.device_count() or 2)')}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / NPROC > 0 ? $(nproc) / NPROC : 1 ))}
exec "$venv/bin/torchrun" --standalone --nproc_per_node="$NPROC" -m scalable_rec "$@"
