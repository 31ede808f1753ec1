"""Ratings that arrived after training, read for folding into the message-passing graph.

Accepted inputs: a MovieLens-format ``ratings.csv`` file (``userId,movieId,rating,
timestamp``), a MovieLens folder holding one, or a shard directory (``manifest.json``,
e.g. written by ``scalable-rec arango export`` from a timestamp-filtered collection).
Rows are validated like ``prepare`` validates them (``validate_ratings``): unparseable
rows, out-of-range ratings and movies the run does not know are counted and skipped;
users the run does not know become new user nodes (``insert_users``).

The fingerprint is a sha256 of the input's bytes (of the files' recorded sha256s for a
shard directory), so the run directory can tell an input it has already folded in.
"""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from scalable_rec.atomic import sha256_file
from scalable_rec.errors import ConfigError
from scalable_rec.shards import GraphShards, KeyIndex
from scalable_rec.source.base import RatingBounds, validate_ratings
from scalable_rec.source.movielens import RATINGS_COLUMNS, _parse, _skip_rows
from scalable_rec.source.report import SkipReport


@dataclass
class NewEdges:
    """Validated new ratings as node indices of the run's (grown) user and movie spaces."""

    src: np.ndarray
    dst: np.ndarray
    rating: np.ndarray
    timestamp: np.ndarray
    fingerprint: str
    source: str


def fingerprint(path: str | Path) -> str:
    """sha256 identifying the content of a ratings file or shard directory."""
    path = _resolve(path)
    if path.is_dir():  # a shard directory: its manifest records every file's sha256
        manifest = json.loads((path / "manifest.json").read_text())
        return hashlib.sha256(json.dumps(_shard_digests(manifest), sort_keys=True).encode()).hexdigest()
    return sha256_file(path)


def _shard_digests(obj) -> list[str]:
    """Every ``sha256`` value found in a manifest (node and edge files alike)."""
    if isinstance(obj, dict):
        return [v for k, v in sorted(obj.items()) if k == "sha256"] + [
            d for k, v in sorted(obj.items()) if k != "sha256" for d in _shard_digests(v)
        ]
    if isinstance(obj, list):
        return [d for v in obj for d in _shard_digests(v)]
    return []


def _resolve(path: str | Path) -> Path:
    path = Path(path)
    if path.is_dir() and not (path / "manifest.json").is_file():
        if (path / "ratings.csv").is_file():
            return path / "ratings.csv"
        raise ConfigError(
            f"'new_ratings' needs a ratings.csv file, a folder holding one or a shard directory "
            f"(got folder '{path}' with neither ratings.csv nor manifest.json)"
        )
    if not path.exists():
        raise ConfigError(f"'new_ratings' needs an existing file or directory (got '{path}')")
    return path


def _batches(path: Path, report: SkipReport):
    """``user_key, movie_key, rating, timestamp`` record batches from a CSV or shard directory."""
    if path.is_dir():
        shards = GraphShards(path)
        src, rel, dst = shards.rating_edge_type
        edges = shards.edges(src, rel, dst)
        users, movies = shards.nodes(src).column("key"), shards.nodes(dst).column("key")
        yield pa.record_batch(
            [
                users.take(edges.column("src")).combine_chunks(),
                movies.take(edges.column("dst")).combine_chunks(),
                edges.column("rating").combine_chunks().cast(pa.float64()),
                edges.column("timestamp").combine_chunks().fill_null(0),
            ],
            names=["user_key", "movie_key", "rating", "timestamp"],
        )
        return
    with open(path, newline="", encoding="utf-8") as f:
        header = next(csv.reader(f), [])
    missing = [c for c in RATINGS_COLUMNS if c not in header]
    if missing:
        raise ConfigError(f"'new_ratings' file '{path}' needs columns {RATINGS_COLUMNS} (missing {missing})")

    def on_invalid(row) -> str:
        report.skip("malformed_row_ratings", f"{path.name} line {row.number}: {row.text!r}")
        return "skip"

    table = pacsv.read_csv(
        path,
        parse_options=pacsv.ParseOptions(invalid_row_handler=on_invalid),
        convert_options=pacsv.ConvertOptions(
            column_types={c: pa.string() for c in RATINGS_COLUMNS},
            include_columns=RATINGS_COLUMNS,
            strings_can_be_null=False,
        ),
    )
    for batch in table.to_batches():
        parsed = [
            _parse(batch.column(c), t)
            for c, t in zip(RATINGS_COLUMNS, (pa.int64(), pa.int64(), pa.float64(), pa.int64()))
        ]
        ok = np.logical_and.reduce([good for _, good in parsed])
        pending = ~ok
        for (_, good), what in zip(parsed, ("user_id", "movie_id", "rating", "timestamp")):
            _skip_rows(batch, pending & ~good, f"unparseable_{what}", report)
            pending &= good
        yield pa.record_batch(
            [pa.array(v[ok]) for v, _ in parsed], names=["user_key", "movie_key", "rating", "timestamp"]
        )


def read_new_ratings(
    path: str | Path, users: KeyIndex, movies: KeyIndex, report: SkipReport, bounds: RatingBounds = RatingBounds()
) -> NewEdges:
    """Validates and maps new ratings; unknown users are added to ``users`` (new nodes).

    Args:
        path: ratings.csv, a folder holding it, or a shard directory.
        users: Key map of the users the run knows (trained plus earlier folded); grows.
        movies: Key map of the run's movies; ratings of other movies are counted skips
            (``unknown_movie``): a movie without a feature row cannot be embedded.
        report: Collects skipped rows.
        bounds: Valid rating range.
    """
    resolved = _resolve(path)
    parts = [
        validate_ratings(b, users, movies, report, bounds, insert_users=True)
        for b in _batches(resolved, report)
        if b.num_rows
    ]
    cols = {
        n: np.concatenate([p.column(n).to_numpy(zero_copy_only=False) for p in parts])
        if parts
        else np.empty(0, dtype=np.float32 if n == "rating" else np.int64)
        for n in ("src", "dst", "rating", "timestamp")
    }
    return NewEdges(
        src=cols["src"].astype(np.int64),
        dst=cols["dst"].astype(np.int64),
        rating=cols["rating"].astype(np.float32),
        timestamp=cols["timestamp"].astype(np.int64),
        fingerprint=fingerprint(resolved),
        source=str(resolved),
    )
