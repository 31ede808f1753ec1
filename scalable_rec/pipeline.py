"""The stages a user runs: prepare → train (+ evaluate) → score, and ``run`` for all.

Each stage is a plain function taking a ``RunConfig``; the CLI maps names to them.
Under torchrun, rank 0 prepares shards and features while the other ranks wait, all
ranks train, evaluate (metrics reduced over ranks) and score a disjoint block of users
each; rank 0 merges the recommendation parts and writes the run directory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import json
import logging
import shutil
import signal
import time
import uuid
from pathlib import Path
from typing import Any

import torch

from scalable_rec import locking
from scalable_rec.atomic import dumps, write_json_atomic
from scalable_rec.config import RunConfig
from scalable_rec.dist import DistEnv, broadcast_object, from_rank0, init_distributed
from scalable_rec.errors import (
    CheckpointError,
    ConfigError,
    InterruptedRunError,
    MalformedInputError,
    RunStateError,
    ScalableRecError,
    ShardError,
)
from scalable_rec.graph import RATES, RatingGraph, movie_features, split_edges
from scalable_rec.graph.features import FeatureConfig
from scalable_rec.graph.index import GraphIndex, build_index
from scalable_rec.graph.store import open_stores
from scalable_rec.model.layerwise import encode_layerwise
from scalable_rec.refresh import RefreshConfig
from scalable_rec.score import RatedIndex, ScoreConfig, evaluate_split, plot_curves, recommend
from scalable_rec.score.recommend import user_slice
from scalable_rec.shards import GraphShards, Manifest
from scalable_rec.shards.manifest import edge_type_name
from scalable_rec.sink import merge_parts, part_path, write_parquet
from scalable_rec.source import MovieLensSource, RatingBounds, SkipReport, write_rating_shards
from scalable_rec.source.download import fetch_movielens
from scalable_rec.train import Recommender, train
from scalable_rec.train import checkpoint as ckpt
from scalable_rec.train.config import TrainConfig, resolve_device

log = logging.getLogger(__name__)


# What a run directory holds; ``--overwrite`` removes exactly these (never the folder itself,
# which may be one the user named by mistake).
RUN_ARTIFACTS = (
    "config.json",
    "metrics.json",
    "best.pt",
    "last.pt",
    "curves.png",
    "recommendations.parquet",
    "arango_writeback.json",
)
SELECT_DIR = "select"  # where 'train --refit' keeps its selecting run, inside the run directory


def _barrier(env: DistEnv) -> None:
    if env.enabled and torch.distributed.is_initialized():
        torch.distributed.barrier()


def prepare(cfg: RunConfig, rebuild: bool = False) -> GraphShards:
    """MovieLens → shards (reused when input and config are unchanged, unless ``rebuild``:
    ``prepare --overwrite``) → cached features. ``run --overwrite`` replaces the run
    directory only: reused shards are verified against their checksums, so rebuilding
    them would only cost time.

    Under torchrun only rank 0 does the work; the others wait for its result (or its error,
    so no rank is left waiting at a collective).
    """
    env = DistEnv.from_environ()
    out = from_rank0(lambda: str(_prepare_on_this_rank(cfg, rebuild)), env, "prepare the shards")
    # Rank 0 has just written or fully verified every file: later reads skip the checksums.
    return GraphShards(out, verify=False)


def _prepare_on_this_rank(cfg: RunConfig, rebuild: bool) -> Path:
    if cfg.data.train_file:
        from scalable_rec.source.rating_files import RatingFilesSource

        data_dir = cfg.data.data
        try:
            source = RatingFilesSource(cfg.data.train_file, cfg.data.test_file, movies_dir=data_dir)
        except FileNotFoundError as err:
            raise ConfigError(f"'train_file'/'test_file': {err}") from None
    else:
        data_dir = cfg.data.data or str(fetch_movielens())
        try:
            source = MovieLensSource(data_dir)
        except FileNotFoundError as err:
            raise ConfigError(f"'data' {data_dir!r}: {err}") from None
    out = cfg.data.shards_dir(data_dir)
    with locking.hold(out, "shard directory"):
        why_not = _why_not_reuse(out, cfg, source.fingerprint(), rebuild)
        if why_not is None:
            GraphShards(out).verify_all()  # sizes, row counts, schemas and sha256 of every file
            log.info("prepare: input and options unchanged, reusing shards in %s", out)
        else:
            log.info("prepare: writing %s (%s)", out, why_not)
            t0 = time.perf_counter()
            report = SkipReport(strict=cfg.data.strict)
            try:
                write_rating_shards(
                    source,
                    str(out),
                    report,
                    RatingBounds(cfg.data.rating_min, cfg.data.rating_max),
                    cfg.data.max_rows_per_shard,
                    overwrite=True,
                    max_skipped_share=cfg.data.max_skipped_share,
                )
            except (MalformedInputError, OSError):
                shutil.rmtree(f"{out}.incomplete", ignore_errors=True)  # refused input: nothing half-written
                raise
            log.info("prepare: wrote %s in %.1fs (%s)", out, time.perf_counter() - t0, report.summary())
        shards = GraphShards(out, verify=False)  # verified or written just above
        # computes once, then cached (and checksummed) beside the shards
        movie_features(shards, cfg.features, progress=cfg.train.progress)
        if _graph_index_wanted(cfg, shards):
            build_index(shards, cfg.split, cfg.features)  # memory-mapped graph index, reused when unchanged
    return out


def load_graph(shards: GraphShards, features: FeatureConfig, env: DistEnv) -> RatingGraph:
    """The rating graph; under torchrun rank 0 alone builds the movie feature cache (text
    encoding) when it is missing, the other ranks then read it."""
    from_rank0(lambda: movie_features(shards, features) is None, env, "build the movie features")
    return RatingGraph.from_shards(shards, features)


def _why_not_reuse(out: Path, cfg: RunConfig, fingerprint: str, rebuild: bool = False) -> str | None:
    """``None`` when existing shards are what these input bytes and options would produce,
    else why they are rebuilt. Options are compared by their effect: the rating bounds and
    shard size as recorded in the manifest, ``--strict`` (shards made with skips are not
    what a strict run gives) and ``--max-skipped-share`` (the recorded share must pass)."""
    if not (out / "manifest.json").is_file():
        return "no shards yet"
    if rebuild:
        return "prepare --overwrite"
    manifest = Manifest.load(out)
    if manifest.fingerprint != fingerprint:
        return "input files changed"
    bounds = [cfg.data.rating_min, cfg.data.rating_max]
    if manifest.config.get("rating_bounds") != bounds:
        return f"rating bounds {manifest.config.get('rating_bounds')} -> {bounds}"
    if manifest.config.get("max_rows_per_shard") != cfg.data.max_rows_per_shard:
        return f"max rows per shard {manifest.config.get('max_rows_per_shard')} -> {cfg.data.max_rows_per_shard}"
    skipped = sum(manifest.report.get("skipped", {}).values())
    if cfg.data.strict and skipped:
        return f"--strict, and the existing shards skipped {skipped} rows"
    accepted = manifest.report.get("accepted", {})
    read = skipped + accepted.get("ratings", 0) + accepted.get("movies", 0)
    if read and skipped / read > cfg.data.max_skipped_share:
        return f"the existing shards skipped {skipped / read:.1%} of rows, above --max-skipped-share"
    return None


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


def claim_run_dir(cfg: RunConfig, run_dir: Path, env: DistEnv) -> None:
    """A run directory belongs to one config: reusing one needs ``--resume`` (continue it;
    the checkpoint's config must match) or ``--overwrite`` (its artifacts are removed). A
    group that torchrun restarted (``--max-restarts``) continues its own run."""
    if cfg.train.resume and cfg.data.overwrite:
        raise ConfigError(
            "'resume' and 'overwrite' exclude each other: --resume continues the run in "
            f"'{run_dir}', --overwrite replaces it"
        )
    # a '--refit' run keeps its selecting run in select/: part of the same run
    found = [f"{d}{n}" for d in ("", f"{SELECT_DIR}/") for n in RUN_ARTIFACTS if (run_dir / d / n).exists()]
    if not found or cfg.train.resume or env.restart_count > 0:
        return
    if not cfg.data.overwrite:
        raise RunStateError(
            f"Run directory '{run_dir}' already holds a run ({', '.join(found)}); pass --resume "
            "to continue it or --overwrite to replace it"
        )
    for name in found:
        (run_dir / name).unlink()
    log.info("--overwrite: removed %s from %s", ", ".join(found), run_dir)


def _stopped_early(run_dir: Path, cfg: RunConfig) -> dict[str, Any] | None:
    """On ``--resume``: the saved metrics of a run that already stopped early (patience
    used up), which is not trained further; ``None`` otherwise."""
    metrics_path, last = run_dir / "metrics.json", run_dir / "last.pt"
    if not (cfg.train.resume and metrics_path.is_file() and last.is_file()):
        return None
    metrics = json.loads(metrics_path.read_text())
    if not metrics.get("stopped_early") or metrics.get("interrupted"):
        return None
    if ckpt.load(last)["bad_epochs"] < cfg.train.patience:
        return None  # a larger --patience on resume trains on
    return metrics


def new_run_dir(cfg: RunConfig) -> Path:
    if cfg.run_dir:
        return Path(cfg.run_dir)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path(cfg.data.workdir) / f"run-{stamp}-{uuid.uuid4().hex[:6]}"


def train_stage(cfg: RunConfig, shards: GraphShards | None = None, graph: RatingGraph | None = None) -> dict[str, Any]:
    """Trains, evaluates on the test split and writes the run directory (rank 0).

    ``shards``/``graph`` are read from ``cfg`` when not given (``run`` passes them in).
    """
    env = DistEnv.from_environ()
    init_distributed(env, resolve_device(cfg.train, env), cfg.train.collective_timeout_s)
    run_dir = Path(cfg.run_dir) if cfg.run_dir else None
    if run_dir is None:
        run_dir = broadcast_object(new_run_dir(cfg), env)
    cfg.run_dir = str(run_dir)
    with locking.hold(run_dir, "run directory") if env.is_main else contextlib.nullcontext():
        from_rank0(lambda: claim_run_dir(cfg, run_dir, env), env, "claim the run directory")
        return _train_in(cfg, run_dir, env, shards, graph)


def _train_in(
    cfg: RunConfig,
    run_dir: Path,
    env: DistEnv,
    shards: GraphShards | None,
    graph: RatingGraph | None,
    evaluate_test: bool = True,
) -> dict[str, Any]:
    if cfg.train.refit and not cfg.train.refitting():
        return _select_then_refit(cfg, run_dir, env, shards, graph)
    shards = shards or _open_shards(cfg)
    if cfg.data.shards is None:
        cfg.data.shards = str(shards.directory.resolve())
    finished = _stopped_early(run_dir, cfg)
    if finished is not None:
        log.info(
            "resume: the run in %s already stopped early (best val rmse %s); not training further",
            run_dir,
            finished.get("best_val_rmse"),
        )
        return finished
    # The shards' identity goes into config.json and every checkpoint: 'score' and '--resume'
    # refuse shards that changed since.
    config = {**cfg.to_json(), "shards_identity": shards.manifest.identity()}
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    index = _graph_index(cfg, shards)
    if index is not None:  # edges, split and CSC memory-mapped: shared by the ranks of a node
        # a refit passes messages over training + validation edges: the index's 'seen' CSC
        graph, split = index.rating_graph(shards), index.split()
        data = open_stores(index, "seen" if cfg.train.refitting() else "train")
    else:
        graph = graph or load_graph(shards, cfg.features, env)
        split, data = split_edges(graph, cfg.split), None
    if cfg.train.refitting():  # validation edges train too; the test edges stay held out
        split = split.refit()
    timings["load_graph_s"] = time.perf_counter() - t0
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(run_dir / "config.json", config)
    result = train(
        graph,
        split,
        cfg.model,
        cfg.train,
        run_dir,
        config=config,
        data=data,
        rating_range=(cfg.data.rating_min, cfg.data.rating_max),
        layer_batch_size=cfg.store.layer_batch_size,
    )
    timings["train_s"] = result.seconds
    interrupted_by = (
        signal.Signals(result.signal).name if result.signal is not None else "max_steps" if result.interrupted else None
    )
    metrics: dict[str, Any] = {
        "history": result.history,
        "best_val_rmse": result.best_val_rmse,
        "best_val_recall@10": result.best_val_recall,
        "select_metric": cfg.train.select_metric,
        "global_step": result.global_step,
        "stopped_early": result.stopped_early,
        "interrupted": result.interrupted,
        "interrupted_by": interrupted_by,
    }
    if evaluate_test and not result.interrupted:  # the same on every rank: the stop was agreed
        t1 = time.perf_counter()
        z = seen = None
        if index is not None:  # layer-wise over train + validation edges, masks from their CSC
            z = encode_layerwise(result.model, *open_stores(index, "seen"), batch_size=cfg.store.layer_batch_size)
            rev_row, rev_colptr = index.csc("seen")["rev_rates"]
            seen = RatedIndex(rowptr=rev_colptr, col=rev_row)
        metrics["test"] = evaluate_split(
            result.model,
            graph,
            split,
            k=cfg.score.k,
            memory_mb=cfg.score.score_memory_mb,
            rating_min=cfg.data.rating_min,
            rating_max=cfg.data.rating_max,
            relevant_min=cfg.train.relevant_min,
            z=z,
            seen=seen,
            env=env,
        )
        timings["evaluate_s"] = time.perf_counter() - t1
        log.info("test: %s", dumps(metrics["test"], indent=None))
    metrics["timings"] = timings
    metrics["input_report"] = shards.manifest.report
    if env.is_main:
        write_json_atomic(run_dir / "metrics.json", metrics)
        plot_curves(result.history, run_dir / "curves.png")
    _barrier(env)
    if result.signal is not None:
        raise InterruptedRunError(
            f"Training was interrupted by {interrupted_by} at step {result.global_step}; '{run_dir}' is marked "
            "interrupted in metrics.json. Continue with --resume",
            result.signal,
        )
    return metrics


def _select_then_refit(
    cfg: RunConfig, run_dir: Path, env: DistEnv, shards: GraphShards | None, graph: RatingGraph | None
) -> dict[str, Any]:
    """``--refit``: a selecting run in ``<run_dir>/select`` (early stopping on validation,
    no test evaluation), then the refit in ``run_dir``: training + validation edges, the
    chosen epoch count, no selection, evaluated once on the test split.

    Each is an ordinary run directory. ``--resume`` continues whichever was interrupted: an
    unfinished selection first (then the refit from scratch), a finished selection is
    reused, and the refit resumes from its own ``last.pt`` when it has one.
    """
    select_dir = run_dir / SELECT_DIR
    chosen, select_started = from_rank0(
        lambda: (_finished_metrics(select_dir) if cfg.train.resume else None, (select_dir / "last.pt").is_file()),
        env,
        "read select/metrics.json",
    )
    select = dataclasses.replace(
        cfg,
        train=dataclasses.replace(cfg.train, refit=False, resume=cfg.train.resume and select_started),
        run_dir=str(select_dir),
    )
    if chosen is None:
        # a signal raises; max_steps is refused with --refit
        chosen = _train_in(select, select_dir, env, shards, graph, evaluate_test=False)
    else:
        log.info("resume: the selecting run in %s finished; reusing its choice", select_dir)
    epochs = from_rank0(lambda: ckpt.load(select_dir / "best.pt")["epoch"] + 1, env, "read select/best.pt")
    log.info("refit: validation chose %d epoch(s); training on training + validation edges", epochs)
    # --resume continues the refit only where it has started (its last.pt): after an
    # interrupted selection it starts now
    started = from_rank0(lambda: (run_dir / "last.pt").is_file(), env, "look for the refit's last.pt")
    refit = dataclasses.replace(
        cfg, train=dataclasses.replace(cfg.train.for_refit(epochs), resume=cfg.train.resume and started)
    )
    metrics = _train_in(refit, run_dir, env, shards, graph)
    metrics["selection"] = {
        "run_dir": str(select_dir),
        "epochs": epochs,
        "select_metric": cfg.train.select_metric,
        "best_val_rmse": chosen["best_val_rmse"],
        "best_val_recall@10": chosen["best_val_recall@10"],
    }
    if env.is_main:
        write_json_atomic(run_dir / "metrics.json", metrics)
    return metrics


def _finished_metrics(run_dir: Path) -> dict[str, Any] | None:
    """The metrics of a run in ``run_dir`` whose training finished (not interrupted), else ``None``."""
    path = run_dir / "metrics.json"
    if not (path.is_file() and (run_dir / "best.pt").is_file()):
        return None
    metrics = json.loads(path.read_text())
    return None if metrics.get("interrupted") else metrics


def _score_device(score: ScoreConfig, train: TrainConfig, env: DistEnv) -> torch.device:
    """``--score-device``, or the device the run trained on (``run``); scoring runs in fp32."""
    spec, hint = score.device_spec(train.device)
    try:
        return resolve_device(dataclasses.replace(train, device=spec, precision="fp32"), env)
    except ValueError as err:
        raise ConfigError(f"Cannot score: {err}{hint}") from None


def score_stage(
    cfg: RunConfig,
    run_dir: str | Path | None = None,
    graph: RatingGraph | None = None,
    allow_interrupted: bool = False,
    allow_shard_mismatch: bool = False,
) -> Path:
    """Encodes with all rating edges, ranks the whole catalog per user, writes Parquet (or
    ArangoDB edges with ``--sink arango``). ``graph`` is read from the run's shards when
    not given.
    Under torchrun every rank encodes and ranks its own contiguous block of users into a
    hidden part file; rank 0 then merges the parts in rank order into
    ``recommendations.parquet`` (atomically), so the file equals one process's. The
    ArangoDB sink is written by rank 0 alone.

    Refuses a run whose training did not finish (interrupted, killed, diverged) unless
    ``allow_interrupted``, and shards that differ from those the model was trained on
    unless ``allow_shard_mismatch``. An empty result is an error, never success.
    """
    env = DistEnv.from_environ()
    run_dir = Path(run_dir or cfg.run_dir)
    explicit = cfg.score.score_device != "run"
    init_distributed(
        env,
        _score_device(cfg.score, cfg.train, env) if explicit else resolve_device(cfg.train, env),
        cfg.train.collective_timeout_s,
    )
    with locking.hold(run_dir, "run directory") if env.is_main else contextlib.nullcontext():
        saved, state = from_rank0(lambda: _check_scorable(run_dir, allow_interrupted), env, "read the run")
        saved.store = cfg.store  # the backend is this command's choice, the index key the run's
        device = _score_device(cfg.score, saved.train, env)  # refused before the graph loads
        shards = GraphShards(saved.data.shards_dir(), verify=False)
        _check_same_shards(run_dir, state.get("config", {}).get("shards_identity"), shards, allow_shard_mismatch)
        index = _graph_index(saved, shards)
        if index is not None:
            graph = index.rating_graph(shards)
        graph = graph or load_graph(shards, saved.features, env)
        model = Recommender(graph.num_users, graph.num_movies, graph.movie_x.size(1), saved.model).to(device)
        model.load_state_dict({k: v.to(device) for k, v in state["model"].items()})
        model.eval()
        t0 = time.perf_counter()
        z = rated = None
        if index is not None:  # layer-wise over the mapped CSC; rated movies = each user's CSC row
            z = encode_layerwise(model, *open_stores(index, "all"), batch_size=cfg.store.layer_batch_size)
            rev_row, rev_colptr = index.csc("all")["rev_rates"]
            rated = RatedIndex(rowptr=rev_colptr, col=rev_row)
        rating_range = (saved.data.rating_min, saved.data.rating_max)
        if cfg.sink.sink == "arango":  # edges Users/<key> → Movie/<key>; outcome in arango_writeback.json
            from scalable_rec.sink.arango import writeback_run

            out = from_rank0(
                lambda: writeback_run(
                    recommend(model, graph, cfg.score, z=z, rated=rated, rating_range=rating_range),
                    cfg.arango,
                    cfg.sink,
                    run_dir,
                ),
                env,
                "write recommendations to ArangoDB",
            )
            log.info(
                "score: recommendations for %d users written to ArangoDB in %.2fs (%s)",
                graph.num_users,
                time.perf_counter() - t0,
                out,
            )
            return out
        out = run_dir / "recommendations.parquet"
        metadata = {"run_dir": str(run_dir), "k": str(cfg.score.k)}
        if not env.enabled:
            try:
                rows = write_parquet(
                    recommend(model, graph, cfg.score, z=z, rated=rated, rating_range=rating_range),
                    out,
                    metadata=metadata,
                )
            except ValueError as err:
                raise ScalableRecError(f"score: {err}") from err
        else:
            rows = _score_parts(model, graph, cfg, env, out, metadata, z, rated, rating_range)
        if rows == 0:
            from_rank0(lambda: out.unlink(missing_ok=True), env, "remove the empty recommendations")
            raise ScalableRecError(
                f"score: no recommendations for run '{run_dir}' (expected up to "
                f"{cfg.score.k} per user for {graph.num_users} users, got 0 rows)"
            )
        log.info(
            "score: %d recommendations for %d users in %.2fs → %s", rows, graph.num_users, time.perf_counter() - t0, out
        )
        return out


def _check_scorable(run_dir: Path, allow_interrupted: bool, command: str = "score") -> tuple[RunConfig, dict[str, Any]]:
    """The run's config and best checkpoint, if training finished (or ``allow_interrupted``);
    ``command`` (``score``, ``refresh``) names what is refused."""
    if not (run_dir / "config.json").is_file():
        raise RunStateError(
            f"No config.json in '{run_dir}': expected a run directory written by 'train' or 'run' (pass --run-dir)"
        )
    try:
        saved = RunConfig.load(run_dir / "config.json")
    except (ValueError, TypeError, KeyError) as err:
        raise RunStateError(f"'{run_dir / 'config.json'}' is not a valid run config: {err}") from err
    metrics_path = run_dir / "metrics.json"
    if not metrics_path.is_file():
        problem = "training did not finish (no metrics.json: killed, crashed or diverged)"
    else:
        metrics = json.loads(metrics_path.read_text())
        by = metrics.get("interrupted_by")
        problem = f"training was interrupted by {by}" if by and by != "max_steps" else None
    if problem:
        if not allow_interrupted:
            raise RunStateError(
                f"Refusing to {command} '{run_dir}': {problem}. Continue it with 'train --resume "
                f"--run-dir {run_dir}', or pass --allow-interrupted to use best.pt anyway"
            )
        log.warning("%s: %s; using best.pt anyway (--allow-interrupted)", command, problem)
    try:
        state = ckpt.load(run_dir / "best.pt")
    except CheckpointError as err:
        raise RunStateError(f"Cannot {command} '{run_dir}': {err}") from err
    return saved, state


def _check_same_shards(
    run_dir: Path, trained: dict[str, str] | None, shards: GraphShards, allow: bool, command: str = "score"
) -> None:
    now = shards.manifest.identity()
    if trained is None:
        log.warning(
            "%s: best.pt in %s records no shard identity (older run); cannot check the shards", command, run_dir
        )
        return
    if trained.get("content_sha256") == now["content_sha256"]:
        return
    message = (
        f"The shards in '{shards.directory}' are not the ones the model in '{run_dir}' was trained on "
        f"(trained on content sha256 {trained.get('content_sha256')}, now {now['content_sha256']}): "
        "node indices may map to other users and movies"
    )
    if not allow:
        raise RunStateError(message + "; re-train, or pass --allow-shard-mismatch")
    log.warning("%s: %s (--allow-shard-mismatch)", command, message)


def check_sink(cfg: RunConfig) -> None:
    """``--sink arango``: resolves the settings, connects and checks write access before any
    training, so a bad URL, password or permission costs seconds, not a whole run."""
    if cfg.sink.sink != "arango":
        return
    from scalable_rec.sink.arango import check_writable

    check_writable(cfg.arango, cfg.sink)


def _score_parts(
    model: Recommender,
    graph: RatingGraph,
    cfg: RunConfig,
    env: DistEnv,
    out: Path,
    metadata: dict[str, str],
    z: dict[str, torch.Tensor] | None = None,
    rated: RatedIndex | None = None,
    rating_range: tuple[float, float] = (0.5, 5.0),
) -> int:
    """Each rank writes its users' part; rank 0 merges them once every rank has reported
    (a failed rank's error reaches every rank, and no part is left behind)."""
    users = user_slice(graph.num_users, env.rank, env.world_size)
    part = part_path(out, env.rank, env.world_size)
    rows, error = 0, None
    try:
        if users.numel():
            rows = write_parquet(
                recommend(model, graph, cfg.score, z=z, rated=rated, users=users, rating_range=rating_range), part
            )
        log.debug(
            "score: rank %d ranked users %d..%d (%d rows)",
            env.rank,
            int(users[0]) if users.numel() else 0,
            int(users[-1]) if users.numel() else -1,
            rows,
        )
    except Exception as err:  # reported to every rank below
        error = f"rank {env.rank}: {type(err).__name__}: {err}"
    reports: list = [None] * env.world_size
    torch.distributed.all_gather_object(reports, (rows, error))
    errors = [e for _, e in reports if e]

    def merge() -> int:
        parts = [part_path(out, r, env.world_size) for r, (n, _) in enumerate(reports) if n]
        if errors:
            for p in parts:
                p.unlink(missing_ok=True)
            raise ScalableRecError("scoring failed: " + "; ".join(errors))
        return merge_parts(parts, out, metadata)

    return from_rank0(merge, env, "merge the recommendation parts")


def refresh_stage(
    cfg: RunConfig,
    refresh_cfg: RefreshConfig,
    run_dir: str | Path | None = None,
    k: int | None = None,
    allow_interrupted: bool = False,
    allow_shard_mismatch: bool = False,
) -> dict[str, Any]:
    """Folds new ratings into the run's message-passing graph (not its weights) and
    re-scores only the users whose recommendations can change (``--mode exact``) or only
    the users who rated (``--mode bounded``); replaces their rows in
    recommendations.parquet (or, with ``--sink arango``, their edges in ArangoDB). Users the
    run has never seen get recommendations from their new ratings. The report also goes to
    <run_dir>/refresh/last_report.json.

    Holds the run directory's lock, and refuses what ``score`` refuses (an unfinished run,
    changed shards) unless ``allow_interrupted`` / ``allow_shard_mismatch``. Lists keep the
    length recommendations.parquet was written with; ``k`` (``--k``) must agree with it, and
    is needed only where no Parquet file records one. Predicted ratings are clamped to the
    run's rating range.
    """
    from scalable_rec.refresh import check_refreshable, refresh
    from scalable_rec.source import RatingBounds

    run_dir = Path(run_dir or cfg.run_dir)
    with locking.hold(run_dir, "run directory"):
        saved, state = _check_scorable(run_dir, allow_interrupted, "refresh")
        check_refreshable(saved.model)
        shards = GraphShards(saved.data.shards_dir())
        _check_same_shards(
            run_dir, state.get("config", {}).get("shards_identity"), shards, allow_shard_mismatch, "refresh"
        )
        k = _refresh_k(run_dir, saved, k)
        graph = RatingGraph.from_shards(shards, saved.features)
        model = Recommender(graph.num_users, graph.num_movies, graph.movie_x.size(1), saved.model)
        model.load_state_dict(state["model"])
        writer = None
        if cfg.sink.sink == "arango":  # replace exactly the refreshed users' edges
            from scalable_rec.sink.arango import replace_users

            def writer(batch, users, fingerprint):
                return replace_users(batch, cfg.arango, cfg.sink, run_dir, fingerprint[:12])

        report = refresh(
            run_dir,
            model,
            graph,
            refresh_cfg,
            k=k,
            memory_mb=cfg.score.score_memory_mb,
            bounds=RatingBounds(saved.data.rating_min, saved.data.rating_max),
            strict=cfg.data.strict,
            writer=writer,
        )
        if not report["already_folded"]:
            write_json_atomic(run_dir / "refresh" / "last_report.json", report)
    log.info("refresh: %s", json.dumps({key: v for key, v in report.items() if key != "input_report"}))
    return report


def _refresh_k(run_dir: Path, saved: RunConfig, given: int | None) -> int:
    """The list length a refresh keeps: recommendations.parquet's (a different ``given`` is
    refused: the rows it does not replace would keep the old length), else ``given``, else
    the run's configured ``k``."""
    import pyarrow.parquet as pq

    out = run_dir / "recommendations.parquet"
    if not out.is_file():
        return given if given is not None else saved.score.k
    written = (pq.read_schema(out).metadata or {}).get(b"k")
    if written is None:
        raise RunStateError(
            f"'{out}' records no k (not written by 'score'); re-score it with 'score --run-dir {run_dir}' first"
        )
    written_k = int(written)
    if given is not None and given != written_k:
        raise ConfigError(
            f"'k' {given} differs from the k={written_k} that '{out}' was written with: a refresh "
            f"replaces only some users' rows, so it keeps k={written_k}; leave out --k, or re-score "
            f"with 'score --k {given}' first"
        )
    return written_k


def run(cfg: RunConfig) -> dict[str, Any]:
    """prepare → train → evaluate → score, all in one run directory."""
    env = DistEnv.from_environ()
    init_distributed(env, resolve_device(cfg.train, env), cfg.train.collective_timeout_s)
    if cfg.run_dir is None:
        cfg.run_dir = str(broadcast_object(new_run_dir(cfg), env))
    run_dir = Path(cfg.run_dir)
    with locking.hold(run_dir, "run directory") if env.is_main else contextlib.nullcontext():
        from_rank0(lambda: claim_run_dir(cfg, run_dir, env), env, "claim the run directory")  # before any work
        from_rank0(lambda: check_sink(cfg), env, "check the sink")
        shards = prepare(cfg)
        # Read once and shared by the stages; with the graph index each stage maps it instead.
        graph = None if _graph_index_wanted(cfg, shards) else RatingGraph.from_shards(shards, cfg.features)
        metrics = train_stage(cfg, shards, graph)
        if not metrics["interrupted"]:  # every rank scores its block of users
            score_stage(cfg, cfg.run_dir, graph)
    return metrics
