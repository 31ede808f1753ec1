"""``scalable-rec arango export``: ArangoDB → Arrow shards, checkpointed per shard, resumable.

Each table (movies, users, ratings) is read by ``_key`` ranges of ``max_rows_per_shard`` rows,
one query per range, and each range becomes one part. When a part is on disk its table's
``_progress.json`` records a checkpoint: the last ``_key`` of the range, whether the table is
done, and a copy of the ``SkipReport`` up to there. Part boundaries are therefore fixed by the
data and the shard size alone, not by cursor batches or by where a run was interrupted.

A cursor that dies mid-way (connection reset after python-arango's retries, expired cursor
404/1600, 503) and a killed process take the same road back: ``GraphShardWriter(resume=True)``
keeps the finished parts, the key → index maps are rebuilt from the finished node parts, the
report is restored from the checkpoint and reading continues with ``FILTER v._key > @after``.
Rows after the checkpoint that were in memory are read again, none twice into a shard.
Memory holds the two key maps, one part's rows and the prefetched cursor batches.
"""
from __future__ import annotations

import copy
import logging
import os
import time
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tqdm.auto import tqdm

from scalable_rec.connection import ArangoConfig, connect, database_error, is_cursor_lost, is_transient
from scalable_rec.errors import ConfigError
from scalable_rec.shards import GraphShardWriter, KeyIndex, Manifest, ShardWriter
from scalable_rec.source.arango import (
    MOVIE_SCHEMA, USER_SCHEMA, ArangoSource, ExportConfig, ReadSpec, movie_batch, rating_batch, user_batch,
)
from scalable_rec.source.base import (
    EDGE_SCHEMA, MOVIE, RATES, USER, RatingBounds, keep_latest_per_pair, validate_ratings,
)
from scalable_rec.source.report import SkipReport

log = logging.getLogger(__name__)


class FrozenKeyIndex(KeyIndex):
    """A finished key map whose lookups hash in Arrow (``pc.index_in``).

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
        found = pc.index_in(pa.array(keys, pa.string()) if isinstance(keys, np.ndarray) else keys,
                            value_set=self._values)
        return pc.fill_null(found, -1).to_numpy(zero_copy_only=False).astype(np.int64)


def restore_report(report: SkipReport, saved: dict[str, Any] | None) -> None:
    """Sets ``report`` to a saved ``to_json()`` snapshot (empty when ``saved`` is None)."""
    saved = saved or {}
    report.accepted = dict(saved.get("accepted", {}))
    report.counts = dict(saved.get("skipped", {}))
    report.examples = {k: list(v) for k, v in saved.get("examples", {}).items()}


class _Export:
    """One attempt at the export, continuing from whatever checkpoints ``writer`` holds."""

    def __init__(self, source: ArangoSource, writer: GraphShardWriter, report: SkipReport,
                 bounds: RatingBounds, identity: dict[str, Any], range_rows: int, progress: bool) -> None:
        self.source, self.writer, self.report, self.bounds = source, writer, report, bounds
        self.identity, self.range_rows, self.progress = identity, range_rows, progress
        self.parts_written = 0

    def checkpoint(self, after: str, done: bool) -> dict[str, Any]:
        # A deep copy: the writer keeps this object and may save it again later.
        return {"after": after, "done": done, "identity": self.identity,
                "report": copy.deepcopy(self.report.to_json())}

    def run(self) -> None:
        movie_w = self.writer.node_writer(MOVIE, MOVIE_SCHEMA)
        user_w = self.writer.node_writer(USER, USER_SCHEMA)
        edge_w = self.writer.edge_writer(USER, RATES, MOVIE, EDGE_SCHEMA)
        states = [w.state for w in (movie_w, user_w, edge_w) if w.state]
        for state in states:
            if state.get("identity") != self.identity:
                raise ConfigError(f"Cannot resume '{self.writer.tmp}': it was started with {state.get('identity')}, "
                                  f"this export reads {self.identity}; drop --export-resume to start over")
        restore_report(self.report, states[-1]["report"] if states else None)
        movies = self.nodes(movie_w, self.source.movie_spec, movie_batch, "movies")
        users = self.nodes(user_w, self.source.user_spec, user_batch, "users")
        self.edges(edge_w, FrozenKeyIndex(users.keys), FrozenKeyIndex(movies.keys))
        keep_latest_per_pair(edge_w, self.report)  # idempotent: a resumed run finds nothing left

    def nodes(self, w: ShardWriter, spec: ReadSpec, convert: Callable[[list], pa.RecordBatch],
              what: str) -> KeyIndex:
        index = KeyIndex()
        for table in w.read_finished():
            for key in table.column("key").to_pylist():
                index.add(key)
        state = w.state or {}
        if state.get("done"):
            return index
        with self.source.scan(spec, state.get("after", ""), self.range_rows) as chunks:
            for chunk in chunks:
                if chunk.rows:
                    batch = convert(chunk.rows)
                    for key in batch.column("key").to_pylist():
                        index.add(key)  # _key is unique in a collection and ranges are disjoint
                    w.write(batch, state=self.checkpoint(chunk.last_key, False))
                    assert len(index) == w.num_rows, f"{spec.collection}: a _key was read twice"
                if chunk.range_end:
                    if chunk.exhausted:
                        self.report.accept(what, len(index))
                    self.flush(w, chunk.last_key, chunk.exhausted)
        return index

    def edges(self, w: ShardWriter, users: KeyIndex, movies: KeyIndex) -> None:
        state = w.state or {}
        if state.get("done"):
            return
        spec = self.source.rating_spec
        total = self.source.db.collection(spec.collection).count() if self.progress else None
        with tqdm(total=total, initial=w.num_rows, unit="edge", desc="export ratings",
                  disable=None if self.progress else True) as bar, \
                self.source.scan(spec, state.get("after", ""), self.range_rows) as chunks:
            for chunk in chunks:
                if chunk.rows:
                    batch = rating_batch(chunk.rows, self.source.layout, self.report)
                    edges = validate_ratings(batch, users, movies, self.report, self.bounds, insert_users=False)
                    w.write(edges, state=self.checkpoint(chunk.last_key, False))
                    bar.update(len(chunk.rows))
                if chunk.range_end:
                    self.flush(w, chunk.last_key, chunk.exhausted)

    def flush(self, w: ShardWriter, after: str, done: bool) -> None:
        before = len(w.files)
        w.flush(state=self.checkpoint(after, done))
        self.parts_written += len(w.files) - before


def export_shards(source: ArangoSource, out: str | os.PathLike, report: SkipReport,
                  bounds: RatingBounds = RatingBounds(), max_rows_per_shard: int = 1_000_000,
                  overwrite: bool = False, resume: bool = False, progress: bool = True) -> Manifest:
    """Exports the rating graph into a shard directory that ``scalable-rec train`` reads.

    Node types ``user`` (``key``) and ``movie`` (``key``, ``title``, ``genres``), edge type
    ``user__rates__movie`` with ``EDGE_SCHEMA``; keys are the documents' ``_key`` strings.

    Args:
        source: The database and collections to read.
        out: Final shard directory (written as ``<out>.incomplete`` until complete).
        report: Collects skipped rows; reset to the checkpoint's counts when resuming.
        bounds: Valid rating range.
        max_rows_per_shard: Rows per part and per key-range query.
        overwrite: Replace an existing ``out``.
        resume: Continue ``<out>.incomplete`` after its last finished part.
        progress: Show a progress bar over the ratings.

    Raises:
        DatabaseUnreachableError: The cursor kept dying ``arango_retries`` times in a row
            without a new part being finished.
        MalformedInputError: In strict mode, at the first unusable row.
    """
    identity = {**source.identity(), "rating_bounds": [bounds.min, bounds.max],
                "max_rows_per_shard": max_rows_per_shard}
    config = {**source.config(), "rating_bounds": [bounds.min, bounds.max], "max_rows_per_shard": max_rows_per_shard}
    policy = source.layout.retry_policy()
    delays = policy.delays()
    writer = GraphShardWriter(out, config, max_rows_per_shard, resume=resume, overwrite=overwrite)
    while True:
        attempt = _Export(source, writer, report, bounds, identity, max_rows_per_shard, progress)
        try:
            attempt.run()
            break
        except Exception as err:  # noqa: BLE001 - classified right below
            if not (is_transient(err) or is_cursor_lost(err)):
                raise
            if attempt.parts_written:
                delays = policy.delays()  # progress since the last failure: fresh backoff
            delay = next(delays, None)
            if delay is None:
                raise database_error(err, f"Exporting to '{out}' (gave up after {policy.attempts} "
                                          "attempts without finishing a shard)") from err
            log.warning("export: reading failed (%s); resuming after the last finished shard in %.2fs", err, delay)
            time.sleep(delay)
            writer = GraphShardWriter(out, config, max_rows_per_shard, resume=True, overwrite=overwrite)
    if report.counts:
        log.warning("%s", report.summary())
    return writer.commit(report=report.to_json(), fingerprint="")


def export_command(out: str, layout: ArangoConfig, cfg: ExportConfig, *, strict: bool = False,
                   bounds: RatingBounds = RatingBounds(), max_rows_per_shard: int = 1_000_000,
                   overwrite: bool = False) -> Manifest:
    """Connects with ``layout``'s settings and runs ``export_shards`` (the CLI's entry point)."""
    db = connect(layout.settings())
    source = ArangoSource(db, layout, cfg, range_rows=max_rows_per_shard)
    report = SkipReport(strict=strict)
    t0 = time.perf_counter()
    manifest = export_shards(source, out, report, bounds, max_rows_per_shard, overwrite=overwrite,
                             resume=cfg.export_resume)
    edges = sum(i.num_rows for i in manifest.edge_types.values())
    log.info("export: %d rating edges into %s in %.1fs (%s)", edges, out, time.perf_counter() - t0,
             report.summary())
    return manifest
