"""Cold movies: recommendations of movies nobody rated during training, from their title
and genre features alone.

Protocol (MovieLens folder, e.g. ../shared/data/ml-latest-small), per ``--seeds`` value s:

1. A seeded share ``--holdout`` of the rated movies is held out of training entirely: all
   their ratings are removed from ratings.csv (so from train, validation, test and the
   message-passing graph); movies.csv stays whole, so they are catalog nodes with
   features, no edges and an untrained ID row. The model is trained on the rest with
   ``scalable-rec run --seed s --split-seed s`` once per ``--movie-id-dropout`` value.
2. The held-out ratings ≥ ``--relevant-min`` are the positives; the users are those of
   the training data who rated a cold movie that well (a user whose every rating was of
   a cold movie is not in the graph and is counted, not scored).
3. Ranked among the cold movies only, Recall@K / NDCG@K (the package's
   ``ranking_metrics``) for (a) the model (its ranking head over the full training
   graph, as ``scalable-rec score`` encodes it), (b) a content baseline: cosine between
   the movie's ``[title embedding / ‖·‖ ‖ genres / ‖·‖]`` and the mean of that vector
   over the user's movies rated ≥ ``--relevant-min`` (all their movies if none), and
   (c) random ranking (mean of ``--random-draws`` seeded draws). Popularity cannot rank
   movies without ratings. Ablation: the model reading the cold movies' untrained ID
   rows instead of the features-only input (``model_untrained_rows``).
4. Mixed into the whole catalog: the run's own recommendations.parquet (every user's
   top-K over all unrated movies): the share of users with a cold movie in their top-K,
   the cold share of all slots next to the cold share of the catalog, Recall@K of the
   cold positives when the model ranks the whole catalog (rated movies masked), and per
   user the catalog rank of their best-scored cold movie.

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python experiments/eval_cold_movies.py \\
        --data ../shared/data/ml-latest-small --work /tmp/cold-movies --out cold_movies.json

Writes one JSON object: settings, thread count, and per seed and dropout every number.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import torch

from scalable_rec import cli
from scalable_rec.config import RunConfig
from scalable_rec.graph import RatingGraph
from scalable_rec.model.evaluate import ranking_metrics
from scalable_rec.model.recommender import Recommender
from scalable_rec.model.topk import RatedIndex
from scalable_rec.shards import GraphShards
from scalable_rec.train import checkpoint as ckpt


def hold_out_movies(data: Path, out: Path, share: float, seed: int) -> tuple[pa.Table, np.ndarray]:
    """Writes ``out``/ratings.csv without a seeded ``share`` of the rated movies (and
    movies.csv whole); returns the held-out ratings and movie ids."""
    ratings = pacsv.read_csv(data / "ratings.csv")
    movies = np.unique(ratings.column("movieId").to_numpy())
    cold = np.sort(
        np.random.default_rng(seed).choice(movies, size=max(1, int(round(share * len(movies)))), replace=False)
    )
    is_cold = pc.is_in(ratings.column("movieId"), value_set=pa.array(cold))
    out.mkdir(parents=True, exist_ok=True)
    pacsv.write_csv(ratings.filter(pc.invert(is_cold)), out / "ratings.csv")
    shutil.copy(data / "movies.csv", out / "movies.csv")
    return ratings.filter(is_cold), cold


def content_vectors(graph: RatingGraph, shards: Path) -> torch.Tensor:
    """``[title / ‖title‖ ‖ genres / ‖genres‖]`` per movie (equal weight to both parts)."""
    metas = sorted((shards / "features").glob("movie-*.json"))
    genres = len(json.loads(metas[-1].read_text())["genres"])
    x = graph.movie_x
    title, genre = x[:, :-genres], x[:, -genres:]
    return torch.cat([torch.nn.functional.normalize(title, dim=1), torch.nn.functional.normalize(genre, dim=1)], 1)


def content_score_fn(graph: RatingGraph, vectors: torch.Tensor, cold: torch.Tensor, relevant_min: float):
    """Cosine of each cold movie to the mean vector of the user's liked movies."""
    liked = graph.rating >= relevant_min
    profile = torch.zeros(graph.num_users, vectors.size(1))
    profile.index_add_(0, graph.src[liked], vectors[graph.dst[liked]])
    has_liked = torch.bincount(graph.src[liked], minlength=graph.num_users) > 0
    fallback = torch.zeros_like(profile).index_add_(0, graph.src, vectors[graph.dst])
    profile = torch.where(has_liked[:, None], profile, fallback)
    profile = torch.nn.functional.normalize(profile, dim=1)
    cold_vec = torch.nn.functional.normalize(vectors[cold], dim=1)
    return lambda users: profile[users] @ cold_vec.T


def catalog_mix(recs: pa.Table, cold_keys: set[int], num_movies: int, k: int) -> dict[str, Any]:
    """How often cold movies enter the run's full-catalog top-K lists."""
    users = recs.column("user_key").to_numpy()
    is_cold = np.isin(recs.column("movie_key").to_numpy(), np.fromiter(cold_keys, dtype=np.int64))
    top = recs.column("rank").to_numpy() <= k if "rank" in recs.column_names else np.ones(len(users), bool)
    users, is_cold = users[top], is_cold[top]
    with_cold = np.unique(users[is_cold])
    return {
        "users": int(np.unique(users).size),
        "users_with_a_cold_movie_in_top_k": int(with_cold.size),
        "share_of_users_with_a_cold_movie": float(with_cold.size / max(1, np.unique(users).size)),
        "cold_share_of_slots": float(is_cold.mean()) if is_cold.size else 0.0,
        "cold_share_of_catalog": len(cold_keys) / num_movies,
        "distinct_cold_movies_recommended": int(np.unique(recs.column("movie_key").to_numpy()[top][is_cold]).size),
    }


def best_cold_rank(
    score_fn, users: torch.Tensor, cold: torch.Tensor, rated: RatedIndex, chunk: int = 256
) -> torch.Tensor:
    """Per user, the full-catalog rank (1 = first; rated movies masked) of their
    best-scored cold movie: how far the cold movies sit from a top-K list."""
    ranks = []
    for i in range(0, users.numel(), chunk):
        u = users[i : i + chunk]
        s = score_fn(u).float()
        rated.mask_(s, u)
        best = s[:, cold].max(1).values
        ranks.append((s > best[:, None]).sum(1) + 1)
    return torch.cat(ranks) if ranks else torch.empty(0, dtype=torch.long)


def evaluate_run(run_dir: Path, held: pa.Table, cold_ids: np.ndarray, args) -> dict[str, Any]:
    saved = RunConfig.load(run_dir / "config.json")
    shards = saved.data.shards_dir()
    graph = RatingGraph.from_shards(GraphShards(shards), saved.features)
    model = Recommender(graph.num_users, graph.num_movies, graph.movie_x.size(1), saved.model)
    model.load_state_dict(ckpt.load(run_dir / "best.pt")["model"])
    model.eval()
    movie_index = {key: i for i, key in enumerate(graph.movie_keys.to_pylist())}
    user_index = {key: i for i, key in enumerate(graph.user_keys.to_pylist())}
    cold = torch.tensor([movie_index[m] for m in cold_ids])
    col_of = {int(m): c for c, m in enumerate(cold.tolist())}
    # positives: held-out ratings ≥ relevant_min of users the graph knows
    good = held.filter(pc.greater_equal(held.column("rating"), args.relevant_min))
    src, dst, unknown_users = [], [], set()
    for u, m in zip(good.column("userId").to_pylist(), good.column("movieId").to_pylist()):
        if u not in user_index:
            unknown_users.add(u)
            continue
        src.append(user_index[u])
        dst.append(movie_index[m])
    src, dst = torch.tensor(src), torch.tensor(dst)
    col = torch.tensor([col_of[int(d)] for d in dst.tolist()])
    with torch.no_grad():
        z = model.encode_all(graph.hetero_data())  # as `scalable-rec score` encodes: every rating
    none_seen = RatedIndex.from_edges(
        torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long), graph.num_users
    )
    among = (graph.num_users, cold.numel(), none_seen, src, col, args.k)
    out: dict[str, Any] = {
        "cold_movies": int(cold.numel()),
        "cold_movies_with_a_positive": int(torch.unique(col).numel()),
        "held_out_ratings": held.num_rows,
        "positives": int(src.numel()),
        "positive_users_not_in_graph": len(unknown_users),
        "cold_rows_marked_untrained": int((model.encoder.movie_trained[cold] == 0).sum()),
    }
    with torch.no_grad():
        out["model"] = ranking_metrics(lambda u: model.rank_block(z, u, cold), *among)
        # ablation: the same model reading the cold movies' untrained (randomly initialised)
        # ID rows, i.e. what scoring did before the features-only fallback
        saved_mask = model.encoder.movie_trained.clone()
        model.encoder.movie_trained.fill_(1)
        z_rows = model.encode_all(graph.hetero_data())
        out["model_untrained_rows"] = ranking_metrics(lambda u: model.rank_block(z_rows, u, cold), *among)
        model.encoder.movie_trained.copy_(saved_mask)
    vectors = content_vectors(graph, shards)
    out["content"] = ranking_metrics(content_score_fn(graph, vectors, cold, args.relevant_min), *among)
    draws = []
    for d in range(args.random_draws):
        gen = torch.Generator().manual_seed(1000 + d)
        draws.append(ranking_metrics(lambda u: torch.rand(u.numel(), cold.numel(), generator=gen), *among))
    out["random"] = {key: float(np.mean([r[key] for r in draws])) for key in draws[0]}
    all_movies = torch.arange(graph.num_movies)
    rated = RatedIndex.from_edges(graph.src, graph.dst, graph.num_users)
    with torch.no_grad():
        out["full_catalog_model"] = ranking_metrics(
            lambda u: model.rank_block(z, u, all_movies), graph.num_users, graph.num_movies, rated, src, dst, args.k
        )
        ranks = best_cold_rank(
            lambda u: model.rank_block(z, u, all_movies), torch.arange(graph.num_users), cold, rated
        ).float()
    out["best_cold_movie_rank"] = {
        "median": float(ranks.median()),
        "mean": float(ranks.mean()),
        "share_within_k": float((ranks <= args.k).float().mean()),
        "share_within_100": float((ranks <= 100).float().mean()),
        "catalog": graph.num_movies,
    }
    recs = pq.read_table(run_dir / "recommendations.parquet")
    out["catalog_mix"] = catalog_mix(recs, set(int(m) for m in cold_ids), graph.num_movies, args.k)
    out["warm_test"] = json.loads((run_dir / "metrics.json").read_text())["test"]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="MovieLens folder (ratings.csv, movies.csv)")
    p.add_argument("--work", required=True, help="scratch folder for data, shards and runs")
    p.add_argument("--out", required=True, help="JSON results file")
    p.add_argument("--holdout", type=float, default=0.1, help="share of rated movies held out of training")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="holdout, split and model seed")
    p.add_argument("--movie-id-dropout", type=float, nargs="+", default=[0.0], help="values to train with")
    p.add_argument("--relevant-min", type=float, default=4.0)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--random-draws", type=int, default=10)
    args = p.parse_args()
    torch.set_num_threads(1)
    work = Path(args.work)
    results: dict[str, Any] = {
        "settings": vars(args),
        "threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "runs": [],
    }
    for seed in args.seeds:
        data_dir = work / f"data-seed-{seed}"
        held, cold_ids = hold_out_movies(Path(args.data), data_dir, args.holdout, seed)
        for dropout in args.movie_id_dropout:
            run_dir = work / f"run-seed-{seed}-dropout-{dropout}"
            t0 = time.perf_counter()
            if not (run_dir / "best.pt").is_file():
                code = cli.main(
                    [
                        "run",
                        "--data",
                        str(data_dir),
                        "--workdir",
                        str(work),
                        "--run-dir",
                        str(run_dir),
                        "--seed",
                        str(seed),
                        "--split-seed",
                        str(seed),
                        "--movie-id-dropout",
                        str(dropout),
                        "--epochs",
                        str(args.epochs),
                        "--k",
                        str(args.k),
                        "--no-progress",
                    ]
                )
                if code:
                    raise SystemExit(f"training failed with exit code {code}")
            row = {
                "seed": seed,
                "movie_id_dropout": dropout,
                "run_s": time.perf_counter() - t0,
                **evaluate_run(run_dir, held, cold_ids, args),
            }
            results["runs"].append(row)
            print(json.dumps(row), flush=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
