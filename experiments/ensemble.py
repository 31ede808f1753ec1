"""How much an average of independently trained models gains over one (a measurement, not a
package feature): trains the default configuration with several model seeds on one split,
each with its refit on train + val for the epochs its validation chose, then scores
validation and test with each model alone and with the mean of their ranking logits and
predicted ratings.

    PYTHONPATH=. OMP_NUM_THREADS=1 python experiments/ensemble.py train --shards DIR \\
        --split-seed 0 --model-seed 100 --out DIR/models
    PYTHONPATH=. OMP_NUM_THREADS=1 python experiments/ensemble.py eval --shards DIR \\
        --split-seed 0 --out DIR/models --json ensemble-seed0.json

``train`` writes ``select-<split>-<model>.pt`` and ``refit-<split>-<model>.pt`` (whole
models, pickled: for this script only); ``eval`` reads every one of a split seed.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from scalable_rec.atomic import write_json_atomic
from scalable_rec.graph import FeatureConfig, RatingGraph, SplitConfig, split_edges
from scalable_rec.model.evaluate import ranking_metrics, rating_errors
from scalable_rec.model.topk import RatedIndex
from scalable_rec.shards import GraphShards
from scalable_rec.train import ModelConfig, TrainConfig, train
from scalable_rec.train import checkpoint as ckpt


def _train(args, g, split) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = TrainConfig(progress=False, seed=args.model_seed, **json.loads(args.train))
    model_cfg = ModelConfig(**json.loads(args.model))
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as run_dir:
        result = train(g, split, model_cfg, cfg, Path(run_dir))
        if result.interrupted:  # a half-trained model must not be averaged
            raise SystemExit("training was interrupted (signal or max_steps); no model written")
        epochs = ckpt.load(Path(run_dir) / "best.pt")["epoch"] + 1  # what 'train --refit' refits for
    torch.save(result.model, out / f"select-{args.split_seed}-{args.model_seed}.pt")
    with tempfile.TemporaryDirectory() as run_dir:
        refit = train(g, split.refit(), model_cfg, cfg.for_refit(epochs), Path(run_dir))
    if refit.interrupted:
        raise SystemExit("the refit was interrupted (signal or max_steps); no refit model written")
    torch.save(refit.model, out / f"refit-{args.split_seed}-{args.model_seed}.pt")
    print(json.dumps({"model_seed": args.model_seed, "epochs": epochs, "seconds": time.perf_counter() - t0}))


def _scores(models, g, message_ids, eval_ids):
    """Each model's, and the mean model's, RMSE on ``eval_ids`` and Recall/NDCG@10 on its
    relevant edges, with ``message_ids`` passing messages and masked."""
    data = g.hetero_data(message_ids)
    zs = [m.eval().encode_all(data) for m in models]
    src, dst, rating = g.src[eval_ids], g.dst[eval_ids], g.rating[eval_ids]
    with torch.no_grad():
        preds = [m.predict_pairs(z, src, dst) for m, z in zip(models, zs)]
    seen = RatedIndex.from_edges(g.src[message_ids], g.dst[message_ids], g.num_users)
    relevant = rating >= 4.0
    movies = torch.arange(g.num_movies)

    def ranking(members):
        def score(users):
            with torch.no_grad():
                return sum(models[i].rank_block(zs[i], users, movies) for i in members) / len(members)

        return ranking_metrics(score, g.num_users, g.num_movies, seen, src[relevant], dst[relevant])

    rows = {}
    for name, members in [*((f"model {i}", [i]) for i in range(len(models))), ("mean", list(range(len(models))))]:
        pred = sum(preds[i] for i in members) / len(members)
        rows[name] = {"rmse": rating_errors(pred, rating)["rmse"], **ranking(members)}
    return rows


def _eval(args, g, split) -> None:
    out = Path(args.out)
    results = {"split_seed": args.split_seed, "threads": torch.get_num_threads()}
    for kind in ("select", "refit"):
        paths = sorted(out.glob(f"{kind}-{args.split_seed}-*.pt"))
        models = [torch.load(p, weights_only=False) for p in paths]
        results[kind] = {"models": [p.name for p in paths]}
        if kind == "select":
            results[kind]["val"] = _scores(models, g, split.train, split.val)
        results[kind]["test"] = _scores(models, g, torch.cat([split.train, split.val]), split.test)
    write_json_atomic(args.json, results)
    print(json.dumps(results, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("role", choices=["train", "eval"])
    parser.add_argument("--shards", required=True, help="prepared shard directory (features cached beside it)")
    parser.add_argument("--out", required=True, help="directory of the trained models")
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--model-seed", type=int, default=0)
    parser.add_argument("--train", default="{}", help="JSON of TrainConfig overrides")
    parser.add_argument("--model", default="{}", help="JSON of ModelConfig overrides")
    parser.add_argument("--json", help="eval: JSON file to write")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    g = RatingGraph.from_shards(GraphShards(args.shards), FeatureConfig())
    split = split_edges(g, SplitConfig(split_seed=args.split_seed))
    (_train if args.role == "train" else _eval)(args, g, split)


if __name__ == "__main__":
    main()
