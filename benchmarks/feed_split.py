"""A loader worker's time per batch when it builds the whole batch and when it only
samples, the build it then hands to the feeding process, on the CPU, and the bytes per
batch the worker hands over either way.

    python benchmarks/feed_split.py --shards DIR [--batches 30] [--rounds 3] [--threads 1] [--out FILE]

Both loaders are ``make_loader``'s (PyG's sampler, targets excluded, the default batch
size and fanouts), run in this process on the same input batches with the same seeds;
one warm-up round, then the median of ``--rounds``. On a GPU the build runs there
(``BatchBuilder`` on the device); here it runs on the CPU, which bounds what it moves.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time

import torch

from scalable_rec.dist import DistEnv
from scalable_rec.graph import RatingGraph, SplitConfig, split_edges
from scalable_rec.shards import GraphShards
from scalable_rec.train import TrainConfig
from scalable_rec.train.batches import SupervisionEdges, make_loader
from scalable_rec.train.prefetch import batch_tensors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", required=True, help="rating shards directory")
    parser.add_argument("--batches", type=int, default=30, help="input batches per round (default: 30)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds after one warm-up (default: 3)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    parser.add_argument("--out", help="write the JSON result here too")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    g = RatingGraph.from_shards(GraphShards(args.shards, verify=False))
    split = split_edges(g, SplitConfig())
    data = g.hetero_data(split.train)
    edges = SupervisionEdges(g.src, g.dst, g.rating, split.train)
    cfg = TrainConfig(progress=False, sampler="pyg", num_workers=0)
    feeds = {
        mode: make_loader(
            data,
            edges,
            cfg,
            cfg.batch_size,
            DistEnv(),
            shuffle=True,
            device=torch.device("cpu"),
            exclude_targets=True,
            build_on_device=mode == "sample_only",
        )
        for mode in ("whole_batch", "sample_only")
    }
    order = feeds["whole_batch"][1]
    order.set_epoch(0)
    index = list(itertools.islice(iter(order), args.batches * cfg.batch_size))
    inputs = [index[i : i + cfg.batch_size] for i in range(0, len(index), cfg.batch_size)]
    seconds: dict[str, list[float]] = {"whole_batch": [], "sample_only": [], "build": []}
    nbytes = {"whole_batch": 0, "sample_only": 0}
    for r in range(args.rounds + 1):
        torch.manual_seed(r)
        t0 = time.perf_counter()
        whole = [feeds["whole_batch"][0].collate_fn(batch) for batch in inputs]
        t1 = time.perf_counter()
        torch.manual_seed(r)
        sampled = [feeds["sample_only"][0].collate_fn(batch) for batch in inputs]
        t2 = time.perf_counter()
        for item in sampled:
            feeds["sample_only"][0].build(item)
        t3 = time.perf_counter()
        if r == 0:  # what a worker hands over (through shared memory, then pinned and copied)
            nbytes["whole_batch"] = sum(t.nbytes for b in whole for t in batch_tensors(b))
            nbytes["sample_only"] = sum(t.nbytes for item in sampled for t in item.tensors())
        if r:  # round 0 warms up
            for key, s in (("whole_batch", t1 - t0), ("sample_only", t2 - t1), ("build", t3 - t2)):
                seconds[key].append(s / len(inputs))
    out = {
        "shards": args.shards,
        "batch_size": cfg.batch_size,
        "num_neighbors": cfg.num_neighbors,
        "batches": len(inputs),
        "rounds": args.rounds,
        "torch_threads": torch.get_num_threads(),
        **{f"{key}_ms_per_batch": 1000 * statistics.median(v) for key, v in seconds.items()},
        **{f"{key}_mib_per_batch": n / len(inputs) / 2**20 for key, n in nbytes.items()},
    }
    print(json.dumps(out, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
