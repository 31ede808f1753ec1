"""The run's configuration: typed dataclasses, one per stage, and their CLI flags.

Each stage keeps its own dataclasses in its ``config`` module (``FeatureConfig``,
``SplitConfig``, ``ModelConfig``, ``TrainConfig``, ``ScoreConfig``, ``StoreConfig``, ...);
``RunConfig`` composes them and is what every artifact stores (``config.json``,
checkpoints, manifests). Field names are unique across stages, so each becomes one
``--flag`` whose help is the field's entry in its class docstring. None of these modules
imports torch, PyG, Arrow or python-arango: flags are parsed and checked before those load
(docs/design.md, "Start-up").
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from scalable_rec.connection import ArangoConfig
from scalable_rec.errors import ConfigError
from scalable_rec.graph.config import FeatureConfig, SplitConfig, StoreConfig
from scalable_rec.model.config import ModelConfig, ScoreConfig
from scalable_rec.sink.config import LoadConfig, WritebackConfig
from scalable_rec.source.config import ExportConfig
from scalable_rec.train.config import TrainConfig


@dataclass
class DataConfig:
    """Where the input comes from and where shards go.

    Args:
        data: MovieLens folder with ratings.csv and movies.csv (ml-latest-small, ml-25m,
            ml-32m); unset: $SCALABLE_REC_DATA, else ml-latest-small downloaded (checksummed)
            into ~/.cache/scalable-rec/data.
        workdir: Folder for shards and runs.
        shards: Shard directory; unset: <workdir>/shards/<data folder name>.
        strict: Fail on the first malformed row, unknown id or out-of-range rating instead
            of counting and skipping it.
        max_rows_per_shard: Rows per Arrow shard file, positive.
        rating_min: Lowest valid rating, below ``rating_max``.
        rating_max: Highest valid rating.
        max_skipped_share: Fail 'prepare' when more than this share of input rows, in [0, 1],
            is skipped as malformed or invalid; 1.0 accepts any share.
        overwrite: 'train' and 'run': replace the artifacts of an existing run directory (else a
            used --run-dir needs --resume); unchanged shards are still reused. 'prepare' and
            'arango export': rebuild the shards anyway.
        train_file: A given split's training ratings (``user item rating [timestamp]``, tab- or
            comma-separated, or MovieLens CSV); needs ``test_file``. Validation is carved from
            it; ``--data`` then only supplies movies.csv, if it has one.
        test_file: A given split's test ratings, same format; the test uses exactly these.
    """

    data: str | None = None
    workdir: str = "runs"
    shards: str | None = None
    strict: bool = False
    max_rows_per_shard: int = 1_000_000
    rating_min: float = 0.5
    rating_max: float = 5.0
    max_skipped_share: float = 0.1
    overwrite: bool = False
    train_file: str | None = None
    test_file: str | None = None

    def __post_init__(self) -> None:
        problems = []
        if (self.train_file is None) != (self.test_file is None):
            problems.append(
                f"'train_file' and 'test_file' go together (got train_file={self.train_file!r}, "
                f"test_file={self.test_file!r})"
            )
        if self.max_rows_per_shard <= 0:
            problems.append(f"'max_rows_per_shard' needs to be positive (got {self.max_rows_per_shard})")
        if not self.rating_min < self.rating_max:
            problems.append(f"'rating_min' needs to be below 'rating_max' (got {self.rating_min}, {self.rating_max})")
        if not 0.0 <= self.max_skipped_share <= 1.0:
            problems.append(f"'max_skipped_share' needs to be in [0, 1] (got {self.max_skipped_share})")
        if problems:
            raise ValueError("; ".join(problems))
        if self.data is None and os.environ.get("SCALABLE_REC_DATA"):
            self.data = os.environ["SCALABLE_REC_DATA"]

    def shards_dir(self, data_dir: str | None = None) -> Path:
        if self.shards:
            return Path(self.shards)
        if self.train_file and self.test_file:
            return Path(self.workdir) / "shards" / f"given-{Path(self.train_file).stem}-{Path(self.test_file).stem}"
        name = Path(data_dir or self.data or "ml-latest-small").resolve().name
        return Path(self.workdir) / "shards" / name


@dataclass
class RuntimeConfig:
    """How this process runs (threads, determinism); results do not depend on it unless
    ``deterministic`` is off and threads differ.

    Args:
        threads: CPU threads per process (torch intra-op), positive; unset: under torchrun the
            machine's cores divided by its ranks on this node, else $OMP_NUM_THREADS if set,
            else all cores.
        deterministic: Bit-identical reruns: deterministic torch algorithms (an error for an
            op without one), cuDNN autotuning off and one CPU thread; slower.
    """

    threads: int | None = None
    deterministic: bool = False

    def __post_init__(self) -> None:
        if self.threads is not None and self.threads <= 0:
            raise ValueError(f"'threads' needs to be positive (got {self.threads})")

    def resolved_threads(self, environ: dict[str, str] | None = None) -> int:
        env = os.environ if environ is None else environ
        if self.deterministic:
            return 1
        if self.threads is not None:
            return self.threads
        if "LOCAL_WORLD_SIZE" in env:  # torchrun: share the cores (it would set OMP_NUM_THREADS=1)
            return max(1, (os.cpu_count() or 1) // max(1, int(env["LOCAL_WORLD_SIZE"] or 1)))
        if env.get("OMP_NUM_THREADS", "").isdigit() and int(env["OMP_NUM_THREADS"]) > 0:
            return int(env["OMP_NUM_THREADS"])  # an explicit setting of a single process wins
        return os.cpu_count() or 1

    def apply(self) -> int:
        """Sets torch's thread count and determinism for this process; returns the threads."""
        import torch

        n = self.resolved_threads()
        torch.set_num_threads(n)
        if self.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # needed by deterministic cuBLAS
            torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(self.deterministic)
        return n


# Fields whose default changed after runs were saved without them: a saved config that lacks
# one was trained with the old value (its checkpoint has no parameters for the new one).
SAVED_BEFORE_FIELD: dict[str, dict[str, Any]] = {
    "model": {"retrieval_ids": False, "retrieval_temperature": 0.0, "retrieval_bias": False, "rating_messages": "none"}
}


@dataclass
class RunConfig:
    """Everything that determines a run; stored as ``config.json`` in the run directory."""

    data: DataConfig = field(default_factory=DataConfig)
    features: FeatureConfig = field(default_factory=FeatureConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    sink: WritebackConfig = field(default_factory=WritebackConfig)
    arango: ArangoConfig = field(default_factory=ArangoConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    arango_load: LoadConfig = field(default_factory=LoadConfig)  # not "load": RunConfig.load reads a file
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    run_dir: str | None = None

    def __post_init__(self) -> None:
        """Checks that span groups (each group checks its own fields)."""
        problems = []
        if len(self.train.num_neighbors) != self.model.num_layers:
            problems.append(
                f"'num_neighbors' needs one entry per layer: {self.model.num_layers} for "
                f"--num-layers {self.model.num_layers} (got {self.train.num_neighbors})"
            )
        if self.split.val_ratio <= 0:
            problems.append(
                f"'val_ratio' needs to be positive: validation picks the best epoch and stops "
                f"early (got {self.split.val_ratio})"
            )
        if problems:
            raise ConfigError.of(problems)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> RunConfig:
        groups = {f.name: f.type for f in dataclasses.fields(cls) if f.name != "run_dir"}
        obj = {**obj, "model": {**SAVED_BEFORE_FIELD["model"], **obj.get("model", {})}} if "model" in obj else obj
        kwargs = {name: GROUPS[name](**obj.get(name, {})) for name in groups}
        return cls(**kwargs, run_dir=obj.get("run_dir"))

    @classmethod
    def load(cls, path: str | os.PathLike) -> RunConfig:
        return cls.from_json(json.loads(Path(path).read_text()))


GROUPS = {
    "data": DataConfig,
    "features": FeatureConfig,
    "split": SplitConfig,
    "model": ModelConfig,
    "train": TrainConfig,
    "score": ScoreConfig,
    "store": StoreConfig,
    "sink": WritebackConfig,
    "arango": ArangoConfig,
    "export": ExportConfig,
    "arango_load": LoadConfig,
    "runtime": RuntimeConfig,
}


def field_docs(cls: type) -> dict[str, str]:
    """Parses the ``Args:`` section of a dataclass docstring into ``{field: help}``."""
    doc = cls.__doc__ or ""
    docs, current = {}, None
    in_args = False
    for line in doc.splitlines():
        if line.strip() == "Args:":
            in_args = True
            continue
        if not in_args:
            continue
        m = re.match(r"^\s{4,8}(\w+): (.*)$", line)
        if m and len(line) - len(line.lstrip()) <= 8:
            current = m.group(1)
            docs[current] = m.group(2).strip()
        elif current and line.strip():
            docs[current] += " " + line.strip()
    return docs


# Title of each config group in ``--help``.
TITLES = {
    "DataConfig": "input and output",
    "FeatureConfig": "movie features",
    "SplitConfig": "split",
    "ModelConfig": "model",
    "TrainConfig": "training",
    "ScoreConfig": "scoring",
    "StoreConfig": "graph storage",
    "WritebackConfig": "recommendation sink",
    "ArangoConfig": "ArangoDB connection",
    "ExportConfig": "ArangoDB export",
    "LoadConfig": "ArangoDB load",
    "RuntimeConfig": "runtime",
    "RefreshConfig": "refresh",
}

# Flags most runs leave alone: ``--help`` lists them after the others, in "advanced ..." groups.
RARELY_USED = {
    "DataConfig": ("max_rows_per_shard", "rating_min", "rating_max", "max_skipped_share"),
    "FeatureConfig": ("encode_batch_size", "encode_device"),
    "ModelConfig": (
        "decoder",
        "aggr",
        "user_id_dropout",
        "movie_id_dropout",
        "retrieval_ids",
        "retrieval_temperature",
        "retrieval_bias",
    ),
    "TrainConfig": (
        "weight_decay",
        "supervision",
        "disjoint_ratio",
        "relevant_min",
        "optimizer",
        "table_optimizer",
        "table_lr",
        "sparse_tables_min_rows",
        "val_memory_mb",
        "node_shared_tables",
        "heap_mmap_threshold_kb",
        "loss",
        "rank_loss_weight",
        "ema_decay",
        "logq_correction",
        "rank_id_l2",
        "num_workers",
        "steps_per_epoch",
        "stop_check_every",
        "collective_timeout_s",
    ),
    "ScoreConfig": ("score_memory_mb",),
    "StoreConfig": ("store_min_edges", "store_verify", "layer_batch_size"),
    "WritebackConfig": ("writeback_batch_docs", "writeback_batch_mb"),
    "ArangoConfig": (
        "arango_timeout",
        "arango_retries",
        "arango_backoff",
        "users_collection",
        "movies_collection",
        "ratings_collection",
        "graph_name",
    ),
    "ExportConfig": (
        "export_batch_size",
        "export_ttl",
        "export_prefetch",
        "export_partition_rows",
        "per_shard_reads",
        "pause_gc",
        "rating_attribute",
        "timestamp_attribute",
        "title_attribute",
        "genres_attribute",
    ),
    "RefreshConfig": ("candidate_margin",),
}

# Where ``--help`` points for the reasons behind a group's defaults.
WHY = {"ModelConfig": "docs/config-notes.md#model", "TrainConfig": "docs/config-notes.md#training"}


def default_text(f: dataclasses.Field) -> str:
    """`` (default: X)`` for ``--help``; empty for an unset default (its help says what unset does)."""
    if f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    elif f.default is dataclasses.MISSING or f.default is None:
        return ""
    else:
        value = f.default
    if isinstance(value, bool):
        text = "on" if value else "off"
    elif isinstance(value, list):
        text = " ".join(str(v) for v in value)
    else:
        text = str(value)
    return f" (default: {text})"


def add_group_arguments(
    parser: argparse.ArgumentParser, cls: type, names: typing.Collection[str] | None = None, title: str | None = None
) -> None:
    """Adds one ``--flag`` per dataclass field (or per field in ``names``) as one argument
    group; the help is the field's docstring entry and its default (defaults stay in the
    dataclass: an unset flag is absent from the namespace)."""
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    why = f"why the defaults: {WHY[cls.__name__]}" if cls.__name__ in WHY and title is None else None
    group = parser.add_argument_group(title or TITLES.get(cls.__name__, cls.__name__), why)
    for f in dataclasses.fields(cls):
        if names is not None and f.name not in names:
            continue
        tp = hints[f.name]
        flag = "--" + f.name.replace("_", "-")
        kwargs: dict[str, Any] = {
            "dest": f"{cls.__name__}.{f.name}",
            "default": argparse.SUPPRESS,
            "help": docs.get(f.name, "").replace("``", "") + default_text(f),
        }
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        base = args[0] if typing.get_origin(tp) in (typing.Union, __import__("types").UnionType) else tp
        if base is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(base) is Literal:
            kwargs["choices"] = list(typing.get_args(base))
        elif typing.get_origin(base) is list:
            kwargs.update(nargs="+", type=typing.get_args(base)[0], metavar=f.name.upper())
        else:
            kwargs.update(type=base, metavar=f.name.upper())
        group.add_argument(flag, **kwargs)


def add_config_arguments(parser: argparse.ArgumentParser, classes: typing.Sequence[type]) -> None:
    """Adds the flags of every class in ``classes``: one group per class with the commonly
    used flags, then one "advanced" group per class with its ``RARELY_USED`` flags."""
    for cls in classes:
        common = [f.name for f in dataclasses.fields(cls) if f.name not in RARELY_USED.get(cls.__name__, ())]
        if common:
            add_group_arguments(parser, cls, common)
    for cls in classes:
        rare = [f.name for f in dataclasses.fields(cls) if f.name in RARELY_USED.get(cls.__name__, ())]
        if rare:
            add_group_arguments(parser, cls, rare, f"advanced {TITLES.get(cls.__name__, cls.__name__)}")


def build_group(cls: type, namespace: argparse.Namespace, base: Any | None = None) -> Any:
    """Instantiates ``cls`` from parsed flags over ``base`` (or the defaults); validates."""
    given = {k.split(".", 1)[1]: v for k, v in vars(namespace).items() if k.startswith(f"{cls.__name__}.")}
    if base is not None:
        return dataclasses.replace(base, **given)
    return cls(**given)
