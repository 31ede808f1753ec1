"""CPU cost of a fixed glibc mmap threshold (``TrainConfig.heap_mmap_threshold_kb``): trains
``--steps`` steps of the default config on prepared shards in a fresh process per setting
and prints user/system CPU seconds and minor page faults of the ``train()`` call.

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/heap_threshold_cpu.py \\
        --shards WORKDIR/shards/ml-latest-small --thresholds 0 1024 0 1024
    # over the mapped graph index (built by 'prepare --graph-backend store'), as at scale:
    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/heap_threshold_cpu.py \\
        --shards SHARDS --store --steps 30 --thresholds 1024 0 [--no-hugepages]

Each process runs as the ``scalable-rec`` command does, with glibc's transparent huge pages
(``scalable_rec.heap``), unless ``--no-hugepages``. The in-memory path never fixes the
threshold itself (here it is fixed for the comparison); store-backed training does.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from scalable_rec.heap import hugepages_environ


def one_run(shards: Path, steps: int, threshold_kb: int, store: bool) -> None:
    import torch

    from scalable_rec.config import RunConfig
    from scalable_rec.graph import RatingGraph, split_edges
    from scalable_rec.graph.index import GraphIndex
    from scalable_rec.graph.store import open_stores
    from scalable_rec.heap import fix_mmap_threshold
    from scalable_rec.shards import GraphShards
    from scalable_rec.train import train

    torch.set_num_threads(1)
    cfg = RunConfig()
    data = None
    if store:
        mapped = GraphShards(shards, verify=False)
        index = GraphIndex.for_shards(mapped, cfg.split, verify=False)
        graph, split, data = index.rating_graph(mapped), index.split(), open_stores(index, "train")
        split.val = split.val[:50_000]  # as scale_curves.py: validation on a slice
    else:
        graph = RatingGraph.from_shards(GraphShards(shards), cfg.features)
        split = split_edges(graph, cfg.split)
    cfg.train.max_steps, cfg.train.progress = steps, False
    cfg.train.heap_mmap_threshold_kb = threshold_kb  # what store-backed training applies
    if threshold_kb and not store:  # the in-memory path leaves glibc's threshold alone; set it here
        fix_mmap_threshold(threshold_kb << 10)
    before, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    with tempfile.TemporaryDirectory() as run_dir:
        train(graph, split, cfg.model, cfg.train, Path(run_dir), config=cfg.to_json(), data=data)
    after = resource.getrusage(resource.RUSAGE_SELF)
    print(
        f"{'store' if store else 'memory'} hugepages={os.environ.get('GLIBC_TUNABLES', '')!r} "
        f"threshold_kb={threshold_kb} user_s={after.ru_utime - before.ru_utime:.1f} "
        f"sys_s={after.ru_stime - before.ru_stime:.1f} wall_s={time.perf_counter() - t0:.1f} "
        f"minor_faults={after.ru_minflt - before.ru_minflt}",
        flush=True,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shards", type=Path, required=True, help="a prepared shard directory")
    p.add_argument("--steps", type=int, default=120)
    p.add_argument(
        "--thresholds",
        type=int,
        nargs="+",
        default=[0, 1024, 0, 1024],
        help="KiB; 0 = glibc's dynamic threshold; each in its own process",
    )
    p.add_argument("--store", action="store_true", help="train over the mapped graph index's stores")
    p.add_argument(
        "--no-hugepages",
        dest="hugepages",
        action="store_false",
        help="without glibc's transparent huge pages (the scalable-rec command turns them on)",
    )
    p.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one is not None:
        return one_run(args.shards, args.steps, args.one, args.store)
    env = (hugepages_environ(os.environ) if args.hugepages else None) or dict(os.environ)
    for kb in args.thresholds:  # a fresh process each: the threshold is process-wide
        subprocess.run(
            [
                sys.executable,
                __file__,
                "--shards",
                str(args.shards),
                "--steps",
                str(args.steps),
                "--one",
                str(kb),
                *(["--store"] if args.store else []),
            ],
            check=True,
            env=env,
        )


if __name__ == "__main__":
    main()
