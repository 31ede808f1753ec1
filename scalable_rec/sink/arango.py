"""ArangoDB sink: idempotent bulk imports, and ranked recommendations written back as edges.

Bulk loads go through ``import_documents``: ``import_bulk`` with ``on_duplicate="replace"``
and deterministic ``_key``s, so a request repeated after a lost response (python-arango
resends it, and so does ``RetryPolicy``) or a whole re-run replaces documents instead of
duplicating them. The server's created/updated/errors answer is checked against each batch;
every disagreement is logged as it happens and all of them end in one ``WriteMismatchError``
once everything that could be written has been.

Recommendations (``write_recommendations``) are written a group of users at a time, each group
in one stream transaction: its edges are inserted (replacing same-key edges), then the group's
users' other edges of the same run id are removed (of any run id with ``replace_previous``),
then the transaction commits. After a write a user's edges are exactly this write's, and a
crash leaves each user with either all of the old edges or all of the new ones: an
uncommitted transaction is aborted by the server. ``docs/arango.md`` explains the semantics.
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
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
from arango.collection import StandardCollection
from arango.database import StandardDatabase
from arango.exceptions import ArangoClientError, ArangoServerError

from scalable_rec.atomic import write_json_atomic
from scalable_rec.connection import ArangoConfig, RetryPolicy, connect, database_error, require_collection
from scalable_rec.errors import CollectionNotFoundError, DatabaseError, WriteMismatchError
from scalable_rec.sink.config import WritebackConfig  # re-export

log = logging.getLogger(__name__)

MAX_LISTED_MISMATCHES = 20
# Fixed JSON overhead of one document beyond its keys' and values' text: braces, quotes,
# colons and commas (7 attributes), used to size batches without serialising twice.
DOC_OVERHEAD_BYTES = 48


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

    def add(self, other: ImportCounts) -> None:
        for name in (
            "sent",
            "created",
            "updated",
            "errors",
            "ignored",
            "requests",
            "conflicts_retried",
            "refused_non_finite",
        ):
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


def _is_conflict(line: str) -> bool:
    return "creating document failed" in line and "conflict" in line and "unique constraint" not in line


def conflict_positions(details: list[Any], sent: int) -> list[int]:
    """Request indexes of the documents an import refused with a write-write conflict (1200).

    ``/_api/import`` numbers its ``details`` two ways (``RestImportHandler.cpp``): a document
    that fails validation (not an object, an edge without string ``_from``/``_to``) by its
    1-based position in the request; an insert error, such as a conflict, by its 0-based
    position among the documents that passed validation.

    Args:
        details: The answer's ``details`` lines.
        sent: Documents in the request.
    """
    invalid: set[int] = set()
    conflicts: list[int] = []
    for line in details:
        text = str(line)
        match = _POSITION.search(text)
        if match is None:
            continue
        if "creating document failed" not in text:
            invalid.add(int(match.group(1)) - 1)
        elif _is_conflict(text):
            conflicts.append(int(match.group(1)))
    validated = [i for i in range(sent) if i not in invalid]
    return [validated[p] for p in conflicts if p < len(validated)]


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


def _send_with_conflict_retry(
    collection: StandardCollection, batch: list[dict[str, Any]], policy: RetryPolicy, what: str
) -> tuple[dict[str, Any], int]:
    """One import request; documents refused with 1200 (write-write conflict) are sent again with
    backoff. Returns the merged answer (counts over all tries) and how many were re-sent."""

    def send(docs: list[dict[str, Any]]) -> dict[str, Any]:
        return policy.call(
            lambda: collection.import_bulk(docs, halt_on_error=False, details=True, on_duplicate="replace"), what
        )

    result = dict(send(batch))
    retried, delays, pending, latest = 0, policy.delays(), batch, result.get("details") or []
    while True:
        # Positions refer to the last request only (``pending``), so only its lines are read.
        positions = conflict_positions(latest, len(pending))
        if not positions:
            return result, retried
        delay = next(delays, None)
        if delay is None:
            return result, retried
        pending = [pending[i] for i in positions]
        log.warning("%s: %d write-write conflict(s) (1200); sending them again in %.2fs", what, len(pending), delay)
        time.sleep(delay)
        retried += len(pending)
        again = send(pending)
        latest = again.get("details") or []
        others = [d for d in result.get("details") or [] if not _is_conflict(str(d))]
        result = {
            "created": result.get("created", 0) + again.get("created", 0),
            "updated": result.get("updated", 0) + again.get("updated", 0),
            "ignored": result.get("ignored", 0) + again.get("ignored", 0),
            "errors": result.get("errors", 0) - len(positions) + again.get("errors", 0),
            "details": list(again.get("details") or []) + others,
        }


def import_documents(
    collection: StandardCollection,
    docs: Iterable[dict[str, Any]],
    policy: RetryPolicy,
    max_docs: int = 10_000,
    max_bytes: int = 32 << 20,
    progress: Any = None,
) -> ImportCounts:
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
        counts = ImportCounts(
            sent=len(batch),
            created=result.get("created", 0),
            updated=result.get("updated", 0),
            errors=result.get("errors", 0),
            ignored=result.get("ignored", 0),
            requests=1,
            conflicts_retried=retried,
        )
        total.add(counts)
        if counts.errors or counts.ignored or counts.created + counts.updated != counts.sent:
            line = (
                f"request {number} (keys {batch[0].get('_key')!r}..{batch[-1].get('_key')!r}): sent "
                f"{counts.sent}, server created {counts.created} + updated {counts.updated}, "
                f"errors {counts.errors}, ignored {counts.ignored}"
            )
            details = result.get("details") or []
            if details:
                line += f"; e.g. {'; '.join(str(d)[:200] for d in details[:3])}"
            log.warning("%s: %s", collection.name, line)
            mismatches.append(line)
        if progress is not None:
            progress.update(len(batch))
    total.refused_non_finite = len(refused)
    if refused:
        log.warning(
            "%s: refused %d documents with NaN/inf values (not valid JSON numbers), e.g. %s",
            collection.name,
            len(refused),
            "; ".join(r for r in refused[:3] if r),
        )
    if mismatches:
        listed = mismatches[:MAX_LISTED_MISMATCHES]
        more = len(mismatches) - len(listed)
        raise WriteMismatchError(
            f"Collection '{collection.name}': {len(mismatches)} of {total.requests} import requests disagree "
            f"with what was sent (sent {total.sent}, created {total.created} + updated {total.updated}, "
            f"errors {total.errors}):\n  " + "\n  ".join(listed) + (f"\n  ... and {more} more" if more else "")
        )
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


# ArangoDB's document key alphabet: a handle "<collection>/<key>" with other characters makes the
# server refuse the whole AQL insert, so such edges are refused before sending instead.
_KEY = re.compile(r"^[A-Za-z0-9_\-:.@()+,=;$!*'%]{1,254}$")
REPLACE_EDGES = 'FOR d IN @docs INSERT d INTO @@collection OPTIONS { overwriteMode: "replace" } RETURN OLD._key'
REMOVE_STALE = (
    "FOR v IN @@collection FILTER v._from IN @users AND v.run_id == @run_id AND v.write_id != @write_id "
    "REMOVE v IN @@collection"
)
REMOVE_OTHERS = "FOR v IN @@collection FILTER v._from IN @users AND v.write_id != @write_id REMOVE v IN @@collection"


@dataclass
class WritebackResult:
    """Outcome of writing one run's recommendations."""

    run_id: str
    collection: str
    counts: ImportCounts
    users: int
    removed_previous: int = 0
    """Edges removed: the written users' older edges of this run id (of any run id with
    ``replace_previous``)."""
    write_id: str = ""


@dataclass
class _Group:
    """The edges of some users, written in one transaction."""

    docs: list[dict[str, Any]]
    users: list[str]


def _groups(docs: Iterable[tuple[str, dict[str, Any]]], max_docs: int, max_bytes: int) -> Iterator[_Group]:
    """``(user, edge)`` pairs grouped so that a group ends only where the user changes."""
    group, users, size, last = [], [], 0, None
    for user, doc in docs:
        n = doc_bytes(doc)
        if group and user != last and (len(group) >= max_docs or size + n > max_bytes):
            yield _Group(group, users)
            group, users, size = [], [], 0
        if user != last or not users:
            users.append(user)
        group.append(doc)
        size += n
        last = user
    if group:
        yield _Group(group, users)


def _write_group(
    db: StandardDatabase,
    collection: str,
    group: _Group,
    layout: ArangoConfig,
    run_id: str,
    write_id: str,
    replace_previous: bool,
) -> tuple[int, int]:
    """One stream transaction: insert the group's edges, remove its users' stale ones, commit.
    Returns (edges created, edges removed). Aborted (best effort) on any error; a transaction
    the client never finishes is aborted by the server after its idle timeout."""
    txn = db.begin_transaction(write=[collection])
    try:
        old = list(
            txn.aql.execute(
                REPLACE_EDGES,
                bind_vars={"@collection": collection, "docs": group.docs},
                batch_size=max(1, len(group.docs)),
            )
        )
        handles = [f"{layout.users_collection}/{u}" for u in group.users]
        binds = {"@collection": collection, "users": handles, "write_id": write_id}
        if not replace_previous:
            binds["run_id"] = run_id
        cursor = txn.aql.execute(REMOVE_OTHERS if replace_previous else REMOVE_STALE, bind_vars=binds)
        removed = int((cursor.statistics() or {}).get("modified", 0))
        txn.commit_transaction()
    except BaseException:
        try:
            txn.abort_transaction()
        except Exception as err:  # noqa: BLE001 - the error that ended the group matters more
            log.debug("aborting transaction %s failed (the server aborts it when idle): %s", txn.transaction_id, err)
        raise
    return sum(1 for o in old if o is None), removed


def write_recommendations(
    db: StandardDatabase,
    batches: Iterable[pa.RecordBatch],
    layout: ArangoConfig,
    cfg: WritebackConfig,
    run_id: str,
    created_at: str,
    write_id: str | None = None,
) -> WritebackResult:
    """Writes ranked ``(user_key, movie_key, score, rank)`` batches as recommendation edges.

    Groups of users are written one stream transaction each (``_write_group``): afterwards a
    written user's edges of ``run_id`` are exactly this write's, and a crash never leaves a
    user with part of them. A group that fails transiently is written again as a whole (same
    keys, same ``write_id``: nothing is duplicated or removed twice).

    Args:
        db: Target database.
        batches: Ranked record batches (see ``scalable_rec.model.topk``).
        layout: Collection names (``_from`` is ``<users_collection>/<key>``, ``_to`` is
            ``<movies_collection>/<key>``) and retry settings.
        cfg: Target collection, group sizes and ``replace_previous``.
        run_id: Identifies the model run; part of every ``_key``.
        created_at: Stored on every edge; fixed per run.
        write_id: Identifies this write (default: a fresh random id); stored on every edge.

    Raises:
        WriteMismatchError: Edges were refused before sending (NaN/inf values, keys ArangoDB does
            not allow); raised after every other edge was written.
    """
    collection = ensure_collection(db, cfg.inference_collection, edge=True).name
    policy = layout.retry_policy()
    write_id = write_id or uuid.uuid4().hex
    refused: list[str] = []
    total = ImportCounts()

    def edges() -> Iterator[tuple[str, dict[str, Any]]]:
        for batch in batches:
            user_col = [str(u) for u in batch.column("user_key").to_pylist()]
            predicted = (
                batch.column("predicted_rating").to_pylist()
                if "predicted_rating" in batch.schema.names
                else [None] * batch.num_rows
            )
            for user, movie, score, rank, rating in zip(
                user_col,
                batch.column("movie_key").to_pylist(),
                batch.column("score").to_pylist(),
                batch.column("rank").to_pylist(),
                predicted,
            ):
                movie = str(movie)
                doc = {
                    "_key": recommendation_key(run_id, user, movie),
                    "_from": f"{layout.users_collection}/{user}",
                    "_to": f"{layout.movies_collection}/{movie}",
                    "score": score,
                    "rank": rank,
                    "run_id": run_id,
                    "write_id": write_id,
                    "created_at": created_at,
                }
                if rating is not None:
                    doc["predicted_rating"] = rating
                bad = non_finite(doc)
                reason = (
                    f"{bad}={doc[bad]!r} (not a JSON number)"
                    if bad is not None
                    else None
                    if _KEY.match(user) and _KEY.match(movie)
                    else "a key with characters ArangoDB does not allow in a document key"
                )
                if reason is None:
                    yield user, doc
                else:
                    total.errors += 1
                    total.refused_non_finite += bad is not None
                    if len(refused) < MAX_LISTED_MISMATCHES:
                        refused.append(f"user {user!r} → movie {movie!r}: {reason}")

    users: set[str] = set()
    removed = 0
    for group in _groups(edges(), cfg.writeback_batch_docs, int(cfg.writeback_batch_mb * (1 << 20))):
        what = f"writing {len(group.docs)} recommendation edges of {len(group.users)} users into '{collection}'"
        try:
            created, gone = policy.call(
                lambda g=group: _write_group(db, collection, g, layout, run_id, write_id, cfg.replace_previous), what
            )
        except ArangoServerError as err:
            raise database_error(err, what) from err
        total.add(ImportCounts(sent=len(group.docs), created=created, updated=len(group.docs) - created, requests=1))
        removed += gone
        users.update(group.users)
    result = WritebackResult(run_id, collection, total, len(users), removed, write_id)
    log.info(
        "writeback: %d recommendation edges for %d users into %s (created %d, updated %d, removed %d older ones)",
        total.sent,
        len(users),
        collection,
        total.created,
        total.updated,
        removed,
    )
    if refused:
        raise WriteMismatchError(
            f"Collection '{collection}': refused {total.errors} of {total.sent + total.errors} recommendation edges before "
            f"sending (the other users' edges were written), e.g.:\n  " + "\n  ".join(refused)
        )
    return result


def run_timestamp(run_dir: Path) -> str:
    """When the run's model was made (``best.pt``'s mtime), in UTC; now when there is none."""
    ckpt = run_dir / "best.pt"
    when = _dt.datetime.fromtimestamp(ckpt.stat().st_mtime, _dt.UTC) if ckpt.is_file() else _dt.datetime.now(_dt.UTC)
    return when.isoformat(timespec="seconds")


def writeback_run(
    batches: Iterable[pa.RecordBatch], layout: ArangoConfig, cfg: WritebackConfig, run_dir: str | os.PathLike
) -> Path:
    """Connects, writes one run's recommendations and records the outcome in the run directory.

    The run id is the run directory's name, so writing the same run again replaces its edges.
    Returns ``<run_dir>/arango_writeback.json`` (counts and settings, never the password).
    """
    run_dir = Path(run_dir).resolve()
    settings = layout.settings()
    db = connect(settings)
    result = write_recommendations(db, batches, layout, cfg, run_id=run_dir.name, created_at=run_timestamp(run_dir))
    if result.counts.sent == 0:
        raise DatabaseError(f"No recommendations to write for run '{run_dir.name}' (expected ranked rows, got none)")
    out = run_dir / "arango_writeback.json"
    write_json_atomic(
        out,
        {
            "run_id": result.run_id,
            "collection": result.collection,
            "users": result.users,
            "counts": asdict(result.counts),
            "removed_previous": result.removed_previous,
            "server": settings.describe(),
            "config": asdict(cfg),
        },
    )
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


def replace_users(
    batch: pa.RecordBatch, layout: ArangoConfig, cfg: WritebackConfig, run_dir: str | os.PathLike, tag: str
) -> dict[str, Any]:
    """Replaces the recommendation edges of exactly ``batch``'s users (a refresh).

    The new edges get run id ``<run_dir name>-refresh-<tag>`` (deterministic keys, so a
    repeat replaces them), and only then are those users' edges of every other run id
    removed: each user always has recommendations. Other users' edges are not touched.
    """
    run_dir = Path(run_dir).resolve()
    settings = layout.settings()
    result = write_recommendations(
        connect(settings),
        [batch],
        layout,
        dataclasses.replace(cfg, replace_previous=True),
        run_id=f"{run_dir.name}-refresh-{tag}",
        created_at=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    )
    return {
        "run_id": result.run_id,
        "collection": result.collection,
        "users": result.users,
        "counts": asdict(result.counts),
        "removed_previous": result.removed_previous,
        "server": settings.describe(),
    }
