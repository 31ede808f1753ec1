"""``arango load``: MovieLens → Users, Movie, Ratings and the named graph; idempotent, checked.

Runs against the double, or the real server named by ``SCALABLE_REC_ARANGO_URL`` (fault
tests then skip).
"""

import pytest

from scalable_rec.connection import ArangoConfig, ArangoSettings, RetryPolicy, connect
from scalable_rec.errors import DatabaseError, WriteMismatchError
from scalable_rec.sink.arango import import_documents
from scalable_rec.sink.arango_load import LoadConfig, load_movielens
from scalable_rec.source import MovieLensSource

LAYOUT = ArangoConfig(arango_retries=3, arango_backoff=0.01)
MOVIES = (
    "movieId,title,genres\n1,Toy Story (1995),Adventure|Animation\n2,Heat (1995),Action|Crime\n"
    "3,Unknown (2000),(no genres listed)\n"
)


def _movielens(tmp_path, users=12):
    """12 users × 3 movies, 30 ratings (some users rate all three)."""
    rows = [
        (u, m, (u + m) % 10 / 2 + 0.5, 1_000_000 + u * 10 + m)
        for u in range(1, users + 1)
        for m in (1, 2, 3)
        if (u * m) % 5 != 1
    ][:30]
    (tmp_path / "movies.csv").write_text(MOVIES)
    (tmp_path / "ratings.csv").write_text(
        "userId,movieId,rating,timestamp\n" + "".join(f"{u},{m},{r},{t}\n" for u, m, r, t in rows)
    )
    return MovieLensSource(str(tmp_path)), rows


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


def _count(db, name):
    return db.collection(name).count()


def test_load_writes_collections_graph_and_keys(db, tmp_path):
    source, rows = _movielens(tmp_path)
    result = load_movielens(db, source, LAYOUT, LoadConfig(load_batch_size=7))
    assert (_count(db, "Movie"), _count(db, "Users"), _count(db, "Ratings")) == (3, 12, len(rows))
    assert result.ratings.requests == -(-len(rows) // 7) and result.ratings.created == len(rows)
    u, m, r, t = rows[0]
    edge = db.collection("Ratings").get(f"{u}-{m}")
    assert (edge["_from"], edge["_to"], edge["rating"], edge["timestamp"]) == (f"Users/{u}", f"Movie/{m}", r, t)
    assert db.collection("Movie").get("1")["genres"] == ["Adventure", "Animation"]
    assert db.collection("Movie").get("3")["genres"] == []
    (definition,) = db.graph("movie_rating_graph").edge_definitions()
    assert definition == {
        "edge_collection": "Ratings",
        "from_vertex_collections": ["Users"],
        "to_vertex_collections": ["Movie"],
    }


def test_reload_neither_duplicates_nor_fails(db, tmp_path):
    source, rows = _movielens(tmp_path)
    load_movielens(db, source, LAYOUT)
    again = load_movielens(db, source, LAYOUT)
    assert (_count(db, "Movie"), _count(db, "Users"), _count(db, "Ratings")) == (3, 12, len(rows))
    assert (again.ratings.created, again.ratings.updated) == (0, len(rows))


@pytest.mark.parametrize("fault", ["503", "lost-response"])
def test_transient_import_failures_are_retried(db, tmp_path, arango_faults, arango_endpoint, fault):
    source, rows = _movielens(tmp_path)
    if fault == "503":  # more than python-arango's own three tries: our backoff takes over
        arango_faults.fail_next("/_api/import", 503, times=4)
    else:  # the server imports the batch, the answer is lost, the batch is sent again
        arango_faults.drop_next("/_api/import", times=3, lose_response=True)
    result = load_movielens(db, source, LAYOUT, LoadConfig(load_batch_size=10))
    assert (_count(db, "Movie"), _count(db, "Users"), _count(db, "Ratings")) == (3, 12, len(rows))
    total = result.movies
    assert total.created + total.updated == total.sent == 3
    imports = arango_endpoint.double.requests.matching("POST", "/_api/import")
    assert sum(r.status == 503 or r.dropped for r in imports) >= 3


def test_every_mismatch_is_reported(db):
    db.create_collection("Edges", edge=True)
    docs = [{"_key": f"e{i}", "_from": "Users/1", "_to": "Movie/1"} for i in range(6)]
    docs[1].pop("_from")
    docs[4]["_to"] = "not a handle"
    with pytest.raises(WriteMismatchError) as err:
        import_documents(db.collection("Edges"), docs, RetryPolicy(attempts=0), max_docs=3)
    message = str(err.value)
    assert "2 of 2 import requests disagree with what was sent" in message
    assert "request 0 (keys 'e0'..'e2'): sent 3, server created 2 + updated 0, errors 1" in message
    assert "request 1 (keys 'e3'..'e5'): sent 3, server created 2 + updated 0, errors 1" in message
    assert _count(db, "Edges") == 4  # the valid documents are in


def test_existing_graph_with_other_definition_is_an_error(db, tmp_path):
    db.create_collection("Users")
    db.create_collection("Movie")
    db.create_collection("Ratings", edge=True)
    db.create_graph(
        "movie_rating_graph",
        edge_definitions=[
            {"edge_collection": "Ratings", "from_vertex_collections": ["Movie"], "to_vertex_collections": ["Users"]}
        ],
    )
    source, _ = _movielens(tmp_path)
    with pytest.raises(DatabaseError, match="Graph 'movie_rating_graph' exists with edge definitions .* expected"):
        load_movielens(db, source, LAYOUT)


def test_ratings_collection_of_wrong_type_is_an_error(db, tmp_path):
    db.create_collection("Ratings")
    source, _ = _movielens(tmp_path)
    with pytest.raises(DatabaseError, match="'Ratings' .* is a document collection, expected an edge collection"):
        load_movielens(db, source, LAYOUT)


# ----------------------------------------------------------------------------- issue 10: validation, conflicts, 403


def test_load_skips_bad_ratings_exactly_like_prepare(db, tmp_path):
    from scalable_rec.source import SkipReport, write_rating_shards

    (tmp_path / "movies.csv").write_text(MOVIES)
    (tmp_path / "ratings.csv").write_text(
        "userId,movieId,rating,timestamp\n1,1,4.0,10\n1,2,nan,11\n2,1,inf,12\n2,2,7.5,13\n3,3,0.5,14\n4,1,-inf,15\n"
    )
    load_report, prepare_report = SkipReport(), SkipReport()
    load_movielens(db, MovieLensSource(str(tmp_path)), LAYOUT, report=load_report)
    write_rating_shards(MovieLensSource(str(tmp_path)), str(tmp_path / "shards"), prepare_report)
    assert load_report.counts == prepare_report.counts == {"rating_out_of_range": 4}
    assert _count(db, "Ratings") == 2 and _count(db, "Users") == 2  # users with only bad ratings are no nodes


def test_import_retries_write_write_conflicts(db, arango_faults):
    db.create_collection("C")
    arango_faults.conflict_next_imports([0, 2, 3])
    counts = import_documents(
        db.collection("C"), [{"_key": str(i), "v": i} for i in range(5)], RetryPolicy(attempts=2, backoff=0.0)
    )
    assert (counts.created, counts.errors, counts.conflicts_retried) == (5, 0, 3) and _count(db, "C") == 5


def test_conflicts_after_a_validation_error_resend_the_right_documents(db, arango_faults):
    # Insert errors are numbered among the documents that passed validation: with request
    # document 1 invalid, a conflict on request document 3 is reported "at position 2".
    db.create_collection("E", edge=True)
    docs = [{"_key": str(i), "_from": "V/1", "_to": f"V/{i}"} for i in range(4)]
    docs[1] = {"_key": "1", "_from": "V/1"}  # no _to: fails validation
    arango_faults.conflict_next_imports([3])
    with pytest.raises(WriteMismatchError, match="at position 2: missing '_from' or '_to' attribute"):
        import_documents(db.collection("E"), docs, RetryPolicy(attempts=2, backoff=0.0))
    assert sorted(db.collection("E").keys()) == ["0", "2", "3"]


def test_import_conflicts_that_never_clear_are_a_mismatch(db, arango_faults):
    db.create_collection("C")
    arango_faults.conflict_next_imports(1, times=5)
    with pytest.raises(WriteMismatchError, match="write-write conflict"):
        import_documents(db.collection("C"), [{"_key": "a"}, {"_key": "b"}], RetryPolicy(attempts=2, backoff=0.0))


def test_import_refuses_nan_and_inf_before_sending(db, arango_endpoint, caplog):
    db.create_collection("C")
    docs = [
        {"_key": "ok", "score": 1.0},
        {"_key": "nan", "score": float("nan")},
        {"_key": "inf", "score": float("-inf")},
    ]
    counts = import_documents(db.collection("C"), docs, RetryPolicy(attempts=0))
    assert (counts.sent, counts.refused_non_finite) == (1, 2) and _count(db, "C") == 1
    assert "refused 2 documents with NaN/inf values" in caplog.text and "'nan': score=nan" in caplog.text


def test_read_only_user_gets_a_permission_error(tmp_path):
    from arango_double import ArangoDouble

    from scalable_rec.errors import PermissionDeniedError

    with ArangoDouble({"root": "pw", "reader": "pw"}, read_only=("reader",)) as double:
        double.create_database("t")
        reader = connect(ArangoSettings(url=double.url, database="t", username="reader", password="pw"))
        source, _ = _movielens(tmp_path)
        with pytest.raises(
            PermissionDeniedError, match="Creating collection 'Users'.*HTTP 403.*needs read/write access"
        ):
            load_movielens(reader, source, LAYOUT)


def test_graph_create_whose_answer_was_lost_is_fine(db, arango_faults, arango_endpoint, tmp_path):
    source, rows = _movielens(tmp_path)
    arango_faults.drop_next("/_api/gharial", method="POST", lose_response=True)
    load_movielens(db, source, LAYOUT)
    assert db.has_graph("movie_rating_graph") and _count(db, "Ratings") == len(rows)
    creates = arango_endpoint.double.requests.matching("POST", "/_api/gharial")
    assert [r.status for r in creates] == [None, 409]  # created, answer lost; the re-sent create: 1925
