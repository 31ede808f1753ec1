"""Incremental refresh vs a full re-score, after a share of users gain ratings.

Steps (all through the package's real code paths):

1. ``scalable-rec synth`` shards (``--users/--movies/--edges``), a briefly trained model
   (``scalable-rec train --max-steps``: timing does not depend on model quality) and
   ``scalable-rec score`` → recommendations.parquet. The refresh state is initialised by
   folding an empty ratings file (one full encode + score, reported, not counted).
2. ``--user-share`` of users gain ``--ratings-per-user`` ratings each, movies drawn in
   proportion to their popularity (a popular movie touches many users: the hard case
   for exact mode).
3. Timed: a full re-score as ``scalable-rec score`` does it today (on the graph before
   the new ratings; a few thousand more edges do not change its cost)
   (encode all + score all + write Parquet), and ``refresh`` in ``exact`` and ``bounded``
   mode (read the input, re-encode, re-score, replace Parquet rows, save state), each
   from the same starting run directory. Graph and model loading are common to both and
   not timed.
4. Agreement: every user's top-10 after each refresh against a full re-score of the
   updated graph (mean overlap |A ∩ B| / 10 and share of identical lists).

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python benchmarks/bench_refresh.py --work /tmp/bench-refresh \\
        --users 70000 --movies 30000 --edges 10000000 --out refresh.json

Writes JSON with the settings, thread count and every number.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import torch

from scalable_rec import cli, pipeline
from scalable_rec.config import RunConfig
from scalable_rec.graph import RatingGraph
from scalable_rec.model.recommender import Recommender
from scalable_rec.refresh import RefreshConfig, RefreshState, initial_state, refresh
from scalable_rec.shards import GraphShards
from scalable_rec.train import checkpoint as ckpt


def write_new_ratings(graph: RatingGraph, path: Path, share: float, per_user: int, seed: int) -> int:
    rng = np.random.default_rng(seed)
    users = rng.choice(graph.num_users, size=max(1, int(round(share * graph.num_users))), replace=False)
    popularity = np.bincount(graph.dst.numpy(), minlength=graph.num_movies).astype(np.float64) + 1.0
    movies = rng.choice(graph.num_movies, size=(len(users), per_user), p=popularity / popularity.sum())
    ukeys, mkeys = graph.user_keys.to_numpy(), graph.movie_keys.to_numpy()
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["userId", "movieId", "rating", "timestamp"])
        for u, row in zip(users, movies):
            for m in row:
                w.writerow([ukeys[u], mkeys[m], float(rng.integers(1, 11)) / 2, 2_000_000_000])
    return len(users)


def agreement(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    overlap = (a[:, :, None] == b[:, None, :]).any(-1).float().mean(1)
    return {
        "top10_overlap": float(overlap.mean()),
        "identical_lists": float((a == b).all(1).float().mean()),
        "min_overlap": float(overlap.min()),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--users", type=int, default=70_000)
    p.add_argument("--movies", type=int, default=30_000)
    p.add_argument("--edges", type=int, default=10_000_000)
    p.add_argument("--user-share", type=float, default=0.01)
    p.add_argument("--ratings-per-user", type=int, default=5)
    p.add_argument("--train-steps", type=int, default=30)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    shards, run = work / "shards", work / "run"
    if not (shards / "manifest.json").is_file():
        assert (
            cli.main(
                [
                    "synth",
                    "--preset",
                    "large",
                    "--users",
                    str(args.users),
                    "--movies",
                    str(args.movies),
                    "--edges",
                    str(args.edges),
                    "--seed",
                    str(args.seed),
                    "--out",
                    str(shards),
                ]
            )
            == 0
        )
    if not (run / "best.pt").is_file():
        assert (
            cli.main(
                [
                    "train",
                    "--shards",
                    str(shards),
                    "--run-dir",
                    str(run),
                    "--epochs",
                    "1",
                    "--max-steps",
                    str(args.train_steps),
                    "--val-ratio",
                    "0.001",
                    "--test-ratio",
                    "0.001",
                    "--no-progress",
                    "--device",
                    "cpu",
                ]
            )
            == 0
        )
    graph = RatingGraph.from_shards(GraphShards(shards))
    saved = RunConfig.load(run / "config.json")
    model = Recommender(graph.num_users, graph.num_movies, graph.movie_x.size(1), saved.model)
    model.load_state_dict(ckpt.load(run / "best.pt")["model"])
    model.eval()
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
    ).stdout.strip()
    result: dict = {
        "settings": vars(args),
        "threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "commit": commit,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {os.cpu_count()} cores",
        "graph": {"users": graph.num_users, "movies": graph.movie_x.size(0), "edges": graph.num_edges},
    }

    t0 = time.perf_counter()
    pipeline.score_stage(saved, run, graph)  # today's path: encode all, score all, write Parquet
    result["full_rescore_s"] = time.perf_counter() - t0
    empty = work / "empty.csv"
    empty.write_text("userId,movieId,rating,timestamp\n")
    shutil.rmtree(run / "refresh", ignore_errors=True)
    init = refresh(run, model, graph, RefreshConfig(new_ratings=str(empty)))
    result["state_init_s"] = init["initial_full_score_s"]
    new = work / "new.csv"
    result["users_with_new_ratings"] = write_new_ratings(
        graph, new, args.user_share, args.ratings_per_user, args.seed + 1
    )
    tops = {}
    for mode in ("bounded", "exact"):
        case = work / f"run-{mode}"
        shutil.rmtree(case, ignore_errors=True)
        shutil.copytree(run, case)
        report = refresh(case, model, graph, RefreshConfig(new_ratings=str(new), mode=mode))
        result[mode] = {k: v for k, v in report.items() if k not in ("input_report", "fingerprint")}
        result[mode]["speedup_vs_full_rescore"] = result["full_rescore_s"] / report["total_s"]
        state = RefreshState.load(case / "refresh" / "state.pt")
        tops[mode], extra = state.cand_idx[:, :10], state.extra
        print(json.dumps({mode: result[mode]}), flush=True)
    full = initial_state(model, graph, 10, 20, 256, "bench", extra)
    for mode in tops:
        result[mode]["vs_full_rescore"] = agreement(tops[mode], full.cand_idx[:, :10])
    Path(args.out).write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
