"""ArangoDB sink: idempotent bulk imports, and ranked recommendations written back as edges.

Every write goes through ``import_documents``: ``import_bulk`` with ``on_duplicate="replace"``
and deterministic ``_key``s, so a request repeated after a lost response (python-arango
resends it, and so does ``RetryPolicy``) or a whole re-run replaces documents instead of
duplicating them. The server's created/updated/errors answer is checked against each batch;
every disagreement is logged as it happens and all of them end in one ``WriteMismatchError``
once everything that could be written has been.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import logging
import math
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal

import pyarrow as pa
from arango.collection import StandardCollection
from arango.database import StandardDatabase
from arango.exceptions import ArangoClientError, ArangoServerError

from scalable_rec.connection import ArangoConfig, RetryPolicy, connect, database_error, require_collection
from scalable_rec.errors import CollectionNotFoundError, DatabaseError, WriteMismatchError
from scalable_rec.atomic import write_json_atomic

log = logging.getLogger(__name__)

MAX_LISTED_MISMATCHES = 20
# Fixed JSON overhead of one document beyond its keys' and values' text: braces, quotes,
# colons and commas (7 attributes), used to size batches without serialising twice.
DOC_OVERHEAD_BYTES = 48


@dataclass
class WritebackConfig:
    """Where ranked recommendations go.

    Args:
        sink: ``parquet`` (<run-dir>/recommendations.parquet) or ``arango`` (edges
            Users/<key> → Movie/<key> with score, rank, run_id, created_at).
        inference_collection: Edge collection for ``--sink arango`` (created if missing).
        replace_previous: After this run's edges are written, remove the same users' edges
            from other runs, so no user is ever left without recommendations.
        writeback_batch_docs: Most edges per import request, positive.
        writeback_batch_mb: Most (estimated) MiB per import request, positive.
    """

    sink: Literal["parquet", "arango"] = "parquet"
    inference_collection: str = "Recommendation_Inferences"
    replace_previous: bool = False
    writeback_batch_docs: int = 10_000
    writeback_batch_mb: float = 8.0

    def __post_init__(self) -> None:
        problems = []
        if self.sink not in ("parquet", "arango"):
            problems.append(f"'sink' needs to be 'parquet' or 'arango' (got {self.sink!r})")
        if self.writeback_batch_docs <= 0:
            problems.append(f"'writeback_batch_docs' needs to be positive (got {self.writeback_batch_docs})")
        if self.writeback_batch_mb <= 0:
            problems.append(f"'writeback_batch_mb' needs to be positive (got {self.writeback_batch_mb})")
        if problems:
            raise ValueError("; ".join(problems))


@dataclass
class ImportCounts:
    """What was sent and what the server says it did with it."""

    sent: int = 0
    created: int = 0
    updated: int = 0
    errors: int = 0
    ignored: int = 0
    requests: int = 0
    conflicts_retried: int = 0
    """Documents the server refused with a write-write conflict (1200) and that were sent again."""
    refused_non_finite: int = 0
    """Documents not sent because a value was NaN or infinite (JSON has no such numbers)."""

    def add(self, other: "ImportCounts") -> None:
        for name in ("sent", "created", "updated", "errors", "ignored", "requests", "conflicts_retried",
                     "refused_non_finite"):
            setattr(self, name, getattr(self, name) + getattr(other, name))


def doc_bytes(doc: dict[str, Any]) -> int:
    """Estimated JSON size of a flat document (for sizing batches)."""
    return DOC_OVERHEAD_BYTES + sum(len(k) + len(str(v)) for k, v in doc.items())


def batched(docs: Iterable[dict[str, Any]], max_docs: int, max_bytes: int) -> Iterator[list[dict[str, Any]]]:
    """Groups documents into lists of at most ``max_docs`` and about ``max_bytes`` each."""
    batch: list[dict[str, Any]] = []
    size = 0
    for doc in docs:
        n = doc_bytes(doc)
        if batch and (len(batch) >= max_docs or size + n > max_bytes):
            yield batch
            batch, size = [], 0
        batch.append(doc)
        size += n
    if batch:
        yield batch


_POSITION = re.compile(r"at position (\d+):")


def conflict_positions(details: list[Any]) -> list[int]:
    """Positions of an import's ``details`` lines that report a write-write conflict (1200)."""
    out = []
    for line in details:
        text = str(line)
        match = _POSITION.search(text)
        if match and "conflict" in text and "unique constraint" not in text:
            out.append(int(match.group(1)))
    return out


def non_finite(doc: dict[str, Any]) -> str | None:
    """The first attribute of ``doc`` holding NaN or ±inf, else None."""
    for name, value in doc.items():
        if isinstance(value, float) and not math.isfinite(value):
            return name
    return None


def _finite_only(docs: Iterable[dict[str, Any]], refused: list[str]) -> Iterator[dict[str, Any]]:
    for doc in docs:
        bad = non_finite(doc)
        if bad is None:
            yield doc
        else:
            if len(refused) < MAX_LISTED_MISMATCHES:
                refused.append(f"{doc.get('_key')!r}: {bad}={doc[bad]!r}")
            else:
                refused.append("")


def _send_with_conflict_retry(collection: StandardCollection, batch: list[dict[str, Any]], policy: RetryPolicy,
                              what: str) -> tuple[dict[str, Any], int]:
    """One import request; documents refused with 1200 (write-write conflict) are sent again with
    backoff. Returns the merged answer (counts over all tries) and how many were re-sent."""
    def send(docs: list[dict[str, Any]]) -> dict[str, Any]:
        return policy.call(lambda: collection.import_bulk(docs, halt_on_error=False, details=True,
                                                          on_duplicate="replace"), what)

    result = dict(send(batch))
    retried, delays, pending = 0, policy.delays(), batch
    while True:
        positions = conflict_positions(result.get("details") or [])
        if not positions:
            return result, retried
        delay = next(delays, None)
        if delay is None:
            return result, retried
        pending = [pending[i] for i in positions if i < len(pending)]
        log.warning("%s: %d write-write conflict(s) (1200); sending them again in %.2fs", what, len(pending), delay)
        time.sleep(delay)
        retried += len(pending)
        again = send(pending)
        others = [d for d in result.get("details") or [] if not conflict_positions([d])]
        result = {"created": result.get("created", 0) + again.get("created", 0),
                  "updated": result.get("updated", 0) + again.get("updated", 0),
                  "ignored": result.get("ignored", 0) + again.get("ignored", 0),
                  "errors": result.get("errors", 0) - len(positions) + again.get("errors", 0),
                  "details": list(again.get("details") or []) + others}


def import_documents(collection: StandardCollection, docs: Iterable[dict[str, Any]], policy: RetryPolicy,
                     max_docs: int = 10_000, max_bytes: int = 32 << 20, progress: Any = None) -> ImportCounts:
    """Imports documents idempotently and checks the server's counts for every batch.

    Args:
        collection: Target collection.
        docs: Documents with deterministic ``_key`` (edges with ``_from``/``_to``).
        policy: Backoff for transient failures (503, connection reset, timeouts).
        max_docs: Most documents per request (default 10,000).
        max_bytes: Most estimated bytes per request (default 32 MiB).
        progress: Optional tqdm bar, advanced by the documents of each finished request.

    Raises:
        WriteMismatchError: Some batch's ``created + updated`` differs from what was sent, or
            the server reported errors; raised after all batches, listing the mismatches.
    """
    total, mismatches, refused = ImportCounts(), [], []
    for number, batch in enumerate(batched(_finite_only(docs, refused), max_docs, max_bytes)):
        what = f"import of {len(batch)} documents into '{collection.name}'"
        try:
            result, retried = _send_with_conflict_retry(collection, batch, policy, what)
        except ArangoServerError as err:
            raise database_error(err, what) from err
        counts = ImportCounts(sent=len(batch), created=result.get("created", 0), updated=result.get("updated", 0),
                              errors=result.get("errors", 0), ignored=result.get("ignored", 0), requests=1,
                              conflicts_retried=retried)
        total.add(counts)
        if counts.errors or counts.ignored or counts.created + counts.updated != counts.sent:
            line = (f"request {number} (keys {batch[0].get('_key')!r}..{batch[-1].get('_key')!r}): sent "
                    f"{counts.sent}, server created {counts.created} + updated {counts.updated}, "
                    f"errors {counts.errors}, ignored {counts.ignored}")
            details = result.get("details") or []
            if details:
                line += f"; e.g. {'; '.join(str(d)[:200] for d in details[:3])}"
            log.warning("%s: %s", collection.name, line)
            mismatches.append(line)
        if progress is not None:
            progress.update(len(batch))
    total.refused_non_finite = len(refused)
    if refused:
        log.warning("%s: refused %d documents with NaN/inf values (not valid JSON numbers), e.g. %s",
                    collection.name, len(refused), "; ".join(r for r in refused[:3] if r))
    if mismatches:
        listed = mismatches[:MAX_LISTED_MISMATCHES]
        more = len(mismatches) - len(listed)
        raise WriteMismatchError(
            f"Collection '{collection.name}': {len(mismatches)} of {total.requests} import requests disagree "
            f"with what was sent (sent {total.sent}, created {total.created} + updated {total.updated}, "
            f"errors {total.errors}):\n  " + "\n  ".join(listed) + (f"\n  ... and {more} more" if more else ""))
    return total


def ensure_collection(db: StandardDatabase, name: str, edge: bool) -> StandardCollection:
    """Returns collection ``name``, creating it with the given type if it does not exist."""
    try:
        return require_collection(db, name, edge=edge)
    except CollectionNotFoundError:
        pass
    try:
        db.create_collection(name, edge=edge)
    except ArangoServerError as err:
        if err.error_code != 1207:  # created concurrently by someone else: fine
            raise database_error(err, f"Creating collection '{name}'") from err
    return require_collection(db, name, edge=edge)


def recommendation_key(run_id: str, user: str, movie: str) -> str:
    """Deterministic ``_key`` of one recommendation edge (valid for any key characters)."""
    return hashlib.blake2b(f"{run_id}\x00{user}\x00{movie}".encode(), digest_size=16).hexdigest()


@dataclass
class WritebackResult:
    """Outcome of writing one run's recommendations."""

    run_id: str
    collection: str
    counts: ImportCounts
    users: int
    removed_previous: int = 0


REMOVE_PREVIOUS = ("FOR v IN @@collection FILTER v._from IN @users AND v.run_id != @run_id "
                   "REMOVE v IN @@collection")


def write_recommendations(db: StandardDatabase, batches: Iterable[pa.RecordBatch], layout: ArangoConfig,
                          cfg: WritebackConfig, run_id: str, created_at: str,
                          users_per_remove: int = 1000) -> WritebackResult:
    """Writes ranked ``(user_key, movie_key, score, rank)`` batches as recommendation edges.

    Args:
        db: Target database.
        batches: Ranked record batches (see ``scalable_rec.model.topk``).
        layout: Collection names (``_from`` is ``<users_collection>/<key>``, ``_to`` is
            ``<movies_collection>/<key>``) and retry settings.
        cfg: Target collection, batching and ``replace_previous``.
        run_id: Identifies the model run; part of every ``_key``.
        created_at: Stored on every edge; fixed per run so that a re-run changes nothing.
        users_per_remove: Users per REMOVE query of ``replace_previous``.
    """
    collection = ensure_collection(db, cfg.inference_collection, edge=True)
    policy = layout.retry_policy()
    users: set[str] = set()

    def docs() -> Iterator[dict[str, Any]]:
        for batch in batches:
            user_col = [str(u) for u in batch.column("user_key").to_pylist()]
            users.update(user_col)
            predicted = (batch.column("predicted_rating").to_pylist() if "predicted_rating" in batch.schema.names
                         else [None] * batch.num_rows)
            for user, movie, score, rank, rating in zip(user_col, batch.column("movie_key").to_pylist(),
                                                        batch.column("score").to_pylist(),
                                                        batch.column("rank").to_pylist(), predicted):
                movie = str(movie)
                doc = {"_key": recommendation_key(run_id, user, movie),
                       "_from": f"{layout.users_collection}/{user}", "_to": f"{layout.movies_collection}/{movie}",
                       "score": score, "rank": rank, "run_id": run_id, "created_at": created_at}
                if rating is not None:
                    doc["predicted_rating"] = rating
                yield doc

    counts = import_documents(collection, docs(), policy, cfg.writeback_batch_docs,
                              int(cfg.writeback_batch_mb * (1 << 20)))
    result = WritebackResult(run_id, collection.name, counts, len(users))
    if cfg.replace_previous:
        result.removed_previous = remove_previous_runs(db, collection.name, layout, sorted(users), run_id,
                                                       policy, users_per_remove)
    log.info("writeback: %d recommendation edges for %d users into %s (created %d, updated %d, "
             "removed %d of earlier runs)", counts.sent, len(users), collection.name, counts.created,
             counts.updated, result.removed_previous)
    return result


def remove_previous_runs(db: StandardDatabase, collection: str, layout: ArangoConfig, users: list[str],
                         run_id: str, policy: RetryPolicy, chunk: int = 1000) -> int:
    """Removes edges of ``users`` whose ``run_id`` differs from ``run_id``; returns how many.

    Run only after the new run's edges are in, so every user keeps recommendations throughout.
    Each query is idempotent (a repeat finds nothing more to remove), so it is retried as is.
    """
    removed = 0
    for i in range(0, len(users), chunk):
        handles = [f"{layout.users_collection}/{u}" for u in users[i:i + chunk]]

        def remove(handles: list[str] = handles) -> int:
            cursor = db.aql.execute(REMOVE_PREVIOUS, bind_vars={"@collection": collection, "users": handles,
                                                                "run_id": run_id})
            return int((cursor.statistics() or {}).get("modified", 0))

        try:
            removed += policy.call(remove, f"removing earlier runs' edges from '{collection}'")
        except ArangoServerError as err:
            raise database_error(err, f"Removing earlier runs' edges from '{collection}'") from err
    return removed


def run_timestamp(run_dir: Path) -> str:
    """When the run's model was made (``best.pt``'s mtime), in UTC; now when there is none."""
    ckpt = run_dir / "best.pt"
    when = (_dt.datetime.fromtimestamp(ckpt.stat().st_mtime, _dt.timezone.utc) if ckpt.is_file()
            else _dt.datetime.now(_dt.timezone.utc))
    return when.isoformat(timespec="seconds")


def writeback_run(batches: Iterable[pa.RecordBatch], layout: ArangoConfig, cfg: WritebackConfig,
                  run_dir: str | os.PathLike) -> Path:
    """Connects, writes one run's recommendations and records the outcome in the run directory.

    The run id is the run directory's name, so writing the same run again replaces its edges.
    Returns ``<run_dir>/arango_writeback.json`` (counts and settings, never the password).
    """
    run_dir = Path(run_dir).resolve()
    settings = layout.settings()
    db = connect(settings)
    result = write_recommendations(db, batches, layout, cfg, run_id=run_dir.name,
                                   created_at=run_timestamp(run_dir))
    if result.counts.sent == 0:
        raise DatabaseError(f"No recommendations to write for run '{run_dir.name}' (expected ranked rows, got none)")
    out = run_dir / "arango_writeback.json"
    write_json_atomic(out, {"run_id": result.run_id, "collection": result.collection, "users": result.users,
                            "counts": asdict(result.counts), "removed_previous": result.removed_previous,
                            "server": settings.describe(), "config": asdict(cfg)})
    return out


def check_writable(layout: ArangoConfig, cfg: WritebackConfig) -> None:
    """Before training: resolves the settings (a bad URL or password file fails here),
    connects (credentials, database), and makes sure the recommendation collection exists
    and accepts writes (an empty import: a read-only user gets HTTP 403). Writes no edge."""
    db = connect(layout.settings())
    collection = ensure_collection(db, cfg.inference_collection, edge=True)
    try:
        collection.import_bulk([], on_duplicate="replace")
    except (ArangoServerError, ArangoClientError) as err:
        raise database_error(err, f"Checking write access to collection '{collection.name}'") from err
    log.info("sink: collection %s in %s is writable", collection.name, db.name)


def replace_users(batch: pa.RecordBatch, layout: ArangoConfig, cfg: WritebackConfig, run_dir: str | os.PathLike,
                  tag: str) -> dict[str, Any]:
    """Replaces the recommendation edges of exactly ``batch``'s users (a refresh).

    The new edges get run id ``<run_dir name>-refresh-<tag>`` (deterministic keys, so a
    repeat replaces them), and only then are those users' edges of every other run id
    removed: each user always has recommendations. Other users' edges are not touched.
    """
    run_dir = Path(run_dir).resolve()
    settings = layout.settings()
    result = write_recommendations(connect(settings), [batch], layout, dataclasses.replace(cfg, replace_previous=True),
                                   run_id=f"{run_dir.name}-refresh-{tag}",
                                   created_at=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    return {"run_id": result.run_id, "collection": result.collection, "users": result.users,
            "counts": asdict(result.counts), "removed_previous": result.removed_previous,
            "server": settings.describe()}
