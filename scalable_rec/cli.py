"""``scalable-rec`` command line: each command is one plain function of a ``RunConfig``.

    scalable-rec run      [flags]   prepare → train → evaluate → score
    scalable-rec prepare  [flags]   MovieLens → Arrow shards + cached movie features
    scalable-rec train    [flags]   shards → run directory (checkpoint, metrics, curves)
    scalable-rec score    --run-dir DIR [--k 10]   → DIR/recommendations.parquet
                          [--sink arango [--replace-previous]]   → edges in ArangoDB
    scalable-rec refresh  --run-dir DIR --new-ratings FILE|DIR [--mode exact|bounded] [--sink arango]
                          fold new ratings into the graph, re-score only affected users
    scalable-rec synth    --preset tiny|...|ml-25m --out DIR   synthetic graph → shards
    scalable-rec arango load   [--data DIR]     MovieLens → ArangoDB collections + named graph
    scalable-rec arango export --shards DIR [--export-resume]   ArangoDB → Arrow shards

Run under ``torchrun`` unchanged for DDP. ``scalable-rec COMMAND --help`` lists flags.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Callable

from scalable_rec import pipeline
from scalable_rec.config import GROUPS, RunConfig, add_group_arguments, build_group
from scalable_rec.errors import ScalableRecError
from scalable_rec.score.refresh import RefreshConfig
from scalable_rec.source.synthetic import PRESETS
from scalable_rec.train.distributed import DistEnv, shutdown_distributed

log = logging.getLogger("scalable_rec")


def cmd_prepare(cfg: RunConfig) -> None:
    shards = pipeline.prepare(cfg)
    print(json.dumps({"shards": str(shards.directory), "report": shards.manifest.report}, indent=2))


def cmd_train(cfg: RunConfig) -> None:
    metrics = pipeline.train_stage(cfg)
    _print_summary(cfg, metrics)


def cmd_score(cfg: RunConfig) -> None:
    if not cfg.run_dir:
        raise ScalableRecError("'score' needs --run-dir (a directory written by 'train' or 'run')")
    print(pipeline.score_stage(cfg, cfg.run_dir))


def cmd_refresh(cfg: RunConfig, refresh_cfg: RefreshConfig) -> None:
    """Fold new ratings into a run's graph and re-score only the users they can affect."""
    problems = []
    if not cfg.run_dir:
        problems.append("'refresh' needs --run-dir (a directory written by 'train' or 'run')")
    if not refresh_cfg.new_ratings:
        problems.append("'refresh' needs --new-ratings (a ratings.csv file, a folder holding one, or a shard directory)")
    if problems:
        raise ScalableRecError("; ".join(problems))
    print(json.dumps(pipeline.refresh_stage(cfg, refresh_cfg), indent=2, default=str))


def cmd_run(cfg: RunConfig) -> None:
    metrics = pipeline.run(cfg)
    _print_summary(cfg, metrics)


def cmd_synth(args: argparse.Namespace) -> None:
    """Writes a synthetic rating graph straight to a shard directory (streamed)."""
    from scalable_rec.source import SkipReport, write_rating_shards
    from scalable_rec.source.synthetic import SyntheticSource

    overrides = {k: v for k, v in {"num_users": args.users, "num_movies": args.movies,
                                    "num_edges": args.edges, "seed": args.seed}.items() if v is not None}
    source = SyntheticSource.preset(args.preset, **overrides)
    manifest = write_rating_shards(source, args.out, SkipReport(), max_rows_per_shard=args.max_rows_per_shard,
                                   overwrite=args.overwrite)
    print(json.dumps({"shards": args.out, "config": manifest.config}, indent=2))


def cmd_arango_load(cfg: RunConfig) -> None:
    """MovieLens (--data) → ArangoDB: Users, Movie, Ratings and the graph movie_rating_graph."""
    from scalable_rec.source import RatingBounds
    from scalable_rec.source.arango_load import load_movielens_dir
    from scalable_rec.source.download import fetch_movielens

    data_dir = cfg.data.data or str(fetch_movielens())
    print(json.dumps(load_movielens_dir(data_dir, cfg.arango, cfg.arango_load, strict=cfg.data.strict,
                                        bounds=RatingBounds(cfg.data.rating_min, cfg.data.rating_max)), indent=2))


def cmd_arango_export(cfg: RunConfig) -> None:
    """ArangoDB rating graph → Arrow shards (--shards DIR) that 'scalable-rec train' reads."""
    from scalable_rec.source import RatingBounds
    from scalable_rec.source.arango_export import export_command

    if not cfg.data.shards:
        raise ScalableRecError("'arango export' needs --shards DIR (the shard directory to write)")
    manifest = export_command(cfg.data.shards, cfg.arango, cfg.export, strict=cfg.data.strict,
                              bounds=RatingBounds(cfg.data.rating_min, cfg.data.rating_max),
                              max_rows_per_shard=cfg.data.max_rows_per_shard, overwrite=cfg.data.overwrite)
    print(json.dumps({"shards": cfg.data.shards, "report": manifest.report}, indent=2))


def _print_summary(cfg: RunConfig, metrics: dict) -> None:
    if DistEnv.from_environ().is_main:
        summary = {"run_dir": cfg.run_dir, "best_val_rmse": metrics["best_val_rmse"],
                   "test": metrics.get("test"), "interrupted": metrics["interrupted"]}
        print(json.dumps(summary, indent=2))


# name → (function, config groups it takes flags for)
COMMANDS: dict[str, tuple[Callable[[RunConfig], None], tuple[str, ...]]] = {
    "run": (cmd_run, ("data", "features", "split", "model", "train", "score", "store", "sink", "arango")),
    "prepare": (cmd_prepare, ("data", "features", "split", "store")),
    "train": (cmd_train, ("data", "features", "split", "model", "train", "store")),
    "score": (cmd_score, ("score", "store", "sink", "arango")),
}

# scalable-rec arango ACTION: name → (function, config groups it takes flags for)
ARANGO_COMMANDS: dict[str, tuple[Callable[[RunConfig], None], tuple[str, ...]]] = {
    "load": (cmd_arango_load, ("data", "arango", "arango_load")),
    "export": (cmd_arango_export, ("data", "arango", "export")),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scalable-rec", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (fn, groups) in COMMANDS.items():
        p = sub.add_parser(name, help=fn.__doc__ or name, description=pipeline_doc(name))
        p.add_argument("--run-dir", dest="run_dir", default=None,
                       help="run directory (default: <workdir>/run-<time>-<id>)")
        for g in groups:
            add_group_arguments(p, GROUPS[g])
    refresh = sub.add_parser("refresh", help=cmd_refresh.__doc__, description=pipeline_doc("refresh"))
    refresh.add_argument("--run-dir", dest="run_dir", default=None, help="run directory written by 'train' or 'run'")
    for cls in (GROUPS["score"], RefreshConfig, GROUPS["sink"], GROUPS["arango"]):
        add_group_arguments(refresh, cls)
    refresh.add_argument("--strict", dest="DataConfig.strict", action="store_true", default=argparse.SUPPRESS,
                         help="fail on the first unusable new rating instead of counting and skipping it")
    synth = sub.add_parser("synth", help=cmd_synth.__doc__, description=cmd_synth.__doc__)
    synth.add_argument("--preset", default="small", choices=sorted(PRESETS),
                       help="size preset (users, movies, edges): " + ", ".join(f"{k}={v}" for k, v in PRESETS.items()))
    synth.add_argument("--users", type=int, help="override the preset's number of users")
    synth.add_argument("--movies", type=int, help="override the preset's number of movies")
    synth.add_argument("--edges", type=int, help="override the preset's number of rating edges")
    synth.add_argument("--seed", type=int, help="random seed (default 0)")
    synth.add_argument("--out", required=True, help="shard directory to write")
    synth.add_argument("--max-rows-per-shard", type=int, default=1_000_000, help="rows per Arrow file")
    synth.add_argument("--overwrite", action="store_true", help="replace an existing shard directory")
    arango = sub.add_parser("arango", help="ArangoDB: load MovieLens into it, export its graph to shards",
                            description="The password comes from $SCALABLE_REC_ARANGO_PASSWORD, "
                                        "$SCALABLE_REC_ARANGO_PASSWORD_FILE or --arango-config-file, never a flag.")
    actions = arango.add_subparsers(dest="action", required=True)
    for name, (fn, groups) in ARANGO_COMMANDS.items():
        p = actions.add_parser(name, help=fn.__doc__, description=fn.__doc__)
        p.set_defaults(run_dir=None)
        for g in groups:
            add_group_arguments(p, GROUPS[g])
    return parser


def pipeline_doc(name: str) -> str:
    fn = {"run": pipeline.run, "prepare": pipeline.prepare, "train": pipeline.train_stage,
          "score": pipeline.score_stage, "refresh": pipeline.refresh_stage}[name]
    return (fn.__doc__ or "").strip()


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """Builds and validates every group, reporting all invalid options at once."""
    groups, problems = {}, []
    for name, cls in GROUPS.items():
        try:
            groups[name] = build_group(cls, args)
        except (ValueError, TypeError) as err:
            problems.append(f"{name}: {err}")
    if problems:
        raise ScalableRecError("Invalid options:\n  " + "\n  ".join(problems))
    return RunConfig(**groups, run_dir=args.run_dir)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    env = DistEnv.from_environ()
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else (logging.INFO if env.is_main else logging.WARNING),
        format=f"%(asctime)s [rank {env.rank}] %(levelname)s %(name)s: %(message)s" if env.enabled
        else "%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        if args.command == "synth":
            cmd_synth(args)
            return 0
        cfg = config_from_args(args)
        if args.command == "refresh":
            try:
                refresh_cfg = build_group(RefreshConfig, args)
            except (ValueError, TypeError) as err:
                raise ScalableRecError(f"Invalid options:\n  refresh: {err}") from err
            cmd_refresh(cfg, refresh_cfg)
            return 0
        (ARANGO_COMMANDS[args.action] if args.command == "arango" else COMMANDS[args.command])[0](cfg)
    except ScalableRecError as err:
        log.error("%s", err)
        return 2
    finally:
        shutdown_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
