"""cProfile of one bounded refresh on the cached graph and model of ``bench_refresh.py``.

Copies ``<work>/run`` (whose state ``bench_refresh.py`` initialised) to ``<work>/run-prof``,
folds ``<work>/new.csv`` in bounded mode under cProfile and prints the report and the
functions with the largest cumulative time:

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python benchmarks/profile_refresh.py --work /tmp/bench-refresh
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import shutil
from pathlib import Path

import torch

from scalable_rec.config import RunConfig
from scalable_rec.graph import RatingGraph
from scalable_rec.model.recommender import Recommender
from scalable_rec.refresh import RefreshConfig, refresh
from scalable_rec.shards import GraphShards
from scalable_rec.train import checkpoint as ckpt


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", required=True, help="bench_refresh.py's --work folder (after one run)")
    p.add_argument("--mode", default="bounded", choices=["bounded", "exact"])
    p.add_argument("--top", type=int, default=35)
    args = p.parse_args()
    torch.set_num_threads(1)
    work = Path(args.work)
    run = work / "run"
    graph = RatingGraph.from_shards(GraphShards(work / "shards"))
    saved = RunConfig.load(run / "config.json")
    model = Recommender(graph.num_users, graph.num_movies, graph.movie_x.size(1), saved.model)
    model.load_state_dict(ckpt.load(run / "best.pt")["model"])
    model.eval()
    case = work / "run-prof"
    shutil.rmtree(case, ignore_errors=True)
    shutil.copytree(run, case)
    prof = cProfile.Profile()
    prof.enable()
    report = refresh(case, model, graph, RefreshConfig(new_ratings=str(work / "new.csv"), mode=args.mode))
    prof.disable()
    print({k: v for k, v in report.items() if k != "input_report"})
    pstats.Stats(prof).sort_stats("cumulative").print_stats(args.top)


if __name__ == "__main__":
    main()
