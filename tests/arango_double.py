"""In-process test double of ArangoDB's HTTP API, driven by the real python-arango 8.x client.

`ArangoDouble` runs a stdlib ``ThreadingHTTPServer`` on 127.0.0.1 (free port, daemon thread) that
answers JSON in the shapes of ArangoDB 3.11/3.12: errors are ``{"error": true, "code": <http>,
"errorNum": N, "errorMessage": "..."}``, successes carry ``"error": false, "code": ...`` where
ArangoDB includes them. The pytest fixtures at the bottom (``arango_double``, ``arango_endpoint``,
``arango_faults``) are meant to be imported into ``tests/conftest.py`` with
``from arango_double import *``.

Modelled:
  * HTTP basic auth on every request (401 / errorNum 11); users are a ``{username: password}`` map.
  * Databases (``/_api/database``, ``/_db/{db}/...``; unknown database 404 / 1228; requests without
    ``/_db/`` go to ``_system``); document and edge collections (1203 / 1207); named graphs
    (``/_api/gharial``, 1924 / 1925; creating a graph creates its missing collections).
  * Documents: single and array insert with ``overwriteMode``; generated numeric-string ``_key``;
    ``_id``; ``_rev``; unique ``_key`` (1210); edge ``_from``/``_to`` must be "collection/key" (1233).
  * ``/_api/import`` with ``type=array|list|documents|auto``, ``onDuplicate``, ``complete``
    (all-or-nothing per request), ``details``, ``overwrite``, ``fromPrefix``/``toPrefix``.
  * AQL cursors: ``batchSize``, idle ``ttl`` (default 30 s), ``count``, ``options.stream`` (results
    are produced lazily, chunk by chunk, from a primary-index style scan, never materialised),
    ``options.allowRetry`` with ``nextBatchId`` and ``POST /_api/cursor/{id}/{batchId}`` (only the
    last delivered batch or the next one), ``DELETE``, legacy ``PUT /_api/cursor/{id}``. A fetch
    that arrives while another request holds the cursor gets 409 / 1601 at once, as
    ``CursorRepository::find`` answers (see ``Faults.drop_connection_after_batches(busy_for=)``).
  * AQL: ONLY these shapes, parsed structurally from tokens (keywords case-insensitive, any loop
    variable name, used consistently), values always from bind variables; anything else is
    400 / 1501 "AQL: syntax error, unexpected ..."::

      FOR v IN @@c [FILTER v._key > @after | FILTER SUBSTRING(MD5(v._key), 0, N) IN @buckets]
          [SORT v._key [ASC]] [LIMIT @limit]
          RETURN expr                                            (missing attributes give null)
          expr: v | v.attr | v.@attr | 'str' | "str" | number | null | true | false | @bind
              | [expr, ...] | {name: expr, 'name': expr, ...} | MERGE(expr, ...) | KEEP(expr, ...)
          (MERGE/KEEP as ArangoDB: see ``_fn_merge``/``_fn_keep``; adbpyg-adapter's
          ``RETURN MERGE({_key: doc._key, _from: doc._from, _to: doc._to}, KEEP(doc, ['a']))``;
          other functions 1540, wrong arity 1541, a non-object argument null + warning 1542)
      FOR v IN @@c [FILTER cond [AND cond ...]]... REMOVE v|v._key IN @@c
          cond: v.attr|v.@attr (== | != | IN) @bind              (result [], stats.writesExecuted)
      RETURN LENGTH(@@c)

    Missing bind var 1551, undeclared bind var 1552, bad bind value 1553, unknown collection
    404 / 1203, variable other than the loop variable 1512. Add a shape by writing one
    ``_shape_*`` function and listing it in ``_SHAPES``.
  * Fault injection through ``ArangoDouble.faults`` (see `Faults`) and a request log
    (``ArangoDouble.requests``, see `RequestLog`).

  * Server switches (``ArangoDouble(version=, role=, shards=, read_only=, hardened=, access=)``):
    ``version`` 3.7 (no ``POST /_api/cursor/{id}``: 405), 3.10
    (cursors ignore ``allowRetry``: no ``nextBatchId``, so python-arango's re-sent fetch skips a
    batch), 3.11 or 3.12 (``/_api/version``); ``hardened``: ``/_api/version`` without ``version``
    for users who are not admins; ``access``: a user limited to some databases gets 401 / 11 for
    any other, existing or not; ``role`` SINGLE or COORDINATOR
    (``/_admin/server/role``); with COORDINATOR every new collection gets ``shards`` shards
    (or its ``numberOfShards``), a document living on shard ``crc32(_key) % shards``; users in
    ``read_only`` get 403 / errorNum 11 "forbidden" for every write.
  * Collation: AQL compares and sorts strings like ICU (``icu_key``: the Unicode Collation
    Algorithm via pyuca, ``a < A < b``, punctuation before digits before letters, ties by code
    point). A single server's primary index iterates in byte order, and a ``_key`` FILTER/SORT
    scan follows it (the optimizer uses the index for both). On a cluster each shard scans in
    byte order and the coordinator merges the shards' streams in ICU order (modelled on a reading
    of the 3.11/3.12 source in issue 10, not checked against a real cluster), so paging by ``_key > @after`` over ``SORT v._key`` skips and repeats rows
    once keys hold upper case or ``_ : . @``.
  * Per-shard reads on a coordinator: ``GET /_api/collection/{name}/shards`` (``{"shards": [ids]}``;
    501 / 1471 on a single server) and the cursor option ``shardIds`` restricting a read's scan
    to those shards (no known id left: 500 / 1521 "Could not identify any shard belonging to
    collection", as read from the coordinator's shard locking; not checked against a real cluster).
    ``ArangoDouble.documents_scanned`` counts documents visited by read scans (``scannedFull`` /
    ``scannedIndex`` count visited documents, ``filtered`` those a FILTER dropped, as ArangoDB).
  * Injected per-document write-write conflicts in ``/_api/import`` (`Faults.conflict_next_imports`).

  * Stream transactions (``/_api/transaction/begin``, commit ``PUT``, abort ``DELETE``, status ``GET``;
    requests carrying ``x-arango-trx-id``: AQL writes and imports). Writes apply at once and are
    undone on abort or by ``ArangoDouble.expire_transactions`` (the server's idle timeout after a
    client died); other readers see them before the commit (no isolation is modelled). Unknown
    transaction 404 / 1655, finished one 410 / 1653.
  * ``FOR d IN @docs INSERT d INTO @@c OPTIONS { overwriteMode: "replace" } RETURN OLD._key``
    (null for a created document; the first invalid document fails the whole query).

Not modelled: JavaScript transactions, indexes other than the primary index and edge-attribute checks,
revision checks (``If-Match`` and ``_rev`` are ignored), JWT, per-collection permissions,
cluster failover, ``shardIds`` on anything but a FOR ... RETURN read, snapshots (a stream cursor sees writes made while
it is open), views, AQL beyond the shapes above (``collection.all()``/``find()`` and
functions other than ``MERGE``/``KEEP``; ``keys()``/``ids()`` work). pyuca implements
DUCET, not ICU's CLDR root tailoring; they agree on ASCII. Plain full scans run in insertion
order (shard after shard on a cluster), so forgetting ``SORT`` is not hidden by accident. Import ``details`` positions
follow the server: validation errors (not an object, an edge without string ``_from``/``_to``)
by 1-based position in the request, insert errors by 0-based position among the documents that
passed validation (read from ``RestImportHandler.cpp``). ``nextBatchId`` follows 3.11 (only with allowRetry);
a response carries the cursor ``id`` only while ``hasMore`` is true, except that with allowRetry the
cursor outlives its last batch (until DELETE or ttl) and every batch carries the ``id``.
"""

from __future__ import annotations

import base64
import bisect
import dataclasses
import hashlib
import heapq
import itertools
import json
import os
import re
import socket
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Iterator
from functools import lru_cache
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, NoReturn
from urllib.parse import parse_qsl, unquote, urlsplit

import pytest
import pyuca

__all__ = [
    "ArangoDouble",
    "ArangoEndpoint",
    "Faults",
    "RequestLog",
    "RequestRecord",
    "arango_double",
    "arango_endpoint",
    "arango_faults",
]

DEFAULT_USERS = {"root": "test-password"}
SERVER_VERSIONS = ("3.7", "3.10", "3.11", "3.12")
_CHUNK = 1000  # documents read from a collection per lock acquisition by lazy scans
_KEY_RE = re.compile(r"^[A-Za-z0-9_\-:.@()+,=;$!*'%]{1,254}$")
_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_\-]{0,255}$")
_HANDLE_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*/[A-Za-z0-9_\-:.@()+,=;$!*'%]{1,254}$")
_CURSOR_FETCH_RE = re.compile(r"^/_api/cursor/[^/]+(/[^/]+)?$")


class ApiError(Exception):
    """An ArangoDB error response.

    Args:
        status: HTTP status code.
        error_num: ArangoDB ``errorNum``.
        message: ArangoDB ``errorMessage``.
    """

    def __init__(self, status: int, error_num: int, message: str) -> None:
        super().__init__(f"[HTTP {status}][ERR {error_num}] {message}")
        self.status, self.error_num, self.message = status, error_num, message

    def body(self) -> dict:
        return {"error": True, "code": self.status, "errorNum": self.error_num, "errorMessage": self.message}


def _flag(query: dict, name: str, default: bool = False) -> bool:
    value = query.get(name)
    return default if value is None else value.lower() in ("1", "true", "yes", "on")


_COLLATOR = pyuca.Collator()


@lru_cache(maxsize=1 << 20)
def icu_key(text: str) -> tuple:
    """ICU-like collation key of ``text`` (Unicode Collation Algorithm, DUCET, via pyuca).

    ArangoDB compares AQL strings with its ICU collator (language ``en``/root), which sorts
    ``a < A < b < B`` and puts ``_ : . @ -`` before digits and letters, unlike byte order;
    strings with equal collation keys fall back to code point order (a total order).
    """
    return (_COLLATOR.sort_key(text), text)


def _aql_key(value: Any) -> tuple:
    """Equality key following AQL's type order: null < bool < number < string < array < object.

    Orderings of strings (the coordinator's merge) use `icu_key` instead."""
    if value is None:
        return (0, 0)
    if isinstance(value, bool):
        return (1, value)
    if isinstance(value, (int, float)):
        return (2, value)
    if isinstance(value, str):
        return (3, value)  # equality and IN only: ICU equality is code point equality here
    if isinstance(value, list):
        return (4, tuple(_aql_key(v) for v in value))
    return (5, tuple(sorted((k, _aql_key(v)) for k, v in value.items())))


def _merge(old: dict, new: dict, keep_null: bool = True, merge_objects: bool = True) -> dict:
    out = dict(old)
    for key, value in new.items():
        if value is None and not keep_null:
            out.pop(key, None)
        elif merge_objects and isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value, keep_null, merge_objects)
        else:
            out[key] = value
    return out


# ----------------------------------------------------------------------------- storage


class _Collection:
    """Documents of one collection, with a lazily sorted key list (primary index) and an
    append-only insertion log (document order); scans never hold the lock between chunks.

    With ``shards > 1`` (a cluster) each document lives on shard ``crc32(_key) % shards``;
    each shard's primary index iterates in byte order and a ``_key``-ordered scan is the
    coordinator's merge of the shards' streams in ICU order (see `key_scan`).
    """

    def __init__(self, name: str, edge: bool, ident: str, shards: int = 1) -> None:
        self.name, self.edge, self.id, self.shards = name, edge, ident, shards
        self.truncate()

    def truncate(self) -> None:
        self.docs: dict[str, dict] = {}
        self._sorted: list[str] | None = []
        self._shard_sorted: list[list[str]] | None = None
        self._log: list[str | None] = []
        self._slot: dict[str, int] = {}

    def shard_of(self, key: str) -> int:
        return zlib.crc32(key.encode()) % self.shards

    def shard_ids(self) -> list[str]:
        """Shard names as ``GET /_api/collection/{name}/shards`` lists them (``s<number>``)."""
        return [f"s{int(self.id) * 1000 + i}" for i in range(self.shards)]

    def shard_numbers(self, ids: Any) -> list[int] | None:
        """``options.shardIds`` → this collection's shard numbers (None: no restriction)."""
        if ids is None:
            return None
        names = self.shard_ids()
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise ApiError(400, 10, f"expecting an array of shard id strings for shardIds, got {ids!r}")
        known = [i for i in ids if i in names]
        if not known:
            # As the coordinator does: the restriction leaves the collection without a shard, and
            # locking it fails (Aql/QuerySnippet / EngineInfoContainer: "Could not identify any shard").
            raise ApiError(
                500, 1521, f"Could not identify any shard belonging to collection: {self.name}. Maybe it is dropped?"
            )
        return sorted(names.index(i) for i in known)

    def info(self) -> dict:
        return {
            "id": self.id,
            "name": self.name,
            "type": 3 if self.edge else 2,
            "status": 3,
            "statusString": "loaded",
            "isSystem": False,
            "globallyUniqueId": f"h{self.id}/{self.name}",
            "error": False,
            "code": 200,
        }

    def put(self, doc: dict) -> None:
        key = doc["_key"]
        if key not in self.docs:
            self._slot[key] = len(self._log)
            self._log.append(key)
            if self._sorted is not None and (not self._sorted or key > self._sorted[-1]):
                self._sorted.append(key)
            else:
                self._sorted = None
            self._shard_sorted = None
        self.docs[key] = doc

    def remove(self, key: str) -> None:
        del self.docs[key]
        self._log[self._slot.pop(key)] = None
        self._sorted = None
        self._shard_sorted = None

    def sorted_keys(self) -> list[str]:
        if self._sorted is None:
            self._sorted = sorted(self.docs)
        return self._sorted

    def shard_sorted_keys(self, shard: int) -> list[str]:
        if self._shard_sorted is None:
            per: list[list[str]] = [[] for _ in range(self.shards)]
            for key in self.sorted_keys():
                per[self.shard_of(key)].append(key)
            self._shard_sorted = per
        return self._shard_sorted[shard]

    def _range_scan(self, lock: threading.RLock, keys_of: Callable[[], list[str]], after: str | None) -> Iterator[dict]:
        last = after
        while True:
            with lock:
                keys = keys_of()
                start = 0 if last is None else bisect.bisect_right(keys, last)
                chunk_keys = keys[start : start + _CHUNK]
                chunk = [self.docs[k] for k in chunk_keys]
            if not chunk:
                return
            last = chunk_keys[-1]
            yield from chunk

    def key_scan(self, lock: threading.RLock, after: str | None, only: list[int] | None = None) -> Iterator[dict]:
        """Documents with ``_key > after`` (all when None), one chunk per lock.

        Single server: one byte-ordered primary-index range scan. Cluster: every shard runs
        that scan in byte order and the coordinator merges the streams by AQL (ICU) order,
        as issue 10 reads ArangoDB's GatherNode for ``SORT v._key``; the two orders disagree once
        upper case or ``_ : . @`` appear in keys.
        """
        if self.shards == 1:
            yield from self._range_scan(lock, self.sorted_keys, after)
            return
        streams = [
            self._range_scan(lock, lambda s=s: self.shard_sorted_keys(s), after)
            for s in (range(self.shards) if only is None else only)
        ]
        yield from heapq.merge(*streams, key=lambda doc: icu_key(doc["_key"]))

    def insertion_scan(self, lock: threading.RLock, only: list[int] | None = None) -> Iterator[dict]:
        """All documents in insertion order (shard after shard on a cluster; ``only`` these
        shards when given), one chunk per lock."""
        with lock:
            log = self._log
        for shard in range(self.shards) if only is None else only:
            pos = 0
            while True:
                with lock:
                    chunk = [
                        self.docs[k]
                        for k in log[pos : pos + _CHUNK]
                        if k in self.docs and (self.shards == 1 or self.shard_of(k) == shard)
                    ]
                    pos += _CHUNK
                    done = pos >= len(log)
                yield from chunk
                if done:
                    break


class _Database:
    def __init__(self, name: str, ident: str) -> None:
        self.name, self.id = name, ident
        self.collections: dict[str, _Collection] = {}
        self.graphs: dict[str, dict] = {}

    def collection(self, name: str) -> _Collection:
        try:
            return self.collections[name]
        except KeyError:
            raise ApiError(404, 1203, "collection or view not found") from None


@dataclasses.dataclass
class _Transaction:
    """A stream transaction: its writes are applied at once and undone on abort (no isolation)."""

    id: str
    db: str
    write: frozenset
    status: str = "running"
    undo: list = dataclasses.field(default_factory=list)  # (collection, key, previous doc or None)

    def rollback(self) -> None:
        for coll, key, old in reversed(self.undo):
            if old is None:
                if key in coll.docs:
                    coll.remove(key)
            else:
                coll.put(old)
        self.undo.clear()


class _State:
    """All databases, the users and the tick generator; one re-entrant lock guards it all."""

    def __init__(
        self,
        users: dict[str, str],
        version: str = "3.11",
        role: str = "SINGLE",
        shards: int = 1,
        read_only: frozenset = frozenset(),
        hardened: bool = False,
        admins: frozenset = frozenset({"root"}),
        access: dict | None = None,
    ) -> None:
        self.lock = threading.RLock()
        self.users = dict(users)
        self.version, self.role, self.shards, self.read_only = version, role, shards, read_only
        self.hardened, self.admins = hardened, admins
        self.access = {u: frozenset(dbs) for u, dbs in (access or {}).items()}
        self._ticks = itertools.count(1_000_000)
        self.databases = {"_system": _Database("_system", "1")}
        self.transactions: dict[str, _Transaction] = {}
        self.scanned = 0  # documents visited by AQL read scans, all queries together

    def counted(self, docs: Iterator[dict], stats: dict, counter: str) -> Iterator[dict]:
        """``docs``, counting each visited document in ``stats[counter]`` and in ``scanned``."""
        n = 0
        try:
            for doc in docs:
                n += 1
                stats[counter] += 1
                yield doc
        finally:
            with self.lock:
                self.scanned += n

    def tick(self) -> str:
        return str(next(self._ticks))

    def revision(self) -> str:
        return f"_r{next(self._ticks):x}-"

    def database(self, name: str) -> _Database:
        try:
            return self.databases[name]
        except KeyError:
            raise ApiError(404, 1228, "database not found") from None

    @property
    def post_fetch(self) -> bool:
        """``POST /_api/cursor/{id}`` fetches the next batch (3.8 and later; before, only PUT)."""
        return tuple(int(x) for x in self.version.split(".")[:2]) >= (3, 8)

    @property
    def allow_retry(self) -> bool:
        """Cursors honour ``allowRetry`` / ``nextBatchId`` (ArangoDB 3.11 and later)."""
        return tuple(int(x) for x in self.version.split(".")[:2]) >= (3, 11)

    def create_collection(self, db: _Database, name: Any, edge: bool, shards: Any = None) -> _Collection:
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise ApiError(400, 1208, f"illegal name: expected a collection name, got {name!r}")
        if name in db.collections:
            raise ApiError(409, 1207, "duplicate name")
        if self.role != "COORDINATOR":
            shards = 1
        elif shards is None:
            shards = self.shards
        elif isinstance(shards, bool) or not isinstance(shards, int) or shards < 1:
            raise ApiError(400, 10, f"invalid numberOfShards: expected a positive integer, got {shards!r}")
        db.collections[name] = coll = _Collection(name, edge, self.tick(), shards)
        return coll

    def prepare(self, coll: _Collection, raw: Any, from_prefix: str = "", to_prefix: str = "") -> dict:
        """Validate one incoming document and return it with ``_key``, ``_id`` and ``_rev`` set."""
        if not isinstance(raw, dict):
            raise ApiError(400, 1227, "invalid document type")
        doc = {k: v for k, v in raw.items() if k not in ("_id", "_rev")}
        if coll.edge:
            for attr, prefix in (("_from", from_prefix), ("_to", to_prefix)):
                value = doc.get(attr)
                if prefix and isinstance(value, (str, int)) and "/" not in str(value):
                    doc[attr] = value = prefix + str(value)
                if not isinstance(value, str) or not _HANDLE_RE.match(value):
                    raise ApiError(400, 1233, "edge attribute missing or invalid")
        key = doc.setdefault("_key", self.tick())
        if not isinstance(key, str) or not _KEY_RE.match(key):
            raise ApiError(400, 1221, "illegal document key")
        doc["_id"], doc["_rev"] = f"{coll.name}/{key}", self.revision()
        return doc


# ----------------------------------------------------------------------------- AQL

_KEYWORDS = {
    "FOR",
    "IN",
    "FILTER",
    "SORT",
    "LIMIT",
    "RETURN",
    "REMOVE",
    "AND",
    "OR",
    "NOT",
    "ASC",
    "DESC",
    "LET",
    "COLLECT",
    "INSERT",
    "UPDATE",
    "REPLACE",
    "UPSERT",
    "WITH",
    "INTO",
    "NULL",
    "TRUE",
    "FALSE",
    "DISTINCT",
    "OPTIONS",
    "WINDOW",
    "PRUNE",
    "SEARCH",
}
_TOKEN_RE = re.compile(
    r"""
    (?P<skip>\s+|//[^\n]*|/\*.*?\*/)
  | (?P<bind>@@?[A-Za-z_][A-Za-z0-9_]*)
  | (?P<name>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<op>==|!=|<=|>=|[<>.,\[\](){}:])
  | (?P<number>\d+(?:\.\d+)?)
  | (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')
  | (?P<other>.)""",
    re.X | re.S,
)


@dataclasses.dataclass(frozen=True)
class _Tok:
    kind: str
    text: str
    pos: int


class _Mismatch(Exception):
    def __init__(self, index: int, expected: str) -> None:
        super().__init__(expected)
        self.index, self.expected = index, expected


class _Parser:
    """Token cursor used by the shape functions; records bind parameters and variable uses."""

    def __init__(self, query: str) -> None:
        self.toks = [
            _Tok(m.lastgroup, m.group(), m.start()) for m in _TOKEN_RE.finditer(query) if m.lastgroup != "skip"
        ]
        self.i = 0
        self.binds: dict[str, None] = {}  # bindVars keys in order of appearance ("@c" for @@c)
        self.loop_var: str | None = None
        self.var_uses: list[str] = []

    def peek(self) -> _Tok | None:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def fail(self, expected: str) -> NoReturn:
        raise _Mismatch(self.i, expected)

    def keyword(self, word: str) -> bool:
        tok = self.peek()
        if tok is not None and tok.kind == "name" and tok.text.upper() == word:
            self.i += 1
            return True
        return False

    def expect_keyword(self, word: str) -> None:
        if not self.keyword(word):
            self.fail(word)

    def op(self, symbol: str) -> bool:
        tok = self.peek()
        if tok is not None and tok.kind == "op" and tok.text == symbol:
            self.i += 1
            return True
        return False

    def expect_op(self, symbol: str) -> None:
        if not self.op(symbol):
            self.fail(f"'{symbol}'")

    def bind(self, collection: bool = False) -> str:
        tok = self.peek()
        at = "@@" if collection else "@"
        if tok is None or tok.kind != "bind" or tok.text.startswith("@@") != collection:
            self.fail(f"{at}parameter")
        self.i += 1
        key = tok.text[1:]  # "@@c" -> "@c", "@x" -> "x"
        self.binds.setdefault(key)
        return key

    def name(self) -> str:
        tok = self.peek()
        if tok is None or tok.kind != "name" or tok.text.upper() in _KEYWORDS:
            self.fail("identifier")
        self.i += 1
        return tok.text

    def variable(self) -> str:
        name = self.name()
        self.var_uses.append(name)
        return name

    def attribute(self) -> tuple[str, bool]:
        """``v.name`` or ``v.@bind`` -> (attribute name or bind key, is_bind)."""
        self.variable()
        self.expect_op(".")
        tok = self.peek()
        if tok is not None and tok.kind == "bind" and not tok.text.startswith("@@"):
            return self.bind(), True
        if tok is None or tok.kind != "name":
            self.fail("attribute name")
        self.i += 1
        return tok.text, False

    def fixed_attribute(self, attr: str) -> None:
        self.variable()
        self.expect_op(".")
        tok = self.peek()
        if tok is None or tok.text != attr:
            self.fail(attr)
        self.i += 1

    def end(self) -> None:
        if self.peek() is not None:
            self.fail("end of query")


def _for_head(p: _Parser) -> tuple[str, str]:
    p.expect_keyword("FOR")
    var = p.loop_var = p.name()
    p.expect_keyword("IN")
    return var, p.bind(collection=True)


@dataclasses.dataclass
class _Run:
    results: Iterator[Any]
    stats: dict
    warnings: list = dataclasses.field(default_factory=list)
    """``{"code", "message"}`` entries, filled while results are produced (``extra.warnings``)."""


def _new_stats() -> dict:
    return {
        "writesExecuted": 0,
        "writesIgnored": 0,
        "scannedFull": 0,
        "scannedIndex": 0,
        "filtered": 0,
        "httpRequests": 0,
        "executionTime": 0.0,
        "peakMemoryUsage": 0,
    }


def _bind_error(key: str) -> ApiError:
    return ApiError(400, 1553, f"AQL: bind parameter '{key}' has an invalid value or type (while parsing)")


def _bound_collection(db: _Database, binds: dict, key: str) -> _Collection:
    name = binds[key]
    if not isinstance(name, str):
        raise _bind_error(key)
    if name not in db.collections:
        raise ApiError(404, 1203, f"AQL: collection or view not found: {name} (while parsing)")
    return db.collections[name]


def _attr_name(binds: dict, attr: tuple[str, bool]) -> str:
    name, is_bind = attr
    if is_bind and not isinstance(binds[name], str):
        raise _bind_error(name)
    return binds[name] if is_bind else name


def _md5_prefix(key: str, width: int) -> str:
    return hashlib.md5(key.encode()).hexdigest()[:width]


@dataclasses.dataclass
class _ReadPlan:
    coll: str
    after: str | None
    sort: bool
    limit: str | None
    projection: Any  # None (whole document), (attr, is_bind), a list of those, or an _Expr
    buckets: tuple[int, str] | None = None  # FILTER SUBSTRING(MD5(v._key), 0, width) IN @buckets

    def run(self, state: _State, db: _Database, binds: dict, shard_ids: Any = None) -> _Run:
        coll, stats = _bound_collection(db, binds, self.coll), _new_stats()
        only = coll.shard_numbers(shard_ids)
        limit = None if self.limit is None else binds[self.limit]
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
            raise _bind_error(self.limit)
        warnings: list = []
        project = self._projector(binds, warnings)
        if self.after is None and not self.sort:
            docs, counter = coll.insertion_scan(state.lock, only), "scannedFull"
        else:  # primary-index range scan; AQL type order: every string > null/bool/number
            after, rank = None, 0
            if self.after is not None:
                rank = _aql_key(binds[self.after])[0]
                after = binds[self.after] if rank == 3 else None
            docs = iter(()) if rank > 3 else coll.key_scan(state.lock, after, only)
            counter = "scannedIndex"
        docs = state.counted(docs, stats, counter)

        if self.buckets is not None:
            width, key = self.buckets
            wanted = binds[key]
            if not isinstance(wanted, list):
                raise _bind_error(key)
            wanted_set = set(w for w in wanted if isinstance(w, str))
            unfiltered = docs

            def bucket_filter() -> Iterator[dict]:
                for d in unfiltered:
                    if _md5_prefix(d["_key"], width) in wanted_set:
                        yield d
                    else:
                        stats["filtered"] += 1

            docs = bucket_filter()

        def produce() -> Iterator[Any]:
            for doc in itertools.islice(docs, limit):
                yield project(doc)

        return _Run(produce(), stats, warnings)

    def _projector(self, binds: dict, warnings: list) -> Callable[[dict], Any]:
        if self.projection is None:
            return lambda doc: doc
        if isinstance(self.projection, tuple):
            name = _attr_name(binds, self.projection)
            return lambda doc: doc.get(name)
        if isinstance(self.projection, list):
            names = [_attr_name(binds, attr) for attr in self.projection]
            return lambda doc: [doc.get(n) for n in names]
        return _evaluator(self.projection, binds, warnings)


@dataclasses.dataclass
class _RemovePlan:
    coll: str
    conditions: list  # [((attr, is_bind), op, bind_key)]
    target: str

    def run(self, state: _State, db: _Database, binds: dict, undo: list | None = None) -> _Run:
        source, target = _bound_collection(db, binds, self.coll), _bound_collection(db, binds, self.target)
        tests = [self._test(_attr_name(binds, attr), op, binds[key]) for attr, op, key in self.conditions]
        stats = _new_stats()
        with state.lock:
            scanned = len(source.docs)
            victims = [k for k, d in source.docs.items() if all(t(d) for t in tests)]
            missing = [k for k in victims if k not in target.docs]
            if missing:
                raise ApiError(404, 1202, f"AQL: document not found: {missing[0]} (while executing)")
            for key in victims:
                if undo is not None:
                    undo.append((target, key, target.docs[key]))
                target.remove(key)
        stats.update(scannedFull=scanned, writesExecuted=len(victims), filtered=scanned - len(victims))
        return _Run(iter(()), stats)

    @staticmethod
    def _test(name: str, op: str, value: Any) -> Callable[[dict], bool]:
        if op == "IN":
            wanted = {_aql_key(v) for v in value} if isinstance(value, list) else set()
            return lambda doc: _aql_key(doc.get(name)) in wanted
        expected = _aql_key(value)
        if op == "==":
            return lambda doc: _aql_key(doc.get(name)) == expected
        return lambda doc: _aql_key(doc.get(name)) != expected


@dataclasses.dataclass
class _InsertPlan:
    docs: str
    coll: str

    def run(self, state: _State, db: _Database, binds: dict, undo: list | None = None) -> _Run:
        coll, docs = _bound_collection(db, binds, self.coll), binds[self.docs]
        if not isinstance(docs, list):
            raise _bind_error(self.docs)
        with state.lock:  # AQL fails the whole query at the first bad document; nothing is applied
            prepared = [state.prepare(coll, raw) for raw in docs]
            olds = []
            for doc in prepared:
                old = coll.docs.get(doc["_key"])
                if undo is not None:
                    undo.append((coll, doc["_key"], old))
                coll.put(doc)
                olds.append(None if old is None else old["_key"])
        stats = _new_stats()
        stats.update(writesExecuted=len(prepared))
        return _Run(iter(olds), stats)


@dataclasses.dataclass
class _LengthPlan:
    coll: str

    def run(self, state: _State, db: _Database, binds: dict) -> _Run:
        coll = _bound_collection(db, binds, self.coll)
        with state.lock:
            return _Run(iter([len(coll.docs)]), _new_stats())


@dataclasses.dataclass(frozen=True)
class _Expr:
    """A RETURN expression that is not a plain projection: a tree of ``("var",)``,
    ``("attr", (name, is_bind))``, ``("value", v)``, ``("bind", key)``, ``("array", [node])``,
    ``("object", [(key, node)])`` and ``("call", NAME, [node])`` nodes."""

    tree: tuple


_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "b": "\b", "f": "\f"}


def _string_literal(text: str) -> str:
    """AQL ``'...'`` or ``"..."`` → its value (backslash escapes as in JSON, plus ``\\'``)."""

    def unescape(m: re.Match) -> str:
        esc = m.group(1)
        if esc.startswith("u") and len(esc) == 5:
            return chr(int(esc[1:], 16))
        return _ESCAPES.get(esc, esc)

    return re.sub(r"\\(u[0-9A-Fa-f]{4}|.)", unescape, text[1:-1], flags=re.S)


def _warn(warnings: list, function: str) -> None:
    if len(warnings) < 10:  # ArangoDB's default maxWarningCount
        warnings.append({"code": 1542, "message": f"invalid argument type in call to function '{function}()'"})


def _fn_merge(args: list, warnings: list) -> Any:
    """MERGE(doc1, doc2, ...) or MERGE([doc1, ...]): shallow, later attributes win (nulls too);
    an argument that is not an object gives null and warning 1542."""
    if len(args) == 1 and isinstance(args[0], list):
        args = args[0]
    out: dict = {}
    for doc in args:
        if not isinstance(doc, dict):
            _warn(warnings, "MERGE")
            return None
        out.update(doc)
    return out


def _fn_keep(args: list, warnings: list) -> Any:
    """KEEP(doc, name, ...) or KEEP(doc, [names]): only the named attributes that exist (a
    missing one is left out, not null); names that are not strings are ignored; a first
    argument that is not an object gives null and warning 1542."""
    doc, names = args[0], args[1:]
    if not isinstance(doc, dict):
        _warn(warnings, "KEEP")
        return None
    if len(names) == 1 and isinstance(names[0], list):
        names = names[0]
    wanted = {n for n in names if isinstance(n, str)}
    return {k: v for k, v in doc.items() if k in wanted}


# name -> (implementation, minimum arguments, maximum arguments)
_FUNCTIONS: dict[str, tuple[Callable[[list, list], Any], int, int]] = {
    "MERGE": (_fn_merge, 1, 65536),
    "KEEP": (_fn_keep, 2, 65536),
}


def _expression(p: _Parser) -> tuple:
    """One RETURN expression: loop variable, attribute, literal, bind value, array, object,
    or a call of a function in ``_FUNCTIONS`` (unknown functions: 1540, wrong arity: 1541)."""
    tok = p.peek()
    if tok is None:
        p.fail("expression")
    if p.op("["):
        return ("array", _expression_list(p, "]"))
    if p.op("{"):
        pairs = []
        if not p.op("}"):
            while True:
                key = p.peek()
                if (
                    key is None
                    or key.kind not in ("name", "string")
                    or (key.kind == "name" and key.text.upper() in _KEYWORDS)
                ):
                    p.fail("attribute name")
                p.i += 1
                p.expect_op(":")
                pairs.append((key.text if key.kind == "name" else _string_literal(key.text), _expression(p)))
                if p.op("}"):
                    break
                p.expect_op(",")
        return ("object", pairs)
    if tok.kind == "string":
        p.i += 1
        return ("value", _string_literal(tok.text))
    if tok.kind == "number":
        p.i += 1
        return ("value", float(tok.text) if "." in tok.text else int(tok.text))
    if tok.kind == "bind" and not tok.text.startswith("@@"):
        return ("bind", p.bind())
    if tok.kind == "name" and tok.text.upper() in ("NULL", "TRUE", "FALSE"):
        p.i += 1
        return ("value", {"NULL": None, "TRUE": True, "FALSE": False}[tok.text.upper()])
    after = p.toks[p.i + 1] if p.i + 1 < len(p.toks) else None
    if tok.kind == "name" and after is not None and after.text == "(" and tok.text.upper() not in _KEYWORDS:
        name = tok.text.upper()
        if name not in _FUNCTIONS:
            raise ApiError(400, 1540, f"AQL: usage of unknown function '{tok.text}()' (while parsing)")
        p.i += 2
        args = _expression_list(p, ")")
        _, least, most = _FUNCTIONS[name]
        if not least <= len(args) <= most:
            raise ApiError(
                400,
                1541,
                f"AQL: invalid number of arguments for function '{name}()', expected "
                f"number of arguments: minimum: {least}, maximum: {most} (while parsing)",
            )
        return ("call", name, args)
    start = p.i
    p.variable()
    nxt = p.peek()
    if nxt is not None and nxt.text == ".":
        p.i = start
        return ("attr", p.attribute())
    return ("var",)


def _expression_list(p: _Parser, close: str) -> list:
    """Comma-separated expressions up to ``close`` (which may follow at once)."""
    items: list = []
    if p.op(close):
        return items
    while True:
        items.append(_expression(p))
        if p.op(close):
            return items
        p.expect_op(",")


def _simple_projection(tree: tuple) -> Any:
    """The read plan's fast forms: None (``v``), ``(attr, is_bind)`` (``v.a``), a list of those
    (``[v.a, v.@b]``); any other expression as an `_Expr`."""
    if tree[0] == "var":
        return None
    if tree[0] == "attr":
        return tree[1]
    if tree[0] == "array" and tree[1] and all(item[0] == "attr" for item in tree[1]):
        return [item[1] for item in tree[1]]
    return _Expr(tree)


def _evaluator(expr: _Expr, binds: dict, warnings: list) -> Callable[[dict], Any]:
    """Compiles an `_Expr` (bind values resolved once) into ``doc -> value``."""

    def build(node: tuple) -> Callable[[dict], Any]:
        kind = node[0]
        if kind == "var":
            return lambda doc: doc
        if kind == "attr":
            name = _attr_name(binds, node[1])
            return lambda doc: doc.get(name)
        if kind in ("value", "bind"):
            value = node[1] if kind == "value" else binds[node[1]]
            return lambda doc: value
        if kind == "array":
            items = [build(n) for n in node[1]]
            return lambda doc: [f(doc) for f in items]
        if kind == "object":
            pairs = [(k, build(n)) for k, n in node[1]]
            return lambda doc: {k: f(doc) for k, f in pairs}
        impl = _FUNCTIONS[node[1]][0]
        args = [build(n) for n in node[2]]
        return lambda doc: impl([f(doc) for f in args], warnings)

    return build(expr.tree)


def _shape_read(p: _Parser) -> _ReadPlan:
    """FOR v IN @@c [FILTER v._key > @after | FILTER SUBSTRING(MD5(v._key), 0, N) IN @buckets]
    [SORT v._key [ASC]] [LIMIT @limit] RETURN ..."""
    var, coll = _for_head(p)
    after = limit = buckets = None
    if p.keyword("FILTER"):
        if p.keyword("SUBSTRING"):
            p.expect_op("(")
            p.expect_keyword("MD5")
            p.expect_op("(")
            p.fixed_attribute("_key")
            p.expect_op(")")
            p.expect_op(",")
            tok = p.peek()
            if tok is None or tok.text != "0":
                p.fail("0")
            p.i += 1
            p.expect_op(",")
            tok = p.peek()
            if tok is None or tok.kind != "number" or not tok.text.isdigit():
                p.fail("number")
            p.i += 1
            p.expect_op(")")
            p.expect_keyword("IN")
            buckets = (int(tok.text), p.bind())
        else:
            p.fixed_attribute("_key")
            p.expect_op(">")
            after = p.bind()
    sort = p.keyword("SORT")
    if sort:
        p.fixed_attribute("_key")
        p.keyword("ASC")
    if p.keyword("LIMIT"):
        limit = p.bind()
    p.expect_keyword("RETURN")
    projection = _simple_projection(_expression(p))
    p.end()
    return _ReadPlan(coll, after, sort, limit, projection, buckets)


def _shape_remove(p: _Parser) -> _RemovePlan:
    """FOR v IN @@c [FILTER cond [AND cond]...]... REMOVE v|v._key IN @@c"""
    _, coll = _for_head(p)
    conditions = []
    while p.keyword("FILTER"):
        while True:
            attr = p.attribute()
            if p.keyword("IN"):
                op = "IN"
            elif p.op("=="):
                op = "=="
            elif p.op("!="):
                op = "!="
            else:
                p.fail("'==', '!=' or IN")
            conditions.append((attr, op, p.bind()))
            if not p.keyword("AND"):
                break
    p.expect_keyword("REMOVE")
    p.variable()
    if p.op("."):
        tok = p.peek()
        if tok is None or tok.text != "_key":
            p.fail("_key")
        p.i += 1
    p.expect_keyword("IN")
    target = p.bind(collection=True)
    p.end()
    return _RemovePlan(coll, conditions, target)


def _shape_insert(p: _Parser) -> _InsertPlan:
    """FOR d IN @docs INSERT d INTO @@c OPTIONS { overwriteMode: "replace" } RETURN OLD._key"""
    p.expect_keyword("FOR")
    p.loop_var = p.name()
    p.expect_keyword("IN")
    docs = p.bind()
    p.expect_keyword("INSERT")
    p.variable()
    p.expect_keyword("INTO")
    coll = p.bind(collection=True)
    p.expect_keyword("OPTIONS")
    p.expect_op("{")
    for expected in ("overwriteMode", ":", '"replace"', "}"):
        tok = p.peek()
        text = None if tok is None else (_string_literal(tok.text) if tok.kind == "string" else tok.text)
        if text != expected.strip('"'):
            p.fail(expected)
        p.i += 1
    p.expect_keyword("RETURN")
    for expected in ("OLD", ".", "_key"):
        tok = p.peek()
        if tok is None or tok.text != expected:
            p.fail(expected)
        p.i += 1
    p.end()
    return _InsertPlan(docs, coll)


def _shape_length(p: _Parser) -> _LengthPlan:
    """RETURN LENGTH(@@c)"""
    p.expect_keyword("RETURN")
    p.expect_keyword("LENGTH")
    p.expect_op("(")
    coll = p.bind(collection=True)
    p.expect_op(")")
    p.end()
    return _LengthPlan(coll)


_SHAPES: list[Callable[[_Parser], Any]] = [_shape_read, _shape_remove, _shape_insert, _shape_length]


def compile_query(query: str, bind_vars: dict) -> Any:
    """Match ``query`` against the supported shapes and check its bind variables.

    Args:
        query: AQL query text.
        bind_vars: ``bindVars`` of the request (collection parameters keyed ``"@name"``).

    Returns:
        The plan of the matching shape (has ``run(state, db, binds) -> _Run``).

    Raises:
        ApiError: 1501 for unsupported syntax, 1512, 1551 or 1552 as ArangoDB would.
    """
    if not query.strip():
        raise ApiError(400, 1502, "query is empty")
    best: _Mismatch | None = None
    for shape in _SHAPES:
        parser = _Parser(query)
        try:
            plan = shape(parser)
        except _Mismatch as miss:
            best = miss if best is None or miss.index > best.index else best
            continue
        for name in parser.var_uses:
            if name != parser.loop_var:
                raise ApiError(400, 1512, f"AQL: unknown variable '{name}' (while parsing)")
        for key in parser.binds:
            if key not in bind_vars:
                raise ApiError(
                    400, 1551, f"AQL: no value specified for declared bind parameter '{key}' (while parsing)"
                )
        for key in bind_vars:
            if key not in parser.binds:
                raise ApiError(400, 1552, f"AQL: bind parameter '{key}' was not declared in the query (while parsing)")
        return plan
    toks = _Parser(query).toks
    tok = toks[best.index] if best.index < len(toks) else None
    offset = len(query) if tok is None else tok.pos
    line = query.count("\n", 0, offset) + 1
    column = offset - (query.rfind("\n", 0, offset) + 1) + 1
    if tok is None:
        what = "end of query"
    elif tok.kind == "name":
        what = f"{tok.text.upper()} keyword" if tok.text.upper() in _KEYWORDS else "identifier"
    else:
        what = {"bind": "bind parameter", "number": "number", "string": "quoted string"}.get(tok.kind, f"'{tok.text}'")
    raise ApiError(
        400,
        1501,
        f"AQL: syntax error, unexpected {what}, expecting {best.expected} "
        f"near '{query[offset : offset + 40]}' at position {line}:{column} "
        f"(while parsing)",
    )


# ----------------------------------------------------------------------------- cursors

_END = object()


class _Cursor:
    """Server-side cursor; pulls results lazily from ``results`` with one item of look-ahead."""

    def __init__(
        self,
        ident: str,
        db: str,
        results: Iterator[Any],
        stats: dict,
        *,
        batch_size: int,
        ttl: float,
        allow_retry: bool,
        count: int | None,
        warnings: list | None = None,
    ) -> None:
        self.id, self.db, self.stats = ident, db, stats
        self.warnings = [] if warnings is None else warnings
        self.batch_size, self.ttl, self.allow_retry, self.count = batch_size, ttl, allow_retry, count
        self._source = results
        self._ahead = next(results, _END)
        self.batch_id = 0
        self.last_batch: list | None = None
        self.stored = False
        self.lock = threading.Lock()
        self.touch()

    @property
    def has_more(self) -> bool:
        return self._ahead is not _END

    def touch(self) -> None:
        self.expires_at = time.monotonic() + self.ttl

    def advance(self) -> list:
        batch = []
        while self._ahead is not _END and len(batch) < self.batch_size:
            batch.append(self._ahead)
            self._ahead = next(self._source, _END)
        self.batch_id += 1
        self.last_batch = batch if self.allow_retry else None
        return batch

    def body(self, batch: list, code: int) -> dict:
        body: dict = {"result": batch, "hasMore": self.has_more}
        if self.has_more or (self.stored and self.allow_retry):
            body["id"] = self.id
        if self.allow_retry and self.has_more:
            body["nextBatchId"] = self.batch_id + 1
        if self.count is not None:
            body["count"] = self.count
        body.update(
            cached=False, extra={"stats": dict(self.stats), "warnings": list(self.warnings)}, error=False, code=code
        )
        return body


class _CursorRegistry:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cursors: dict[str, _Cursor] = {}

    def add(self, cursor: _Cursor) -> None:
        with self._lock:
            now = time.monotonic()
            for ident in [i for i, c in self._cursors.items() if c.expires_at <= now]:
                del self._cursors[ident]
            self._cursors[cursor.id] = cursor
            cursor.stored = True

    def get(self, db: str, ident: str) -> _Cursor:
        with self._lock:
            cursor = self._cursors.get(ident)
            if cursor is not None and cursor.expires_at <= time.monotonic():
                del self._cursors[ident]
                cursor = None
        if cursor is None or cursor.db != db:
            raise ApiError(404, 1600, "cursor not found")
        return cursor

    def remove(self, ident: str) -> bool:
        with self._lock:
            return self._cursors.pop(ident, None) is not None

    def remove_all(self) -> int:
        with self._lock:
            count = len(self._cursors)
            self._cursors.clear()
            return count


# ----------------------------------------------------------------------------- faults and log


@dataclasses.dataclass
class RequestRecord:
    """One request as the double saw it.

    Args:
        method: HTTP method ("GET", "POST", ...).
        path: Raw URL path without the query string (may start with ``/_db/{db}``).
        db: Database the request addressed.
        api_path: ``path`` without the ``/_db/{db}`` prefix, e.g. ``/_api/import``.
        query: Query parameters (last value wins).
        body_bytes: Size of the (decompressed) request body.
        body_items: Number of elements when the body was a JSON array, else None.
        status: HTTP status answered; None when the connection was dropped.
        dropped: True when the double closed the connection instead of answering.
        transaction: The stream transaction named by the ``x-arango-trx-id`` header, if any.
    """

    method: str
    path: str
    db: str
    api_path: str
    query: dict
    body_bytes: int
    body_items: int | None = None
    status: int | None = None
    dropped: bool = False
    transaction: str | None = None


class RequestLog:
    """Thread-safe, append-only list of `RequestRecord`; iterate, index, or filter it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._records: list[RequestRecord] = []

    def append(self, record: RequestRecord) -> None:
        with self._lock:
            self._records.append(record)

    def matching(self, method: str | None = None, path_prefix: str | None = None) -> list[RequestRecord]:
        """Records whose method equals ``method`` and whose ``api_path`` (or raw ``path``) starts
        with ``path_prefix``; None matches anything."""
        with self._lock:
            records = list(self._records)
        return [
            r
            for r in records
            if (method is None or r.method == method.upper())
            and (path_prefix is None or r.api_path.startswith(path_prefix) or r.path.startswith(path_prefix))
        ]

    def clear(self) -> None:
        with self._lock:
            self._records.clear()

    def __iter__(self) -> Iterator[RequestRecord]:
        return iter(self.matching())

    def __len__(self) -> int:
        with self._lock:
            return len(self._records)

    def __getitem__(self, index: int) -> RequestRecord:
        with self._lock:
            return self._records[index]


@dataclasses.dataclass
class _Rule:
    kind: str  # "fail" | "drop" | "delay"
    remaining: int | None  # None: until cleared
    method: str | None = None
    prefix: str | None = None
    after_batches: int | None = None  # only cursor fetches, once this many batches were served
    error: ApiError | None = None
    lose_response: bool = False
    seconds: float = 0.0

    def matches(self, record: RequestRecord, batches: int) -> bool:
        if self.method is not None and record.method != self.method.upper():
            return False
        if self.prefix is not None and not (
            record.api_path.startswith(self.prefix) or record.path.startswith(self.prefix)
        ):
            return False
        if self.after_batches is not None:
            return (
                record.method in ("POST", "PUT")
                and bool(_CURSOR_FETCH_RE.match(record.api_path))
                and batches >= self.after_batches
            )
        return True


@dataclasses.dataclass
class _Decision:
    delay: float = 0.0
    fail: ApiError | None = None
    drop_before: bool = False
    drop_after: bool = False
    busy_for: float = 0.0


class Faults:
    """Thread-safe fault injection; rules apply to requests in arrival order.

    Path prefixes match the database-relative API path (``/_api/import``) or the raw path
    (``/_db/x/_api/import``). A "cursor batch" is any batch a cursor delivers: the first one in
    ``POST /_api/cursor`` and every later fetch or re-fetch. Note that python-arango itself retries
    a request up to 3 times when the connection fails or when the answer is 503 with errorNum 503.
    """

    def __init__(self, cursors: _CursorRegistry) -> None:
        self._lock = threading.Lock()
        self._cursors = cursors
        self._rules: list[_Rule] = []
        self._batches = 0
        self._expire_at: list[int] = []
        self._conflicts: list[set[int]] = []

    @property
    def batches_served(self) -> int:
        with self._lock:
            return self._batches

    def fail_next(
        self,
        path_prefix: str,
        status: int = 503,
        *,
        times: int = 1,
        error_num: int | None = None,
        message: str | None = None,
        method: str | None = None,
    ) -> None:
        """Answer the next ``times`` matching requests with an error, without performing them.

        Args:
            path_prefix: API path prefix, e.g. ``"/_api/import"``.
            status: HTTP status (default 503).
            times: How many matching requests fail.
            error_num: ``errorNum`` (default: ``status``, as ArangoDB does for HTTP-level errors).
            message: ``errorMessage`` (default: the lower-case HTTP reason, "service unavailable").
            method: Only requests with this HTTP method.
        """
        error = ApiError(
            status, status if error_num is None else error_num, message or HTTPStatus(status).phrase.lower()
        )
        self._add(_Rule("fail", times, method, path_prefix, error=error))

    def drop_next(
        self, path_prefix: str, *, times: int = 1, method: str | None = None, lose_response: bool = False
    ) -> None:
        """Close the TCP connection of the next ``times`` matching requests without answering.

        Args:
            path_prefix: API path prefix.
            times: How many matching requests are dropped.
            method: Only requests with this HTTP method.
            lose_response: False: drop before the double acts. True: perform the request, then
                drop (the response is lost in transit; the write or cursor advance happened).
        """
        self._add(_Rule("drop", times, method, path_prefix, lose_response=lose_response))

    def drop_connection_after_batches(
        self, n: int, *, times: int = 1, lose_response: bool = True, busy_for: float = 0.0
    ) -> None:
        """Once ``n`` more cursor batches have been served (across cursors), drop the connection of
        the next ``times`` cursor fetch requests (``POST``/``PUT /_api/cursor/{id}[/{batchId}]``).

        Args:
            n: Batches to serve first, counted from now.
            times: How many fetch requests are dropped.
            lose_response: True (default): the server advances the cursor and the response is
                lost, the failure ``allowRetry`` exists for; False: the request is dropped unread.
            busy_for: With ``lose_response``: the connection drops at once while the server goes on
                working on the fetch, holding the cursor for this many seconds, so that the
                driver's immediate re-send finds it busy (409 / 1601).
        """
        with self._lock:
            self._rules.append(
                _Rule("drop", times, after_batches=self._batches + n, lose_response=lose_response, seconds=busy_for)
            )

    def delay(
        self, seconds: float, path_prefix: str | None = None, *, times: int | None = None, method: str | None = None
    ) -> None:
        """Wait ``seconds`` before answering matching requests (all, when ``path_prefix`` is None).

        Args:
            seconds: Delay per request.
            path_prefix: API path prefix or None for every request.
            times: How many requests are delayed (None: until `clear`).
            method: Only requests with this HTTP method.
        """
        self._add(_Rule("delay", times, method, path_prefix, seconds=seconds))

    def conflict_next_imports(self, positions: int | list[int], *, times: int = 1) -> None:
        """The next ``times`` ``/_api/import`` requests report a write-write conflict (errorNum
        1200, in ``details``, counted in ``errors``, document not written) for the documents at
        ``positions`` (a count: the first that many), inside an otherwise successful 201 answer.
        """
        chosen = list(range(positions)) if isinstance(positions, int) else list(positions)
        with self._lock:
            self._conflicts.extend([set(chosen)] * times)

    def _take_conflicts(self, n: int) -> set[int]:
        with self._lock:
            return {p for p in self._conflicts.pop(0) if p < n} if self._conflicts else set()

    def expire_cursors(self) -> int:
        """Make every open cursor vanish now; returns how many there were."""
        return self._cursors.remove_all()

    def expire_cursor_after_batches(self, n: int) -> None:
        """The cursor that serves the ``n``-th batch from now vanishes right after serving it."""
        with self._lock:
            self._expire_at.append(self._batches + n)

    def clear(self) -> None:
        """Remove every pending rule."""
        with self._lock:
            self._rules.clear()
            self._expire_at.clear()
            self._conflicts.clear()

    def _add(self, rule: _Rule) -> None:
        with self._lock:
            self._rules.append(rule)

    def _decide(self, record: RequestRecord) -> _Decision:
        decision = _Decision()
        with self._lock:
            for rule in self._rules:
                if rule.remaining == 0 or not rule.matches(record, self._batches):
                    continue
                if rule.kind == "delay":
                    decision.delay += rule.seconds
                elif rule.kind == "fail" and decision.fail is None and not decision.drop_before:
                    decision.fail = rule.error
                elif (
                    rule.kind == "drop" and decision.fail is None and not (decision.drop_before or decision.drop_after)
                ):
                    decision.drop_after, decision.drop_before = rule.lose_response, not rule.lose_response
                    decision.busy_for = rule.seconds if rule.lose_response else 0.0
                else:
                    continue
                rule.remaining = None if rule.remaining is None else rule.remaining - 1
            self._rules = [r for r in self._rules if r.remaining != 0]
        return decision

    def _batch_served(self, cursor_id: str) -> None:
        with self._lock:
            self._batches += 1
            due = [at for at in self._expire_at if at <= self._batches]
            self._expire_at = [at for at in self._expire_at if at > self._batches]
        if due:
            self._cursors.remove(cursor_id)


# ----------------------------------------------------------------------------- HTTP API


@dataclasses.dataclass
class _Request:
    record: RequestRecord
    db: _Database
    params: dict
    raw: bytes
    user: str = ""
    txn: _Transaction | None = None

    def json(self) -> Any:
        try:
            body = json.loads(self.raw) if self.raw.strip() else None
        except ValueError as err:
            raise ApiError(400, 600, f"VPackError error: expecting valid JSON, got: {err}") from None
        if isinstance(body, list):
            self.record.body_items = len(body)
        return body

    def object(self) -> dict:
        body = self.json()
        if not isinstance(body, dict):
            raise ApiError(400, 400, f"expecting a JSON object body, got {type(body).__name__}")
        return body


_ROUTES: list[tuple[str, re.Pattern, str]] = [
    (m, re.compile(p + "$"), h)
    for m, p, h in [
        ("GET", r"/_api/version", "version"),
        ("GET", r"/_admin/server/role", "server_role"),
        ("GET", r"/_api/database(?:/user)?", "list_databases"),
        ("GET", r"/_api/database/current", "current_database"),
        ("POST", r"/_api/database", "create_database"),
        ("DELETE", r"/_api/database/(?P<name>[^/]+)", "delete_database"),
        ("GET", r"/_api/collection", "list_collections"),
        ("POST", r"/_api/collection", "create_collection"),
        ("GET", r"/_api/collection/(?P<name>[^/]+)(?:/(?P<aspect>properties|count|shards))?", "collection"),
        ("PUT", r"/_api/collection/(?P<name>[^/]+)/truncate", "truncate_collection"),
        ("DELETE", r"/_api/collection/(?P<name>[^/]+)", "delete_collection"),
        ("GET", r"/_api/gharial", "list_graphs"),
        ("POST", r"/_api/gharial", "create_graph"),
        ("GET", r"/_api/gharial/(?P<name>[^/]+)", "get_graph"),
        ("GET", r"/_api/gharial/(?P<name>[^/]+)/(?P<kind>vertex|edge)", "graph_collections"),
        ("DELETE", r"/_api/gharial/(?P<name>[^/]+)", "delete_graph"),
        ("POST", r"/_api/document/(?P<coll>[^/]+)", "insert_documents"),
        ("GET", r"/_api/document/(?P<coll>[^/]+)/(?P<key>[^/]+)", "get_document"),
        ("HEAD", r"/_api/document/(?P<coll>[^/]+)/(?P<key>[^/]+)", "get_document"),
        ("POST", r"/_api/import", "import_documents"),
        ("POST", r"/_api/cursor", "create_cursor"),
        ("POST", r"/_api/cursor/(?P<ident>[^/]+)(?:/(?P<batch>[^/]+))?", "next_batch"),
        ("PUT", r"/_api/cursor/(?P<ident>[^/]+)", "next_batch"),
        ("DELETE", r"/_api/cursor/(?P<ident>[^/]+)", "delete_cursor"),
        ("POST", r"/_api/transaction/begin", "begin_transaction"),
        ("GET", r"/_api/transaction/(?P<ident>[^/]+)", "status_transaction"),
        ("PUT", r"/_api/transaction/(?P<ident>[^/]+)", "commit_transaction"),
        ("DELETE", r"/_api/transaction/(?P<ident>[^/]+)", "abort_transaction"),
    ]
]


class _Api:
    """ArangoDB REST handlers; each returns ``(status, json_body)`` or raises `ApiError`."""

    def __init__(self, state: _State, cursors: _CursorRegistry, faults: Faults) -> None:
        self.state, self.cursors, self.faults = state, cursors, faults

    def handle(
        self, record: RequestRecord, authorization: str | None, raw: bytes, hold: float = 0.0
    ) -> tuple[int, Any]:
        try:
            user = self._authenticate(authorization)
            granted = self.state.access.get(user)
            if granted is not None and record.db not in granted:
                # The server does not tell a user whether a database it may not see exists.
                raise ApiError(401, 11, "not authorized to execute this request")
            if (
                user in self.state.read_only
                and record.method not in ("GET", "HEAD")
                and not (record.api_path.startswith("/_api/cursor") or record.api_path == "/_api/version")
            ):
                raise ApiError(403, 11, "forbidden")
            db = self.state.database(record.db)
            allowed = False
            for method, pattern, handler in _ROUTES:
                match = pattern.match(record.api_path)
                if match and method == record.method:
                    request = _Request(record, db, record.query, raw, user)
                    if record.transaction is not None and not handler.endswith("_transaction"):
                        request.txn = self._running(record.transaction, db)
                    extra = {"hold": hold} if hold and handler == "next_batch" else {}
                    return getattr(self, handler)(request, **match.groupdict(), **extra)
                allowed |= bool(match)
            if allowed:
                raise ApiError(405, 405, "method not supported")
            raise ApiError(404, 404, f"unknown path '{record.api_path}'")
        except ApiError as err:
            return err.status, err.body()
        except Exception as err:  # a bug in the double: answer like ArangoDB's internal error
            return 500, ApiError(500, 4, f"internal error in arango_double: {err!r}").body()

    def _running(self, ident: str, db: _Database) -> _Transaction:
        with self.state.lock:
            txn = self.state.transactions.get(ident)
        if txn is None or txn.db != db.name:
            raise ApiError(404, 1655, f"transaction '{ident}' not found")
        if txn.status != "running":
            raise ApiError(410, 1653, f"transaction '{ident}' is {txn.status}")
        return txn

    def _authenticate(self, authorization: str | None) -> str:
        scheme, _, token = (authorization or "").partition(" ")
        try:
            user, _, password = base64.b64decode(token).decode().partition(":")
        except ValueError:
            user = password = None
        if scheme.lower() != "basic" or user not in self.state.users or self.state.users[user] != password:
            raise ApiError(401, 11, "not authorized to execute this request")
        return user

    @staticmethod
    def _system_only(req: _Request) -> None:
        if req.db.name != "_system":
            raise ApiError(403, 1230, "operation only allowed in system database")

    # -- server and databases
    def version(self, req: _Request) -> tuple[int, Any]:
        body = {"server": "arango", "license": "community"}
        if self.state.hardened and req.user not in self.state.admins:
            return 200, body  # RestVersionHandler: version and details only for administrators
        body["version"] = f"{self.state.version}.99-double"
        if _flag(req.params, "details"):
            body["details"] = {"mode": "server", "role": self.state.role, "engine": "rocksdb"}
        return 200, body

    def server_role(self, req: _Request) -> tuple[int, Any]:
        return 200, {"error": False, "code": 200, "role": self.state.role, "mode": "default"}

    def list_databases(self, req: _Request) -> tuple[int, Any]:
        if not req.record.api_path.endswith("/user"):
            self._system_only(req)
        with self.state.lock:
            return 200, {"error": False, "code": 200, "result": sorted(self.state.databases)}

    def current_database(self, req: _Request) -> tuple[int, Any]:
        return 200, {
            "error": False,
            "code": 200,
            "result": {"name": req.db.name, "id": req.db.id, "path": "none", "isSystem": req.db.name == "_system"},
        }

    def create_database(self, req: _Request) -> tuple[int, Any]:
        self._system_only(req)
        body = req.object()
        name = body.get("name")
        with self.state.lock:
            if not isinstance(name, str) or not _NAME_RE.match(name) or len(name) > 64:
                raise ApiError(400, 1229, "database name invalid")
            if name in self.state.databases:
                raise ApiError(409, 1207, "duplicate database name")
            self.state.databases[name] = _Database(name, self.state.tick())
            for user in body.get("users") or []:
                self.state.users.setdefault(user["username"], user.get("passwd", ""))
        return 201, {"error": False, "code": 201, "result": True}

    def delete_database(self, req: _Request, name: str) -> tuple[int, Any]:
        self._system_only(req)
        with self.state.lock:
            self.state.database(name)
            if name == "_system":
                raise ApiError(403, 11, "forbidden")
            del self.state.databases[name]
        return 200, {"error": False, "code": 200, "result": True}

    # -- collections
    def list_collections(self, req: _Request) -> tuple[int, Any]:
        with self.state.lock:
            result = [
                {k: v for k, v in c.info().items() if k not in ("error", "code")} for c in req.db.collections.values()
            ]
        return 200, {"error": False, "code": 200, "result": result}

    def create_collection(self, req: _Request) -> tuple[int, Any]:
        body = req.object()
        if body.get("type", 2) not in (2, 3):
            raise ApiError(400, 1218, f"collection type invalid: expected 2 or 3, got {body['type']!r}")
        with self.state.lock:
            coll = self.state.create_collection(
                req.db, body.get("name"), body.get("type") == 3, body.get("numberOfShards")
            )
            return 200, self._properties(coll, body.get("waitForSync", False))

    @staticmethod
    def _properties(coll: _Collection, wait_for_sync: bool = False) -> dict:
        return {
            **coll.info(),
            "waitForSync": wait_for_sync,
            "cacheEnabled": False,
            "writeConcern": 1,
            "replicationFactor": 1,
            "schema": None,
            "computedValues": None,
            "numberOfShards": coll.shards,
            "keyOptions": {"type": "traditional", "allowUserKeys": True, "lastValue": 0},
        }

    def collection(self, req: _Request, name: str, aspect: str | None) -> tuple[int, Any]:
        with self.state.lock:
            coll = req.db.collection(name)
            if aspect == "count":
                return 200, {**self._properties(coll), "count": len(coll.docs)}
            if aspect == "shards":
                if self.state.role != "COORDINATOR":
                    raise ApiError(501, 1471, "this operation is only valid on a coordinator in a cluster")
                return 200, {**self._properties(coll), "shards": coll.shard_ids()}
            return 200, self._properties(coll) if aspect else coll.info()

    def truncate_collection(self, req: _Request, name: str) -> tuple[int, Any]:
        with self.state.lock:
            coll = req.db.collection(name)
            coll.truncate()
            return 200, coll.info()

    def delete_collection(self, req: _Request, name: str) -> tuple[int, Any]:
        with self.state.lock:
            coll = req.db.collection(name)
            del req.db.collections[name]
        return 200, {"error": False, "code": 200, "id": coll.id}

    # -- graphs
    def list_graphs(self, req: _Request) -> tuple[int, Any]:
        with self.state.lock:
            return 200, {"error": False, "code": 200, "graphs": list(req.db.graphs.values())}

    def create_graph(self, req: _Request) -> tuple[int, Any]:
        body = req.object()
        name = body.get("name")
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise ApiError(400, 1208, f"illegal name: expected a graph name, got {name!r}")
        definitions = [
            {"collection": d["collection"], "from": sorted(set(d.get("from", []))), "to": sorted(set(d.get("to", [])))}
            for d in body.get("edgeDefinitions") or []
        ]
        orphans = list(body.get("orphanCollections") or [])
        with self.state.lock:
            if name in req.db.graphs:
                raise ApiError(409, 1925, "graph already exists")
            wanted = (
                [(d["collection"], True) for d in definitions]
                + [(v, False) for d in definitions for v in d["from"] + d["to"]]
                + [(o, False) for o in orphans]
            )
            for coll_name, edge in wanted:
                existing = req.db.collections.get(coll_name)
                if existing is not None and edge and not existing.edge:
                    raise ApiError(400, 1237, f"collection type mismatch: {coll_name} is not an edge collection")
            for coll_name, edge in wanted:
                if coll_name not in req.db.collections:
                    self.state.create_collection(req.db, coll_name, edge)
            graph = {
                "_key": name,
                "_id": f"_graphs/{name}",
                "_rev": self.state.revision(),
                "name": name,
                "edgeDefinitions": definitions,
                "orphanCollections": orphans,
                "numberOfShards": 1,
                "replicationFactor": 1,
                "minReplicationFactor": 1,
                "writeConcern": 1,
                "isSmart": False,
                "isSatellite": False,
            }
            req.db.graphs[name] = graph
        return 202, {"error": False, "code": 202, "graph": graph}

    def _graph(self, req: _Request, name: str) -> dict:
        graph = req.db.graphs.get(name)
        if graph is None:
            raise ApiError(404, 1924, f"graph '{name}' not found")
        return graph

    @staticmethod
    def _graph_collections(graph: dict) -> tuple[list[str], list[str]]:
        edges = [d["collection"] for d in graph["edgeDefinitions"]]
        vertices = {v for d in graph["edgeDefinitions"] for v in d["from"] + d["to"]}
        return edges, sorted(vertices | set(graph["orphanCollections"]))

    def get_graph(self, req: _Request, name: str) -> tuple[int, Any]:
        with self.state.lock:
            return 200, {"error": False, "code": 200, "graph": self._graph(req, name)}

    def graph_collections(self, req: _Request, name: str, kind: str) -> tuple[int, Any]:
        with self.state.lock:
            edges, vertices = self._graph_collections(self._graph(req, name))
        return 200, {"error": False, "code": 200, "collections": vertices if kind == "vertex" else edges}

    def delete_graph(self, req: _Request, name: str) -> tuple[int, Any]:
        with self.state.lock:
            graph = self._graph(req, name)
            del req.db.graphs[name]
            if _flag(req.params, "dropCollections"):
                in_use = {c for g in req.db.graphs.values() for part in self._graph_collections(g) for c in part}
                for coll_name in set(itertools.chain(*self._graph_collections(graph))) - in_use:
                    req.db.collections.pop(coll_name, None)
        return 202, {"error": False, "code": 202, "removed": True}

    # -- documents
    def insert_documents(self, req: _Request, coll: str) -> tuple[int, Any]:
        body, params = req.json(), req.params
        mode = params.get("overwriteMode") or ("replace" if _flag(params, "overwrite") else "conflict")
        status = 201 if _flag(params, "waitForSync") else 202
        with self.state.lock:
            collection = req.db.collection(coll)
            if isinstance(body, list):
                results = []
                for raw in body:
                    try:
                        results.append(self._insert_one(collection, raw, mode, params))
                    except ApiError as err:
                        results.append({"error": True, "errorNum": err.error_num, "errorMessage": err.message})
                if _flag(params, "silent"):
                    results = [r for r in results if r.get("error")]
                return status, results
            result = self._insert_one(collection, body, mode, params)
        return status, {} if _flag(params, "silent") else result

    def _insert_one(self, coll: _Collection, raw: Any, mode: str, params: dict) -> dict:
        doc = self.state.prepare(coll, raw)
        old = coll.docs.get(doc["_key"])
        if old is not None:
            if mode == "ignore":
                return {"_id": old["_id"], "_key": old["_key"], "_rev": old["_rev"]}
            if mode == "update":
                doc = _merge(old, doc, _flag(params, "keepNull", True), _flag(params, "mergeObjects", True))
            elif mode != "replace":
                raise ApiError(
                    409,
                    1210,
                    "unique constraint violated - in index primary of type primary "
                    f"over '_key'; conflicting key: {doc['_key']}",
                )
        coll.put(doc)
        result = {"_id": doc["_id"], "_key": doc["_key"], "_rev": doc["_rev"]}
        if old is not None:
            result["_oldRev"] = old["_rev"]
        if _flag(params, "returnNew"):
            result["new"] = doc
        if _flag(params, "returnOld") and old is not None:
            result["old"] = old
        return result

    def get_document(self, req: _Request, coll: str, key: str) -> tuple[int, Any]:
        with self.state.lock:
            doc = req.db.collection(coll).docs.get(key)
        if doc is None:
            raise ApiError(404, 1202, "document not found")
        return 200, doc

    def import_documents(self, req: _Request) -> tuple[int, Any]:
        params = req.params
        name = params.get("collection")
        if not name:
            raise ApiError(400, 1204, "'collection' is missing, expecting /_api/import?collection=<identifier>")
        kind = params.get("type")
        if kind == "auto":
            kind = "array" if req.raw.lstrip()[:1] == b"[" else "documents"
        empty = 0
        if kind in ("array", "list"):
            docs = req.json()
            if not isinstance(docs, list):
                raise ApiError(400, 400, "expecting a JSON array in the request")
        elif kind == "documents":
            lines = req.raw.decode().split("\n")
            empty = sum(1 for line in lines[:-1] if not line.strip())
            docs = [self._json_line(line) for line in lines if line.strip()]
        else:
            raise ApiError(
                400,
                10,
                f"invalid value for 'type': expected documents, array, list or "
                f"auto (the double has no CSV-style import), got {kind!r}",
            )
        prefixes = [
            p + ("" if not p or p.endswith("/") else "/")
            for p in (params.get("fromPrefix", ""), params.get("toPrefix", ""))
        ]
        on_duplicate = params.get("onDuplicate", "error")
        complete, overwrite = _flag(params, "complete"), _flag(params, "overwrite")
        counts = dict.fromkeys(("created", "errors", "updated", "ignored"), 0)
        details: list[str] = []
        with self.state.lock:
            coll = req.db.collection(name)
            staged: dict[str, dict] = {}  # writes of this request; applied only if it succeeds

            def reject(position: int, err: ApiError, raw: Any, what: str) -> None:
                if complete:
                    raise err
                counts["errors"] += 1
                details.append(
                    f"at position {position}: {what}, offending document: {json.dumps(raw, ensure_ascii=False)[:255]}"
                )

            # RestImportHandler validates every document first (objects only; an edge needs string
            # _from and _to) and reports those errors by 1-based position in the request; the
            # documents that pass are then inserted as one array, and insert errors (illegal key or
            # handle, conflicts, unique constraint) carry the 0-based position in that array.
            validated: list[tuple[int, Any, dict]] = []
            for position, raw in enumerate(docs):
                if not isinstance(raw, dict):
                    reject(
                        position + 1,
                        ApiError(400, 1227, "invalid document type"),
                        raw,
                        "invalid JSON type (expecting object)",
                    )
                    continue
                doc = dict(raw)
                if coll.edge:
                    for attr, prefix in (("_from", prefixes[0]), ("_to", prefixes[1])):
                        value = doc.get(attr)
                        if (
                            prefix
                            and isinstance(value, (str, int))
                            and not isinstance(value, bool)
                            and "/" not in str(value)
                        ):
                            doc[attr] = prefix + str(value)
                    if not isinstance(doc.get("_from"), str) or not isinstance(doc.get("_to"), str):
                        reject(
                            position + 1,
                            ApiError(400, 1233, "edge attribute missing or invalid"),
                            raw,
                            "missing '_from' or '_to' attribute",
                        )
                        continue
                validated.append((position, raw, doc))
            conflicts = self.faults._take_conflicts(len(docs))
            for insert_position, (position, raw, doc) in enumerate(validated):
                if position in conflicts:  # a concurrent writer holds this document: 1200, not applied
                    reject(
                        insert_position,
                        ApiError(409, 1200, "write-write conflict"),
                        raw,
                        "creating document failed with error 'write-write conflict'",
                    )
                    continue
                try:
                    doc = self.state.prepare(coll, doc)
                except ApiError as err:
                    reject(insert_position, err, raw, f"creating document failed with error '{err.message}'")
                    continue
                key = doc["_key"]
                old = staged.get(key) or (None if overwrite else coll.docs.get(key))
                if old is None:
                    counts["created"] += 1
                elif on_duplicate == "ignore":
                    counts["ignored"] += 1
                    continue
                elif on_duplicate in ("update", "replace"):
                    counts["updated"] += 1
                    doc = _merge(old, doc) if on_duplicate == "update" else doc
                else:
                    err = ApiError(
                        409,
                        1210,
                        "unique constraint violated - in index primary of type "
                        f"primary over '_key'; conflicting key: {key}",
                    )
                    reject(
                        insert_position, err, raw, "creating document failed with error 'unique constraint violated'"
                    )
                    continue
                staged[key] = doc
            if overwrite:
                coll.truncate()
            for doc in staged.values():
                if req.txn is not None:
                    req.txn.undo.append((coll, doc["_key"], coll.docs.get(doc["_key"])))
                coll.put(doc)
        body = {"error": False, **counts, "empty": empty}
        if _flag(params, "details"):
            body["details"] = details
        return 201, body

    @staticmethod
    def _json_line(line: str) -> Any:
        try:
            return json.loads(line)
        except ValueError:
            return line  # reported as an invalid document at its position

    # -- cursors
    def create_cursor(self, req: _Request) -> tuple[int, Any]:
        body = req.object()
        options = {**body, **(body.get("options") or {})}
        bind_vars = body.get("bindVars") or {}
        if not isinstance(bind_vars, dict):
            raise ApiError(400, 10, f"expecting an object for bindVars, got {type(bind_vars).__name__}")
        batch_size, ttl = body.get("batchSize", 1000), body.get("ttl", 30)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ApiError(400, 10, f"expecting a positive integer batchSize, got {batch_size!r}")
        if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or ttl <= 0:
            ttl = 30
        plan = compile_query(str(body.get("query") or ""), bind_vars)
        if isinstance(plan, (_RemovePlan, _InsertPlan)) and req.user in self.state.read_only:
            raise ApiError(403, 11, "forbidden")
        started = time.perf_counter()
        shard_ids = options.get("shardIds")
        if shard_ids is not None and not isinstance(plan, _ReadPlan):
            raise ApiError(400, 10, "the double supports shardIds only for FOR ... RETURN reads")
        if shard_ids is not None:
            run = plan.run(self.state, req.db, bind_vars, shard_ids)
        elif isinstance(plan, (_RemovePlan, _InsertPlan)):
            run = plan.run(self.state, req.db, bind_vars, None if req.txn is None else req.txn.undo)
        else:
            run = plan.run(self.state, req.db, bind_vars)
        results, count = run.results, None
        if not options.get("stream"):  # ArangoDB computes non-stream results up front
            materialised = list(results)
            results = iter(materialised)
            count = len(materialised) if body.get("count") else None
        run.stats["executionTime"] = time.perf_counter() - started
        cursor = _Cursor(
            self.state.tick(),
            req.db.name,
            results,
            run.stats,
            batch_size=batch_size,
            ttl=float(ttl),
            allow_retry=bool(options.get("allowRetry")) and self.state.allow_retry,
            count=count,
            warnings=run.warnings,
        )
        batch = cursor.advance()
        if cursor.has_more:
            self.cursors.add(cursor)
        self.faults._batch_served(cursor.id)
        return 201, cursor.body(batch, 201)

    def next_batch(self, req: _Request, ident: str, batch: str | None = None, hold: float = 0.0) -> tuple[int, Any]:
        if req.record.method == "POST" and not self.state.post_fetch:
            raise ApiError(405, 405, "method not supported")
        cursor = self.cursors.get(req.db.name, ident)
        # CursorRepository::find hands a cursor to one request at a time; a second one that
        # arrives meanwhile is answered 409 / 1601 at once instead of waiting.
        if not cursor.lock.acquire(blocking=False):
            raise ApiError(409, 1601, "cursor is busy")
        try:
            if hold:
                time.sleep(hold)
            if batch is None or (batch.isdigit() and int(batch) == cursor.batch_id + 1):
                result = cursor.advance()
            elif batch.isdigit() and int(batch) == cursor.batch_id and cursor.last_batch is not None:
                result = cursor.last_batch
            else:
                raise ApiError(
                    400,
                    400,
                    f"batch id not found: expected {cursor.batch_id + 1}"
                    f"{f' or {cursor.batch_id}' if cursor.allow_retry else ''}, "
                    f"got {batch} (allowRetry={cursor.allow_retry})",
                )
            cursor.touch()
            if not cursor.has_more and not cursor.allow_retry:
                self.cursors.remove(ident)
            body = cursor.body(result, 200)
        finally:
            cursor.lock.release()
        self.faults._batch_served(ident)
        return 200, body

    # -- stream transactions
    def begin_transaction(self, req: _Request) -> tuple[int, Any]:
        body = req.object()
        collections = body.get("collections") or {}
        write = collections.get("write") or []
        write = [write] if isinstance(write, str) else write
        with self.state.lock:
            for name in write:
                req.db.collection(name)
            txn = _Transaction(self.state.tick(), req.db.name, frozenset(write))
            self.state.transactions[txn.id] = txn
        return 201, {"error": False, "code": 201, "result": {"id": txn.id, "status": txn.status}}

    def _transaction(self, req: _Request, ident: str) -> _Transaction:
        with self.state.lock:
            txn = self.state.transactions.get(ident)
        if txn is None or txn.db != req.db.name:
            raise ApiError(404, 1655, f"transaction '{ident}' not found")
        return txn

    def status_transaction(self, req: _Request, ident: str) -> tuple[int, Any]:
        txn = self._transaction(req, ident)
        return 200, {"error": False, "code": 200, "result": {"id": txn.id, "status": txn.status}}

    def commit_transaction(self, req: _Request, ident: str) -> tuple[int, Any]:
        txn = self._transaction(req, ident)
        with self.state.lock:
            if txn.status == "aborted":
                raise ApiError(410, 1653, f"transaction '{ident}' was aborted")
            txn.status = "committed"  # committing twice is fine, as a re-sent commit needs
            txn.undo.clear()
        return 200, {"error": False, "code": 200, "result": {"id": txn.id, "status": txn.status}}

    def abort_transaction(self, req: _Request, ident: str) -> tuple[int, Any]:
        txn = self._transaction(req, ident)
        with self.state.lock:
            if txn.status == "committed":
                raise ApiError(409, 1650, f"transaction '{ident}' is already committed")
            if txn.status == "running":
                txn.rollback()
                txn.status = "aborted"
        return 200, {"error": False, "code": 200, "result": {"id": txn.id, "status": txn.status}}

    def delete_cursor(self, req: _Request, ident: str) -> tuple[int, Any]:
        self.cursors.get(req.db.name, ident)
        self.cursors.remove(ident)
        return 202, {"id": ident, "error": False, "code": 202}


# ----------------------------------------------------------------------------- HTTP server


class _Server(ThreadingHTTPServer):
    """Threading server that remembers open connections so `ArangoDouble.stop` can close them."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], double: ArangoDouble) -> None:
        super().__init__(address, _Handler)
        self.double = double
        self._open: set[socket.socket] = set()
        self._open_lock = threading.Lock()

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._open_lock:
            self._open.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._open_lock:
            self._open.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        with self._open_lock:
            connections, self._open = list(self._open), set()
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like ArangoDB
    server_version = "ArangoDB"
    sys_version = ""
    disable_nagle_algorithm = True
    timeout = 120
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass

    def _serve(self) -> None:
        double = self.server.double
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.headers.get("Content-Encoding", "").lower() in ("deflate", "gzip"):
            raw = zlib.decompress(raw, 47)
        parts = urlsplit(self.path)
        path = parts.path
        db, api_path = "_system", unquote(path)
        match = re.match(r"^/_db/([^/]+)(/.*)?$", path)
        if match:
            db, api_path = unquote(match.group(1)), unquote(match.group(2) or "/")
        record = RequestRecord(
            self.command,
            path,
            db,
            api_path,
            dict(parse_qsl(parts.query, keep_blank_values=True)),
            len(raw),
            transaction=self.headers.get("x-arango-trx-id"),
        )
        double.requests.append(record)
        decision = double.faults._decide(record)
        if decision.delay:
            time.sleep(decision.delay)
        if decision.fail is not None:
            return self._respond(record, decision.fail.status, decision.fail.body())
        if decision.drop_before:
            return self._drop(record)
        if decision.busy_for:  # the client sees the reset now; the server is still at work
            self._drop(record)
            double._api.handle(record, self.headers.get("Authorization"), raw, hold=decision.busy_for)
            return
        status, body = double._api.handle(record, self.headers.get("Authorization"), raw)
        if decision.drop_after:
            return self._drop(record)
        self._respond(record, status, body)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _serve

    def _respond(self, record: RequestRecord, status: int, body: Any) -> None:
        data = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
        record.status = status
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _drop(self, record: RequestRecord) -> None:
        record.dropped = True
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class ArangoDouble:
    """A running test double; the handle tests talk to.

    Args:
        users: ``{username: password}`` accepted by basic auth; the first one becomes
            `username`/`password`. Default ``{"root": "test-password"}``.
        host: Interface to bind (a free port is chosen).
        version: "3.7" (no ``POST /_api/cursor/{id}``: 405), "3.10" (no allowRetry), "3.11", "3.12".
        role, shards, read_only: see the module docstring.
        hardened: ``--server.harden``: ``/_api/version`` leaves out ``version`` for users not in
            ``admins``.
        admins: Users with administrator rights (default ``("root",)``).
        access: ``{username: databases}``: such a user gets 401 / errorNum 11 for any other
            database, existing or not, as ArangoDB answers a database the user may not see.

    Attributes:
        url: Base URL for ``ArangoClient(hosts=url)``.
        username, password: Credentials of the first user.
        faults: `Faults` controlling injected failures.
        requests: `RequestLog` of every request received.
    """

    def __init__(
        self,
        users: dict[str, str] | None = None,
        *,
        host: str = "127.0.0.1",
        version: str = "3.11",
        role: str = "SINGLE",
        shards: int = 1,
        read_only: tuple[str, ...] = (),
        hardened: bool = False,
        admins: tuple[str, ...] = ("root",),
        access: dict[str, tuple[str, ...]] | None = None,
    ) -> None:
        if version not in SERVER_VERSIONS:
            raise ValueError(f"'version' needs to be one of {SERVER_VERSIONS} (got {version!r})")
        if role not in ("SINGLE", "COORDINATOR"):
            raise ValueError(f"'role' needs to be SINGLE or COORDINATOR (got {role!r})")
        if shards < 1 or (shards > 1 and role != "COORDINATOR"):
            raise ValueError(f"'shards' needs to be 1, or >= 1 with role COORDINATOR (got {shards}, {role})")
        users = dict(users or DEFAULT_USERS)
        self._state = _State(users, version, role, shards, frozenset(read_only), hardened, frozenset(admins), access)
        self._cursors = _CursorRegistry()
        self.faults = Faults(self._cursors)
        self.requests = RequestLog()
        self._api = _Api(self._state, self._cursors, self.faults)
        self._server = _Server((host, 0), self)
        self.url = f"http://{host}:{self._server.server_address[1]}"
        self.username, self.password = next(iter(users.items()))
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"arango-double{self.url[6:]}",
            daemon=True,
        )
        self._thread.start()

    def create_database(self, name: str) -> None:
        """Create database ``name`` directly (no HTTP request, nothing logged)."""
        with self._state.lock:
            if name in self._state.databases:
                raise ValueError(f"database {name!r} already exists")
            self._state.databases[name] = _Database(name, self._state.tick())

    def documents(self, database: str, collection: str) -> list[dict]:
        """Stored documents of ``database``/``collection`` in ``_key`` order (test inspection)."""
        with self._state.lock:
            coll = self._state.database(database).collection(collection)
            return [coll.docs[k] for k in coll.sorted_keys()]

    @property
    def documents_scanned(self) -> int:
        """Documents visited by AQL read scans so far (every query, every shard; a FILTER
        does not reduce it: a hash partition visits the whole collection)."""
        with self._state.lock:
            return self._state.scanned

    def expire_transactions(self) -> int:
        """Abort every running stream transaction now, undoing its writes, as the server does with
        one idle past ``--transaction.streaming-idle-timeout`` (a client that died mid-way);
        returns how many there were."""
        with self._state.lock:
            running = [t for t in self._state.transactions.values() if t.status == "running"]
            for txn in running:
                txn.rollback()
                txn.status = "aborted"
        return len(running)

    def open_cursors(self) -> int:
        """Number of server-side cursors currently held (expired ones may still be counted)."""
        with self._cursors._lock:
            return len(self._cursors._cursors)

    def stop(self) -> None:
        """Stop serving and close open client connections; idempotent."""
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join()
        self._server.close_connections()
        self._server.server_close()

    def __enter__(self) -> ArangoDouble:
        return self

    def __exit__(self, *_: Any) -> None:
        self.stop()


# ----------------------------------------------------------------------------- pytest fixtures

TEST_DATABASE = "scalable_rec_test"
_NEEDS_DOUBLE = "fault injection needs the test double; SCALABLE_REC_ARANGO_URL points at a real server"


@dataclasses.dataclass(frozen=True)
class ArangoEndpoint:
    """Where a test's ArangoDB lives.

    Args:
        url: Server URL.
        username: User name for basic auth.
        password: Password for basic auth.
        database: A fresh database for this test.
        double: The `ArangoDouble` handle, or None against a real server.
    """

    url: str
    username: str
    password: str
    database: str
    double: ArangoDouble | None


@pytest.fixture
def arango_double() -> Iterator[ArangoDouble]:
    """A fresh double with only ``_system``; stopped after the test."""
    double = ArangoDouble()
    try:
        yield double
    finally:
        double.stop()


@pytest.fixture
def arango_endpoint() -> Iterator[ArangoEndpoint]:
    """A fresh database: on the real server named by ``SCALABLE_REC_ARANGO_URL`` (user
    ``SCALABLE_REC_ARANGO_USER``, default root; password ``SCALABLE_REC_ARANGO_PASSWORD``; a uniquely
    named database dropped afterwards), else ``scalable_rec_test`` on a fresh double."""
    url = os.environ.get("SCALABLE_REC_ARANGO_URL")
    if not url:
        with ArangoDouble() as double:
            double.create_database(TEST_DATABASE)
            yield ArangoEndpoint(double.url, double.username, double.password, TEST_DATABASE, double)
        return
    from arango import ArangoClient

    username = os.environ.get("SCALABLE_REC_ARANGO_USER", "root")
    password = os.environ.get("SCALABLE_REC_ARANGO_PASSWORD", "")
    name = f"{TEST_DATABASE}_{uuid.uuid4().hex[:12]}"
    client = ArangoClient(hosts=url)
    try:
        system = client.db("_system", username=username, password=password, verify=True)
        system.create_database(name)
        try:
            yield ArangoEndpoint(url, username, password, name, None)
        finally:
            system.delete_database(name, ignore_missing=True)
    finally:
        client.close()


@pytest.fixture
def arango_faults(arango_endpoint: ArangoEndpoint) -> Faults:
    """The double's `Faults`; skips the test when running against a real server."""
    if arango_endpoint.double is None:
        pytest.skip(_NEEDS_DOUBLE)
    return arango_endpoint.double.faults
