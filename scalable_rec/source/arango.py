"""ArangoDB source: the rating graph read out by ``_key`` ranges, as Arrow record batches.

Every read is one query shape, with collection and attribute names as bind variables::

    FOR v IN @@collection FILTER v._key > @after SORT v._key LIMIT @limit
        RETURN [v._key, v._from, v._to, v.@rating, v.@timestamp]

run as a stream cursor (``stream=True``, ``fill_block_cache=False``, ``allow_retry=True``),
so the server walks the primary index lazily and python-arango can re-ask for a batch whose
response was lost. Rows come back as compact arrays, not documents. ``LIMIT`` bounds each
query to one key range, and the next range starts after the last key read, so a lost or
expired cursor (connection reset after python-arango's own retries, 404/1600) is replaced
by a new query that neither skips nor repeats a row. A background thread fetches the next
batch (at most ``export_prefetch`` ahead) while the caller converts the current one.

``ArangoSource`` follows ``RatingGraphSource`` (``write_rating_shards`` can drive it); the
checkpointed, resumable export into shards is ``scalable_rec.source.arango_export``.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from arango.database import StandardDatabase
from arango.exceptions import ArangoServerError

from scalable_rec.connection import (
    ArangoConfig, RetryPolicy, database_error, is_cursor_lost, is_transient, require_collection,
)
from scalable_rec.source.report import SkipReport

log = logging.getLogger(__name__)

RANGE_QUERY = ("FOR v IN @@collection FILTER v._key > @after SORT v._key LIMIT @limit "
               "RETURN [{projection}]")
MOVIE_PROJECTION = "v._key, v.@title, v.@genres"
USER_PROJECTION = "v._key"
RATING_PROJECTION = "v._key, v._from, v._to, v.@rating, v.@timestamp"

MOVIE_SCHEMA = pa.schema([("key", pa.string()), ("title", pa.string()), ("genres", pa.string())])
USER_SCHEMA = pa.schema([("key", pa.string())])
RATING_SCHEMA = pa.schema([("user_key", pa.string()), ("movie_key", pa.string()), ("rating", pa.float64()),
                           ("timestamp", pa.int64())])


@dataclass
class ExportConfig:
    """How the graph is read out of ArangoDB.

    Args:
        export_batch_size: Rows per cursor batch (AQL batchSize; default 10,000).
        export_ttl: Seconds a server-side cursor may sit idle between batches.
        export_prefetch: Cursor batches fetched ahead while the current one is converted (1-8).
        export_resume: Continue an interrupted export from '<shards>.incomplete' after its last
            finished shard.
        rating_attribute: Attribute of a rating edge holding the rating.
        timestamp_attribute: Attribute of a rating edge holding the Unix time (may be missing).
        title_attribute: Attribute of a movie holding its title.
        genres_attribute: Attribute of a movie holding its genres (a list or a pipe-joined string).
    """

    export_batch_size: int = 10_000
    export_ttl: float = 120.0
    export_prefetch: int = 2
    export_resume: bool = False
    rating_attribute: str = "rating"
    timestamp_attribute: str = "timestamp"
    title_attribute: str = "title"
    genres_attribute: str = "genres"

    def __post_init__(self) -> None:
        problems = []
        if self.export_batch_size <= 0:
            problems.append(f"'export_batch_size' needs to be positive (got {self.export_batch_size})")
        if self.export_ttl <= 0:
            problems.append(f"'export_ttl' needs to be positive (got {self.export_ttl})")
        if not 1 <= self.export_prefetch <= 8:
            problems.append(f"'export_prefetch' needs to be between 1 and 8 (got {self.export_prefetch})")
        if problems:
            raise ValueError("; ".join(problems))


@dataclass
class Chunk:
    """One cursor batch of rows and where the read stands after it."""

    rows: list[list[Any]]
    last_key: str
    """``_key`` of the last row read so far: the next range starts after it."""
    range_end: bool
    """This batch ends one key-range query."""
    exhausted: bool
    """No rows remain after this batch."""


@dataclass(frozen=True)
class ReadSpec:
    """One collection read as compact rows."""

    collection: str
    """Bound as ``@@collection``."""
    projection: str
    """Elements of ``RETURN [...]``; the first is always ``v._key``."""
    binds: dict[str, Any]
    """Bind variables of the projection (attribute names)."""


def scan_ranges(db: StandardDatabase, spec: ReadSpec, after: str, range_rows: int,
                cfg: ExportConfig) -> Iterator[Chunk]:
    """Reads a collection in ``_key`` order after ``after``, one query per ``range_rows`` rows.

    Args:
        db: Database.
        spec: Collection, projection and its bind variables.
        after: Start after this key (``""``: from the first).
        range_rows: ``LIMIT`` of each query.
        cfg: Cursor batch size and ttl.
    """
    query = RANGE_QUERY.format(projection=spec.projection)
    while True:
        read = 0
        cursor = db.aql.execute(query, bind_vars={"@collection": spec.collection, "after": after,
                                                  "limit": range_rows, **spec.binds},
                                batch_size=cfg.export_batch_size, ttl=cfg.export_ttl, stream=True,
                                fill_block_cache=False, allow_retry=True)
        try:
            while True:
                batch = cursor.batch()
                rows = list(batch)
                batch.clear()
                read += len(rows)
                if rows:
                    after = rows[-1][0]
                done = not cursor.has_more()
                if rows or done:
                    yield Chunk(rows, after, done, done and read < range_rows)
                if done:
                    break
                cursor.fetch()
        finally:
            _close_quietly(cursor)
        if read < range_rows:
            return


def _close_quietly(cursor: Any) -> None:
    # With allowRetry the cursor outlives its last batch until deleted or its ttl passes.
    # A failed close must not hide the error that ended the read, so it is only logged.
    try:
        cursor.close(ignore_missing=True)
    except Exception as err:  # noqa: BLE001
        log.debug("closing cursor %s failed (it expires with its ttl): %s", cursor.id, err)


class Prefetcher:
    """Runs an iterator in a daemon thread, handing items over through a bounded queue.

    The worker is at most ``depth`` items ahead (plus the one it is producing). An error in
    the worker is re-raised in the consumer; closing the prefetcher stops the worker and
    closes the iterator there (so its ``finally`` blocks, e.g. cursor cleanup, run).

    Args:
        items: The iterator to run in the background.
        depth: Queue size.
    """

    def __init__(self, items: Iterator[Any], depth: int) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(items,), name="arango-prefetch", daemon=True)
        self._thread.start()

    def _put(self, message: tuple[str, Any]) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(message, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, items: Iterator[Any]) -> None:
        try:
            for item in items:
                if not self._put(("item", item)):
                    return
            self._put(("end", None))
        except BaseException as err:  # noqa: BLE001 - handed to the consumer thread
            self._put(("error", err))
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()

    def __iter__(self) -> Iterator[Any]:
        while True:
            kind, value = self._queue.get()
            if kind == "item":
                yield value
            elif kind == "end":
                return
            else:
                raise value

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5.0)

    def __enter__(self) -> "Prefetcher":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# ----------------------------------------------------------------------------- row conversion


def movie_batch(rows: list[list[Any]]) -> pa.RecordBatch:
    """``[key, title, genres]`` rows → ``key, title, genres`` strings (genre lists pipe-joined)."""
    keys, titles, genres = zip(*rows)
    genres = ["|".join(str(g) for g in v) if isinstance(v, list) else ("" if v is None else str(v)) for v in genres]
    titles = ["" if t is None else str(t) for t in titles]
    return pa.record_batch([pa.array(keys, pa.string()), pa.array(titles, pa.string()),
                            pa.array(genres, pa.string())], schema=MOVIE_SCHEMA)


def user_batch(rows: list[list[Any]]) -> pa.RecordBatch:
    return pa.record_batch([pa.array([r[0] for r in rows], pa.string())], schema=USER_SCHEMA)


def _strings(values: tuple[Any, ...]) -> pa.Array:
    try:
        return pa.array(values, pa.string())
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return pa.array([v if isinstance(v, str) else None for v in values], pa.string())


def _strip_prefix(values: tuple[Any, ...], prefix: str) -> tuple[pa.Array, np.ndarray]:
    """Keys after ``prefix`` (``Users/``) and a mask of the values that carry it."""
    arr = _strings(values)
    ok = pc.fill_null(pc.starts_with(arr, prefix), False).to_numpy(zero_copy_only=False)
    return pc.utf8_slice_codeunits(arr, len(prefix)), ok


def _ratings(values: tuple[Any, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """float64 ratings plus masks of missing (null/absent) and non-numeric values."""
    if set(map(type, values)) <= {int, float, type(None)}:  # not bool: pyarrow would make True 1.0
        arr = pa.array(values, pa.float64())
        missing = arr.is_null().to_numpy(zero_copy_only=False)
        return pc.fill_null(arr, np.nan).to_numpy(zero_copy_only=False), missing, np.zeros(len(values), bool)
    out = np.full(len(values), np.nan)
    missing = np.zeros(len(values), bool)
    wrong = np.zeros(len(values), bool)
    for i, v in enumerate(values):
        if v is None:
            missing[i] = True
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[i] = v
        else:
            wrong[i] = True
    return out, missing, wrong


def _timestamps(values: tuple[Any, ...]) -> pa.Array:
    """int64 Unix times; values that are not whole numbers become null (the edge is kept)."""
    try:
        return pa.array(values, pa.int64())
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return pa.array([int(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and float(v).is_integer()
                         else None for v in values], pa.int64())


def rating_batch(rows: list[list[Any]], layout: ArangoConfig, report: SkipReport) -> pa.RecordBatch:
    """``[key, _from, _to, rating, timestamp]`` rows → ``RATING_SCHEMA`` rows a shard can use.

    Edges whose ``_from``/``_to`` name another collection, and ratings that are missing or not
    numbers, are counted in ``report`` (each row once, under its first problem) and dropped.
    Unknown vertices and out-of-range ratings are left to ``validate_ratings``.
    """
    keys, froms, tos, ratings, stamps = zip(*rows)
    user_key, ok_from = _strip_prefix(froms, f"{layout.users_collection}/")
    movie_key, ok_to = _strip_prefix(tos, f"{layout.movies_collection}/")
    rating, missing, wrong = _ratings(ratings)
    pending = np.ones(len(keys), bool)
    for reason, bad, expected in (
            ("wrong_from_collection", ~ok_from, f"_from in '{layout.users_collection}'"),
            ("wrong_to_collection", ~ok_to, f"_to in '{layout.movies_collection}'"),
            ("missing_rating", missing, "a rating"),
            ("non_numeric_rating", wrong, "a numeric rating")):
        hit = np.flatnonzero(pending & bad)
        if len(hit):
            i = int(hit[0])
            report.skip(reason, f"{layout.ratings_collection}/{keys[i]}: expected {expected}, got _from="
                                f"{froms[i]!r}, _to={tos[i]!r}, rating={ratings[i]!r}", count=len(hit))
            pending[hit] = False
    keep = pa.array(pending)
    return pa.record_batch([user_key.filter(keep), movie_key.filter(keep), pa.array(rating[pending]),
                            _timestamps(stamps).filter(keep)], schema=RATING_SCHEMA)


# ----------------------------------------------------------------------------- the source


@dataclass
class ArangoSource:
    """The rating graph in ArangoDB, as a ``RatingGraphSource``.

    Checks on construction that the three collections exist with the right types. Reads
    recover from a lost cursor by reopening after the last key received (with backoff from
    ``layout``), so ``write_rating_shards`` sees every row exactly once.

    Args:
        db: The database (see ``scalable_rec.connection.connect``).
        layout: Collection names and retry settings.
        export: Cursor settings and attribute names.
        range_rows: ``LIMIT`` of each key-range query.
    """

    db: StandardDatabase
    layout: ArangoConfig = field(default_factory=ArangoConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    range_rows: int = 1_000_000

    def __post_init__(self) -> None:
        if self.range_rows <= 0:
            raise ValueError(f"'range_rows' needs to be positive (got {self.range_rows})")
        require_collection(self.db, self.layout.users_collection, edge=False)
        require_collection(self.db, self.layout.movies_collection, edge=False)
        require_collection(self.db, self.layout.ratings_collection, edge=True)

    def identity(self) -> dict[str, Any]:
        """What determines the rows read (a resumed export must match it)."""
        e = self.export
        return {"source": "arango", "database": self.db.name, "users": self.layout.users_collection,
                "movies": self.layout.movies_collection, "ratings": self.layout.ratings_collection,
                "attributes": {"rating": e.rating_attribute, "timestamp": e.timestamp_attribute,
                               "title": e.title_attribute, "genres": e.genres_attribute}}

    def config(self) -> dict[str, Any]:
        return {**self.identity(), "export_batch_size": self.export.export_batch_size,
                "export_ttl": self.export.export_ttl}

    def fingerprint(self) -> None:
        return None  # a live database has no content hash; shards are never reused by fingerprint

    @property
    def movie_spec(self) -> ReadSpec:
        return ReadSpec(self.layout.movies_collection, MOVIE_PROJECTION,
                        {"title": self.export.title_attribute, "genres": self.export.genres_attribute})

    @property
    def user_spec(self) -> ReadSpec:
        return ReadSpec(self.layout.users_collection, USER_PROJECTION, {})

    @property
    def rating_spec(self) -> ReadSpec:
        return ReadSpec(self.layout.ratings_collection, RATING_PROJECTION,
                        {"rating": self.export.rating_attribute, "timestamp": self.export.timestamp_attribute})

    def scan(self, spec: ReadSpec, after: str = "", range_rows: int | None = None) -> Prefetcher:
        """Prefetched ``scan_ranges`` chunks of one collection; the caller handles a lost cursor."""
        return Prefetcher(scan_ranges(self.db, spec, after, range_rows or self.range_rows, self.export),
                          self.export.export_prefetch)

    def _rows(self, spec: ReadSpec) -> Iterator[list[list[Any]]]:
        """All rows in key order; a lost cursor is reopened after the last key received."""
        policy: RetryPolicy = self.layout.retry_policy()

        def produce() -> Iterator[list[list[Any]]]:
            after, delays = "", policy.delays()
            while True:
                try:
                    for chunk in scan_ranges(self.db, spec, after, self.range_rows, self.export):
                        after = chunk.last_key
                        if chunk.rows:
                            delays = policy.delays()  # progress: the next failure starts a fresh backoff
                            yield chunk.rows
                    return
                except Exception as err:  # noqa: BLE001 - classified right below
                    if not (is_transient(err) or is_cursor_lost(err)):
                        if isinstance(err, ArangoServerError):
                            raise database_error(err, f"Reading '{spec.collection}'") from err
                        raise
                    delay = next(delays, None)
                    if delay is None:
                        raise database_error(err, f"Reading '{spec.collection}' (gave up after "
                                                  f"{policy.attempts} reopens)") from err
                    log.warning("reading %s: cursor lost (%s); reopening after key %r in %.2fs",
                                spec.collection, err, after, delay)
                    time.sleep(delay)

        with Prefetcher(produce(), self.export.export_prefetch) as rows:
            yield from rows

    def movies(self, report: SkipReport) -> Iterator[pa.RecordBatch]:
        return (movie_batch(rows) for rows in self._rows(self.movie_spec))

    def users(self, report: SkipReport) -> Iterator[pa.RecordBatch]:
        return (user_batch(rows) for rows in self._rows(self.user_spec))

    def ratings(self, report: SkipReport) -> Iterator[pa.RecordBatch]:
        return (rating_batch(rows, self.layout, report) for rows in self._rows(self.rating_spec))
