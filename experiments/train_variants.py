"""Trains the default config and named variants of it on one split; writes a JSON of each
run's validation history and test metrics (the measurements behind the defaults' choices
of ``supervision``, ``optimizer`` and ``select_metric``).

    PYTHONPATH=. OMP_NUM_THREADS=1 python experiments/train_variants.py --shards DIR --out x.json \\
        --epochs 8 --variant exclude='{"supervision": "exclude_targets"}' \\
        --variant disjoint='{"supervision": "disjoint"}'

Each variant is a JSON object of ``TrainConfig`` overrides (``model.`` prefixed keys go to
``ModelConfig``); the split, seed and everything else stay at their defaults.
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
from scalable_rec.score import evaluate_split
from scalable_rec.shards import GraphShards
from scalable_rec.train import ModelConfig, TrainConfig, train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shards", required=True, help="prepared shard directory (features cached beside it)")
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--epochs", type=int, default=30, help="epoch cap of every variant")
    parser.add_argument("--seed", type=int, default=0, help="split seed and model seed")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument(
        "--variant", action="append", default=[], metavar="NAME=JSON", help="a named set of overrides (repeatable)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    g = RatingGraph.from_shards(GraphShards(args.shards), FeatureConfig())
    split = split_edges(g, SplitConfig(split_seed=args.seed))
    results = {"shards": args.shards, "epochs": args.epochs, "seed": args.seed, "threads": args.threads, "variants": {}}
    for spec in args.variant or ["default={}"]:
        name, _, overrides = spec.partition("=")
        over = json.loads(overrides or "{}")
        model_over = {k[6:]: v for k, v in over.items() if k.startswith("model.")}
        train_over = {k: v for k, v in over.items() if not k.startswith("model.")}
        cfg = TrainConfig(**{"epochs": args.epochs, "progress": False, "seed": args.seed, **train_over})
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as run_dir:
            result = train(g, split, ModelConfig(**model_over), cfg, Path(run_dir))
        test = evaluate_split(result.model, g, split, relevant_min=cfg.relevant_min)
        results["variants"][name] = {
            "overrides": over,
            "seconds": time.perf_counter() - t0,
            "best_val_rmse": result.best_val_rmse,
            "best_val_recall@10": result.best_val_recall,
            "history": result.history,
            "test": test,
        }
        print(
            json.dumps(
                {
                    name: {
                        "val_rmse": result.best_val_rmse,
                        "val_recall@10": result.best_val_recall,
                        "test_rmse": test["rmse"],
                        "test_recall@10": test["model"]["recall@10"],
                        "test_ndcg@10": test["model"]["ndcg@10"],
                    }
                }
            ),
            flush=True,
        )
        write_json_atomic(args.out, results)


if __name__ == "__main__":
    main()
