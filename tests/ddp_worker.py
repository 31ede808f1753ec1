"""Worker for tests/test_distributed.py, launched by torchrun (not collected by pytest).

    torchrun --standalone --nproc_per_node=2 tests/ddp_worker.py SHARDS RUN_DIR OUT_PREFIX JSON_TRAIN_CONFIG [JSON_OPTIONS]

JSON_OPTIONS (optional, used by benchmarks/bench_train.py): {"val_edges": M, "train_edges": N,
"model": {...}} keeps the first M validation (N training) edges of the split and sets the ModelConfig (default: hidden
16, no dropout, no ID dropout and no ranking bias, for the exactness tests: masks are drawn per rank).
{"record_batches": true} also writes, per rank, every batch the training loader gave (its input ids and a digest of
its sampled subgraph) and the digest of the rank's sampler on the first 16 supervision edges (``probe``).
"""

import contextlib
import hashlib
import json
import sys
from unittest import mock

import torch

from scalable_rec.dist import DistEnv, shutdown_distributed
from scalable_rec.graph import RATES, RatingGraph, SplitConfig, split_edges
from scalable_rec.shards import GraphShards
from scalable_rec.train import ModelConfig, TrainConfig, loop, train
from scalable_rec.train.batches import make_loader

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


def digest(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


class RecordingLoader:
    """The training loader, recording what each of its iterations gave (the first one of a
    DDP job is the unused-parameter probe's single batch)."""

    def __init__(self, loader) -> None:
        self.loader, self.iterations = loader, []

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        batches = []
        self.iterations.append(batches)
        for batch in self.loader:
            subgraph = [batch[nt].n_id for nt in batch.node_types]
            subgraph += [t for et in batch.edge_types for t in (batch[et].edge_index, batch[et].e_id)]
            batches.append({"input_id": batch[RATES].input_id.tolist(), "subgraph": digest(subgraph)})
            yield batch


recorders = []


def recording_make_loader(*args, **kwargs):
    loader, epochs = make_loader(*args, **kwargs)
    recorders.append(RecordingLoader(loader))
    return recorders[-1], epochs


record = options.get("record_batches", False)
# Scoped to this call (as pytest's monkeypatch would be): the loop's own loader, recorded.
with mock.patch.object(loop, "make_loader", recording_make_loader) if record else contextlib.nullcontext():
    result = train(graph, split, model_cfg, TrainConfig(**json.loads(train_json)), run_dir)
recorded = {}
if record:
    link = recorders[0].loader.collate_fn  # PyG's LinkLoader: its sampler and the supervision edges
    probe = link.link_sampler.sample_from_edges(link.input_data[torch.arange(16)])
    recorded = {
        "iterations": recorders[0].iterations,
        "probe": digest([probe.node[nt] for nt in sorted(probe.node)] + [probe.edge[et] for et in sorted(probe.edge)]),
    }
# With one epoch, the returned (best) model holds the parameters after the last step.
torch.save({k: v.detach().cpu() for k, v in result.model.state_dict().items()}, f"{out_prefix}-rank{env.rank}.pt")
# Inodes of the node-shared table files this rank maps (``node_tables``; deleted names).
tables = sorted({line.split()[4] for line in open("/proc/self/maps") if "/scalable_rec-tables-" in line})
json.dump(
    {
        "history": result.history,
        "steps": result.global_step,
        "world": env.world_size,
        "table_inodes": tables,
        **recorded,
    },
    open(f"{out_prefix}-rank{env.rank}.json", "w"),
)
shutdown_distributed()
