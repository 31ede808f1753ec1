"""Neighbour sampling throughput (seed edges/s): our training loader vs PyG's defaults.

    scripts/bench.sh -k sampling

Reference: ``LinkNeighborLoader`` with default settings (shuffle, no custom sampler,
default batch size 1) is what a first PyG script uses; ours is the same sampler behind an
``EdgeEpochSampler`` with the training batch size. Both iterate ``MAX_BATCHES`` batches.
"""
import itertools

import pytest
import torch
from torch_geometric.loader import LinkNeighborLoader

from scalable_rec.graph import RATES, RatingGraph, SplitConfig, split_edges
from scalable_rec.train import TrainConfig
from scalable_rec.dist import DistEnv
from scalable_rec.train.batches import SupervisionEdges, make_loader

MAX_BATCHES = 50


@pytest.fixture(scope="module")
def graph(synthetic_shards):
    g = RatingGraph.from_shards(synthetic_shards)
    return g, split_edges(g, SplitConfig())


def _drain(loader, n):
    seeds = 0
    for batch in itertools.islice(loader, n):
        seeds += batch[RATES].edge_label_index.size(1)
    return seeds


def test_sampling_ours(benchmark, graph):
    g, split = graph
    cfg = TrainConfig(progress=False)
    edges = SupervisionEdges(g.src, g.dst, g.rating, split.train)
    loader, _ = make_loader(g.hetero_data(split.train), edges, cfg, cfg.batch_size, DistEnv(), shuffle=True,
                            device=torch.device("cpu"))
    seeds = benchmark.pedantic(_drain, args=(loader, MAX_BATCHES), rounds=3, warmup_rounds=1)
    benchmark.extra_info.update(batch_size=cfg.batch_size, num_neighbors=cfg.num_neighbors,
                                seeds_per_s=seeds / benchmark.stats.stats.median)


@pytest.mark.parametrize("batch_size", [1, 2048])
def test_sampling_pyg_defaults(benchmark, graph, batch_size):
    g, split = graph
    loader = LinkNeighborLoader(g.hetero_data(split.train), num_neighbors=[10, 5],
                                edge_label_index=(RATES, torch.stack([g.src[split.train], g.dst[split.train]])),
                                edge_label=g.rating[split.train], batch_size=batch_size, shuffle=True)
    n = MAX_BATCHES if batch_size > 1 else 2000
    seeds = benchmark.pedantic(_drain, args=(loader, n), rounds=3, warmup_rounds=1)
    benchmark.extra_info.update(batch_size=batch_size, seeds_per_s=seeds / benchmark.stats.stats.median)
