"""ArangoDB source and resumable export, against the double (or a real server when
``SCALABLE_REC_ARANGO_URL`` is set; fault tests then skip).

A small graph (40 users, 30 movies, 600 ratings) is exported with 100-row shards and
25-row cursor batches, so every fault lands mid-cursor and mid-export.
"""

import logging
import random

import pytest
from arango.aql import AQL

from scalable_rec import cli
from scalable_rec.connection import ArangoConfig, ArangoSettings, connect
from scalable_rec.errors import (
    CollectionNotFoundError,
    ConfigError,
    DatabaseError,
    DatabaseUnreachableError,
    MalformedInputError,
)
from scalable_rec.shards import GraphShards, Manifest
from scalable_rec.source import SkipReport, arango_export, write_rating_shards
from scalable_rec.source.arango import ArangoSource, ExportConfig
from scalable_rec.source.arango_export import export_shards

LAYOUT = ArangoConfig(arango_retries=3, arango_backoff=0.01)
USERS, MOVIES, RATINGS = 40, 30, 600
SHARD_ROWS, BATCH = 100, 25


def _connect(endpoint):
    return connect(
        ArangoSettings(
            url=endpoint.url,
            database=endpoint.database,
            username=endpoint.username,
            password=endpoint.password,
            http_retries=0,
        )
    )


def _fill(db, extra_ratings=()):
    """Users "1".."40", movies "1".."30" (genres alternately a list and a pipe string), 600 ratings."""
    rng = random.Random(3)
    db.create_collection("Users").import_bulk([{"_key": str(u)} for u in range(1, USERS + 1)])
    db.create_collection("Movie").import_bulk(
        [
            {"_key": str(m), "title": f"Movie {m} (1999)", "genres": ["Drama", "Comedy"] if m % 2 else "Action|Sci-Fi"}
            for m in range(1, MOVIES + 1)
        ]
    )
    pairs = rng.sample([(u, m) for u in range(1, USERS + 1) for m in range(1, MOVIES + 1)], RATINGS)
    docs = [
        {
            "_key": f"{u}-{m}",
            "_from": f"Users/{u}",
            "_to": f"Movie/{m}",
            "rating": rng.randint(1, 10) / 2,
            "timestamp": 964_980_000 + i,
        }
        for i, (u, m) in enumerate(pairs)
    ]
    db.create_collection("Ratings", edge=True).import_bulk(docs + list(extra_ratings))
    return docs


def _source(db, layout=LAYOUT, **export):
    export.setdefault("export_partition_rows", SHARD_ROWS)
    return ArangoSource(db, layout, ExportConfig(export_batch_size=BATCH, **export))


def _export(db, out, strict=False, resume=False, **export):
    report = SkipReport(strict=strict)
    manifest = export_shards(
        _source(db, **export), out, report, max_rows_per_shard=SHARD_ROWS, resume=resume, progress=False
    )
    return manifest, report


def _files(manifest: Manifest) -> dict[str, str]:
    tables = {**manifest.node_types, **manifest.edge_types}
    return {f.path: f.sha256 for info in tables.values() for f in info.files}


def _edge_rows(out) -> list[tuple]:
    shards = GraphShards(out)
    users = shards.nodes("user").column("key").to_pylist()
    movies = shards.nodes("movie").column("key").to_pylist()
    e = shards.edges("user", "rates", "movie").to_pydict()
    return [(users[s], movies[d], r, t) for s, d, r, t in zip(e["src"], e["dst"], e["rating"], e["timestamp"])]


def _expected(docs) -> list[tuple]:
    return [(d["_from"][6:], d["_to"][6:], d["rating"], d["timestamp"]) for d in docs]


@pytest.fixture
def db(arango_endpoint):
    return _connect(arango_endpoint)


@pytest.fixture
def clean(db, tmp_path):
    """The filled database and the manifest, report and rows of an export without faults."""
    docs = _fill(db)
    manifest, report = _export(db, tmp_path / "clean")
    return docs, manifest, report, _edge_rows(tmp_path / "clean")


def test_export_writes_every_rating_once_in_bounded_shards(db, clean, tmp_path):
    docs, manifest, report, rows = clean
    assert sorted(rows) == sorted(_expected(docs)) and len(rows) == RATINGS
    edges = manifest.edge_types["user__rates__movie"]
    assert not list(tmp_path.glob(".*spill*"))  # spilled partitions are temporary
    sizes = [f.num_rows for f in edges.files]  # one or more parts per hash partition, none above the bound
    assert sum(sizes) == RATINGS and max(sizes) <= SHARD_ROWS and len(sizes) >= RATINGS // SHARD_ROWS
    shards = GraphShards(tmp_path / "clean")
    movies = shards.nodes("movie").to_pydict()
    assert sorted(movies["key"]) == sorted(str(m) for m in range(1, MOVIES + 1))
    assert movies["genres"][movies["key"].index("1")] == "Drama|Comedy"  # list → pipe-joined
    assert movies["genres"][movies["key"].index("2")] == "Action|Sci-Fi"
    assert shards.nodes("user").num_rows == USERS
    assert report.counts == {} and report.accepted == {"movies": MOVIES, "users": USERS, "ratings": RATINGS}
    assert manifest.config["source"] == "arango" and manifest.config["ratings"] == "Ratings"


def test_queries_are_stream_cursors_with_bind_variables(db, monkeypatch, tmp_path):
    _fill(db)
    calls, execute = [], AQL.execute

    def spy(self, query, **kwargs):
        calls.append((query, kwargs))
        return execute(self, query, **kwargs)

    monkeypatch.setattr(AQL, "execute", spy)
    _export(db, tmp_path / "s")
    assert calls
    for query, kw in calls:
        assert "@@collection" in query and "Ratings" not in query and "rating" not in query.replace("@rating", "")
        assert (kw["stream"], kw["allow_retry"], kw["fill_block_cache"], kw["batch_size"]) == (True, True, False, BATCH)
        assert kw["ttl"] > 0 and "limit" not in kw["bind_vars"] and "SORT" not in query
    rating_calls = [(q, kw) for q, kw in calls if kw["bind_vars"]["@collection"] == "Ratings"]
    assert rating_calls[0][0].endswith("RETURN [v._key, v._from, v._to, v.@rating, v.@timestamp]")
    # 600 ratings / 100 rows per partition: 6 disjoint hash partitions covering all 256 MD5 prefixes
    buckets = [b for _, kw in rating_calls for b in kw["bind_vars"]["buckets"]]
    assert len(rating_calls) == 6 and sorted(buckets) == [f"{i:02x}" for i in range(256)]


def test_source_drives_write_rating_shards(db, clean, tmp_path):
    docs, *_ = clean
    report = SkipReport()
    write_rating_shards(_source(db), str(tmp_path / "proto"), report, max_rows_per_shard=SHARD_ROWS)
    assert sorted(_edge_rows(tmp_path / "proto")) == sorted(_expected(docs))
    assert report.accepted["ratings"] == RATINGS


# ----------------------------------------------------------------------------- faults


@pytest.mark.parametrize("times", [1, 3], ids=["client-resends", "reopen-after-client-gives-up"])
def test_connection_dropped_mid_cursor(db, clean, arango_faults, tmp_path, times):
    _, manifest, report, _ = clean
    # movies and users take 4 batches; the 3rd batch of the first ratings range is dropped
    arango_faults.drop_connection_after_batches(6, times=times, lose_response=True)
    faulty, faulty_report = _export(db, tmp_path / "faulty")
    assert _files(faulty) == _files(manifest)
    assert faulty_report.to_json() == report.to_json()


def test_expired_cursor_resumes_from_last_shard(db, clean, arango_faults, arango_endpoint, tmp_path):
    _, manifest, report, _ = clean
    arango_faults.expire_cursor_after_batches(7)  # movies 2 batches, users 2, mid-way through ratings
    faulty, faulty_report = _export(db, tmp_path / "faulty")
    assert _files(faulty) == _files(manifest) and faulty_report.to_json() == report.to_json()
    assert any(r.status == 404 for r in arango_endpoint.double.requests.matching("POST", "/_api/cursor/"))


def test_killed_export_resumes_from_last_shard(db, clean, monkeypatch, tmp_path):
    _, manifest, report, _ = clean
    calls, validate = [], arango_export.validate_ratings

    class Killed(Exception):
        pass

    def dies_in_third_range(*args, **kwargs):  # 4 batches per range: dies mid-way through range 3
        calls.append(1)
        if len(calls) == 11:
            raise Killed()
        return validate(*args, **kwargs)

    monkeypatch.setattr(arango_export, "validate_ratings", dies_in_third_range)
    with pytest.raises(Killed):
        _export(db, tmp_path / "killed")
    assert (tmp_path / "killed.incomplete").is_dir() and not (tmp_path / "killed").exists()
    monkeypatch.setattr(arango_export, "validate_ratings", validate)
    resumed, resumed_report = _export(db, tmp_path / "killed", resume=True)
    assert _files(resumed) == _files(manifest) and resumed_report.to_json() == report.to_json()


def test_resume_refuses_a_different_export(db, clean, monkeypatch, tmp_path):
    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    validate = arango_export.validate_ratings
    monkeypatch.setattr(arango_export, "validate_ratings", killed)
    with pytest.raises(KeyboardInterrupt):
        _export(db, tmp_path / "other")
    monkeypatch.setattr(arango_export, "validate_ratings", validate)
    with pytest.raises(ConfigError, match="Cannot resume .* it was started with .*'rating': 'rating'"):
        _export(db, tmp_path / "other", resume=True, rating_attribute="stars")


def test_cursor_that_keeps_dying_gives_up(db, arango_faults, tmp_path):
    _fill(db)
    arango_faults.fail_next("/_api/cursor", 503, times=1000)
    with pytest.raises(DatabaseUnreachableError, match="gave up after 3 re-reads"):
        _export(db, tmp_path / "dead")


def test_busy_cursor_after_a_dropped_fetch_rereads_the_partition(db, clean, arango_faults, arango_endpoint, tmp_path):
    # The fetch's connection drops while the server still holds the cursor; python-arango re-sends at
    # once and gets 409 / 1601. The partition is read again after a backoff, as for 1600.
    _, manifest, report, _ = clean
    arango_faults.drop_connection_after_batches(6, busy_for=0.3)
    faulty, faulty_report = _export(db, tmp_path / "faulty")
    assert _files(faulty) == _files(manifest) and faulty_report.to_json() == report.to_json()
    assert any(r.status == 409 for r in arango_endpoint.double.requests.matching("POST", "/_api/cursor/"))


@pytest.mark.parametrize("status, error_num", [(500, 32), (500, 4), (400, 1501)])
def test_deterministic_cursor_errors_are_not_retried(db, arango_faults, arango_endpoint, tmp_path, status, error_num):
    # A 500 that names its cause (32: resource limit) fails the same way again: one try, one named line.
    _fill(db)
    arango_faults.fail_next("/_api/cursor", status, error_num=error_num, message="resource limit exceeded", times=1000)
    with pytest.raises(DatabaseError, match=rf"\[HTTP {status}\]\[ERR {error_num}\]") as err:
        _export(db, tmp_path / "dead")
    assert not isinstance(err.value, DatabaseUnreachableError)
    assert len([r for r in arango_endpoint.double.requests.matching("POST", "/_api/cursor") if r.status == status]) == 1


def test_source_reopens_after_last_key_received(db, clean, arango_faults, tmp_path):
    docs, *_ = clean
    arango_faults.drop_connection_after_batches(5, times=3, lose_response=True)
    write_rating_shards(_source(db), str(tmp_path / "proto"), SkipReport(), max_rows_per_shard=SHARD_ROWS)
    assert sorted(_edge_rows(tmp_path / "proto")) == sorted(_expected(docs))


# ----------------------------------------------------------------------------- bad input


BAD_EDGES = [
    {"_key": "ghost-user", "_from": "Users/999", "_to": "Movie/1", "rating": 3.0, "timestamp": 1},
    {"_key": "ghost-movie", "_from": "Users/1", "_to": "Movie/999", "rating": 3.0, "timestamp": 1},
    {"_key": "wrong-from", "_from": "Movie/2", "_to": "Movie/1", "rating": 3.0, "timestamp": 1},
    {"_key": "text-rating", "_from": "Users/1", "_to": "Movie/3", "rating": "five", "timestamp": 1},
    {"_key": "no-rating", "_from": "Users/1", "_to": "Movie/4", "timestamp": 1},
    {"_key": "too-high", "_from": "Users/1", "_to": "Movie/5", "rating": 7.0, "timestamp": 1},
]


def test_bad_edges_are_counted_with_examples(db, tmp_path):
    docs = _fill(db, BAD_EDGES)
    _, report = _export(db, tmp_path / "bad")
    assert report.counts == {
        "unknown_user": 1,
        "unknown_movie": 1,
        "wrong_from_collection": 1,
        "non_numeric_rating": 1,
        "missing_rating": 1,
        "rating_out_of_range": 1,
    }
    assert "Ratings/text-rating: expected a numeric rating, got" in report.examples["non_numeric_rating"][0]
    assert "'user_key': '999'" in report.examples["unknown_user"][0]
    assert sorted(_edge_rows(tmp_path / "bad")) == sorted(_expected(docs))
    assert GraphShards(tmp_path / "bad").manifest.report["skipped"] == report.counts


@pytest.mark.parametrize(
    "edge, message",
    [
        (BAD_EDGES[0], r"unknown_user: \{'user_key': '999'"),
        (BAD_EDGES[1], r"unknown_movie: \{'user_key': '1', 'movie_key': '999'"),
        (BAD_EDGES[3], r"non_numeric_rating: Ratings/text-rating: expected a numeric rating, got .*rating='five'"),
    ],
)
def test_strict_mode_raises_on_first_bad_edge(db, tmp_path, edge, message):
    _fill(db, [edge])
    with pytest.raises(MalformedInputError, match=message):
        _export(db, tmp_path / "strict", strict=True)


def test_unknown_collection_is_named(db):
    _fill(db)
    with pytest.raises(CollectionNotFoundError, match="Collection 'Rating' does not exist in database .* edge"):
        ArangoSource(db, ArangoConfig(ratings_collection="Rating"))


def test_export_command_needs_shards_dir(caplog):
    assert cli.main(["arango", "export"]) == 2
    assert "'arango export' needs --shards DIR" in caplog.text


def test_export_command_names_a_wrong_password(arango_endpoint, tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("SCALABLE_REC_ARANGO_PASSWORD", "not-the-password")
    argv = [
        "arango",
        "export",
        "--shards",
        str(tmp_path / "s"),
        "--arango-url",
        arango_endpoint.url,
        "--arango-database",
        arango_endpoint.database,
        "--arango-username",
        arango_endpoint.username,
    ]
    assert cli.main(argv) == 2
    assert "rejected the credentials for user" in caplog.text and "not-the-password" not in caplog.text


def test_killed_between_parts_of_one_partition_drops_the_unrecorded_part(db, clean, monkeypatch, tmp_path):
    # A partition of more than SHARD_ROWS rows is written as two parts; a process killed after the
    # first part reached disk but before the partition's checkpoint leaves a part no checkpoint
    # covers. Resuming must delete it, or its rows would be exported twice.
    from scalable_rec.shards.writer import ShardWriter

    _, manifest, report, rows = clean
    write = ShardWriter.write

    class Killed(Exception):
        pass

    def dies_after_a_part(self, batch, state=None):
        before = len(self.files)
        write(self, batch, state)
        if self.directory.name == "user__rates__movie" and len(self.files) > before and state is None:
            raise Killed()

    monkeypatch.setattr(ShardWriter, "write", dies_after_a_part)
    with pytest.raises(Killed):
        _export(db, tmp_path / "killed")
    assert not list(tmp_path.glob(".*spill*"))
    monkeypatch.setattr(ShardWriter, "write", write)
    resumed, resumed_report = _export(db, tmp_path / "killed", resume=True)
    assert sorted(_edge_rows(tmp_path / "killed")) == sorted(rows)
    assert _files(resumed) == _files(manifest) and resumed_report.to_json() == report.to_json()


def test_export_command_with_parallelism_flag(db, clean, arango_endpoint, tmp_path, monkeypatch):
    docs, *_ = clean
    monkeypatch.setenv("SCALABLE_REC_ARANGO_PASSWORD", arango_endpoint.password)
    argv = [
        "arango",
        "export",
        "--shards",
        str(tmp_path / "cli"),
        "--arango-url",
        arango_endpoint.url,
        "--arango-database",
        arango_endpoint.database,
        "--arango-username",
        arango_endpoint.username,
        "--parallelism",
        "3",
        "--export-partition-rows",
        "150",
        "--export-batch-size",
        "40",
    ]
    assert cli.main(argv) == 0
    assert sorted(_edge_rows(tmp_path / "cli")) == sorted(_expected(docs))
    assert Manifest.load(tmp_path / "cli").config["parallelism"] == 3


def test_export_pauses_the_garbage_collector_and_restores_it(db, tmp_path):
    import gc

    _fill(db)
    seen = []

    class Watching(ArangoSource):
        def read(self, spec, part, consume, on_start=lambda: None):
            seen.append(gc.isenabled())
            return super().read(spec, part, consume, on_start)

    def export(out, fail=False, **cfg):
        source = Watching(db, LAYOUT, ExportConfig(export_batch_size=BATCH, export_partition_rows=SHARD_ROWS, **cfg))
        if fail:
            source.read = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom"))
        return export_shards(source, out, SkipReport(), max_rows_per_shard=SHARD_ROWS, progress=False)

    assert gc.isenabled()
    export(tmp_path / "paused")
    assert seen and not any(seen) and gc.isenabled()  # off while reading, back on after
    seen.clear()
    export(tmp_path / "not-paused", pause_gc=False)
    assert seen and all(seen)
    with pytest.raises(RuntimeError, match="boom"):
        export(tmp_path / "failed", fail=True)
    assert gc.isenabled()  # restored on error too
    gc.disable()
    try:
        export(tmp_path / "was-off")
        assert not gc.isenabled()  # a collector the caller had disabled stays disabled
    finally:
        gc.enable()
