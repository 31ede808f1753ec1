"""What every graph source yields, and the one function that turns it into shards.

A source produces Arrow record batches keyed by the source's own ids; it knows nothing
about node indices or files. ``write_rating_shards`` consumes those batches, maps keys to
dense indices (``KeyIndex``), validates ratings and endpoints, and writes a shard
directory. MovieLens CSV, the ArangoDB export and the synthetic generator all go through
it, so the trainer sees one format.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from scalable_rec.shards import GraphShardWriter, KeyIndex, Manifest, ShardWriter
from scalable_rec.source.report import SkipReport

log = logging.getLogger(__name__)

USER, MOVIE, RATES = "user", "movie", "rates"
RATING_EDGE = (USER, RATES, MOVIE)


class RatingGraphSource(Protocol):
    """A producer of a user–movie rating graph as Arrow record batches.

    ``movies()`` yields batches with ``key`` plus either ``title``/``genres`` (text
    features computed later) or ``features`` (a fixed-size float list, used as is).
    ``users()`` yields batches with ``key`` or returns ``None`` when users are only known
    from the ratings. ``ratings()`` yields ``user_key``, ``movie_key``, ``rating`` (float)
    and ``timestamp`` (int64, may be null); rows it could not parse are counted in
    ``report`` by the source itself.
    """

    def config(self) -> dict[str, Any]: ...

    def fingerprint(self) -> str | None: ...

    def users(self, report: SkipReport) -> Iterator[pa.RecordBatch] | None: ...

    def movies(self, report: SkipReport) -> Iterator[pa.RecordBatch]: ...

    def ratings(self, report: SkipReport) -> Iterator[pa.RecordBatch]: ...


@dataclass
class RatingBounds:
    """Valid rating range (inclusive). MovieLens uses half stars from 0.5 to 5.0."""

    min: float = 0.5
    max: float = 5.0

    def __post_init__(self) -> None:
        if not self.min < self.max:
            raise ValueError(f"Rating bounds need min < max (got min={self.min}, max={self.max})")


EDGE_SCHEMA = pa.schema(
    [
        ("src", pa.int64()),
        ("dst", pa.int64()),
        ("rating", pa.float32()),
        ("timestamp", pa.int64()),
    ]
)
# Sources of a given train/test split (``RatingFilesSource``) add which side an edge is on.
GIVEN_SPLIT_EDGE_SCHEMA = EDGE_SCHEMA.append(pa.field("given_split", pa.int8()))


def validate_ratings(
    batch: pa.RecordBatch,
    users: KeyIndex,
    movies: KeyIndex,
    report: SkipReport,
    bounds: RatingBounds,
    insert_users: bool,
) -> pa.RecordBatch:
    """Maps a ratings batch to an edge batch, counting rows that cannot be used."""
    rating = batch.column("rating").to_numpy(zero_copy_only=False).astype(np.float64)
    bad = ~np.isfinite(rating) | (rating < bounds.min) | (rating > bounds.max)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        report.skip(
            "rating_out_of_range", f"{_row(batch, first)} (valid: {bounds.min}..{bounds.max})", count=int(bad.sum())
        )
    dst = movies.lookup(batch.column("movie_key"))
    unknown_movie = (dst < 0) & ~bad
    if unknown_movie.any():
        first = int(np.flatnonzero(unknown_movie)[0])
        report.skip("unknown_movie", _row(batch, first), count=int(unknown_movie.sum()))
    keep = ~bad & ~unknown_movie
    user_keys = batch.column("user_key")
    if insert_users:
        # Only rows that survive add users, so a user with only bad rows is not a node.
        src = np.full(len(rating), -1, dtype=np.int64)
        src[keep] = users.lookup(user_keys.filter(pa.array(keep)), insert=True)
    else:
        src = users.lookup(user_keys)
        unknown_user = (src < 0) & keep
        if unknown_user.any():
            first = int(np.flatnonzero(unknown_user)[0])
            report.skip("unknown_user", _row(batch, first), count=int(unknown_user.sum()))
        keep &= ~unknown_user
    ts = batch.column("timestamp")
    columns = [
        pa.array(src[keep]),
        pa.array(dst[keep]),
        pa.array(rating[keep], pa.float32()),
        pc.filter(ts.cast(pa.int64()), pa.array(keep)),
    ]
    given = "given_split" in batch.schema.names
    if given:
        columns.append(pc.filter(batch.column("given_split").cast(pa.int8()), pa.array(keep)))
    out = pa.record_batch(columns, schema=GIVEN_SPLIT_EDGE_SCHEMA if given else EDGE_SCHEMA)
    report.accept("ratings", out.num_rows)
    return out


def _row(batch: pa.RecordBatch, i: int) -> str:
    return str({name: batch.column(name)[int(i)].as_py() for name in batch.schema.names})


def write_rating_shards(
    source: RatingGraphSource,
    out: str,
    report: SkipReport,
    bounds: RatingBounds = RatingBounds(),
    max_rows_per_shard: int = 1_000_000,
    overwrite: bool = False,
    max_skipped_share: float | None = None,
) -> Manifest:
    """Streams a source into a shard directory.

    Memory: the user and movie key maps plus one shard's rows while streaming; at the end
    one pass over the written edges keeps one rating per (user, movie) pair
    (``keep_latest_per_pair``). Returns the committed manifest (also written to
    ``<out>/manifest.json``). With ``max_skipped_share`` set, input with no usable ratings
    or with more than that share of rows skipped raises ``MalformedInputError`` before
    anything is published.
    """
    config = {**source.config(), "rating_bounds": [bounds.min, bounds.max], "max_rows_per_shard": max_rows_per_shard}
    with GraphShardWriter(out, config, max_rows_per_shard, overwrite=overwrite) as writer:
        movies = _write_nodes(source.movies(report), writer, MOVIE, report)
        if movies is None:
            raise ValueError(f"Source {source.config()} yielded no movies")
        user_batches = source.users(report)
        users = _write_nodes(user_batches, writer, USER, report) if user_batches is not None else None
        discover_users = users is None
        users = users if users is not None else KeyIndex()
        edge_writer = None
        user_key_type = pa.int64()
        for batch in source.ratings(report):
            user_key_type = batch.schema.field("user_key").type
            edges = validate_ratings(batch, users, movies, report, bounds, insert_users=discover_users)
            if edge_writer is None:
                edge_writer = writer.edge_writer(USER, RATES, MOVIE, edges.schema)
            edge_writer.write(edges)
        if edge_writer is None:
            edge_writer = writer.edge_writer(USER, RATES, MOVIE, EDGE_SCHEMA)
        if discover_users:
            user_writer = writer.node_writer(USER, pa.schema([("key", user_key_type)]))
            user_writer.write(pa.record_batch([pa.array(users.keys, user_key_type)], names=["key"]))
            report.accept("users", len(users))
        keep_latest_per_pair(edge_writer, report)
        if report.counts:
            log.warning("%s", report.summary())
        if max_skipped_share is not None:
            report.check_usable(max_skipped_share)
        return writer.commit(report=report.to_json(), fingerprint=source.fingerprint() or "")


def keep_latest_per_pair(edges: ShardWriter, report: SkipReport) -> int:
    """Keeps one rating per (user, movie) pair, the latest by timestamp; counts the rest as
    ``duplicate_rating`` skips. Returns the number dropped.

    Runs once the edge table is written (at commit), over its finished parts read back
    memory-mapped, because a pair's repeats can sit in any two shards of a stream. Only
    the pair keys are held (8 bytes per edge, plus 8 for the sort order): less than
    the 28 bytes per edge that training holds anyway, and never a Python object per
    row. Timestamps are read only for rows of repeated pairs. A missing timestamp loses
    to any present one; equal timestamps keep the row that came last in the input. Nothing
    is rewritten when there are no repeats (the usual case).
    """
    edges.flush()
    parts = list(edges.read_finished())
    if not parts:
        return 0
    src = np.concatenate([t.column("src").to_numpy() for t in parts])
    dst = np.concatenate([t.column("dst").to_numpy() for t in parts])
    key = (src << 32) | dst  # node indices stay below 2**31
    del src, dst
    order = np.argsort(key, kind="stable")
    sorted_key = key[order]
    repeat = sorted_key[1:] == sorted_key[:-1]
    if not repeat.any():
        return 0
    in_group = np.zeros(len(key), dtype=bool)
    in_group[1:] |= repeat
    in_group[:-1] |= repeat
    rows = order[in_group]  # rows of repeated pairs, grouped by pair, in input order within a pair
    ts = np.concatenate([t.column("timestamp").fill_null(np.iinfo(np.int64).min).to_numpy() for t in parts])[rows]
    by_time = np.lexsort((rows, ts, key[rows]))  # within a pair: oldest first, input order on ties
    rows, pair = rows[by_time], key[rows][by_time]
    last = np.ones(len(rows), dtype=bool)
    last[:-1] = pair[1:] != pair[:-1]
    keep = np.ones(len(key), dtype=bool)
    keep[rows[~last]] = False
    first = int(rows[~last][0])
    part_at = np.cumsum([t.num_rows for t in parts])
    p = int(np.searchsorted(part_at, first, side="right"))
    row = parts[p].slice(first - (int(part_at[p - 1]) if p else 0), 1).to_pylist()[0]
    report.skip(
        "duplicate_rating", f"{row} (node indices; a later rating of the same pair is kept)", count=int((~last).sum())
    )
    del parts
    dropped = edges.filter_rows(keep)
    report.accepted["ratings"] = report.accepted.get("ratings", 0) - dropped
    return dropped


def _write_nodes(batches, writer: GraphShardWriter, node_type: str, report: SkipReport) -> KeyIndex | None:
    """Writes node batches, dropping (and counting) repeated keys; returns the key map."""
    index, table_writer = KeyIndex(), None
    for batch in batches:
        if table_writer is None:
            table_writer = writer.node_writer(node_type, batch.schema)
        fresh = np.ones(batch.num_rows, dtype=bool)
        for i, k in enumerate(batch.column("key").to_pylist()):
            if k is None or k in index:
                fresh[i] = False
                report.skip(f"{'missing' if k is None else 'duplicate'}_{node_type}_key", _node_row(batch, i))
            else:
                index.add(k)
        table_writer.write(batch if fresh.all() else batch.filter(pa.array(fresh)))
    if table_writer is None:
        return None
    report.accept(f"{node_type}s", len(index))
    return index


def _node_row(batch: pa.RecordBatch, i: int) -> str:
    return str({n: batch.column(n)[i].as_py() for n in batch.schema.names if n != "features"})
