"""ArangoDB source: the rating graph read out by hash partitions of ``_key``, as Arrow batches.

Why partitions and not key ranges. AQL compares strings with the server's ICU collator,
while a shard's primary index iterates in byte order; on a cluster the coordinator merges
the shards' ``SORT v._key`` streams in ICU order. A reader that pages with
``FILTER v._key > @after SORT v._key LIMIT @n`` therefore skips and repeats rows once keys
hold upper case or ``_ : . @`` (``tests/test_arango_cluster.py`` shows it). Nothing here
depends on how the server orders strings: a collection is split into ``P`` partitions by
the first hex digits of ``MD5(_key)``::

    FOR v IN @@collection FILTER SUBSTRING(MD5(v._key), 0, 2) IN @buckets RETURN [...]

(no FILTER when ``P == 1``). Partitions are disjoint and cover the collection whatever the
sharding or collation, because membership is a string equality on a hash. Each partition
is read whole by one stream cursor (``allowRetry``: python-arango re-asks for a batch whose
response was lost) and is the unit of retry, of resume and of parallelism: a partition
whose cursor dies (connection reset after retries, expired cursor 404/1600, 503) is read
again from its start and its rows count only once it is complete. The price is one
server-side scan of the collection per partition; ``P`` is the largest of the parallelism
and ``count / export_partition_rows``, so on a big collection a failure re-reads at most
one partition.

On a coordinator each shard is read on its own instead (``GET /_api/collection/{name}/shards``,
cursor option ``shardIds``, as ArangoDB's Spark datasource does): one scan in all, no ordering
needed; with more partitions wanted than shards, each shard gets ``ceil(P / shards)`` hash
partitions. ``shardIds`` is an internal query option that python-arango 8 cannot pass, so its
request is built through the driver's private ``db.aql._conn`` / ``db.aql._execute``
(``driver_can_restrict_to_shards`` checks they are still there). Before a table is read shard by
shard, one ``LIMIT 1`` read of its first shard checks that the server takes the option.
``per_shard_reads=False``, a refused shard list or option, or changed driver internals (each
logged) keep whole-collection hash partitions. A shard the server no longer knows (500 / errorNum
1521: the collection was dropped, recreated or resharded since its shards were listed) is fatal,
never retried.

Servers before 3.11 have no ``allowRetry``: python-arango re-sends a cursor fetch after a
lost response and the server serves the *next* batch, skipping one. There each partition
is read by a non-stream cursor with ``count``, and a partition whose rows differ from the
server's count is read again (``ServerInfo.legacy_cursors``); that mode cannot skip a
batch unnoticed, at the cost of the server materialising one partition.

``ArangoSource`` follows ``RatingGraphSource`` (``write_rating_shards`` can drive it); the
checkpointed, parallel, verified export into shards is ``scalable_rec.source.arango_export``.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pyarrow as pa
from arango.cursor import Cursor
from arango.database import StandardDatabase
from arango.exceptions import AQLQueryExecuteError, ArangoServerError
from arango.request import Request
from arango.response import Response

from scalable_rec.connection import (
    ArangoConfig,
    RetryPolicy,
    ServerInfo,
    database_error,
    is_cursor_retryable,
    is_transient,
    require_collection,
    server_info,
)
from scalable_rec.errors import DatabaseError, ExportVerificationError
from scalable_rec.source.arango_rows import (  # noqa: F401 - re-exported: the rows of each read
    MOVIE_SCHEMA,
    RATING_SCHEMA,
    USER_SCHEMA,
    movie_batch,
    rating_batch,
    user_batch,
)
from scalable_rec.source.config import ExportConfig  # re-export
from scalable_rec.source.prefetch import Prefetcher
from scalable_rec.source.report import SkipReport

log = logging.getLogger(__name__)
T = TypeVar("T")

FULL_QUERY = "FOR v IN @@collection RETURN [{projection}]"
PARTITION_QUERY = "FOR v IN @@collection FILTER SUBSTRING(MD5(v._key), 0, {width}) IN @buckets RETURN [{projection}]"
MOVIE_PROJECTION = "v._key, v.@title, v.@genres"
USER_PROJECTION = "v._key"
RATING_PROJECTION = "v._key, v._from, v._to, v.@rating, v.@timestamp"
PROBE_QUERY = "FOR v IN @@collection LIMIT @limit RETURN v._key"
MAX_PARTITIONS = 4096  # three hex digits of MD5
UNKNOWN_SHARD = 1521  # ERROR_QUERY_COLLECTION_LOCK_FAILED: no shard of the collection left to lock


@dataclass(frozen=True)
class ReadSpec:
    """One collection read as compact rows."""

    collection: str
    """Bound as ``@@collection``."""
    projection: str
    """Elements of ``RETURN [...]``; the first is always ``v._key``."""
    binds: dict[str, Any]
    """Bind variables of the projection (attribute names)."""


@dataclass(frozen=True)
class Partition:
    """Partition ``index`` of ``count``: the documents whose ``MD5(_key)`` starts with a bucket
    ``b`` (``width`` hex digits) with ``int(b, 16) % count == index``, of the whole collection
    or, with ``shard``, of that shard only (shard ``shard_index`` of ``shards``)."""

    index: int
    count: int
    shard: str | None = None
    shard_index: int = 0
    shards: int = 1

    @property
    def ordinal(self) -> int:
        """Position among the table's partitions (what checkpoints record)."""
        return self.shard_index * self.count + self.index

    def describe(self) -> str:
        where = f" (shard {self.shard}, hash partition {self.index + 1}/{self.count})" if self.shard else ""
        return f"partition {self.ordinal + 1}/{self.shards * self.count}{where}"

    @property
    def width(self) -> int:
        return 2 if self.count <= 256 else 3

    @property
    def buckets(self) -> list[str]:
        width = self.width
        return [f"{b:0{width}x}" for b in range(16**width) if b % self.count == self.index]


def partition_count(rows: int, parallelism: int, partition_rows: int, shards: int = 1) -> int:
    """Hash partitions per shard (of the collection when ``shards`` is 1) for a collection of
    ``rows``: together enough for the workers and for the row target."""
    wanted = max(parallelism, math.ceil(rows / partition_rows))
    return max(1, min(MAX_PARTITIONS, math.ceil(wanted / max(1, shards))))


def partitions(count: int, shards: list[str] | None = None) -> list[Partition]:
    """``count`` hash partitions of the collection, or of each of ``shards``, in ``ordinal`` order."""
    if not 1 <= count <= MAX_PARTITIONS:
        raise ValueError(f"partition count needs to be between 1 and {MAX_PARTITIONS} (got {count})")
    if shards is None:
        return [Partition(i, count) for i in range(count)]
    return [Partition(i, count, shard, j, len(shards)) for j, shard in enumerate(shards) for i in range(count)]


def driver_can_restrict_to_shards(db: StandardDatabase) -> bool:
    """True when python-arango still has the private pieces a ``shardIds`` read is built from:
    ``db.aql._conn`` and ``db.aql._execute(request, response_handler)``."""
    execute, conn = getattr(db.aql, "_execute", None), getattr(db.aql, "_conn", None)
    if conn is None or not callable(execute):
        return False
    try:
        params = list(inspect.signature(execute).parameters)
    except (TypeError, ValueError):
        return False
    return params[:2] == ["request", "response_handler"]


def _open_cursor(
    db: StandardDatabase, query: str, binds: dict[str, Any], cfg: ExportConfig, legacy: bool, shard: str | None
) -> Cursor:
    """``db.aql.execute`` with the export's options; a per-shard read's request (``shardIds``,
    which python-arango 8 cannot pass) is built here."""
    if shard is None:
        return db.aql.execute(
            query,
            bind_vars=binds,
            batch_size=cfg.export_batch_size,
            ttl=cfg.export_ttl,
            stream=not legacy,
            count=legacy,
            fill_block_cache=False,
            allow_retry=not legacy,
        )
    options = {"stream": not legacy, "fillBlockCache": False, "allowRetry": not legacy, "shardIds": [shard]}
    request = Request(
        method="post",
        endpoint="/_api/cursor",
        data={
            "query": query,
            "bindVars": binds,
            "count": legacy,
            "batchSize": cfg.export_batch_size,
            "ttl": cfg.export_ttl,
            "options": options,
        },
    )

    def handler(resp: Response) -> Cursor:
        if not resp.is_success:
            raise AQLQueryExecuteError(resp, request)
        return Cursor(db.aql._conn, resp.body, allow_retry=not legacy)  # noqa: SLF001 - the driver's own path

    return db.aql._execute(request, handler)  # noqa: SLF001


def read_partition(
    db: StandardDatabase, spec: ReadSpec, part: Partition, cfg: ExportConfig, server: ServerInfo
) -> Iterator[list[list[Any]]]:
    """Cursor batches of one partition, in server order (any order).

    Raises:
        ExportVerificationError: (pre-3.11 servers) the rows received differ from the cursor's count.
    """
    binds: dict[str, Any] = {"@collection": spec.collection, **spec.binds}
    if part.count == 1:
        query = FULL_QUERY.format(projection=spec.projection)
    else:
        query = PARTITION_QUERY.format(width=part.width, projection=spec.projection)
        binds["buckets"] = part.buckets
    legacy = server.legacy_cursors
    cursor = _open_cursor(db, query, binds, cfg, legacy, part.shard)
    received = 0
    try:
        while True:
            batch = cursor.batch()
            rows = list(batch)
            batch.clear()
            received += len(rows)
            if rows:
                yield rows
            if not cursor.has_more():
                break
            cursor.fetch()
    finally:
        _close_quietly(cursor)
    if legacy and received != cursor.count():
        raise ExportVerificationError(
            f"Reading {part.describe()} of '{spec.collection}': received {received} rows, "
            f"the server's cursor counted {cursor.count()} (a cursor batch was lost; ArangoDB "
            f"{server.version_text or '(version hidden)'} reads without allowRetry)"
        )


def _close_quietly(cursor: Any) -> None:
    # With allowRetry the cursor outlives its last batch until deleted or its ttl passes.
    # A failed close must not hide the error that ended the read, so it is only logged.
    try:
        cursor.close(ignore_missing=True)
    except Exception as err:  # noqa: BLE001
        log.debug("closing cursor %s failed (it expires with its ttl): %s", cursor.id, err)


def retry_partition(read: Callable[[], T], policy: RetryPolicy, what: str) -> T:
    """Runs ``read`` (one whole partition), starting it over after a lost cursor or connection.

    A partition's rows count only once it was read to its end, so starting over neither loses
    nor repeats a row. ``ExportVerificationError`` (a lost pre-3.11 batch) is also retried.
    """
    delays = policy.delays()
    while True:
        try:
            return read()
        except Exception as err:  # noqa: BLE001 - classified right below
            if not (is_transient(err) or is_cursor_retryable(err) or isinstance(err, ExportVerificationError)):
                if isinstance(err, ArangoServerError) and err.error_code == UNKNOWN_SHARD:
                    raise unknown_shard_error(err, what) from err
                if isinstance(err, ArangoServerError):
                    raise database_error(err, what) from err
                raise
            delay = next(delays, None)
            if delay is None:
                if isinstance(err, ExportVerificationError):
                    raise
                raise database_error(err, f"{what} (gave up after {policy.attempts} re-reads)") from err
            log.warning("%s: %s; reading the partition again in %.2fs", what, err, delay)
            time.sleep(delay)


def unknown_shard_error(err: ArangoServerError, what: str) -> DatabaseError:
    """The named error for 500 / errorNum 1521 on a shard-restricted read."""
    return DatabaseError(
        f"{what}: the server has no such shard any more (HTTP {err.http_code}, errorNum "
        f"{err.error_code}: {err.error_message}); the collection was dropped, recreated or "
        "resharded since its shards were listed. Export again from the start"
    )


# ----------------------------------------------------------------------------- the source


@dataclass
class ArangoSource:
    """The rating graph in ArangoDB, as a ``RatingGraphSource``.

    Checks on construction that the three collections exist with the right types and reads
    the server's version and role (``server``). Reads go partition by partition; a partition
    whose cursor is lost is read again (with backoff from ``layout``) before any of its rows
    are handed on, so ``write_rating_shards`` sees every row exactly once.

    Args:
        db: The database (see ``scalable_rec.connection.connect``).
        layout: Collection names and retry settings.
        export: Cursor settings, parallelism and attribute names.
        server: Version and role (default: asked from the server).
    """

    db: StandardDatabase
    layout: ArangoConfig = field(default_factory=ArangoConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    server: ServerInfo | None = None

    def __post_init__(self) -> None:
        require_collection(self.db, self.layout.users_collection, edge=False)
        require_collection(self.db, self.layout.movies_collection, edge=False)
        require_collection(self.db, self.layout.ratings_collection, edge=True)
        if self.server is None:
            self.server = server_info(self.db)
        if self.server.legacy_cursors:
            log.warning(
                "ArangoDB %s: no cursor allowRetry known, reading each partition with a counted, "
                "non-stream cursor and re-reading it when a batch goes missing",
                self.server.version_text or "(version hidden from this user)",
            )

    def identity(self) -> dict[str, Any]:
        """What determines the rows read (a resumed export must match it)."""
        e = self.export
        return {
            "source": "arango",
            "database": self.db.name,
            "users": self.layout.users_collection,
            "movies": self.layout.movies_collection,
            "ratings": self.layout.ratings_collection,
            "attributes": {
                "rating": e.rating_attribute,
                "timestamp": e.timestamp_attribute,
                "title": e.title_attribute,
                "genres": e.genres_attribute,
            },
        }

    def config(self) -> dict[str, Any]:
        return {
            **self.identity(),
            "export_batch_size": self.export.export_batch_size,
            "export_ttl": self.export.export_ttl,
            "parallelism": self.export.parallelism,
            "server": self.server.describe(),
        }

    def fingerprint(self) -> None:
        return None  # a live database has no content hash; shards are never reused by fingerprint

    @property
    def movie_spec(self) -> ReadSpec:
        return ReadSpec(
            self.layout.movies_collection,
            MOVIE_PROJECTION,
            {"title": self.export.title_attribute, "genres": self.export.genres_attribute},
        )

    @property
    def user_spec(self) -> ReadSpec:
        return ReadSpec(self.layout.users_collection, USER_PROJECTION, {})

    @property
    def rating_spec(self) -> ReadSpec:
        return ReadSpec(
            self.layout.ratings_collection,
            RATING_PROJECTION,
            {"rating": self.export.rating_attribute, "timestamp": self.export.timestamp_attribute},
        )

    def shard_ids(self, collection: str) -> list[str] | None:
        """Sorted shards to read one by one (a coordinator, ``per_shard_reads``, the option taken),
        else None (hash partitions of the whole collection).

        Raises:
            DatabaseError: The server does not know a shard it just listed (errorNum 1521).
        """
        if not (self.server.cluster and self.export.per_shard_reads):
            return None
        fallback = "reading '%s' in hash partitions of the whole collection, one server-side scan each (%s)"
        if not driver_can_restrict_to_shards(self.db):
            log.warning(
                fallback,
                collection,
                "this python-arango has no db.aql._conn / db.aql._execute "
                "(request, response_handler), which cursor option shardIds is sent through",
            )
            return None
        try:
            shards = self.list_shards(collection) or None
        except (ArangoServerError, KeyError, TypeError) as err:
            log.warning(fallback, collection, f"listing the shards of '{collection}' failed: {err}")
            return None
        if shards is None:
            return None
        what = f"Reading shard {shards[0]} of '{collection}' with cursor option shardIds"
        try:
            self.layout.retry_policy().call(lambda: self.probe_shard(collection, shards[0]), what)
        except ArangoServerError as err:
            if err.error_code == UNKNOWN_SHARD:
                raise unknown_shard_error(err, what) from err
            log.warning(fallback, collection, f"the server refused cursor option shardIds: {err}")
            return None
        return shards

    def probe_shard(self, collection: str, shard: str) -> None:
        """Reads at most one key of ``shard`` through the per-shard request path."""
        cursor = _open_cursor(
            self.db,
            PROBE_QUERY,
            {"@collection": collection, "limit": 1},
            dataclasses.replace(self.export, export_batch_size=1),
            self.server.legacy_cursors,
            shard,
        )
        _close_quietly(cursor)

    def list_shards(self, collection: str) -> list[str]:
        """The collection's shard ids, sorted (``GET /_api/collection/{name}/shards``; a coordinator only)."""
        return sorted(str(s) for s in self.db.collection(collection).shards()["shards"])  # list or {id: servers}

    def plan(self, collection: str, rows: int, parallelism: int) -> tuple[int, list[str] | None]:
        """(hash partitions per shard or of the collection, shards or None) for reading ``rows``."""
        shards = self.shard_ids(collection)
        per_shard = partition_count(rows, parallelism, self.export.export_partition_rows, len(shards) if shards else 1)
        return per_shard, shards

    def count(self, collection: str) -> int:
        """The server's document count of ``collection``."""
        try:
            return int(self.db.collection(collection).count())
        except ArangoServerError as err:
            raise database_error(err, f"Counting '{collection}'") from err

    def read(
        self,
        spec: ReadSpec,
        part: Partition,
        consume: Callable[[list[list[Any]]], None],
        on_start: Callable[[], None] = lambda: None,
    ) -> None:
        """Passes every cursor batch of one whole partition to ``consume``.

        The partition is read again from its start after a lost cursor or connection;
        ``on_start`` runs before each attempt, so the caller can drop what a failed one gave.
        """

        def once() -> None:
            on_start()
            with Prefetcher(
                read_partition(self.db, spec, part, self.export, self.server), self.export.export_prefetch
            ) as batches:
                for rows in batches:
                    consume(rows)

        retry_partition(once, self.layout.retry_policy(), f"Reading {part.describe()} of '{spec.collection}'")

    def _batches(
        self, spec: ReadSpec, convert: Callable[..., pa.RecordBatch], report: SkipReport | None = None
    ) -> Iterator[pa.RecordBatch]:
        """Every row of ``spec``'s collection exactly once, checked against the server's count.

        One partition is held in memory at a time (``export_partition_rows``)."""
        expected = self.count(spec.collection)
        count, shards = self.plan(spec.collection, expected, 1)
        read = 0
        for part in partitions(count, shards):
            attempt: dict[str, Any] = {}

            def start() -> None:  # a failed attempt's rows and skips are dropped with it
                attempt.update(batches=[], rows=0, report=None if report is None else SkipReport(strict=report.strict))

            def consume(rows: list[list[Any]]) -> None:
                attempt["rows"] += len(rows)
                attempt["batches"].append(convert(rows) if report is None else convert(rows, attempt["report"]))

            self.read(spec, part, consume, on_start=start)
            if report is not None:
                merge_report(report, attempt["report"])
            read += attempt["rows"]
            yield from attempt["batches"]
        check_count(spec.collection, read, expected, self.count(spec.collection))

    def movies(self, report: SkipReport) -> Iterator[pa.RecordBatch]:
        return self._batches(self.movie_spec, movie_batch)

    def users(self, report: SkipReport) -> Iterator[pa.RecordBatch]:
        return self._batches(self.user_spec, user_batch)

    def ratings(self, report: SkipReport) -> Iterator[pa.RecordBatch]:
        return self._batches(self.rating_spec, lambda rows, rep: rating_batch(rows, self.layout, rep), report)


def merge_report(into: SkipReport, part: SkipReport) -> None:
    """Adds a partition's skip counts and examples to the export's report."""
    for reason, n in part.counts.items():
        into.counts[reason] = into.counts.get(reason, 0) + n
        examples = into.examples.setdefault(reason, [])
        examples.extend(part.examples.get(reason, [])[: max(0, into.max_examples - len(examples))])
    for what, n in part.accepted.items():
        into.accept(what, n)


def check_count(collection: str, read: int, before: int, after: int) -> None:
    """Raises unless ``read`` rows equal the server's count before and after the read."""
    if before != after:
        raise ExportVerificationError(
            f"'{collection}' changed during the export: count() was {before} before and {after} after; "
            "export from a collection nobody writes to"
        )
    if read != before:
        raise ExportVerificationError(
            f"Exported {read} rows of '{collection}', but the server counts {before} "
            f"({'missing' if read < before else 'extra'}: {abs(before - read)})"
        )
