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
MOVIES = ("movieId,title,genres\n1,Toy Story (1995),Adventure|Animation\n2,Heat (1995),Action|Crime\n"
          "3,Unknown (2000),(no genres listed)\n")


def _movielens(tmp_path, users=12):
    """12 users × 3 movies, 30 ratings (some users rate all three)."""
    rows = [(u, m, (u + m) % 10 / 2 + 0.5, 1_000_000 + u * 10 + m) for u in range(1, users + 1)
            for m in (1, 2, 3) if (u * m) % 5 != 1][:30]
    (tmp_path / "movies.csv").write_text(MOVIES)
    (tmp_path / "ratings.csv").write_text("userId,movieId,rating,timestamp\n" +
                                          "".join(f"{u},{m},{r},{t}\n" for u, m, r, t in rows))
    return MovieLensSource(str(tmp_path)), rows


@pytest.fixture
def db(arango_endpoint):
    return connect(ArangoSettings(url=arango_endpoint.url, database=arango_endpoint.database,
                                  username=arango_endpoint.username, password=arango_endpoint.password))


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
    assert definition == {"edge_collection": "Ratings", "from_vertex_collections": ["Users"],
                          "to_vertex_collections": ["Movie"]}


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
    db.create_graph("movie_rating_graph", edge_definitions=[{"edge_collection": "Ratings",
                                                             "from_vertex_collections": ["Movie"],
                                                             "to_vertex_collections": ["Users"]}])
    source, _ = _movielens(tmp_path)
    with pytest.raises(DatabaseError, match="Graph 'movie_rating_graph' exists with edge definitions .* expected"):
        load_movielens(db, source, LAYOUT)


def test_ratings_collection_of_wrong_type_is_an_error(db, tmp_path):
    db.create_collection("Ratings")
    source, _ = _movielens(tmp_path)
    with pytest.raises(DatabaseError, match="'Ratings' .* is a document collection, expected an edge collection"):
        load_movielens(db, source, LAYOUT)
