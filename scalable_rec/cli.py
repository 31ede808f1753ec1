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

Run under ``torchrun`` unchanged for DDP, or let ``run``/``train``/``score`` start the ranks of
one node themselves with ``--nproc-per-node N`` (forked from a forkserver after its
imports, so the ranks share them: ``scalable_rec.train.launch``). ``scalable-rec COMMAND --help`` lists flags.

Flags are parsed and checked before torch, PyG, Arrow or python-arango is imported: this module
imports none of them (the config dataclasses live in torch-free modules), and each command
imports the pipeline when it runs, so ``--help`` and a bad flag are answered at once
(docs/design.md, "Start-up").
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

from scalable_rec.atomic import dumps
from scalable_rec.config import GROUPS, RunConfig, add_config_arguments, build_group
from scalable_rec.dist_env import DistEnv
from scalable_rec.errors import ConfigError, InterruptedRunError, ScalableRecError
from scalable_rec.refresh_config import RefreshConfig
from scalable_rec.source.config import PRESETS, missing_input
from scalable_rec.train.config import cuda_cannot_exist, device_problems
from scalable_rec.train.launch import LAUNCHED_ENV, launch

log = logging.getLogger("scalable_rec")


# Exit status of a user error (bad option, bad input, refused state), as argparse uses.
USAGE_ERROR = 2
# OS errors that are the environment's, not a bug: one line and exit 2, no traceback.
USER_OS_ERRORS = {
    errno.ENOSPC: "no space left on the device",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOENT: "no such file or directory",
    errno.ENOTDIR: "not a directory",
    errno.EDQUOT: "disk quota exceeded",
    errno.EISDIR: "is a directory",
}


def cmd_prepare(cfg: RunConfig, args: argparse.Namespace) -> None:
    """MovieLens → Arrow shards + cached movie features (reused when input and options are unchanged)."""
    from scalable_rec import pipeline

    shards = pipeline.prepare(cfg, rebuild=cfg.data.overwrite)
    print(dumps({"shards": str(shards.directory), "report": shards.manifest.report}))


def cmd_train(cfg: RunConfig, args: argparse.Namespace) -> None:
    """Shards → run directory: checkpoints, metrics, curves."""
    from scalable_rec import pipeline

    metrics = pipeline.train_stage(cfg)
    _print_summary(cfg, metrics)


def cmd_score(cfg: RunConfig, args: argparse.Namespace) -> None:
    """Run directory → top-K per user (Parquet or ArangoDB)."""
    from scalable_rec import pipeline

    print(
        pipeline.score_stage(
            cfg, cfg.run_dir, allow_interrupted=args.allow_interrupted, allow_shard_mismatch=args.allow_shard_mismatch
        )
    )


# Flags of the groups 'refresh' shares with 'score' that a refresh cannot honour: refused
# with one line (and left out of its --help) rather than silently ignored.
REFRESH_REFUSES = {
    "ScoreConfig.score_device": "--score-device (a refresh runs on the CPU)",
    "ScoreConfig.exclude_rated": "--exclude-rated/--no-exclude-rated (rated movies are always excluded)",
    "WritebackConfig.replace_previous": "--replace-previous/--no-replace-previous (a refresh always "
    "replaces the refreshed users' edges)",
}


def cmd_refresh(cfg: RunConfig, refresh_cfg: RefreshConfig, args: argparse.Namespace) -> None:
    """Fold new ratings into a run's graph and re-score only the users they can affect."""
    from scalable_rec import pipeline

    k = cfg.score.k if "ScoreConfig.k" in vars(args) else None  # None: the k the Parquet was written with
    print(
        dumps(
            pipeline.refresh_stage(
                cfg,
                refresh_cfg,
                k=k,
                allow_interrupted=args.allow_interrupted,
                allow_shard_mismatch=args.allow_shard_mismatch,
            )
        )
    )


def cmd_run(cfg: RunConfig, args: argparse.Namespace) -> None:
    """Prepare → train → evaluate → score in one run directory."""
    from scalable_rec import pipeline

    metrics = pipeline.run(cfg)
    _print_summary(cfg, metrics)


def cmd_synth(args: argparse.Namespace) -> None:
    """Writes a synthetic rating graph straight to a shard directory (streamed)."""
    from scalable_rec.source import SkipReport, write_rating_shards
    from scalable_rec.source.synthetic import SyntheticSource

    overrides = {
        k: v
        for k, v in {
            "num_users": args.users,
            "num_movies": args.movies,
            "num_edges": args.edges,
            "seed": args.seed,
        }.items()
        if v is not None
    }
    source = SyntheticSource.preset(args.preset, **overrides)
    manifest = write_rating_shards(
        source, args.out, SkipReport(), max_rows_per_shard=args.max_rows_per_shard, overwrite=args.overwrite
    )
    print(json.dumps({"shards": args.out, "config": manifest.config}, indent=2))


def cmd_arango_load(cfg: RunConfig, args: argparse.Namespace) -> None:
    """MovieLens (--data) → ArangoDB: Users, Movie, Ratings and the graph movie_rating_graph."""
    from scalable_rec.sink.arango_load import load_movielens_dir
    from scalable_rec.source import RatingBounds
    from scalable_rec.source.download import fetch_movielens

    data_dir = cfg.data.data or str(fetch_movielens())
    print(
        json.dumps(
            load_movielens_dir(
                data_dir,
                cfg.arango,
                cfg.arango_load,
                strict=cfg.data.strict,
                bounds=RatingBounds(cfg.data.rating_min, cfg.data.rating_max),
            ),
            indent=2,
        )
    )


def cmd_arango_export(cfg: RunConfig, args: argparse.Namespace) -> None:
    """ArangoDB rating graph → Arrow shards (--shards DIR) that 'scalable-rec train' reads."""
    from scalable_rec.source import RatingBounds
    from scalable_rec.source.arango_export import export_command

    manifest = export_command(
        cfg.data.shards,
        cfg.arango,
        cfg.export,
        strict=cfg.data.strict,
        bounds=RatingBounds(cfg.data.rating_min, cfg.data.rating_max),
        max_rows_per_shard=cfg.data.max_rows_per_shard,
        overwrite=cfg.data.overwrite,
    )
    print(json.dumps({"shards": cfg.data.shards, "report": manifest.report}, indent=2))


def _print_summary(cfg: RunConfig, metrics: dict) -> None:
    if DistEnv.from_environ().is_main:
        selected = metrics.get("selection", metrics)  # --refit: validated by the selecting run
        summary = {
            "run_dir": cfg.run_dir,
            "best_val_rmse": selected["best_val_rmse"],
            "test": metrics.get("test"),
            "interrupted": metrics["interrupted"],
        }
        if "selection" in metrics:
            summary["refit_epochs"] = selected["epochs"]
        print(dumps(summary))


# name → (function, config groups it takes flags for)
COMMANDS: dict[str, tuple[Callable[[RunConfig, argparse.Namespace], None], tuple[str, ...]]] = {
    "run": (cmd_run, ("data", "features", "split", "model", "train", "score", "store", "sink", "arango")),
    "prepare": (cmd_prepare, ("data", "features", "split", "store")),
    "train": (cmd_train, ("data", "features", "split", "model", "train", "store")),
    "score": (cmd_score, ("score", "store", "sink", "arango")),
}

# scalable-rec arango ACTION: name → (function, config groups it takes flags for)
ARANGO_COMMANDS: dict[str, tuple[Callable[[RunConfig, argparse.Namespace], None], tuple[str, ...]]] = {
    "load": (cmd_arango_load, ("data", "arango", "arango_load")),
    "export": (cmd_arango_export, ("data", "arango", "export")),
}


def _add_verbose(parser: argparse.ArgumentParser, top: bool = False) -> None:
    """``-v`` before or after the command; a subcommand's copy sets it only when given."""
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=False if top else argparse.SUPPRESS,
        help="debug logging, and the traceback of an error",
    )


def _add_check_overrides(parser: argparse.ArgumentParser, command: str) -> None:
    parser.add_argument(
        "--allow-interrupted",
        action="store_true",
        help=f"{command} from best.pt even if training was interrupted, killed or diverged",
    )
    parser.add_argument(
        "--allow-shard-mismatch",
        action="store_true",
        help=f"{command} even if the shards differ from those the model was trained on",
    )


# What each command's ``--help`` opens with: its usage line and what it does.
USAGE = {
    "run": "scalable-rec run [options]",
    "prepare": "scalable-rec prepare [options]",
    "train": "scalable-rec train [options]",
    "score": "scalable-rec score --run-dir DIR [options]",
    "refresh": "scalable-rec refresh --run-dir DIR --new-ratings PATH [options]",
    "arango load": "scalable-rec arango load [options]",
    "arango export": "scalable-rec arango export --shards DIR [options]",
}
DESCRIPTIONS = {
    "run": "Prepare, train, evaluate and score in one run directory: config.json, best.pt, last.pt, "
    "metrics.json, curves and recommendations.parquet (or ArangoDB edges with --sink arango). "
    "For DDP run it under torchrun, or give --nproc-per-node N on one node.",
    "prepare": "MovieLens (--data) or a given split (--train-file, --test-file) -> Arrow shards and cached "
    "movie features; reused when the input and the options are unchanged.",
    "train": "Shards -> run directory: config.json, best.pt, last.pt, metrics.json (validation curve, test "
    "metrics) and curves. For DDP run it under torchrun, or give --nproc-per-node N on one node.",
    "score": "Run directory -> top-K movies per user in <run-dir>/recommendations.parquet, or edges in "
    "ArangoDB with --sink arango. Refuses an interrupted run, or shards that changed since "
    "training, unless told otherwise.",
    "refresh": "Folds new ratings into a run's graph (not its weights) and re-scores only the users whose "
    "recommendations can change (--mode exact) or who rated (--mode bounded); their rows are "
    "replaced in recommendations.parquet or in ArangoDB. Holds the run directory's lock, refuses "
    "what score refuses and keeps the k recommendations.parquet was written with. The report "
    "also goes to <run-dir>/refresh/last_report.json.",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scalable-rec", description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    _add_verbose(parser, top=True)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (fn, groups) in COMMANDS.items():
        p = sub.add_parser(name, help=fn.__doc__, usage=USAGE[name], description=DESCRIPTIONS[name])
        _add_verbose(p)
        p.add_argument(
            "--run-dir", dest="run_dir", default=None, help="run directory (default: <workdir>/run-<time>-<id>)"
        )
        if name in ("run", "train", "score"):
            p.add_argument(
                "--nproc-per-node",
                dest="nproc_per_node",
                type=int,
                default=1,
                metavar="N",
                help="DDP ranks on this node, forked from one process after its imports (one "
                "node; across nodes use torchrun); default 1: this process alone",
            )
            p.add_argument(
                "--max-restarts",
                dest="max_restarts",
                type=int,
                default=0,
                metavar="N",
                help="with --nproc-per-node: restart the ranks up to N times after a failure "
                "(they resume from last.pt)",
            )
        if name == "score":
            _add_check_overrides(p, "score")
        if "train" not in groups:  # --no-progress also silences prepare's text encoder
            p.add_argument(
                "--progress",
                action=argparse.BooleanOptionalAction,
                dest="TrainConfig.progress",
                default=argparse.SUPPRESS,
                help="show progress bars (default: on)",
            )
        add_config_arguments(p, [GROUPS[g] for g in groups + ("runtime",)])
    refresh = sub.add_parser(
        "refresh", help=cmd_refresh.__doc__, usage=USAGE["refresh"], description=DESCRIPTIONS["refresh"]
    )
    _add_verbose(refresh)
    refresh.add_argument("--run-dir", dest="run_dir", default=None, help="run directory written by 'train' or 'run'")
    add_config_arguments(refresh, [RefreshConfig, GROUPS["score"], GROUPS["sink"], GROUPS["arango"]])
    for action in refresh._actions:
        if action.dest in REFRESH_REFUSES:
            action.help = argparse.SUPPRESS
        elif action.dest == "ScoreConfig.k":
            action.help = (
                "recommendations per user; default and only accepted value: the k recommendations.parquet "
                "was written with (without one: the run's k)"
            )
    _add_check_overrides(refresh, "refresh")
    refresh.add_argument(
        "--strict",
        dest="DataConfig.strict",
        action="store_true",
        default=argparse.SUPPRESS,
        help="fail on the first unusable new rating instead of counting and skipping it",
    )
    synth = sub.add_parser("synth", help=cmd_synth.__doc__, description=cmd_synth.__doc__)
    _add_verbose(synth)
    synth.add_argument(
        "--preset",
        default="small",
        choices=sorted(PRESETS),
        help="size preset (users, movies, edges): " + ", ".join(f"{k}={v}" for k, v in PRESETS.items()),
    )
    synth.add_argument("--users", type=int, help="override the preset's number of users")
    synth.add_argument("--movies", type=int, help="override the preset's number of movies")
    synth.add_argument("--edges", type=int, help="override the preset's number of rating edges")
    synth.add_argument("--seed", type=int, help="random seed (default 0)")
    synth.add_argument("--out", required=True, help="shard directory to write")
    synth.add_argument("--max-rows-per-shard", type=int, default=1_000_000, help="rows per Arrow file")
    synth.add_argument("--overwrite", action="store_true", help="replace an existing shard directory")
    arango = sub.add_parser(
        "arango",
        help="ArangoDB: load MovieLens into it, export its graph to shards",
        description="The password comes from $SCALABLE_REC_ARANGO_PASSWORD, "
        "$SCALABLE_REC_ARANGO_PASSWORD_FILE or --arango-config-file, never a flag.",
    )
    _add_verbose(arango)
    actions = arango.add_subparsers(dest="action", required=True)
    for name, (fn, groups) in ARANGO_COMMANDS.items():
        p = actions.add_parser(name, help=fn.__doc__, description=fn.__doc__, usage=USAGE[f"arango {name}"])
        _add_verbose(p)
        p.set_defaults(run_dir=None)
        add_config_arguments(p, [GROUPS[g] for g in groups])
    return parser


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """Builds and validates every group, reporting all invalid options at once."""
    groups, problems = {}, []
    for name, cls in GROUPS.items():
        try:
            groups[name] = build_group(cls, args)
        except (ValueError, TypeError) as err:
            problems.append(f"{name}: {err}")
    if problems:
        raise ConfigError.of(problems)
    try:
        return RunConfig(**groups, run_dir=args.run_dir)
    except ValueError as err:  # checks across groups
        raise ConfigError(str(err)) from None


def check_command(cfg: RunConfig, refresh_cfg: RefreshConfig | None, args: argparse.Namespace) -> None:
    """What a command needs beyond valid flags (a run directory, new ratings, a shard
    directory), checked before torch is imported."""
    if args.command == "score" and not cfg.run_dir:
        raise ConfigError("'score' needs --run-dir (a directory written by 'train' or 'run')")
    if args.command == "arango" and args.action == "export" and not cfg.data.shards:
        raise ScalableRecError("'arango export' needs --shards DIR (the shard directory to write)")
    asks_cuda = cfg.train.device.startswith("cuda") or cfg.train.precision == "fp16"
    if args.command in ("run", "train") and asks_cuda and cuda_cannot_exist():  # answered without torch
        raise ConfigError("Invalid options: " + "; ".join(device_problems(cfg.train, cuda_available=False)))
    if args.command == "score":
        spec, hint = cfg.score.device_spec(_trained_on(cfg.run_dir))
        if spec.startswith("cuda") and cuda_cannot_exist():
            scoring = dataclasses.replace(cfg.train, device=spec, precision="fp32")
            raise ConfigError("Cannot score: " + "; ".join(device_problems(scoring, cuda_available=False)) + hint)
    if args.command in ("prepare", "run"):  # what 'prepare' reads, before torch loads
        problem = missing_input(cfg.data.data, cfg.data.train_file, cfg.data.test_file)
        if problem:
            raise ConfigError(problem)
    if refresh_cfg is None:
        return
    problems = []
    if not cfg.run_dir:
        problems.append("'refresh' needs --run-dir (a directory written by 'train' or 'run')")
    if not refresh_cfg.new_ratings:
        problems.append(
            "'refresh' needs --new-ratings (a ratings.csv file, a folder holding one, or a shard directory)"
        )
    refused = [flag for dest, flag in REFRESH_REFUSES.items() if dest in vars(args)]
    if refused:
        problems.append("'refresh' does not take " + ", ".join(refused))
    if problems:
        raise ConfigError("; ".join(problems))


def _trained_on(run_dir: str) -> str:
    """The device a run directory's ``config.json`` trained on, read without torch; ``cpu``
    when it cannot be read (the score stage then names what is wrong with the directory)."""
    try:
        device = json.loads((Path(run_dir) / "config.json").read_text())["train"]["device"]
    except (OSError, ValueError, KeyError, TypeError):
        return "cpu"
    return device if isinstance(device, str) else "cpu"


def check_device(cfg: RunConfig, command: str) -> None:
    """``--device``/``--precision`` (and what the model needs there) against this machine,
    before any work."""
    if command not in ("run", "train"):
        return
    from scalable_rec.model.recommender import check_model_device
    from scalable_rec.train.config import resolve_device

    try:
        check_model_device(cfg.model, resolve_device(cfg.train, DistEnv.from_environ()))
    except ValueError as err:
        raise ConfigError(f"Invalid options: {err}") from None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    env = DistEnv.from_environ()
    if getattr(args, "nproc_per_node", 1) != 1 and not os.environ.get(LAUNCHED_ENV):
        return _launch_ranks(args, argv, env)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else (logging.INFO if env.is_main else logging.WARNING),
        format=f"%(asctime)s [rank {env.rank}] %(levelname)s %(name)s: %(message)s"
        if env.enabled
        else "%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # glibc reads its tunables at exec: what this process runs with (the command restarts
    # itself with huge pages for malloc, scalable_rec.heap)
    log.debug("pid %d, GLIBC_TUNABLES=%s", os.getpid(), os.environ.get("GLIBC_TUNABLES", ""))
    try:
        if args.command == "synth":
            cmd_synth(args)
            return 0
        cfg = config_from_args(args)
        refresh_cfg = None
        if args.command == "refresh":
            try:
                refresh_cfg = build_group(RefreshConfig, args)
            except (ValueError, TypeError) as err:
                raise ConfigError.of([f"refresh: {err}"]) from err
        check_command(cfg, refresh_cfg, args)
        # Everything above is answered without torch; from here on the command loads it.
        check_device(cfg, args.command)
        threads = cfg.runtime.apply()
        log.debug("torch threads per process: %d (deterministic: %s)", threads, cfg.runtime.deterministic)
        from scalable_rec.dist import shutdown_distributed

        try:
            if refresh_cfg is not None:
                cmd_refresh(cfg, refresh_cfg, args)
            else:
                (ARANGO_COMMANDS[args.action] if args.command == "arango" else COMMANDS[args.command])[0](cfg, args)
        finally:
            shutdown_distributed()
    except InterruptedRunError as err:
        log.error("%s", err)
        return 128 + err.signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM
    except (ScalableRecError, OSError) as err:
        if isinstance(err, OSError) and err.errno not in USER_OS_ERRORS:
            raise
        log.error("%s", one_line(err), exc_info=args.verbose)
        return USAGE_ERROR
    return 0


def _launch_ranks(args: argparse.Namespace, argv: list[str], env: DistEnv) -> int:
    """``--nproc-per-node N``: this process starts the N ranks and waits for them."""
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    problem = None
    if args.nproc_per_node < 1:
        problem = f"'--nproc-per-node' needs to be positive (got {args.nproc_per_node})"
    elif args.max_restarts < 0:
        problem = f"'--max-restarts' needs to be non-negative (got {args.max_restarts})"
    elif env.world_size > 1:  # under torchrun (forced one-rank DDP may still fork its ranks)
        problem = "'--nproc-per-node' starts the ranks itself; under torchrun leave it out"
    if problem:
        log.error("Invalid options: %s", problem)
        return USAGE_ERROR
    return launch(main, argv, args.nproc_per_node, args.max_restarts)


def one_line(err: BaseException) -> str:
    """A user-facing message: the error's own text, or for OS errors what failed and where."""
    if isinstance(err, OSError) and not isinstance(err, ScalableRecError):
        where = f" '{err.filename}'" if err.filename else ""
        return f"{USER_OS_ERRORS.get(err.errno, err.strerror)}{where} ({type(err).__name__}: {err.strerror})"
    return str(err)


if __name__ == "__main__":
    sys.exit(main())
