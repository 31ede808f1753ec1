#!/usr/bin/env bash
# Multi-node DDP example: run this same command on every node.
#
#   NNODES=2 NPROC=8 MASTER_ADDR=node0.example MASTER_PORT=29500 JOB_ID=rec42 \
#     scripts/launch_multinode.sh run --data /shared/ml-25m --workdir /shared/runs
#
# Rendezvous: torchrun's c10d backend on MASTER_ADDR:MASTER_PORT (any node reachable by
# all; it need not be rank 0's). RDZV_ID (JOB_ID) must be the same on every node and
# differ between jobs. --workdir/--shards/--run-dir must be on a filesystem all nodes
# share: rank 0 writes shards, features and the run directory, the other ranks read them
# after a barrier. NCCL picks the network; set NCCL_SOCKET_IFNAME if a node has several.
# MAX_RESTARTS lets torchrun restart the workers after a failure; a restarted group
# resumes from <run-dir>/last.pt by itself, so pass --run-dir (and --checkpoint-every N to
# bound the work redone). --collective-timeout-s bounds how long a rank waits for a hung one.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${NNODES:?set NNODES}" "${MASTER_ADDR:?set MASTER_ADDR}"
venv=$(scripts/setup_env.sh)
NPROC=${NPROC:-$("$venv/bin/python" -c 'import torch; print(torch.cuda.device_count() or 1)')}
exec "$venv/bin/torchrun" \
  --nnodes="$NNODES" --nproc_per_node="$NPROC" \
  --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:${MASTER_PORT:-29500}" --rdzv_id="${JOB_ID:-scalable-rec}" \
  --max_restarts="${MAX_RESTARTS:-0}" \
  -m scalable_rec "$@"
