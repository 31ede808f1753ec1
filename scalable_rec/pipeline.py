"""The stages a user runs: prepare → train (+ evaluate) → score, and ``run`` for all.

Each stage is a plain function taking a ``RunConfig``; the CLI maps names to them.
Under torchrun, rank 0 prepares shards and features while the other ranks wait, all
ranks train, and rank 0 evaluates, scores and writes the run directory.
"""
from __future__ import annotations

import datetime as _dt
import json
import logging
import time
import uuid
from pathlib import Path
from typing import Any

import torch

from scalable_rec.atomic import write_json_atomic
from scalable_rec.config import RunConfig
from scalable_rec.errors import ScalableRecError, ShardError
from scalable_rec.graph import RATES, RatingGraph, movie_features, split_edges
from scalable_rec.graph.index import GraphIndex, build_index
from scalable_rec.graph.store import open_stores
from scalable_rec.score import RatedIndex, evaluate_split, plot_curves, recommend
from scalable_rec.score.layerwise import encode_layerwise
from scalable_rec.score.refresh import RefreshConfig
from scalable_rec.shards import GraphShards, Manifest
from scalable_rec.shards.manifest import edge_type_name
from scalable_rec.sink import write_parquet
from scalable_rec.source import MovieLensSource, RatingBounds, SkipReport, write_rating_shards
from scalable_rec.source.download import fetch_movielens
from scalable_rec.train import Recommender, train
from scalable_rec.train import checkpoint as ckpt
from scalable_rec.train.distributed import DistEnv, broadcast_object, init_distributed
from scalable_rec.train.loop import resolve_device

log = logging.getLogger(__name__)


def _barrier(env: DistEnv) -> None:
    if env.enabled and torch.distributed.is_initialized():
        torch.distributed.barrier()


def prepare(cfg: RunConfig) -> GraphShards:
    """MovieLens → shards (reused when input and config are unchanged) → cached features.

    Under torchrun only rank 0 does the work; the others wait for its result (or its error,
    so no rank is left waiting at a collective).
    """
    env = DistEnv.from_environ()
    out, error = None, None
    if env.is_main:
        try:
            out = str(_prepare_on_this_rank(cfg))
        except Exception as err:
            if not env.enabled:
                raise
            error = err
    out, message = broadcast_object((out, None if error is None else f"{type(error).__name__}: {error}"), env)
    if error is not None:
        raise error
    if message is not None:
        raise ScalableRecError(f"rank 0 failed to prepare the shards: {message}")
    # Rank 0 has just written or fully verified every file: later reads skip the checksums.
    return GraphShards(out, verify=False)


def _prepare_on_this_rank(cfg: RunConfig) -> Path:
    if cfg.data.train_file:
        from scalable_rec.source.rating_files import RatingFilesSource

        data_dir = cfg.data.data
        source = RatingFilesSource(cfg.data.train_file, cfg.data.test_file, movies_dir=data_dir)
    else:
        data_dir = cfg.data.data or str(fetch_movielens())
        source = MovieLensSource(data_dir)
    out = cfg.data.shards_dir(data_dir)
    if (out / "manifest.json").is_file() and not cfg.data.overwrite \
            and Manifest.load(out).fingerprint == source.fingerprint():
        GraphShards(out).verify_all()  # sizes, row counts, schemas and sha256 of every file
        log.info("prepare: input unchanged, reusing shards in %s", out)
    else:
        t0 = time.perf_counter()
        report = SkipReport(strict=cfg.data.strict)
        write_rating_shards(source, str(out), report, RatingBounds(cfg.data.rating_min, cfg.data.rating_max),
                            cfg.data.max_rows_per_shard, overwrite=True)
        log.info("prepare: wrote %s in %.1fs (%s)", out, time.perf_counter() - t0, report.summary())
    shards = GraphShards(out, verify=False)  # verified or written just above
    movie_features(shards, cfg.features)  # computes once, then cached beside the shards
    if _graph_index_wanted(cfg, shards):
        build_index(shards, cfg.split, cfg.features)  # memory-mapped graph index, reused when unchanged
    return out


def _graph_index_wanted(cfg: RunConfig, shards: GraphShards) -> bool:
    return cfg.store.use_store(shards.manifest.edge_types[edge_type_name(*RATES)].num_rows)


def _graph_index(cfg: RunConfig, shards: GraphShards) -> GraphIndex | None:
    """The memory-mapped graph index when ``cfg.store`` picks it for this graph's size
    (built here if ``prepare`` did not)."""
    if not _graph_index_wanted(cfg, shards):
        return None
    return GraphIndex.for_shards(shards, cfg.split, cfg.features, verify=cfg.store.store_verify)


def _open_shards(cfg: RunConfig) -> GraphShards:
    path = cfg.data.shards_dir()
    try:
        return GraphShards(path)
    except ShardError:
        if cfg.data.shards is None and not (path / "manifest.json").exists():
            raise ShardError(f"No shards at '{path}': run 'scalable-rec prepare' first or pass --shards") from None
        raise


def new_run_dir(cfg: RunConfig) -> Path:
    if cfg.run_dir:
        return Path(cfg.run_dir)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path(cfg.data.workdir) / f"run-{stamp}-{uuid.uuid4().hex[:6]}"


def train_stage(cfg: RunConfig, shards: GraphShards | None = None,
                graph: RatingGraph | None = None) -> dict[str, Any]:
    """Trains, evaluates on the test split and writes the run directory (rank 0).

    ``shards``/``graph`` are read from ``cfg`` when not given (``run`` passes them in).
    """
    env = DistEnv.from_environ()
    init_distributed(env, resolve_device(cfg.train, env))
    shards = shards or _open_shards(cfg)
    if cfg.data.shards is None:
        cfg.data.shards = str(shards.directory.resolve())
    run_dir = Path(cfg.run_dir) if cfg.run_dir else None
    if run_dir is None:
        run_dir = broadcast_object(new_run_dir(cfg), env)
    cfg.run_dir = str(run_dir)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    index = _graph_index(cfg, shards)
    if index is not None:  # edges, split and CSC memory-mapped: shared by the ranks of a node
        graph, split, data = index.rating_graph(shards), index.split(), open_stores(index, "train")
    else:
        graph = graph or RatingGraph.from_shards(shards, cfg.features)
        split, data = split_edges(graph, cfg.split), None
    timings["load_graph_s"] = time.perf_counter() - t0
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(run_dir / "config.json", cfg.to_json())
    result = train(graph, split, cfg.model, cfg.train, run_dir, config=cfg.to_json(), data=data,
                   rating_range=(cfg.data.rating_min, cfg.data.rating_max))
    timings["train_s"] = result.seconds
    metrics: dict[str, Any] = {"history": result.history, "best_val_rmse": result.best_val_rmse,
                               "best_val_recall@10": result.best_val_recall, "select_metric": cfg.train.select_metric,
                               "global_step": result.global_step, "stopped_early": result.stopped_early,
                               "interrupted": result.interrupted}
    if env.is_main and not result.interrupted:
        t1 = time.perf_counter()
        z = seen = None
        if index is not None:  # layer-wise over train + validation edges, masks from their CSC
            z = encode_layerwise(result.model, *open_stores(index, "seen"), batch_size=cfg.store.layer_batch_size)
            rev_row, rev_colptr = index.csc("seen")["rev_rates"]
            seen = RatedIndex(rowptr=rev_colptr, col=rev_row)
        metrics["test"] = evaluate_split(result.model, graph, split, k=cfg.score.k,
                                         memory_mb=cfg.score.score_memory_mb, rating_min=cfg.data.rating_min,
                                         rating_max=cfg.data.rating_max, relevant_min=cfg.train.relevant_min,
                                         z=z, seen=seen)
        timings["evaluate_s"] = time.perf_counter() - t1
        log.info("test: %s", json.dumps(metrics["test"]))
    metrics["timings"] = timings
    metrics["input_report"] = shards.manifest.report
    if env.is_main:
        write_json_atomic(run_dir / "metrics.json", metrics)
        plot_curves(result.history, run_dir / "curves.png")
    _barrier(env)
    return metrics


def score_stage(cfg: RunConfig, run_dir: str | Path | None = None, graph: RatingGraph | None = None) -> Path:
    """Encodes with all rating edges, ranks the whole catalog per user, writes Parquet (or
    ArangoDB edges with ``--sink arango``). ``graph`` is read from the run's shards when
    not given."""
    run_dir = Path(run_dir or cfg.run_dir)
    saved = RunConfig.load(run_dir / "config.json")
    saved.store = cfg.store  # the backend is this command's choice, the index key the run's
    shards = GraphShards(saved.data.shards_dir(), verify=False)
    index = _graph_index(saved, shards)
    if index is not None:
        graph = index.rating_graph(shards)
    graph = graph or RatingGraph.from_shards(shards, saved.features)
    device = resolve_device(saved.train, DistEnv())
    state = ckpt.load(run_dir / "best.pt", map_location=device)
    model = Recommender(graph.num_users, graph.num_movies, graph.movie_x.size(1), saved.model).to(device)
    model.load_state_dict(state["model"])
    model.eval()
    t0 = time.perf_counter()
    z = rated = None
    if index is not None:  # layer-wise over the mapped CSC; rated movies = each user's CSC row
        z = encode_layerwise(model, *open_stores(index, "all"), batch_size=cfg.store.layer_batch_size)
        rev_row, rev_colptr = index.csc("all")["rev_rates"]
        rated = RatedIndex(rowptr=rev_colptr, col=rev_row)
    batches = recommend(model, graph, cfg.score, z=z, rated=rated,
                        rating_range=(saved.data.rating_min, saved.data.rating_max))
    if cfg.sink.sink == "arango":  # edges Users/<key> → Movie/<key>; outcome in arango_writeback.json
        from scalable_rec.sink.arango import writeback_run

        out = writeback_run(batches, cfg.arango, cfg.sink, run_dir)
        log.info("score: recommendations for %d users written to ArangoDB in %.2fs (%s)", graph.num_users,
                 time.perf_counter() - t0, out)
        return out
    out = run_dir / "recommendations.parquet"
    rows = write_parquet(batches, out, metadata={"run_dir": str(run_dir), "k": str(cfg.score.k)})
    log.info("score: %d recommendations for %d users in %.2fs → %s", rows, graph.num_users,
             time.perf_counter() - t0, out)
    return out


def refresh_stage(cfg: RunConfig, refresh_cfg: RefreshConfig, run_dir: str | Path | None = None) -> dict[str, Any]:
    """Folds new ratings into the run's message-passing graph (not its weights) and
    re-scores only the users whose recommendations can change (``--mode exact``) or only
    the users who rated (``--mode bounded``); replaces their rows in
    recommendations.parquet (or, with ``--sink arango``, their edges in ArangoDB). Users the run has never seen get recommendations from their
    new ratings. The report also goes to <run_dir>/refresh/last_report.json."""
    from scalable_rec.score.refresh import refresh
    from scalable_rec.source import RatingBounds

    run_dir = Path(run_dir or cfg.run_dir)
    saved = RunConfig.load(run_dir / "config.json")
    graph = RatingGraph.from_shards(GraphShards(saved.data.shards_dir()), saved.features)
    state = ckpt.load(run_dir / "best.pt", map_location="cpu")
    model = Recommender(graph.num_users, graph.num_movies, graph.movie_x.size(1), saved.model)
    model.load_state_dict(state["model"])
    writer = None
    if cfg.sink.sink == "arango":  # replace exactly the refreshed users' edges
        from scalable_rec.sink.arango import replace_users

        def writer(batch, users, fingerprint):
            return replace_users(batch, cfg.arango, cfg.sink, run_dir, fingerprint[:12])
    report = refresh(run_dir, model, graph, refresh_cfg, k=cfg.score.k, memory_mb=cfg.score.score_memory_mb,
                     bounds=RatingBounds(saved.data.rating_min, saved.data.rating_max), strict=cfg.data.strict,
                     writer=writer)
    if not report["already_folded"]:
        write_json_atomic(run_dir / "refresh" / "last_report.json", report)
    log.info("refresh: %s", json.dumps({k: v for k, v in report.items() if k != "input_report"}))
    return report


def run(cfg: RunConfig) -> dict[str, Any]:
    """prepare → train → evaluate → score, all in one run directory."""
    env = DistEnv.from_environ()
    init_distributed(env, resolve_device(cfg.train, env))
    shards = prepare(cfg)
    # Read once and shared by the stages; with the graph index each stage maps it instead.
    graph = None if _graph_index_wanted(cfg, shards) else RatingGraph.from_shards(shards, cfg.features)
    metrics = train_stage(cfg, shards, graph)
    if env.is_main and not metrics["interrupted"]:
        score_stage(cfg, cfg.run_dir, graph)
    return metrics
