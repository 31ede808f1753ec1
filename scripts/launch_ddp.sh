#!/usr/bin/env bash
# Single-node DDP: one process per GPU (or NPROC CPU processes with gloo).
#
#   scripts/launch_ddp.sh run --data ../shared/data/ml-latest-small
#   NPROC=2 scripts/launch_ddp.sh train --shards runs/shards/ml-latest-small --device cpu
#
#   MAX_RESTARTS=3 scripts/launch_ddp.sh train --shards ... --run-dir runs/job1 --checkpoint-every 200
#
# The same scalable-rec arguments work without torchrun; under it, rank 0 prepares the
# shards and features, all ranks train on disjoint slices of the training edges and
# evaluate and score disjoint blocks of users, and rank 0 writes the run directory.
# SIGTERM to the launcher (or to any one rank) stops every rank at the same step with
# last.pt written. MAX_RESTARTS (default 0) lets torchrun restart the ranks after a
# failure; a restarted group resumes from <run-dir>/last.pt by itself (give --run-dir:
# the default run dir is named anew at each start).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=$(scripts/setup_env.sh)
NPROC=${NPROC:-$("$venv/bin/python" -c 'import torch; print(torch.cuda.device_count() or 2)')}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / NPROC > 0 ? $(nproc) / NPROC : 1 ))}
exec "$venv/bin/torchrun" --standalone --nproc_per_node="$NPROC" --max-restarts="${MAX_RESTARTS:-0}" \
  -m scalable_rec "$@"
