"""Neighbour sampling throughput (seed edges/s): our training loader vs PyG's defaults,
and the torch sampler beside PyG's (torch-sparse) on the same batches.

    scripts/bench.sh -k sampling
    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/bench_sampling.py --out benchmarks/reference/sampler-cpu.json
    PYTHONPATH=. python benchmarks/bench_sampling.py --device cuda --out sampler-cuda.json  # on a GPU host

Reference: ``LinkNeighborLoader`` with default settings (shuffle, no custom sampler,
default batch size 1) is what a first PyG script uses; ours is the same sampler behind an
``EdgeEpochSampler`` with the training batch size. Both iterate ``MAX_BATCHES`` batches.
Run as a script, it times the training loader with ``sampler`` ``pyg`` and ``torch`` over
the same input batches (one thread, rounds alternating between the two so that a busy
machine slows both alike) and writes sampled edges/s of each and their ratio.
"""

import argparse
import itertools
import json
import os
import platform
import subprocess
import sys
import time

import pytest
import torch
from torch_geometric.loader import LinkNeighborLoader
from torch_geometric.typing import WITH_PYG_LIB

from scalable_rec.atomic import write_json_atomic
from scalable_rec.dist import DistEnv
from scalable_rec.graph import RATES, REV_RATES, RatingGraph, SplitConfig, split_edges
from scalable_rec.train import TrainConfig
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


@pytest.mark.parametrize("sampler", ["pyg", "torch"])
def test_sampling_ours(benchmark, graph, sampler):
    g, split = graph
    cfg = TrainConfig(progress=False, sampler=sampler)
    edges = SupervisionEdges(g.src, g.dst, g.rating, split.train)
    loader, _ = make_loader(
        g.hetero_data(split.train),
        edges,
        cfg,
        cfg.batch_size,
        DistEnv(),
        shuffle=True,
        device=torch.device("cpu"),
        exclude_targets=True,
    )
    seeds = benchmark.pedantic(_drain, args=(loader, MAX_BATCHES), rounds=3, warmup_rounds=1)
    benchmark.extra_info.update(
        batch_size=cfg.batch_size,
        num_neighbors=cfg.num_neighbors,
        sampler=sampler,
        seeds_per_s=seeds / benchmark.stats.stats.median,
    )


@pytest.mark.parametrize("batch_size", [1, 2048])
def test_sampling_pyg_defaults(benchmark, graph, batch_size):
    g, split = graph
    loader = LinkNeighborLoader(
        g.hetero_data(split.train),
        num_neighbors=[10, 5],
        edge_label_index=(RATES, torch.stack([g.src[split.train], g.dst[split.train]])),
        edge_label=g.rating[split.train],
        batch_size=batch_size,
        shuffle=True,
    )
    n = MAX_BATCHES if batch_size > 1 else 2000
    seeds = benchmark.pedantic(_drain, args=(loader, n), rounds=3, warmup_rounds=1)
    benchmark.extra_info.update(batch_size=batch_size, seeds_per_s=seeds / benchmark.stats.stats.median)


def compare_samplers(
    g: RatingGraph, split, batches: int, rounds: int, cfg: TrainConfig, device: torch.device = torch.device("cpu")
) -> dict:
    """Sampled edges/s of the training loader with ``sampler`` ``pyg`` (on the CPU) and
    ``torch`` (on ``device``) over the same ``batches`` input batches (epoch 0's order),
    targets excluded as in training; ``rounds`` timed rounds after one warm-up,
    alternating between the two."""
    edges = SupervisionEdges(g.src, g.dst, g.rating, split.train)
    data = g.hetero_data(split.train)
    loaders, out = {}, {}
    for kind in ("pyg", "torch"):
        t0 = time.perf_counter()
        loaders[kind] = make_loader(
            data,
            edges,
            TrainConfig(**{**vars(cfg), "sampler": kind}),
            cfg.batch_size,
            DistEnv(),
            shuffle=True,
            device=device,
            exclude_targets=True,
        )
        out[kind] = {"setup_s": time.perf_counter() - t0, "seconds": []}
    epochs = loaders["pyg"][1]
    epochs.set_epoch(0)
    order = torch.tensor(list(itertools.islice(iter(epochs), batches * cfg.batch_size)))
    inputs = [edges[index] for index in order.split(cfg.batch_size)]
    for r in range(rounds + 1):
        for kind, (loader, epochs) in loaders.items():
            # the loader: sampling, then the batch's features and (pyg) its targets filtered out
            epochs.set_epoch(0)
            sampled = seeds = 0
            t0 = time.perf_counter()
            for batch in itertools.islice(loader, batches):
                sampled += batch[RATES].edge_index.size(1) + batch[REV_RATES].edge_index.size(1)
                seeds += batch[RATES].edge_label_index.size(1)
            _sync(device)
            t1 = time.perf_counter()
            # the sampler alone (BaseSampler.sample_from_edges) on the same input batches
            sampler = loader.collate_fn.link_sampler
            sampler_edges = 0
            for batch_input in inputs:
                sample = sampler.sample_from_edges(batch_input)
                sampler_edges += sum(row.numel() for row in sample.row.values())
            _sync(device)
            t2 = time.perf_counter()
            if r:  # round 0 warms up
                out[kind]["seconds"].append(t1 - t0)
                out[kind]["sampler_seconds"] = out[kind].get("sampler_seconds", []) + [t2 - t1]
            out[kind].update(sampled_edges=sampled, seed_edges=seeds, sampler_edges=sampler_edges)
    for row in out.values():
        row["median_s"] = sorted(row["seconds"])[len(row["seconds"]) // 2]
        row["sampled_edges_per_s"] = row["sampled_edges"] / row["median_s"]
        row["seed_edges_per_s"] = row["seed_edges"] / row["median_s"]
        row["sampler_median_s"] = sorted(row["sampler_seconds"])[len(row["sampler_seconds"]) // 2]
        row["sampler_edges_per_s"] = row["sampler_edges"] / row["sampler_median_s"]
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv=None) -> int:
    from conftest import EDGES, cached_shards, synthetic_for_edges

    p = argparse.ArgumentParser(description="torch sampler vs PyG's (torch-sparse) on the CPU, one thread")
    p.add_argument("--edges", type=int, default=EDGES, help="synthetic rating edges (default: the suite's)")
    p.add_argument("--batches", type=int, default=MAX_BATCHES, help="batches per round")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds per sampler (median kept)")
    p.add_argument(
        "--device", default="cpu", help="where the torch sampler runs (cpu or cuda); PyG's samples on the CPU"
    )
    p.add_argument("--out", default=None, help="JSON file to write (default: print only)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    shards = cached_shards(synthetic_for_edges(args.edges), f"synthetic-{args.edges}")
    g = RatingGraph.from_shards(shards)
    split = split_edges(g, SplitConfig())
    cfg = TrainConfig(progress=False)
    device = torch.device(args.device)
    rows = compare_samplers(g, split, args.batches, args.rounds, cfg, device)
    if rows["pyg"]["sampled_edges"] <= 0 or rows["torch"]["sampled_edges"] <= 0:
        raise SystemExit("a sampler sampled no edges")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    result = {
        "what": "sampled_*: the training loader (sampling, target exclusion, feature gather); sampler_*: "
        "sample_from_edges alone (torch excludes targets while sampling, pyg does not); same input batches",
        "graph": {
            "edges": g.num_edges,
            "users": g.num_users,
            "movies": g.num_movies,
            "train_edges": int(split.train.numel()),
        },
        "config": {
            "batch_size": cfg.batch_size,
            "num_neighbors": cfg.num_neighbors,
            "seed": cfg.seed,
            "batches": args.batches,
            "rounds": args.rounds,
        },
        "threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.processor() or 'cpu'}",
        "torch_sampler_device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "load_average": os.getloadavg(),
        "commit": commit or "unknown",
        "torch": torch.__version__,
        "pyg_backend": "pyg-lib" if WITH_PYG_LIB else "torch-sparse",
        "samplers": rows,
        "ratio_sampled_edges_per_s": rows["torch"]["sampled_edges_per_s"] / rows["pyg"]["sampled_edges_per_s"],
        "ratio_seed_edges_per_s": rows["torch"]["seed_edges_per_s"] / rows["pyg"]["seed_edges_per_s"],
        "ratio_sampler_edges_per_s": rows["torch"]["sampler_edges_per_s"] / rows["pyg"]["sampler_edges_per_s"],
    }
    print(json.dumps(result, indent=2))
    if args.out:
        write_json_atomic(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
