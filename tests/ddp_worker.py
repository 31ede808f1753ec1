"""Worker for tests/test_distributed.py, launched by torchrun (not collected by pytest).

    torchrun --standalone --nproc_per_node=2 tests/ddp_worker.py SHARDS RUN_DIR OUT_PREFIX JSON_TRAIN_CONFIG [JSON_OPTIONS]

JSON_OPTIONS (optional, used by benchmarks/bench_train.py): {"val_edges": M, "train_edges": N,
"model": {...}} keeps the first M validation (N training) edges of the split and sets the ModelConfig (default: hidden
16, no dropout, no ID dropout and no ranking bias, for the exactness tests: masks are drawn per rank).
"""

import json
import sys

import torch

from scalable_rec.dist import DistEnv, shutdown_distributed
from scalable_rec.graph import RatingGraph, SplitConfig, split_edges
from scalable_rec.shards import GraphShards
from scalable_rec.train import ModelConfig, TrainConfig, train

shards, run_dir, out_prefix, train_json = sys.argv[1:5]
env = DistEnv.from_environ()
torch.set_num_threads(1)
graph = RatingGraph.from_shards(GraphShards(shards))
split = split_edges(graph, SplitConfig())
options = json.loads(sys.argv[5]) if len(sys.argv) > 5 else {}
if "train_edges" in options:  # e.g. an odd count, so that DDP pads a rank with a zero-weight copy
    split = type(split)(train=split.train[: options["train_edges"]], val=split.val, test=split.test)
if "val_edges" in options:
    split = type(split)(train=split.train, val=split.val[: options["val_edges"]], test=split.test)
# No ranking bias either: with it two ranks and one process drift apart by ~1e-3 over 20 steps
# (test_distributed.py::test_torchrun_two_ranks_with_the_ranking_bias_stay_near_one_process),
# past the 1e-5 the exactness tests allow.
EXACT_MODEL = {"hidden": 16, "dropout": 0.0, "user_id_dropout": 0.0, "movie_id_dropout": 0.0, "retrieval_bias": False}
model_cfg = ModelConfig(**options.get("model", EXACT_MODEL))
result = train(graph, split, model_cfg, TrainConfig(**json.loads(train_json)), run_dir)
# With one epoch, the returned (best) model holds the parameters after the last step.
torch.save({k: v.detach().cpu() for k, v in result.model.state_dict().items()}, f"{out_prefix}-rank{env.rank}.pt")
# Inodes of the node-shared table files this rank maps (``node_tables``; deleted names).
tables = sorted({line.split()[4] for line in open("/proc/self/maps") if "/scalable_rec-tables-" in line})
json.dump(
    {"history": result.history, "steps": result.global_step, "world": env.world_size, "table_inodes": tables},
    open(f"{out_prefix}-rank{env.rank}.json", "w"),
)
shutdown_distributed()
