"""Writeback of ranked recommendations as edges, and the MovieLens round trip through ArangoDB.

Runs against the double, or the real server named by ``SCALABLE_REC_ARANGO_URL`` (fault
tests then skip).
"""

import hashlib
import logging

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pytest

from scalable_rec import cli, pipeline
from scalable_rec.config import DataConfig, RunConfig
from scalable_rec.connection import ENV_DATABASE, ENV_PASSWORD, ENV_URL, ENV_USER, ArangoConfig, ArangoSettings, connect
from scalable_rec.errors import WriteMismatchError
from scalable_rec.graph import features
from scalable_rec.shards import GraphShards
from scalable_rec.sink.arango import WritebackConfig, recommendation_key, write_recommendations
from scalable_rec.train import ModelConfig, TrainConfig

LAYOUT = ArangoConfig(arango_retries=3, arango_backoff=0.01)
COLLECTION = "Recommendation_Inferences"
EDGE_QUERY = "FOR v IN @@c RETURN [v._key, v._from, v._to, v.score, v.rank, v.run_id, v.created_at]"


def _ranked(users, k=3, movies=20, seed=0) -> list[pa.RecordBatch]:
    """One batch per two users of ``k`` ranked movies each."""
    rng = np.random.default_rng(seed)
    batches = []
    for i in range(0, len(users), 2):
        chunk = users[i : i + 2]
        picks = [rng.choice(movies, k, replace=False) + 1 for _ in chunk]
        batches.append(
            pa.record_batch(
                {
                    "user_key": pa.array([u for u in chunk for _ in range(k)]),
                    "movie_key": pa.array([int(m) for p in picks for m in p]),
                    "score": pa.array(np.sort(rng.random(len(chunk) * k))[::-1], pa.float32()),
                    "rank": pa.array(list(range(1, k + 1)) * len(chunk), pa.int32()),
                }
            )
        )
    return batches


def _edges(db, name=COLLECTION) -> dict[str, tuple]:
    cursor = db.aql.execute(EDGE_QUERY, bind_vars={"@c": name})
    return {row[0]: tuple(row[1:]) for row in cursor}


@pytest.fixture
def db(arango_endpoint):
    return connect(
        ArangoSettings(
            url=arango_endpoint.url,
            database=arango_endpoint.database,
            username=arango_endpoint.username,
            password=arango_endpoint.password,
        )
    )


def _write(db, batches, run_id="run-a", **cfg):
    return write_recommendations(
        db, batches, LAYOUT, WritebackConfig(sink="arango", **cfg), run_id, created_at="2024-01-01T00:00:00+00:00"
    )


def test_writeback_edges_and_idempotent_rerun(db):
    users = [str(u) for u in range(1, 11)]
    first = _write(db, _ranked(users))
    edges = _edges(db)
    assert first.counts.sent == first.counts.created == len(edges) == 30 and first.users == 10
    key = recommendation_key("run-a", "1", str(_ranked(users)[0].column("movie_key")[0].as_py()))
    assert edges[key][:2] == ("Users/1", f"Movie/{_ranked(users)[0].column('movie_key')[0].as_py()}")
    assert edges[key][3:] == (1, "run-a", "2024-01-01T00:00:00+00:00")
    again = _write(db, _ranked(users))
    assert (again.counts.created, again.counts.updated) == (0, 30)
    assert _edges(db) == edges


def test_batches_are_bounded_by_count_and_bytes(db, arango_endpoint):
    users = [str(u) for u in range(1, 21)]
    result = _write(db, _ranked(users), writeback_batch_docs=25, writeback_batch_mb=4096 / (1 << 20))
    assert result.counts.sent == 60 and result.counts.requests >= 3
    if arango_endpoint.double is not None:
        imports = arango_endpoint.double.requests.matching("POST", "/_api/import")
        assert all(r.body_items <= 25 and r.body_bytes <= 4096 * 1.1 for r in imports)


@pytest.mark.parametrize("fault", ["503", "connection-reset"])
def test_transient_failures_are_retried(db, arango_faults, fault):
    users = [str(u) for u in range(1, 11)]
    if fault == "503":
        arango_faults.fail_next("/_api/import", 503, times=5)
    else:
        arango_faults.drop_next("/_api/import", times=4, lose_response=True)
    result = _write(db, _ranked(users), writeback_batch_docs=10)
    assert result.counts.created + result.counts.updated == result.counts.sent == 30
    assert len(_edges(db)) == 30


def test_keys_the_server_would_reject_are_refused_and_reported(db):
    # An AQL insert fails whole at its first bad document, so such edges are refused before sending;
    # every other user's edges are still written.
    batch = pa.record_batch(
        {
            "user_key": pa.array(["1", "bad user"]),
            "movie_key": pa.array(["5", "6"]),
            "score": pa.array([1.0, 0.5], pa.float32()),
            "rank": pa.array([1, 2], pa.int32()),
        }
    )
    with pytest.raises(
        WriteMismatchError,
        match=r"refused 1 of 2 recommendation edges before sending .*\n"
        r"  user 'bad user' → movie '6': a key with characters",
    ):
        _write(db, [batch])
    assert [v[0] for v in _edges(db).values()] == ["Users/1"]


def test_replace_previous_keeps_every_user_covered(db, arango_endpoint):
    users = [str(u) for u in range(1, 11)]
    _write(db, _ranked(users, seed=1), run_id="run-a")
    double = arango_endpoint.double
    if double is not None:
        double.requests.clear()
    result = _write(db, _ranked(users[:6], seed=2), run_id="run-b", replace_previous=True, writeback_batch_docs=5)
    if double is not None:  # two users (6 edges) per transaction: insert, then remove, then commit
        log = [(r.method, r.api_path.split("/")[2]) for r in double.requests if r.api_path.startswith("/_api/")]
        group = [("POST", "transaction"), ("POST", "cursor"), ("POST", "cursor"), ("PUT", "transaction")]
        assert log[-12:] == group * 3
    runs_by_user: dict[str, set] = {}
    for _from, _to, _score, _rank, run_id, _ in _edges(db).values():
        runs_by_user.setdefault(_from[6:], set()).add(run_id)
    assert all(runs_by_user[u] == {"run-b"} for u in users[:6])
    assert all(runs_by_user[u] == {"run-a"} for u in users[6:])
    assert result.removed_previous == 18


def _by_user(db) -> dict[str, list[tuple]]:
    out: dict[str, list[tuple]] = {}
    for _from, _to, _score, rank, run_id, _ in _edges(db).values():
        out.setdefault(_from[6:], []).append((rank, _to, run_id))
    return {u: sorted(v) for u, v in out.items()}


@pytest.mark.parametrize("second", [dict(k=2, seed=0), dict(k=3, seed=5)], ids=["smaller-k", "retrained"])
def test_rescoring_the_same_run_leaves_exactly_the_new_edges(db, second):
    # Written with k=3, then again into the same run id with k=2 (or another model): every user's
    # edges are exactly the second write's (before: stale edges stayed, two of them at rank 1).
    users = [str(u) for u in range(1, 11)]
    _write(db, _ranked(users, k=3, seed=1), writeback_batch_docs=7)
    result = _write(db, _ranked(users, **second), writeback_batch_docs=7)
    expected = {}
    for batch in _ranked(users, **second):
        for u, m, r in zip(*(batch.column(c).to_pylist() for c in ("user_key", "movie_key", "rank"))):
            expected.setdefault(u, []).append((r, f"Movie/{m}", "run-a"))
    assert _by_user(db) == {u: sorted(v) for u, v in expected.items()}
    assert result.removed_previous == len(_edges_of_first_write_not_kept(users, second))


def _edges_of_first_write_not_kept(users, second) -> set:
    def keys(batches):
        return {
            (u, m) for b in batches for u, m in zip(b.column("user_key").to_pylist(), b.column("movie_key").to_pylist())
        }

    return keys(_ranked(users, k=3, seed=1)) - keys(_ranked(users, **second))


class _Killed(BaseException):
    """Stands in for the process dying (no except clause of the sink catches it)."""


def test_a_crash_mid_write_leaves_each_user_all_old_or_all_new(db, arango_faults, arango_endpoint, monkeypatch):
    from arango.aql import AQL

    users = [str(u) for u in range(1, 11)]
    _write(db, _ranked(users, k=3, seed=1), writeback_batch_docs=6)
    old, execute, removes = _by_user(db), AQL.execute, []

    def dies_in_the_third_group(self, query, **kwargs):
        if query.startswith("FOR v IN @@collection FILTER v._from IN @users"):
            removes.append(1)
            if len(removes) == 3:  # the third group's edges are in, its old ones not yet removed
                arango_faults.drop_next("/_api/transaction/", method="DELETE", times=10)  # its abort is lost too
                raise _Killed()
        return execute(self, query, **kwargs)

    monkeypatch.setattr(AQL, "execute", dies_in_the_third_group)
    with pytest.raises(_Killed):
        _write(db, _ranked(users, k=2, seed=0), writeback_batch_docs=6)
    monkeypatch.setattr(AQL, "execute", execute)
    expired = arango_endpoint.double.expire_transactions()  # the server's idle timeout
    new = {
        u: sorted(
            (r, f"Movie/{m}", "run-a")
            for b in _ranked(users, k=2, seed=0)
            for bu, m, r in zip(*(b.column(c).to_pylist() for c in ("user_key", "movie_key", "rank")))
            if bu == u
        )
        for u in users
    }
    now = _by_user(db)
    assert all(now[u] in (old[u], new[u]) for u in users)
    assert [u for u in users if now[u] == new[u]] == users[:6]  # two groups of three users committed
    assert expired == 1


def test_a_group_that_fails_transiently_is_written_again_whole(db, arango_faults, arango_endpoint):
    users = [str(u) for u in range(1, 7)]
    _write(db, _ranked(users, k=3, seed=1))
    # more 503s than python-arango re-sends by itself: the group's transaction is aborted and redone
    arango_faults.fail_next("/_api/cursor", 503, times=4)
    _write(db, _ranked(users, k=2, seed=0))
    assert all(len(edges) == 2 for edges in _by_user(db).values()) and len(_by_user(db)) == 6
    assert arango_endpoint.double.requests.matching("DELETE", "/_api/transaction/")


# ----------------------------------------------------------------------------- round trip


def _cheap_titles(titles, cfg, progress=True):
    """Stands in for the sentence-transformer (20-40 s on two cores): the round trip tests data flow."""
    return np.stack([np.frombuffer(hashlib.sha256(t.encode()).digest()[:16], np.uint8) / 255.0 for t in titles]).astype(
        np.float32
    )


def _checksum(triples) -> tuple[int, str]:
    """Order-independent: count and sha256 over the sorted (from, to, rating) triples."""
    rows = sorted(f"{u}|{m}|{float(r)}" for u, m, r in triples)
    return len(rows), hashlib.sha256("\n".join(rows).encode()).hexdigest()


def _shard_triples(out):
    shards = GraphShards(out)
    users = shards.nodes("user").column("key").to_pylist()
    movies = shards.nodes("movie").column("key").to_pylist()
    e = shards.edges("user", "rates", "movie").to_pydict()
    return [(users[s], movies[d], r) for s, d, r in zip(e["src"], e["dst"], e["rating"])]


def _manifest_files(out):
    m = GraphShards(out).manifest
    return {f.path: f.sha256 for info in {**m.node_types, **m.edge_types}.values() for f in info.files}


def _files_containing(root, secret: str) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]


@pytest.mark.slow
def test_movielens_round_trip(arango_endpoint, movielens_dir, tmp_path, monkeypatch, caplog, capsys):
    caplog.set_level(logging.DEBUG)
    for var, value in (
        (ENV_URL, arango_endpoint.url),
        (ENV_DATABASE, arango_endpoint.database),
        (ENV_USER, arango_endpoint.username),
        (ENV_PASSWORD, arango_endpoint.password),
    ):
        monkeypatch.setenv(var, value)
    monkeypatch.setattr(features, "embed_titles", _cheap_titles)
    db = connect(LAYOUT.settings())
    csv = pacsv.read_csv(movielens_dir / "ratings.csv").to_pydict()
    expected = _checksum(zip(map(str, csv["userId"]), map(str, csv["movieId"]), csv["rating"]))
    k, users = 5, len(set(csv["userId"]))

    assert cli.main(["arango", "load", "--data", str(movielens_dir)]) == 0
    assert db.collection("Ratings").count() == expected[0] == 100_004
    out = tmp_path / "shards"
    assert cli.main(["arango", "export", "--shards", str(out), "--max-rows-per-shard", "40000"]) == 0
    assert _checksum(_shard_triples(out)) == expected
    shards_before = _manifest_files(out)

    run_dir = tmp_path / "run"
    cfg = RunConfig(
        data=DataConfig(shards=str(out), workdir=str(tmp_path)),
        model=ModelConfig(hidden=16),
        train=TrainConfig(epochs=1, max_steps=20, batch_size=1024, num_neighbors=[5, 3], progress=False),
        run_dir=str(run_dir),
    )
    pipeline.train_stage(cfg)
    assert cli.main(["score", "--run-dir", str(run_dir), "--sink", "arango", "--k", str(k)]) == 0
    recommendations = _edges(db)
    assert len(recommendations) == users * k
    assert {v[4] for v in recommendations.values()} == {run_dir.name}

    # Again, end to end: nothing changes.
    assert cli.main(["arango", "load", "--data", str(movielens_dir)]) == 0
    assert cli.main(["arango", "export", "--shards", str(out), "--max-rows-per-shard", "40000", "--overwrite"]) == 0
    assert _manifest_files(out) == shards_before
    assert cli.main(["score", "--run-dir", str(run_dir), "--sink", "arango", "--k", str(k)]) == 0
    assert _edges(db) == recommendations
    assert db.collection("Ratings").count() == expected[0] and db.collection("Users").count() == users

    # The password is in no file, log line or printed output of the whole round trip.
    secret = arango_endpoint.password
    if secret:
        assert _files_containing(tmp_path, secret) == []
        assert secret not in caplog.text and secret not in capsys.readouterr().out
