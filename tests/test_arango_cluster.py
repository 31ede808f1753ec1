"""The export against deployments the single-server tests cannot show: a 3-shard cluster with
ICU-ordered coordinator merges, a 3.10 server without cursor allowRetry, and verification
failures (count mismatch, repeated keys). Runs on the double only (it needs its switches)."""

import hashlib
import random
import string

import pytest
from arango import ArangoClient
from arango_double import ArangoDouble

from scalable_rec.connection import ArangoConfig, ArangoSettings, connect, server_info
from scalable_rec.errors import ConfigError, DatabaseError, ExportVerificationError
from scalable_rec.shards import GraphShards
from scalable_rec.source import SkipReport
from scalable_rec.source.arango import ArangoSource, ExportConfig, Partition
from scalable_rec.source.arango_export import export_shards

LAYOUT = ArangoConfig(arango_retries=3, arango_backoff=0.01)
ALPHABET = string.ascii_letters + string.digits + "_:.@-"


def _mixed_keys(n, rng):
    keys = set()
    while len(keys) < n:
        keys.add("".join(rng.choice(ALPHABET) for _ in range(rng.randint(3, 12))))
    return sorted(keys)


def _fill(double, users=300, movies=200, ratings=3000):
    """Mixed-case keys with ``_ : . @`` (ICU and byte order disagree on them)."""
    double.create_database("t")
    db = ArangoClient(hosts=double.url).db("t", username=double.username, password=double.password)
    rng = random.Random(7)
    ukeys, mkeys = _mixed_keys(users, rng), _mixed_keys(movies, rng)
    db.create_collection("Users").import_bulk([{"_key": k} for k in ukeys])
    db.create_collection("Movie").import_bulk([{"_key": k, "title": k, "genres": "Drama"} for k in mkeys])
    pairs = rng.sample([(u, m) for u in ukeys for m in mkeys], ratings)
    edges = [
        {
            "_key": f"{u}:{m}",
            "_from": f"Users/{u}",
            "_to": f"Movie/{m}",
            "rating": rng.randint(1, 10) / 2,
            "timestamp": 1_000 + i,
        }
        for i, (u, m) in enumerate(pairs)
    ]
    db.create_collection("Ratings", edge=True).import_bulk(edges)
    return edges


def _db(double):
    return connect(
        ArangoSettings(url=double.url, database="t", username=double.username, password=double.password, http_retries=0)
    )


def _export(double, out, source_cls=ArangoSource, resume=False, **export):
    report = SkipReport()
    source = source_cls(_db(double), LAYOUT, ExportConfig(export_batch_size=100, **export))
    manifest = export_shards(source, out, report, max_rows_per_shard=500, progress=False, resume=resume)
    return manifest, report


def _rows(out):
    shards = GraphShards(out)
    users = shards.nodes("user").column("key").to_pylist()
    movies = shards.nodes("movie").column("key").to_pylist()
    e = shards.edges("user", "rates", "movie").to_pydict()
    return sorted((users[s], movies[d], r, t) for s, d, r, t in zip(e["src"], e["dst"], e["rating"], e["timestamp"]))


def _expected(edges):
    return sorted((e["_from"][6:], e["_to"][6:], e["rating"], e["timestamp"]) for e in edges)


@pytest.mark.parametrize("parallelism", [1, 4])
def test_three_shard_cluster_with_mixed_case_keys_exports_every_row_once(tmp_path, parallelism):
    # Today's key-range reader (FILTER _key > @after SORT _key LIMIT 500) lost and repeated rows here.
    with ArangoDouble(role="COORDINATOR", shards=3) as double:
        edges = _fill(double)
        manifest, report = _export(double, tmp_path / "out", parallelism=parallelism)
        assert _rows(tmp_path / "out") == _expected(edges)
        assert report.accepted == {"movies": 200, "users": 300, "ratings": 3000} and not report.counts
        assert manifest.config["server"] == {"version": "3.11.99-double", "role": "COORDINATOR"}


def test_server_info_reads_version_and_role():
    with ArangoDouble(version="3.12", role="COORDINATOR", shards=2) as double:
        double.create_database("t")
        info = server_info(_db(double))
        assert (info.version, info.role, info.cluster, info.legacy_cursors) == ((3, 12), "COORDINATOR", True, False)
    with ArangoDouble(version="3.10") as double:
        double.create_database("t")
        info = server_info(_db(double))
        assert (info.version, info.role, info.legacy_cursors) == ((3, 10), "SINGLE", True)


@pytest.mark.parametrize("role,shards", [("SINGLE", 1), ("COORDINATOR", 3)])
def test_310_server_lost_fetch_response_rereads_the_partition(tmp_path, role, shards):
    # 3.10 has no allowRetry: python-arango re-sends a fetch whose response was lost and the server
    # serves the next batch, skipping one. Counted non-stream cursors notice it and read again
    # (on a cluster: the per-shard read, built outside python-arango's execute, counts too).
    with ArangoDouble(version="3.10", role=role, shards=shards) as double:
        edges = _fill(double)
        double.faults.drop_connection_after_batches(6, times=1, lose_response=True)
        _export(double, tmp_path / "out")
        assert _rows(tmp_path / "out") == _expected(edges)
        assert any(r.dropped for r in double.requests)


def test_310_server_lost_batch_is_an_error_without_retries(tmp_path):
    with ArangoDouble(version="3.10") as double:
        _fill(double)
        double.faults.drop_connection_after_batches(6, times=1, lose_response=True)
        db = _db(double)
        source = ArangoSource(db, ArangoConfig(arango_retries=0), ExportConfig(export_batch_size=100))
        with pytest.raises(ExportVerificationError, match="a cursor batch was lost"):
            export_shards(source, tmp_path / "out", SkipReport(), max_rows_per_shard=500, progress=False)


class _CountsOneMore(ArangoSource):
    def count(self, collection):
        return super().count(collection) + (collection == "Ratings")


class _RepeatsUsers(ArangoSource):
    """A server that hands the first user batch out twice (e.g. a re-served batch)."""

    def read(self, spec, part, consume, on_start=lambda: None):
        if spec.collection != "Users":
            return super().read(spec, part, consume, on_start)
        seen = []

        def twice(rows):
            consume(rows)
            if not seen:
                seen.append(1)
                consume(rows)

        return super().read(spec, part, twice, on_start)


def test_count_mismatch_is_an_error(tmp_path):
    with ArangoDouble() as double:
        _fill(double)
        with pytest.raises(
            ExportVerificationError, match="Exported 3000 rows of 'Ratings', but the server counts 3001"
        ):
            _export(double, tmp_path / "out", source_cls=_CountsOneMore)


@pytest.mark.parametrize("parallelism", [1, 2])
def test_repeated_node_key_is_an_error(tmp_path, parallelism):
    with ArangoDouble() as double:
        _fill(double)
        with pytest.raises(ExportVerificationError, match="repeated _key"):
            _export(double, tmp_path / "out", source_cls=_RepeatsUsers, parallelism=parallelism)


class _LeaksAUserAcrossPartitions(ArangoSource):
    """A server whose second user partition also returns, once, a row of the first one."""

    def read(self, spec, part, consume, on_start=lambda: None):
        if spec.collection != "Users" or part.index != 1:
            return super().read(spec, part, consume, on_start)
        first = Partition(0, part.count)
        leaked = next(
            k
            for k in _mixed_keys(300, random.Random(7))
            if hashlib.md5(k.encode()).hexdigest()[: first.width] in first.buckets
        )
        done = []

        def leak(rows):
            consume(rows if done else rows + [[leaked]])
            done.append(1)

        return super().read(spec, part, leak, on_start)


def test_node_key_repeated_across_partitions_is_an_error(tmp_path):
    with ArangoDouble() as double:
        _fill(double)
        with pytest.raises(ExportVerificationError, match="'Users': 1 _key.s. read twice across partitions"):
            _export(double, tmp_path / "out", source_cls=_LeaksAUserAcrossPartitions, parallelism=2)


# ----------------------------------------------------------------------------- per-shard reads

DOCS = 300 + 200 + 3000  # users + movies + ratings of `_fill`


@pytest.mark.parametrize("shards,parallelism,scans", [(4, 4, 1), (4, 1, 1), (2, 4, 2)])
def test_coordinator_reads_shard_by_shard_and_scans_each_document_once(tmp_path, shards, parallelism, scans):
    # Hash partitions of the whole collection visit every document once per partition (4 workers:
    # 4 scans of each table); reading shard by shard (cursor option shardIds) visits it once, or
    # ceil(workers / shards) times when there are more workers than shards.
    with ArangoDouble(role="COORDINATOR", shards=shards) as double:
        edges = _fill(double)
        before = double.documents_scanned
        manifest, report = _export(double, tmp_path / "out", parallelism=parallelism)
        assert _rows(tmp_path / "out") == _expected(edges)
        assert report.accepted == {"movies": 200, "users": 300, "ratings": 3000} and not report.counts
        assert double.documents_scanned - before == scans * DOCS + 3  # + one key per table: the shardIds probe
        assert double.requests.matching("GET", "/_api/collection/Ratings/shards")


@pytest.mark.parametrize("role,per_shard", [("SINGLE", True), ("COORDINATOR", False)])
def test_hash_partitions_scan_the_collection_once_per_partition(tmp_path, role, per_shard):
    # The cost per-shard reads remove: on a single server (no shards) or with per_shard_reads off,
    # 4 workers read 4 hash partitions of each table, each a scan of the whole collection.
    with ArangoDouble(role=role, shards=4 if role == "COORDINATOR" else 1) as double:
        edges = _fill(double)
        before = double.documents_scanned
        _export(double, tmp_path / "out", parallelism=4, per_shard_reads=per_shard)
        assert _rows(tmp_path / "out") == _expected(edges)
        assert double.documents_scanned - before == 4 * DOCS
        assert not double.requests.matching("GET", "/_api/collection/Ratings/shards")


def test_shard_list_refused_falls_back_to_hash_partitions(tmp_path, caplog):
    with ArangoDouble(role="COORDINATOR", shards=3) as double:
        edges = _fill(double)
        double.faults.fail_next("/_api/collection/Ratings/shards", 403, error_num=11, message="forbidden")
        before = double.documents_scanned
        _export(double, tmp_path / "out", parallelism=2)
        assert _rows(tmp_path / "out") == _expected(edges)
        # movies and users shard by shard (after a one-key probe each), ratings in 2 hash partitions
        assert double.documents_scanned - before == 1 * (300 + 200) + 2 + 2 * 3000
        assert "listing the shards of 'Ratings' failed: [HTTP 403][ERR 11] forbidden" in caplog.text


def _killed_mid_ratings(double, out, monkeypatch):
    from scalable_rec.source import arango_export

    calls, validate = [], arango_export.validate_ratings

    class Killed(Exception):
        pass

    def dies(*args, **kwargs):
        calls.append(1)
        if len(calls) == 12:  # 100-row batches, 3000 ratings over 3 shards: inside the second shard
            raise Killed()
        return validate(*args, **kwargs)

    monkeypatch.setattr(arango_export, "validate_ratings", dies)
    with pytest.raises(Killed):
        _export(double, out, parallelism=1)
    monkeypatch.setattr(arango_export, "validate_ratings", validate)


def test_killed_per_shard_export_resumes_after_its_finished_shards(tmp_path, monkeypatch):
    with ArangoDouble(role="COORDINATOR", shards=3) as double:
        edges = _fill(double)
        _killed_mid_ratings(double, tmp_path / "out", monkeypatch)
        ratings = double._state.databases["t"].collections["Ratings"]
        first_shard = sum(1 for k in ratings.docs if ratings.shard_of(k) == 0)
        before = double.documents_scanned
        _, report = _export(double, tmp_path / "out", parallelism=1, resume=True)
        assert _rows(tmp_path / "out") == _expected(edges)
        assert report.accepted == {"movies": 200, "users": 300, "ratings": 3000} and not report.counts
        # nodes finished, the first ratings shard checkpointed: only shards 2 and 3 are read again
        assert double.documents_scanned - before == 3000 - first_shard


def test_resume_refuses_when_the_shards_changed(tmp_path, monkeypatch):
    with ArangoDouble(role="COORDINATOR", shards=3) as double:
        edges = _fill(double)
        _killed_mid_ratings(double, tmp_path / "out", monkeypatch)
        db = ArangoClient(hosts=double.url).db("t", username=double.username, password=double.password)
        db.delete_collection("Ratings")  # recreated between the runs: new shards
        db.create_collection("Ratings", edge=True).import_bulk(edges)
        with pytest.raises(ConfigError, match="'Ratings' was being read shard by shard from"):
            _export(double, tmp_path / "out", parallelism=1, resume=True)


# ----------------------------------------------------------------------------- shardIds


def test_per_shard_reads_need_driver_internals_that_still_exist(tmp_path, monkeypatch, caplog):
    # shardIds goes through python-arango's private db.aql._conn / db.aql._execute(request,
    # response_handler) and Cursor(connection, init_data, allow_retry=...). This test fails when a
    # python-arango upgrade changes them; the export then falls back to hash partitions (below).
    import inspect

    from arango.aql import AQL
    from arango.connection import BaseConnection
    from arango.cursor import Cursor

    from scalable_rec.source.arango import driver_can_restrict_to_shards

    with ArangoDouble(role="COORDINATOR", shards=3) as double:
        edges = _fill(double)
        db = _db(double)
        assert driver_can_restrict_to_shards(db)
        assert isinstance(db.aql._conn, BaseConnection)
        assert list(inspect.signature(db.aql._execute).parameters) == ["request", "response_handler"]
        assert {"connection", "init_data", "allow_retry"} <= set(inspect.signature(Cursor).parameters)

        original = AQL._execute

        def changed(self, request, handler, extra=None):  # a renamed parameter, as an upgrade might bring
            return original(self, request, handler)

        monkeypatch.setattr(AQL, "_execute", changed)
        assert not driver_can_restrict_to_shards(db)
        before = double.documents_scanned
        _export(double, tmp_path / "out", parallelism=2)
        assert _rows(tmp_path / "out") == _expected(edges)
        assert double.documents_scanned - before == 2 * DOCS  # two hash partitions of each table
        assert "has no db.aql._conn / db.aql._execute" in caplog.text


class _StaleShardList(ArangoSource):
    def list_shards(self, collection):
        return ["s999999"]


def test_unknown_shard_is_fatal_and_named(tmp_path):
    with ArangoDouble(role="COORDINATOR", shards=3) as double:
        _fill(double)
        with pytest.raises(
            DatabaseError,
            match=r"Reading shard s999999 of 'Movie' .*no such shard any more "
            r"\(HTTP 500, errorNum 1521",
        ):
            _export(double, tmp_path / "out", source_cls=_StaleShardList)
        assert len([r for r in double.requests.matching("POST", "/_api/cursor") if r.status == 500]) == 1


class _RecreatesRatings(ArangoSource):
    """Between planning the ratings (shards listed and probed) and reading them, the collection is
    dropped and created again: every listed shard is gone."""

    def read(self, spec, part, consume, on_start=lambda: None):
        if spec.collection == "Ratings" and not getattr(self, "_recreated", False):
            self._recreated = True
            edges = list(self.db.aql.execute("FOR v IN @@c RETURN v", bind_vars={"@c": "Ratings"}))
            self.db.delete_collection("Ratings")
            self.db.create_collection("Ratings", edge=True).import_bulk(edges)
        return super().read(spec, part, consume, on_start)


def test_shard_gone_mid_export_is_not_retried(tmp_path, caplog):
    with ArangoDouble(role="COORDINATOR", shards=3) as double:
        _fill(double)
        with pytest.raises(
            DatabaseError,
            match=r"Reading partition 1/3 \(shard s\d+, .*\) of 'Ratings': the server "
            r"has no such shard any more .*errorNum 1521",
        ):
            _export(double, tmp_path / "out", source_cls=_RecreatesRatings)
        assert "reading the partition again" not in caplog.text  # never retried
        assert 1 <= len([r for r in double.requests.matching("POST", "/_api/cursor") if r.status == 500]) <= 3


def test_refused_shard_option_falls_back_to_hash_partitions(tmp_path, caplog):
    with ArangoDouble(role="COORDINATOR", shards=3) as double:
        edges = _fill(double)
        # the first cursor of the export is the movies' shardIds probe: refused as a bad parameter
        double.faults.fail_next("/_api/cursor", 400, error_num=10, message="bad parameter", method="POST")
        before = double.documents_scanned
        _export(double, tmp_path / "out", parallelism=2)
        assert _rows(tmp_path / "out") == _expected(edges)
        # movies: two hash partitions of the whole collection; users and ratings: each shard once,
        # after a one-key probe each
        assert double.documents_scanned - before == 2 * 200 + (300 + 1) + (3000 + 1)
        assert "the server refused cursor option shardIds" in caplog.text
