"""Quality table: the package's default run vs reference recommenders, seeds 0, 1, 2.

For each seed (split seed = model seed) the default ``RunConfig`` trains and is tested
exactly as ``scalable-rec run`` does (``train`` + ``evaluate_split``); the baselines in
``scalable_rec.score.baselines`` are fit on the same split and ranked by the same
``ranking_metrics`` (positives: test ratings ≥ the relevance threshold; train + val masked).
Each baseline's hyper-parameter is picked by validation Recall@10 (fit on train), then it
is refit on train + val and tested; ``ease_relevant`` and ``item_knn_relevant`` fit on the
relevant ratings only (≥ the threshold), every seen rating still masked. Writes ``<out>.json`` and ``<out>.md`` (mean ± std
over seeds, and min–max), and with ``--ablation`` one row per configuration change on the
given seeds. With ``--refit`` each seed's default run is followed by a refit: the same
configuration trained from scratch on train + val for the epoch count validation chose
(``best.pt``'s epoch + 1; ``TrainConfig.refit``), tested on the same test edges, the
protocol the baselines follow. ``--doc docs/RESULTS.md`` replaces the block between the quality markers
there with the Markdown output (``--combine`` of an earlier JSON regenerates it without training).

    OMP_NUM_THREADS=1 PYTHONPATH=. python experiments/quality.py --data /work/shared/data/ml-latest-small
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from scalable_rec.atomic import atomic_open, replace_marked_block, write_json_atomic
from scalable_rec.config import RunConfig
from scalable_rec.graph import RatingGraph, split_edges
from scalable_rec.pipeline import prepare
from scalable_rec.score import baselines as B
from scalable_rec.score import evaluate_split
from scalable_rec.train import checkpoint as ckpt
from scalable_rec.train import train

log = logging.getLogger("quality")
TARGET = {"rmse": 0.850, "recall@10": 0.23, "ndcg@10": 0.24}
GRIDS = {
    "ease": [100.0, 250.0, 500.0],
    "ease_relevant": [10.0, 25.0, 50.0, 100.0, 250.0],
    "item_knn": [50, 200],
    "item_knn_relevant": [100, 200, 400],
    "implicit_als": [(64, 0.05, 2.0), (64, 0.5, 10.0)],
}
# Variants fit on the relevant ratings only (≥ the relevance threshold); every seen rating stays masked.
RELEVANT_ONLY = ("ease_relevant", "item_knn_relevant")
# One row per configuration change against the defaults: (name, what changed, overrides).
ABLATION: list[tuple[str, str, dict[str, dict[str, Any]]]] = [
    (
        "select-rmse",
        "best.pt and early stopping by validation RMSE instead of validation Recall@10",
        {"train": {"select_metric": "rmse"}},
    ),
    (
        "targets-in-subgraph",
        "defect 1 unfixed: each batch's targets stay in its own subgraph",
        {"train": {"supervision": "none"}},
    ),
    (
        "disjoint-supervision",
        "a fixed 30% of training edges supervise, the rest pass messages",
        {"train": {"supervision": "disjoint"}},
    ),
    (
        "coupled-adam",
        "defect 5 unfixed: Adam with coupled L2 on every parameter (tables included)",
        {"train": {"optimizer": "adam"}},
    ),
    (
        "patience-3",
        "early stopping after 3 epochs without a better validation Recall@10 instead of 6 (the default before)",
        {"train": {"patience": 3}},
    ),
    (
        "no-rank-id-l2",
        "no L2 on the retrieval head's own user/movie vectors (rank_id_l2 0, the default before)",
        {"train": {"rank_id_l2": 0.0}},
    ),
    (
        "id-dropout-0.1",
        "10% of a batch's user and movie IDs hidden from the encoder instead of 20% "
        "(user_id_dropout and movie_id_dropout 0.1, the default before)",
        {"model": {"user_id_dropout": 0.1, "movie_id_dropout": 0.1}},
    ),
    (
        "no-retrieval-ids",
        "retrieval head without its own per-user/per-movie ranking vectors (the default "
        "before: ranking vectors are projections of the encoder output alone)",
        {"model": {"retrieval_ids": False}},
    ),
    (
        "no-logq",
        "in-batch softmax without logQ correction (popular negatives are not discounted)",
        {"train": {"logq_correction": False}},
    ),
    (
        "no-ema",
        "validation, best.pt and the returned model use the raw weights instead of their moving "
        "average (ema_decay 0, the default before)",
        {"train": {"ema_decay": 0.0}},
    ),
    (
        "hidden-64",
        "embeddings and GraphSAGE layers 64 wide instead of 128 (the default before)",
        {"model": {"hidden": 64}},
    ),
    (
        "no-temperature",
        "retrieval head ranks by the raw dot product instead of cosine over 0.15 (retrieval_temperature 0)",
        {"model": {"retrieval_temperature": 0.0}},
    ),
    (
        "temperature-0.2",
        "cosine ranking over 0.2 instead of 0.15 (retrieval_temperature 0.2, the default before)",
        {"model": {"retrieval_temperature": 0.2}},
    ),
    (
        "no-retrieval-bias",
        "retrieval head without its learned per-movie ranking bias (scores are cos/τ alone; "
        "retrieval_bias off, the default before)",
        {"model": {"retrieval_bias": False}},
    ),
    (
        "rating-relation",
        "messages typed by rating bucket (below 3, 3-3.5, 4 and up): one relation and "
        "SAGEConv each way per bucket (rating_messages 'relation' instead of 'none')",
        {"model": {"rating_messages": "relation"}},
    ),
    (
        "rating-gcmc",
        "the same rating relations, each relation's sum divided by the destination's in-degree over "
        "all buckets (GC-MC's normalisation: rating_messages 'gcmc' instead of 'none')",
        {"model": {"rating_messages": "gcmc"}},
    ),
    (
        "rating-scale",
        "the default's one mean each way, each message times a learned scalar of its rating bucket "
        "(ones at the start: rating_messages 'scale' instead of 'none')",
        {"model": {"rating_messages": "scale"}},
    ),
    (
        "rating-embed",
        "the default's one SAGEConv each way, each message plus a learned vector of its rating bucket "
        "(zero at the start: rating_messages 'embed' instead of 'none')",
        {"model": {"rating_messages": "embed"}},
    ),
    (
        "rating-center",
        "users add a second mean of their movies, each weighted by its rating's deviation from the user's "
        "mean rating, through its own weight (zero at the start: rating_messages 'center' instead of 'none')",
        {"model": {"rating_messages": "center"}},
    ),
    (
        "rank-dislike-push",
        "the ranking loss also pushes each labelled rating below 4.0 down in its own user's in-batch "
        "softmax, -log(1 - p) per such edge (rank_dislike_weight 1 instead of 0)",
        {"train": {"rank_dislike_weight": 1.0}},
    ),
    (
        "no-id-dropout",
        "no user or movie IDs hidden from the encoder (user_id_dropout and movie_id_dropout 0, "
        "the default two tables ago)",
        {"model": {"user_id_dropout": 0.0, "movie_id_dropout": 0.0}},
    ),
]
MODEL = "scalable-rec (default run)"
REFIT = "scalable-rec (refit on train + val)"
MARK_START, MARK_END = "<!-- quality:start -->", "<!-- quality:end -->"


def fit_baseline(name: str, x, value: Any, seed: int):
    name = name.removesuffix("_relevant")
    if name == "ease":
        return B.ease(x, value)
    if name == "item_knn":
        return B.item_knn(x, value)
    if name == "implicit_als":
        return B.implicit_als(x, value[0], reg=value[1], alpha=value[2], seed=seed)
    return B.popularity(x)


def baselines_for_split(
    graph: RatingGraph,
    split,
    seed: int,
    threshold: float,
    rating_range: tuple[float, float],
    only: list[str] | None,
    chosen: dict[str, Any],
) -> dict[str, dict[str, Any]]:
    """Every baseline on one split. A baseline already in ``chosen`` (tuned on an earlier
    seed's validation edges) reuses that value; otherwise its grid is tuned here and the
    winner is stored in ``chosen``."""
    nu, nm = graph.num_users, graph.num_movies
    train_e = (graph.src[split.train], graph.dst[split.train])
    seen_ids = torch.cat([split.train, split.val])
    seen_e = (graph.src[seen_ids], graph.dst[seen_ids])
    train_fit = B.relevant_edges(*train_e, graph.rating[split.train], threshold)
    seen_fit = B.relevant_edges(*seen_e, graph.rating[seen_ids], threshold)
    rel_v = graph.rating[split.val] >= threshold
    rel_t = graph.rating[split.test] >= threshold
    val_rel = (graph.src[split.val][rel_v], graph.dst[split.val][rel_v])
    test_rel = (graph.src[split.test][rel_t], graph.dst[split.test][rel_t])
    out: dict[str, dict[str, Any]] = {}
    for name in ["popularity", *GRIDS]:
        if only and name not in only:
            continue
        t0 = time.perf_counter()
        grid = [chosen[name]] if name in chosen else GRIDS.get(name, [None])
        relevant_only = name in RELEVANT_ONLY
        best, val_recalls = (
            B.tune_on_validation(
                lambda x, v: fit_baseline(name, x, v, seed),
                grid,
                train_e,
                val_rel,
                nu,
                nm,
                fit_on=train_fit if relevant_only else None,
            )
            if len(grid) > 1
            else (grid[0], {})
        )
        chosen[name] = best
        x_seen = B.interaction_matrix(*(seen_fit if relevant_only else seen_e), nu, nm)
        metrics = B.evaluate_fn(fit_baseline(name, x_seen, best, seed), *seen_e, *test_rel, nu, nm)
        out[name] = {
            **metrics,
            "chosen": best,
            "val_recall@10": {str(k): v for k, v in val_recalls.items()},
            "seconds": time.perf_counter() - t0,
        }
        log.info("seed %d %s: %s", seed, name, out[name])
    if not only or "biased_mf" in only:
        t0 = time.perf_counter()
        seen_r = (graph.src[seen_ids].numpy(), graph.dst[seen_ids].numpy(), graph.rating[seen_ids].numpy())
        test_r = (graph.src[split.test].numpy(), graph.dst[split.test].numpy(), graph.rating[split.test].numpy())
        out["biased_mf"] = {
            **B.biased_mf_rmse(seen_r, test_r, *rating_range, seed=seed),
            "seconds": time.perf_counter() - t0,
        }
        log.info("seed %d biased_mf: %s", seed, out["biased_mf"])
    return out


def with_overrides(base: RunConfig, overrides: dict[str, dict[str, Any]], seed: int) -> RunConfig:
    cfg = copy.deepcopy(base)
    for group, values in overrides.items():
        setattr(cfg, group, type(getattr(cfg, group))(**{**vars(getattr(cfg, group)), **values}))
    cfg.split.split_seed = seed
    cfg.train.seed = seed
    cfg.train.progress = False
    return cfg


def run_model(graph: RatingGraph, cfg: RunConfig, run_dir: Path) -> dict[str, Any]:
    split = split_edges(graph, cfg.split)
    if cfg.train.refitting():  # validation edges train too; the test edges are the same
        split = split.refit()
    result = train(
        graph,
        split,
        cfg.model,
        cfg.train,
        run_dir,
        config=cfg.to_json(),
        rating_range=(cfg.data.rating_min, cfg.data.rating_max),
    )
    if result.interrupted:  # a half-trained model must not become a table row
        raise SystemExit(f"training in {run_dir} was interrupted (signal or max_steps); no result written")
    test = evaluate_split(
        result.model,
        graph,
        split,
        k=cfg.score.k,
        memory_mb=cfg.score.score_memory_mb,
        rating_min=cfg.data.rating_min,
        rating_max=cfg.data.rating_max,
        relevant_min=cfg.train.relevant_min,
    )
    return {
        "rmse": test["rmse"],
        "mae": test["mae"],
        "recall@10": test["model"]["recall@10"],
        "ndcg@10": test["model"]["ndcg@10"],
        "epochs": len(result.history),
        "best_val_rmse": result.best_val_rmse,
        "best_val_recall@10": result.best_val_recall,
        "best_epoch": ckpt.load(run_dir / "best.pt")["epoch"],
        "last_epoch": result.history[-1] if result.history else None,
        "train_seconds": result.seconds,
    }


def summarise(per_seed: list[dict[str, Any]], key: str) -> dict[str, float] | None:
    values = [r[key] for r in per_seed if r.get(key) is not None]
    if not values:
        return None
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def fmt(s: dict[str, float] | None) -> str:
    if s is None:
        return "–"
    return f"{s['mean']:.4f} ± {s['std']:.4f} ({s['min']:.4f}–{s['max']:.4f})"


def markdown(result: dict[str, Any]) -> str:
    seeds = ", ".join(map(str, result["seeds"]))
    lines = [
        f"Shared ml-latest-small, seeds {seeds} (split seed = model seed), mean ± std (min–max); "
        f"relevant = test rating ≥ {result['relevance_threshold']}, train + val masked; "
        f"baselines' hyper-parameters tuned on {result.get('baseline_tuning', 'each seed')} "
        f"(validation Recall@10), then refit on train + val; "
        f"{result['threads']} thread(s), {result['machine']}; `experiments/quality.py`, commit {result['commit']}.",
        "",
        "| method | Recall@10 | NDCG@10 | test RMSE |",
        "| --- | --- | --- | --- |",
    ]
    for name, rows in result["methods"].items():
        lines.append(
            f"| {name} | {fmt(summarise(rows, 'recall@10'))} | {fmt(summarise(rows, 'ndcg@10'))} | "
            f"{fmt(summarise(rows, 'rmse'))} |"
        )
    t = result["target"]
    lines.append(f"| *target (issue 8)* | ≥ {t['recall@10']} | ≥ {t['ndcg@10']} | ≤ {t['rmse']} |")
    if result.get("note"):
        lines += ["", result["note"]]
    if result.get("ablation"):
        lines += [
            "",
            f"Ablation (seeds {', '.join(map(str, result['ablation_seeds']))}; each row changes one "
            "thing against the defaults):",
            "",
            "| change | what | val Recall@10 (best.pt) | val RMSE (best.pt) | Recall@10 | NDCG@10 | test RMSE |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        model_rows = [r for r in result["methods"].get(MODEL, []) if r["seed"] in result["ablation_seeds"]]
        default = [{"name": "default", "what": "the package's defaults (rows above)", "runs": model_rows}]
        for row in (default if model_rows else []) + result["ablation"]:
            lines.append(
                f"| {row['name']} | {row['what']} | {fmt(summarise(row['runs'], 'best_val_recall@10'))} | "
                f"{fmt(summarise(row['runs'], 'best_val_rmse'))} | {fmt(summarise(row['runs'], 'recall@10'))} | "
                f"{fmt(summarise(row['runs'], 'ndcg@10'))} | {fmt(summarise(row['runs'], 'rmse'))} |"
            )
    return "\n".join(lines) + "\n"


def update_doc(doc: Path, table: str) -> None:
    """Replaces the generated block (between the marks) of ``doc``, atomically."""
    try:
        replace_marked_block(doc, MARK_START, MARK_END, table)
    except ValueError as err:
        raise SystemExit(f"--doc: {err}") from None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=os.environ.get("SCALABLE_REC_DATA"), help="MovieLens folder")
    p.add_argument("--workdir", default="runs/quality", help="shards and run directories")
    p.add_argument("--shards", default=None, help="shard directory (default <workdir>/shards/<data name>)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", default="benchmarks/reference/quality-ml-latest-small")
    p.add_argument(
        "--baselines",
        nargs="*",
        default=None,
        help="only these baselines (popularity ease ease_relevant item_knn item_knn_relevant "
        "implicit_als biased_mf); none: skip",
    )
    p.add_argument("--no-model", action="store_true", help="skip the package's model (baselines only)")
    p.add_argument(
        "--tune-every-seed",
        action="store_true",
        help="tune each baseline on every seed's validation edges (default: on the first seed's, "
        "then reused; EASE's inverse is minutes on a busy 2-core machine)",
    )
    p.add_argument(
        "--refit",
        action="store_true",
        help="after each seed's default run, refit it on train + val for the epochs validation chose",
    )
    p.add_argument(
        "--sampler",
        choices=["auto", "pyg", "torch"],
        default=None,
        help="neighbour sampler of every model run (TrainConfig.sampler; default: the config's)",
    )
    p.add_argument("--ablation", nargs="*", default=None, help="also run these ablation rows (no names: all)")
    p.add_argument("--ablation-seeds", type=int, nargs="+", default=[0])
    p.add_argument(
        "--doc", type=Path, default=None, help="Markdown file whose quality block is replaced (docs/RESULTS.md)"
    )
    p.add_argument("--note", default=None, help="a sentence added under the table (e.g. which code ran)")
    p.add_argument(
        "--combine",
        type=Path,
        nargs="+",
        default=None,
        help="merge the JSON outputs of earlier runs (e.g. model and baselines run as two "
        "processes) into --out instead of running anything",
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.combine:
        return write_outputs(combine([json.loads(path.read_text()) for path in args.combine]), args)
    # the code that runs is the code checked out now (a later commit must not label it)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True
    ).stdout.strip()
    commit = f"{commit}+uncommitted" if commit and dirty else commit
    threads = int(os.environ.get("OMP_NUM_THREADS", "0")) or torch.get_num_threads()
    torch.set_num_threads(threads)

    base = RunConfig()
    base.data.data, base.data.workdir, base.data.shards = args.data, args.workdir, args.shards
    if args.sampler is not None:
        base.train.sampler = args.sampler
    shards = prepare(base)
    graph = RatingGraph.from_shards(shards, base.features)
    threshold = base.train.relevant_min
    methods: dict[str, list[dict[str, Any]]] = {}
    chosen: dict[str, Any] = {}
    for seed in args.seeds:
        cfg = with_overrides(base, {}, seed)
        if not args.no_model:
            methods.setdefault(MODEL, []).append(
                {"seed": seed, **run_model(graph, cfg, Path(args.workdir) / f"default-seed{seed}")}
            )
            log.info("seed %d model: %s", seed, methods[MODEL][-1])
            if args.refit:
                epochs = methods[MODEL][-1]["best_epoch"] + 1
                refit = copy.deepcopy(cfg)
                refit.train = cfg.train.for_refit(epochs)
                methods.setdefault(REFIT, []).append(
                    {"seed": seed, **run_model(graph, refit, Path(args.workdir) / f"refit-seed{seed}")}
                )
                log.info("seed %d refit (%d epochs): %s", seed, epochs, methods[REFIT][-1])
        if args.baselines is None or args.baselines:
            for name, metrics in baselines_for_split(
                graph,
                split_edges(graph, cfg.split),
                seed,
                threshold,
                (base.data.rating_min, base.data.rating_max),
                args.baselines,
                {} if args.tune_every_seed else chosen,
            ).items():
                methods.setdefault(name, []).append({"seed": seed, **metrics})
    ablation = []
    if args.ablation is not None:
        rows = [row for row in ABLATION if not args.ablation or row[0] in args.ablation]
        for name, what, overrides in rows:
            runs = [
                {
                    "seed": s,
                    **run_model(
                        graph, with_overrides(base, overrides, s), Path(args.workdir) / f"ablation-{name}-seed{s}"
                    ),
                }
                for s in args.ablation_seeds
            ]
            ablation.append({"name": name, "what": what, "overrides": overrides, "runs": runs})
            log.info("ablation %s: %s", name, runs)
    result = {
        "seeds": args.seeds,
        "relevance_threshold": threshold,
        "threads": threads,
        "machine": f"{platform.machine()} {os.cpu_count()} cores",
        "commit": commit or "unknown",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "target": TARGET,
        "config": base.to_json(),
        "methods": methods,
        "ablation": ablation,
        "ablation_seeds": args.ablation_seeds,
        "baseline_tuning": "every seed" if args.tune_every_seed else f"seed {args.seeds[0]}'s validation",
    }
    return write_outputs(result, args)


def combine(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One result from several runs' JSON: e.g. one process per seed and one for the
    baselines (run side by side on a busy machine). Rows of a method are concatenated
    across parts; seeds are the union."""
    if len({p["relevance_threshold"] for p in parts}) > 1:
        raise SystemExit("--combine: the parts used different relevance thresholds")
    out = dict(parts[0], methods={}, ablation=[], ablation_seeds=[])
    for part in parts:
        for name, rows in part["methods"].items():
            have = {r["seed"] for r in out["methods"].get(name, [])}
            if have & {r["seed"] for r in rows}:
                raise SystemExit(f"--combine: two parts hold '{name}' for the same seed")
            out["methods"].setdefault(name, []).extend(rows)
        for row in part["ablation"]:  # one row per name: a row split over processes is joined
            same = next((r for r in out["ablation"] if r["name"] == row["name"]), None)
            if same is None:
                out["ablation"].append(dict(row, runs=list(row["runs"])))
            elif {r["seed"] for r in same["runs"]} & {r["seed"] for r in row["runs"]}:
                raise SystemExit(f"--combine: two parts hold ablation '{row['name']}' for the same seed")
            else:
                same["runs"] += row["runs"]
        if part["ablation"]:
            out["ablation_seeds"] = sorted(set(out["ablation_seeds"]) | set(part["ablation_seeds"]))
    out["seeds"] = sorted({s for p in parts for s in p["seeds"]})
    threads = sorted({p["threads"] for p in parts})
    out["threads"] = threads[0] if len(threads) == 1 else "/".join(map(str, threads))
    out["commit"] = "/".join(sorted({p["commit"] for p in parts}))
    return out


def write_outputs(result: dict[str, Any], args: argparse.Namespace) -> int:
    if args.note:
        result["note"] = args.note
    result["summary"] = {
        n: {k: summarise(rows, k) for k in ("recall@10", "ndcg@10", "rmse")} for n, rows in result["methods"].items()
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out.with_suffix(".json"), json.loads(json.dumps(result, default=_jsonable)))
    table = markdown(result)
    with atomic_open(out.with_suffix(".md"), "w") as fh:
        fh.write(table)
    if args.doc:
        update_doc(args.doc, table)
    sys.stdout.write(table)
    return 0


def _jsonable(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return str(value)


if __name__ == "__main__":
    raise SystemExit(main())
