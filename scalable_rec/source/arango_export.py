"""``scalable-rec arango export``: ArangoDB → Arrow shards, parallel, verified, resumable.

Each table (movies, users, ratings) is read in hash partitions of ``_key``, on a coordinator
per shard (see ``scalable_rec.source.arango``), ``parallelism`` partitions at a time, one thread and one
stream cursor each. A worker converts its partition's cursor batches to Arrow and spills them
to a temporary IPC file next to the output (memory: one cursor batch and the partition's keys
per worker), checks that no ``_key`` repeats in it, and then, under the export's
lock, writes it as its own parts and records a checkpoint in the table's ``_progress.json``:
the partitions done, the parts that hold them, the rows read and a copy of the
``SkipReport``. Parts written after the last checkpoint (a process killed mid-partition)
are deleted on resume, so a partition is on disk completely or not at all.

Verification, in every mode: node keys go through one key map, so a node key seen twice
(in one partition or across partitions) is an ``ExportVerificationError``; edge keys are
checked per partition (partitions are disjoint by construction); after a table the rows
read must equal the server's ``count()``, which must not have changed during the read.

A cursor that dies (connection reset after python-arango's retries, expired cursor
404/1600, 503) makes its partition be read again, with backoff; a killed process continues
with ``--export-resume`` after its finished partitions. Rows are never read twice into a
shard and never skipped.
"""

from __future__ import annotations

import copy
import gc
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from arango.exceptions import ArangoServerError
from tqdm.auto import tqdm

from scalable_rec.connection import ArangoConfig, connect, database_error
from scalable_rec.errors import ConfigError, ExportVerificationError
from scalable_rec.shards import GraphShardWriter, KeyIndex, Manifest, ShardWriter
from scalable_rec.source.arango import (
    MOVIE_SCHEMA,
    USER_SCHEMA,
    ArangoSource,
    ExportConfig,
    Partition,
    ReadSpec,
    check_count,
    merge_report,
    movie_batch,
    partitions,
    rating_batch,
    user_batch,
)
from scalable_rec.source.base import (
    EDGE_SCHEMA,
    MOVIE,
    RATES,
    USER,
    RatingBounds,
    keep_latest_per_pair,
    validate_ratings,
)
from scalable_rec.source.report import SkipReport

log = logging.getLogger(__name__)


class FrozenKeyIndex(KeyIndex):
    """A finished key map whose lookups hash in Arrow (``pc.index_in``); safe to share between threads.

    ``KeyIndex.lookup`` sorts each batch's keys (``np.unique``), which for Python strings
    is the export's largest client-side cost; node maps are complete before the edges are
    read, so a hash lookup against them gives the same indices.

    Args:
        keys: Node keys in index order.
    """

    def __init__(self, keys: list[str]) -> None:
        super().__init__(keys)
        self._values = pa.array(keys, pa.string())

    def lookup(self, keys: np.ndarray | pa.Array, insert: bool = False) -> np.ndarray:
        if insert:
            raise TypeError("FrozenKeyIndex does not take new keys")
        found = pc.index_in(
            pa.array(keys, pa.string()) if isinstance(keys, np.ndarray) else keys, value_set=self._values
        )
        return pc.fill_null(found, -1).to_numpy(zero_copy_only=False).astype(np.int64)


def restore_report(report: SkipReport, saved: dict[str, Any] | None) -> None:
    """Sets ``report`` to a saved ``to_json()`` snapshot (empty when ``saved`` is None)."""
    saved = saved or {}
    report.accepted = dict(saved.get("accepted", {}))
    report.counts = dict(saved.get("skipped", {}))
    report.examples = {k: list(v) for k, v in saved.get("examples", {}).items()}


def _drop_unrecorded_parts(w: ShardWriter, keep: int) -> None:
    """Deletes parts a killed run wrote after its last checkpoint (a partition half on disk)."""
    for f in w.files[keep:]:
        (w.directory / Path(f.path).name).unlink(missing_ok=True)
    del w.files[keep:]


class _Read:
    """One attempt at one partition: its converted rows spilled to a temporary Arrow file (so a
    worker's memory is one cursor batch plus the partition's keys), its row count and skip report.

    Args:
        path: The spill file (deleted by ``discard``).
        strict: Strict mode of the partition's own ``SkipReport``.
    """

    def __init__(self, path: Path, strict: bool) -> None:
        self.path = path
        self.rows = 0
        self.keys: list[pa.Array] = []
        self.report = SkipReport(strict=strict)
        self._sink: Any = None
        self._file: Any = None
        self._closed = False

    def add(self, batch: pa.RecordBatch) -> None:
        if self._file is None:
            self._sink = pa.OSFile(str(self.path), "wb")
            self._file = pa.ipc.new_file(self._sink, batch.schema)
        self._file.write_batch(batch)

    def close(self) -> None:
        if self._file is not None and not self._closed:
            self._file.close()
            self._sink.close()
        self._closed = True

    def batches(self) -> Iterator[pa.RecordBatch]:
        """The spilled batches, memory-mapped one at a time."""
        if self._file is None:
            return
        reader = pa.ipc.open_file(pa.memory_map(str(self.path), "r"))
        for i in range(reader.num_record_batches):
            yield reader.get_batch(i)

    def discard(self) -> None:
        self.close()
        self.path.unlink(missing_ok=True)


class _Export:
    """Reads every table partition by partition into ``writer``, continuing from its checkpoints."""

    def __init__(
        self,
        source: ArangoSource,
        writer: GraphShardWriter,
        report: SkipReport,
        bounds: RatingBounds,
        identity: dict[str, Any],
        progress: bool,
        spill: Path,
    ) -> None:
        self.source, self.writer, self.report, self.bounds = source, writer, report, bounds
        self.spill = spill
        self.identity, self.progress = identity, progress
        self.lock = threading.Lock()
        self.stop = threading.Event()

    def checkpoint(
        self, w: ShardWriter, count: int, shards: list[str] | None, done: list[int], rows: int, finished: bool
    ) -> dict[str, Any]:
        # A deep copy: the writer keeps this object and may save it again later.
        return {
            "identity": self.identity,
            "partitions": count,
            "shards": shards,
            "done": sorted(done),
            "rows": rows,
            "files": len(w.files),
            "finished": finished,
            "report": copy.deepcopy(self.report.to_json()),
        }

    def plan(self, collection: str, expected: int, state: dict[str, Any]) -> tuple[int, list[str] | None]:
        """The table's partitions: a resumed table keeps its recorded plan (its shards must still exist)."""
        if not state.get("partitions"):
            return self.source.plan(collection, expected, self.source.export.parallelism)
        shards = state.get("shards")
        if shards is not None:
            try:
                now = self.source.list_shards(collection)
            except ArangoServerError as err:
                raise database_error(err, f"Listing the shards of '{collection}' to resume") from err
            if now != shards:
                raise ConfigError(
                    f"Cannot resume '{self.writer.tmp}': '{collection}' was being read shard by shard "
                    f"from {shards}, the server now lists {now}; drop --export-resume to start over"
                )
        return int(state["partitions"]), shards

    def run(self) -> None:
        movie_w = self.writer.node_writer(MOVIE, MOVIE_SCHEMA)
        user_w = self.writer.node_writer(USER, USER_SCHEMA)
        edge_w = self.writer.edge_writer(USER, RATES, MOVIE, EDGE_SCHEMA)
        states = [w.state for w in (movie_w, user_w, edge_w) if w.state]
        for state in states:
            if state.get("identity") != self.identity:
                raise ConfigError(
                    f"Cannot resume '{self.writer.tmp}': it was started with {state.get('identity')}, "
                    f"this export reads {self.identity}; drop --export-resume to start over"
                )
        restore_report(self.report, states[-1]["report"] if states else None)
        movies = self.nodes(movie_w, self.source.movie_spec, movie_batch, "movies")
        users = self.nodes(user_w, self.source.user_spec, user_batch, "users")
        self.edges(edge_w, FrozenKeyIndex(users.keys), FrozenKeyIndex(movies.keys))
        keep_latest_per_pair(edge_w, self.report)  # idempotent: a resumed run finds nothing left

    # -- one table
    def table(
        self,
        w: ShardWriter,
        spec: ReadSpec,
        read: Callable[[Partition], _Read],
        commit: Callable[[_Read], None],
        bar: Any = None,
    ) -> None:
        state = w.state or {}
        if state.get("finished"):
            return
        _drop_unrecorded_parts(w, state.get("files", 0))
        cfg = self.source.export
        expected = self.source.count(spec.collection)
        count, shards = self.plan(spec.collection, expected, state)
        done, rows = list(state.get("done", [])), int(state.get("rows", 0))
        todo = [p for p in partitions(count, shards) if p.ordinal not in set(done)]

        def work(part: Partition) -> None:
            nonlocal rows
            if self.stop.is_set():
                return
            result = read(part)
            try:
                with self.lock:
                    if self.stop.is_set():
                        return
                    commit(result)
                    merge_report(self.report, result.report)
                    for batch in result.batches():
                        w.write(batch)
                    w.flush()
                    done.append(part.ordinal)
                    rows += result.rows
                    w.flush(state=self.checkpoint(w, count, shards, done, rows, False))
                    if bar is not None:
                        bar.update(result.rows)
            finally:
                result.discard()

        with ThreadPoolExecutor(max_workers=cfg.parallelism, thread_name_prefix="arango-export") as pool:
            futures = [pool.submit(work, part) for part in todo]
            finished, _ = wait(futures, return_when=FIRST_EXCEPTION)
            failed = [f for f in finished if f.exception() is not None]
            if failed:
                self.stop.set()
                for f in futures:
                    f.cancel()
                raise failed[0].exception()
        check_count(spec.collection, rows, expected, self.source.count(spec.collection))
        w.flush(state=self.checkpoint(w, count, shards, done, rows, True))

    def partition(
        self, spec: ReadSpec, part: Partition, convert: Callable[[list[list[Any]], SkipReport], pa.RecordBatch]
    ) -> _Read:
        """Reads one partition (retried as a whole) and checks that no ``_key`` repeats in it."""

        def batch(rows: list[list[Any]], out: _Read) -> None:
            out.rows += len(rows)
            out.keys.append(pa.array([r[0] for r in rows], pa.string()))
            out.add(convert(rows, out.report))

        attempts: list[_Read] = []  # a fresh _Read per attempt: nothing of a failed read is kept
        path = self.spill / f"{spec.collection}-{part.ordinal:05d}.arrow"

        def start() -> None:
            if attempts:
                attempts[-1].discard()
            attempts.append(_Read(path, self.report.strict))

        try:
            self.source.read(spec, part, lambda rows: batch(rows, attempts[-1]), on_start=start)
        except BaseException:
            if attempts:
                attempts[-1].discard()
            raise
        out = attempts[-1]
        out.close()
        if out.rows:
            keys = pa.chunked_array(out.keys, pa.string())
            distinct = pc.count_distinct(keys).as_py()
            if distinct != out.rows:
                counts = pc.value_counts(keys)
                repeated = [v["values"] for v in counts.to_pylist() if v["counts"] > 1][:3]
                out.discard()
                raise ExportVerificationError(
                    f"'{spec.collection}' {part.describe()}: {out.rows - distinct} repeated _key(s), e.g. {repeated}"
                )
        out.keys = []
        return out

    def nodes(self, w: ShardWriter, spec: ReadSpec, convert: Callable[[list], pa.RecordBatch], what: str) -> KeyIndex:
        index = KeyIndex()
        for table in w.read_finished():
            for key in table.column("key").to_pylist():
                index.add(key)

        def commit(result: _Read) -> None:
            before = len(index)
            n = 0
            for batch in result.batches():
                for key in batch.column("key").to_pylist():
                    index.add(key)
                n += batch.num_rows
            if len(index) - before != n:
                raise ExportVerificationError(
                    f"'{spec.collection}': {n - (len(index) - before)} _key(s) read twice across partitions"
                )
            result.report.accept(what, n)

        self.table(w, spec, lambda part: self.partition(spec, part, lambda rows, _: convert(rows)), commit)
        return index

    def edges(self, w: ShardWriter, users: KeyIndex, movies: KeyIndex) -> None:
        spec = self.source.rating_spec
        layout = self.source.layout

        def convert(rows: list[list[Any]], report: SkipReport) -> pa.RecordBatch:
            batch = rating_batch(rows, layout, report)
            return validate_ratings(batch, users, movies, report, self.bounds, insert_users=False)

        total = self.source.count(spec.collection) if self.progress else None
        with tqdm(
            total=total,
            initial=(w.state or {}).get("rows", 0),
            unit="edge",
            desc="export ratings",
            disable=None if self.progress else True,
        ) as bar:
            self.table(w, spec, lambda part: self.partition(spec, part, convert), lambda result: None, bar)


@contextmanager
def collector_paused(pause: bool) -> Iterator[None]:
    """Disables Python's cyclic garbage collector inside the block when ``pause`` (and it was
    enabled), enabling it again on the way out, error or not. Reference counting still frees
    the export's batches; only cycles wait until the end."""
    paused = pause and gc.isenabled()
    if paused:
        gc.disable()
    try:
        yield
    finally:
        if paused:
            gc.enable()


def export_shards(
    source: ArangoSource,
    out: str | os.PathLike,
    report: SkipReport,
    bounds: RatingBounds = RatingBounds(),
    max_rows_per_shard: int = 1_000_000,
    overwrite: bool = False,
    resume: bool = False,
    progress: bool = True,
) -> Manifest:
    """Exports the rating graph into a shard directory that ``scalable-rec train`` reads.

    Node types ``user`` (``key``) and ``movie`` (``key``, ``title``, ``genres``), edge type
    ``user__rates__movie`` with ``EDGE_SCHEMA``; keys are the documents' ``_key`` strings.

    Args:
        source: The database and collections to read (``source.export.parallelism`` workers).
        out: Final shard directory (written as ``<out>.incomplete`` until complete).
        report: Collects skipped rows; reset to the checkpoint's counts when resuming.
        bounds: Valid rating range (the same check ``prepare`` applies).
        max_rows_per_shard: Rows per part at most (a partition ends its last part early).
        overwrite: Replace an existing ``out``.
        resume: Continue ``<out>.incomplete`` after its finished partitions.
        progress: Show a progress bar over the ratings.

    Raises:
        DatabaseUnreachableError: A partition's cursor kept dying ``arango_retries`` times in a row.
        ExportVerificationError: Rows read differ from the server's count, or a key repeats.
        MalformedInputError: In strict mode, at the first unusable row.
    """
    identity = {
        **source.identity(),
        "rating_bounds": [bounds.min, bounds.max],
        "max_rows_per_shard": max_rows_per_shard,
    }
    config = {**source.config(), "rating_bounds": [bounds.min, bounds.max], "max_rows_per_shard": max_rows_per_shard}
    writer = GraphShardWriter(out, config, max_rows_per_shard, resume=resume, overwrite=overwrite)
    parent = Path(out).resolve().parent
    with (
        tempfile.TemporaryDirectory(prefix=f".{Path(out).name}.spill-", dir=parent) as spill,
        collector_paused(source.export.pause_gc),
    ):
        _Export(source, writer, report, bounds, identity, progress, Path(spill)).run()
    if report.counts:
        log.warning("%s", report.summary())
    return writer.commit(report=report.to_json(), fingerprint="")


def export_command(
    out: str,
    layout: ArangoConfig,
    cfg: ExportConfig,
    *,
    strict: bool = False,
    bounds: RatingBounds = RatingBounds(),
    max_rows_per_shard: int = 1_000_000,
    overwrite: bool = False,
) -> Manifest:
    """Connects with ``layout``'s settings and runs ``export_shards`` (the CLI's entry point)."""
    db = connect(layout.settings())
    source = ArangoSource(db, layout, cfg)
    report = SkipReport(strict=strict)
    t0 = time.perf_counter()
    manifest = export_shards(
        source, out, report, bounds, max_rows_per_shard, overwrite=overwrite, resume=cfg.export_resume
    )
    edges = sum(i.num_rows for i in manifest.edge_types.values())
    log.info(
        "export: %d rating edges into %s in %.1fs with %d worker(s) (%s)",
        edges,
        out,
        time.perf_counter() - t0,
        cfg.parallelism,
        report.summary(),
    )
    return manifest
