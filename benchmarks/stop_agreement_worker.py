"""torchrun worker for bench_train.py: the latency of one stop agreement (``agree_stop``).

torchrun --standalone --nproc_per_node=2 benchmarks/stop_agreement_worker.py OUT.json CALLS
"""

import json
import sys
import time

import torch

from scalable_rec.dist import DistEnv, agree_stop, init_distributed, shutdown_distributed

out, calls = sys.argv[1], int(sys.argv[2])
env = DistEnv.from_environ()
torch.set_num_threads(1)
device = torch.device("cpu")
init_distributed(env, device)
for _ in range(50):  # warm-up: connections, allocator
    agree_stop(0)
t0 = time.perf_counter()
for _ in range(calls):
    agree_stop(0)
seconds = time.perf_counter() - t0
if env.is_main:
    json.dump({"world_size": env.world_size, "calls": calls, "us_per_call": seconds / calls * 1e6}, open(out, "w"))
shutdown_distributed()
