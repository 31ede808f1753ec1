"""CPU cost of a fixed glibc mmap threshold (``TrainConfig.heap_mmap_threshold_kb``) on
the in-memory path: trains ``--steps`` steps of the default config on prepared shards in a
fresh process per setting and prints user/system CPU seconds and minor page faults.

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/heap_threshold_cpu.py \\
        --shards WORKDIR/shards/ml-latest-small --thresholds 0 1024 0 1024

This is why only training over the mapped stores fixes the threshold (README "Graphs
larger than memory"): there it bounds a rank's private memory, here it only adds syscalls.
"""
from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def one_run(shards: Path, steps: int, threshold_kb: int) -> None:
    import torch

    from scalable_rec.config import RunConfig
    from scalable_rec.graph import RatingGraph, split_edges
    from scalable_rec.shards import GraphShards
    from scalable_rec.train import train
    from scalable_rec.train.heap import fix_mmap_threshold

    torch.set_num_threads(1)
    cfg = RunConfig()
    graph = RatingGraph.from_shards(GraphShards(shards), cfg.features)
    split = split_edges(graph, cfg.split)
    cfg.train.max_steps, cfg.train.progress = steps, False
    if threshold_kb:  # the in-memory path leaves glibc's threshold alone; set it as the store path does
        fix_mmap_threshold(threshold_kb << 10)
    before, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    with tempfile.TemporaryDirectory() as run_dir:
        train(graph, split, cfg.model, cfg.train, Path(run_dir), config=cfg.to_json())
    after = resource.getrusage(resource.RUSAGE_SELF)
    print(f"threshold_kb={threshold_kb} user_s={after.ru_utime - before.ru_utime:.1f} "
          f"sys_s={after.ru_stime - before.ru_stime:.1f} wall_s={time.perf_counter() - t0:.1f} "
          f"minor_faults={after.ru_minflt - before.ru_minflt}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shards", type=Path, required=True, help="a prepared shard directory")
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--thresholds", type=int, nargs="+", default=[0, 1024, 0, 1024],
                   help="KiB; 0 = glibc's dynamic threshold; each in its own process")
    p.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one is not None:
        return one_run(args.shards, args.steps, args.one)
    for kb in args.thresholds:  # a fresh process each: the threshold is process-wide
        subprocess.run([sys.executable, __file__, "--shards", str(args.shards), "--steps", str(args.steps),
                        "--one", str(kb)], check=True)


if __name__ == "__main__":
    main()
