"""Cold users: recommendations for users the model never saw, from their first ratings.

Protocol (MovieLens folder, e.g. ../shared/data/ml-latest-small):

1. A seeded ``--holdout`` share of users is removed from ratings.csv entirely; the model
   is trained (``scalable-rec run``) on the rest, once per ``--user-id-dropout`` value.
2. Each held-out user's ``--fold`` earliest ratings (by timestamp) are folded in with
   ``scalable-rec refresh`` (they are new users to the run: unknown-user input vector +
   message passing from the movies they rated); their later ratings ≥ 4.0 are the
   positives.
3. Recall@10 / NDCG@10 of the refreshed recommendations (recommendations.parquet)
   against popularity (training rating counts, the folded movies masked), on the same
   users and positives.

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python experiments/eval_cold_users.py \\
        --data ../shared/data/ml-latest-small --work /tmp/cold --out cold_users.json

Writes one JSON object with the settings and, per dropout and fold count, both metric sets.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import torch
from torch_geometric.metrics import LinkPredNDCG, LinkPredRecall

from scalable_rec import cli


def split_users(data: Path, work: Path, holdout: float, seed: int) -> tuple[pa.Table, pa.Table]:
    ratings = pacsv.read_csv(data / "ratings.csv")
    users = np.unique(ratings.column("userId").to_numpy())
    rng = np.random.default_rng(seed)
    cold = rng.choice(users, size=max(1, int(round(holdout * len(users)))), replace=False)
    is_cold = pc.is_in(ratings.column("userId"), value_set=pa.array(cold))
    train_dir = work / "train-data"
    train_dir.mkdir(parents=True, exist_ok=True)
    pacsv.write_csv(ratings.filter(pc.invert(is_cold)), train_dir / "ratings.csv")
    shutil.copy(data / "movies.csv", train_dir / "movies.csv")
    return ratings.filter(pc.invert(is_cold)), ratings.filter(is_cold)


def fold_split(cold: pa.Table, fold: int) -> tuple[pa.Table, pa.Table]:
    """Per user, the ``fold`` earliest ratings (ties by movie id) and the rest."""
    t = cold.sort_by([("userId", "ascending"), ("timestamp", "ascending"), ("movieId", "ascending")])
    user = t.column("userId").to_numpy()
    starts = np.r_[0, np.flatnonzero(np.diff(user)) + 1]
    position = np.arange(len(user)) - np.repeat(starts, np.diff(np.r_[starts, len(user)]))
    first = pa.array(position < fold)
    return t.filter(first), t.filter(pc.invert(first))


def metrics(top: dict[int, list[int]], positives: dict[int, set[int]], k: int) -> dict[str, float]:
    users = [u for u in positives if positives[u]]
    movie_ids = sorted({m for u in users for m in positives[u]} | {m for u in users for m in top.get(u, [])})
    col = {m: i for i, m in enumerate(movie_ids)}
    pred = torch.full((len(users), k), -1, dtype=torch.long)
    src, dst = [], []
    for row, u in enumerate(users):
        rec = [col[m] for m in top.get(u, [])][:k]
        pred[row, : len(rec)] = torch.tensor(rec, dtype=torch.long)
        for m in positives[u]:
            src.append(row)
            dst.append(col[m])
    # Users with fewer than k recommendations: pad with an index that is never relevant.
    pred[pred < 0] = len(movie_ids)
    gt = torch.tensor([src, dst])
    recall, ndcg = LinkPredRecall(k), LinkPredNDCG(k)
    recall.update(pred, gt)
    ndcg.update(pred, gt)
    return {f"recall@{k}": float(recall.compute()), f"ndcg@{k}": float(ndcg.compute()), "users": len(users)}


def popularity_top(train: pa.Table, folded: pa.Table, k: int) -> dict[int, list[int]]:
    counts = train.group_by("movieId").aggregate([("userId", "count")]).sort_by([("userId_count", "descending")])
    ranked = counts.column("movieId").to_pylist()
    seen: dict[int, set[int]] = {}
    for u, m in zip(folded.column("userId").to_pylist(), folded.column("movieId").to_pylist()):
        seen.setdefault(u, set()).add(m)
    out = {}
    for u, s in seen.items():
        out[u] = [m for m in ranked[: k + len(s)] if m not in s][:k]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="MovieLens folder (ratings.csv, movies.csv)")
    p.add_argument("--work", required=True, help="scratch folder for shards and runs")
    p.add_argument("--out", required=True, help="JSON results file")
    p.add_argument("--holdout", type=float, default=0.1, help="share of users held out of training")
    p.add_argument("--fold", type=int, nargs="+", default=[1, 5, 10], help="earliest ratings folded in per user")
    p.add_argument("--user-id-dropout", type=float, nargs="+", default=[0.0, 0.1], help="values to train with")
    p.add_argument("--relevant-min", type=float, default=4.0)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=30)
    args = p.parse_args()
    torch.set_num_threads(1)
    work = Path(args.work)
    train, cold = split_users(Path(args.data), work, args.holdout, args.seed)
    results = {
        "settings": vars(args),
        "train_users": len(np.unique(train.column("userId").to_numpy())),
        "cold_users": len(np.unique(cold.column("userId").to_numpy())),
        "runs": [],
    }
    for dropout in args.user_id_dropout:
        run_dir = work / f"run-dropout-{dropout}"
        if not (run_dir / "best.pt").is_file():
            code = cli.main(
                [
                    "run",
                    "--data",
                    str(work / "train-data"),
                    "--workdir",
                    str(work),
                    "--run-dir",
                    str(run_dir),
                    "--user-id-dropout",
                    str(dropout),
                    "--epochs",
                    str(args.epochs),
                    "--no-progress",
                    "--k",
                    str(args.k),
                ]
            )
            if code:
                raise SystemExit(f"training failed with exit code {code}")
        trained = json.loads((run_dir / "metrics.json").read_text())["test"]
        for fold in args.fold:
            folded, rest = fold_split(cold, fold)
            case = work / f"refresh-dropout-{dropout}-fold-{fold}"
            shutil.rmtree(case, ignore_errors=True)
            case.mkdir(parents=True)
            # metrics.json too: refresh, as score, checks that the run finished
            for name in ("config.json", "metrics.json", "best.pt", "recommendations.parquet"):
                shutil.copy(run_dir / name, case / name)
            pacsv.write_csv(folded, case / "new-ratings.csv")
            if cli.main(
                ["refresh", "--run-dir", str(case), "--new-ratings", str(case / "new-ratings.csv"), "--k", str(args.k)]
            ):
                raise SystemExit("refresh failed")
            recs = pq.read_table(case / "recommendations.parquet")
            recs = recs.filter(pc.is_in(recs.column("user_key"), value_set=cold.column("userId").unique()))
            recs = recs.sort_by([("user_key", "ascending"), ("rank", "ascending")])
            top: dict[int, list[int]] = {}
            for u, m in zip(recs.column("user_key").to_pylist(), recs.column("movie_key").to_pylist()):
                top.setdefault(u, []).append(m)
            pos: dict[int, set[int]] = {}
            for u, m, r in zip(
                rest.column("userId").to_pylist(), rest.column("movieId").to_pylist(), rest.column("rating").to_pylist()
            ):
                if r >= args.relevant_min:
                    pos.setdefault(u, set()).add(m)
            report = json.loads((case / "refresh" / "last_report.json").read_text())
            results["runs"].append(
                {
                    "user_id_dropout": dropout,
                    "fold": fold,
                    "folded_ratings": folded.num_rows,
                    "model": metrics(top, pos, args.k),
                    "popularity": metrics(popularity_top(train, folded, args.k), pos, args.k),
                    "cold_users_with_recommendations": len(top),
                    "refresh_new_users": report["new_users"],
                    "refresh_skipped": report["input_report"]["skipped"],
                    "warm_test": trained,
                }
            )
            print(json.dumps(results["runs"][-1]))
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
