"""Bytes that sampling workers get through ``/dev/shm``: what ``make_loader`` shares with
workers that only sample (the sampler's graph), with workers that build whole batches
(plus the features and ratings they gather), and what it shared before workers only
sampled (every tensor of the message graph, as that code counted them).

    python benchmarks/shm_bytes.py --shards DIR [--out FILE]

``DIR`` holds rating shards (e.g. the benchmark suite's 1M-edge synthetic graph, cached
under ``~/.cache/scalable-rec/bench/synthetic-1000000``). Nothing is moved to ``/dev/shm``:
the bytes are counted.
"""

from __future__ import annotations

import argparse
import json

import torch
from torch_geometric.loader import LinkNeighborLoader

from scalable_rec.graph import RATES, RatingGraph, SplitConfig, split_edges
from scalable_rec.shards import GraphShards
from scalable_rec.train.batches import worker_tensors
from scalable_rec.train.workers import shared_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", required=True, help="rating shards directory")
    parser.add_argument("--out", help="write the JSON result here too")
    args = parser.parse_args()
    g = RatingGraph.from_shards(GraphShards(args.shards, verify=False))
    split = split_edges(g, SplitConfig())
    data = g.hetero_data(split.train)
    # PyG's sampler builds its CSC as make_loader's loader does (one input edge suffices)
    link = LinkNeighborLoader(data, num_neighbors=[10, 5], edge_label_index=(RATES, data[RATES].edge_index[:, :1]))
    mib = 2**20
    out = {
        "shards": args.shards,
        "training_edges": int(split.train.numel()),
        "users": g.num_users,
        "movies": g.num_movies,
        "movie_x": list(g.movie_x.shape),
        "before_mib": shared_bytes(v for store in data.stores for v in store.values()) / mib,
        "sample_only_mib": shared_bytes(worker_tensors(link.link_sampler)) / mib,
        "whole_batch_mib": shared_bytes(worker_tensors(link.link_sampler, data)) / mib,
        "torch_threads": torch.get_num_threads(),
    }
    print(json.dumps(out, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
