"""Bytes a store-backed training step allocates, by operator (torch.profiler, CPU).

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/step_allocations.py --shards SHARDS [--top 15]

Builds the default training job over the mapped graph index of ``SHARDS`` (as
``experiments/scale_curves.py --stages train-store`` does), runs ``--warmup`` steps, then profiles
``--steps`` steps with ``profile_memory=True`` and prints the MiB allocated per step (the
positive self CPU memory of every operator, summed) and the largest operators. With the
threshold fixed (``--heap-mmap-threshold-kb``), every allocated byte is a fresh page: this is
what docs/large-graphs.md's "Fused aggregation and transparent huge pages" paragraph measured.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--shards", type=Path, required=True, help="shards with a graph index (prepare --graph-backend store)"
    )
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--top", type=int, default=15)
    args = p.parse_args()

    import torch
    from torch.profiler import ProfilerActivity, profile

    from scalable_rec.graph import SplitConfig
    from scalable_rec.graph.index import GraphIndex
    from scalable_rec.graph.store import open_stores
    from scalable_rec.shards import GraphShards
    from scalable_rec.train import ModelConfig, TrainConfig
    from scalable_rec.train.loop import build_job, train_step

    torch.set_num_threads(1)
    shards = GraphShards(args.shards, verify=False)
    index = GraphIndex.for_shards(shards, SplitConfig(), verify=False)
    graph, split, data = index.rating_graph(shards), index.split(), open_stores(index, "train")
    cfg = TrainConfig(epochs=1, steps_per_epoch=args.warmup + args.steps, progress=False)
    with tempfile.TemporaryDirectory() as run_dir:
        job = build_job(graph, split, ModelConfig(), cfg, Path(run_dir), None, data=data)
        job.ddp_model.train()
        job.train_sampler.set_epoch(0)
        batches = iter(job.train_loader)
        for _ in range(args.warmup):
            train_step(job, next(batches).to(job.device))
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            for _ in range(args.steps):
                train_step(job, next(batches).to(job.device))  # the loop's own step, EMA included
    ops = [e for e in prof.key_averages() if e.self_cpu_memory_usage > 0]
    total = sum(e.self_cpu_memory_usage for e in ops) / args.steps / 2**20
    print(f"allocated per step: {total:,.1f} MiB over {args.steps} steps")
    for e in sorted(ops, key=lambda e: -e.self_cpu_memory_usage)[: args.top]:
        print(
            f"  {e.key:40s} {e.self_cpu_memory_usage / args.steps / 2**20:8.1f} MiB  {e.count / args.steps:9.1f} calls"
        )


if __name__ == "__main__":
    main()
