"""Tests of the ArangoDB test double, driven through the real python-arango client.

Tests that only use the client double as contract tests: with ``SCALABLE_REC_ARANGO_URL`` set they
run against that real server. Tests that inspect the double (request log, stored documents,
faults, double-only AQL limits) skip there.
"""

from __future__ import annotations

import random
import time

import pytest
import requests
from arango import ArangoClient
from arango.exceptions import (
    AQLQueryExecuteError,
    CollectionCreateError,
    CollectionDeleteError,
    CollectionListError,
    CursorNextError,
    DatabaseCreateError,
    DatabaseDeleteError,
    DocumentCountError,
    DocumentInsertError,
    GraphCreateError,
    GraphDeleteError,
    ServerConnectionError,
)
from arango_double import *  # noqa: F401,F403 - the fixtures under test
from arango_double import ArangoDouble, ArangoEndpoint, Faults


@pytest.fixture
def client(arango_endpoint: ArangoEndpoint):
    client = ArangoClient(hosts=arango_endpoint.url)
    yield client
    client.close()


@pytest.fixture
def db(client: ArangoClient, arango_endpoint: ArangoEndpoint):
    return client.db(arango_endpoint.database, username=arango_endpoint.username, password=arango_endpoint.password)


@pytest.fixture
def sys_db(client: ArangoClient, arango_endpoint: ArangoEndpoint):
    return client.db("_system", username=arango_endpoint.username, password=arango_endpoint.password)


@pytest.fixture
def double(arango_endpoint: ArangoEndpoint) -> ArangoDouble:
    if arango_endpoint.double is None:
        pytest.skip("inspects the test double; SCALABLE_REC_ARANGO_URL points at a real server")
    return arango_endpoint.double


def _movies(db, n: int, name: str = "movies", shuffle: bool = True):
    coll = db.create_collection(name)
    docs = [{"_key": f"m{i:06d}", "i": i} for i in range(n)]
    if shuffle:
        random.Random(7).shuffle(docs)
    coll.import_bulk(docs)
    return coll


def _raw(arango_endpoint: ArangoEndpoint, method: str, path: str, **kwargs) -> requests.Response:
    url = f"{arango_endpoint.url}/_db/{arango_endpoint.database}{path}"
    auth = (arango_endpoint.username, arango_endpoint.password)
    return requests.request(method, url, auth=auth, timeout=10, **kwargs)


# ----------------------------------------------------------------------------- fixtures


def test_arango_double_fixture_serves_system_database(arango_double: ArangoDouble) -> None:
    client = ArangoClient(hosts=arango_double.url)
    sys_db = client.db("_system", username=arango_double.username, password=arango_double.password, verify=True)
    assert sys_db.databases() == ["_system"]
    arango_double.create_database("extra")
    assert sys_db.has_database("extra")
    assert arango_double.requests.matching("GET", "/_api/collection")[0].db == "_system"
    client.close()


def test_arango_endpoint_fixture_gives_fresh_database(arango_endpoint: ArangoEndpoint, db) -> None:
    assert db.properties()["name"] == arango_endpoint.database
    assert db.collections() == [] or all(c["system"] for c in db.collections())


def test_arango_faults_fixture_is_the_doubles_faults(arango_faults: Faults, arango_endpoint: ArangoEndpoint) -> None:
    assert arango_faults is arango_endpoint.double.faults


# ----------------------------------------------------------------------------- auth and databases


def test_bad_password_is_401(client: ArangoClient, arango_endpoint: ArangoEndpoint) -> None:
    with pytest.raises(ServerConnectionError) as err:
        client.db(arango_endpoint.database, username=arango_endpoint.username, password="wrong", verify=True)
    assert err.value.http_code == 401
    bad = client.db(arango_endpoint.database, username="nobody", password="x")
    with pytest.raises(CollectionListError) as err:
        bad.collections()
    assert (err.value.http_code, err.value.error_code) == (401, 11)
    no_auth = requests.get(f"{arango_endpoint.url}/_api/version", timeout=10)
    assert no_auth.status_code == 401
    assert no_auth.json()["errorMessage"] == "not authorized to execute this request"


def test_unknown_database_is_1228(client: ArangoClient, arango_endpoint: ArangoEndpoint) -> None:
    with pytest.raises(ServerConnectionError) as err:
        client.db("no_such_db", username=arango_endpoint.username, password=arango_endpoint.password, verify=True)
    assert (err.value.http_code, err.value.error_code) == (404, 1228)


def test_create_list_delete_database(sys_db, db) -> None:
    name = f"{db.name}_second"
    assert sys_db.create_database(name)
    assert sys_db.has_database(name) and name in sys_db.databases()
    with pytest.raises(DatabaseCreateError) as err:
        sys_db.create_database(name)
    assert (err.value.http_code, err.value.error_code) == (409, 1207)
    with pytest.raises(DatabaseCreateError) as err:
        db.create_database(f"{name}_x")
    assert err.value.error_code == 1230
    assert sys_db.delete_database(name)
    assert not sys_db.has_database(name)
    with pytest.raises(DatabaseDeleteError) as err:
        sys_db.delete_database(name)
    assert err.value.error_code == 1228
    assert sys_db.delete_database(name, ignore_missing=True) is False


# ----------------------------------------------------------------------------- collections, graphs


def test_collection_lifecycle(db) -> None:
    movies = db.create_collection("movies")
    rated = db.create_collection("rated", edge=True)
    assert db.has_collection("movies") and not db.has_collection("nope")
    assert rated.properties()["edge"] is True and movies.properties()["edge"] is False
    with pytest.raises(CollectionCreateError) as err:
        db.create_collection("movies")
    assert (err.value.http_code, err.value.error_code) == (409, 1207)
    movies.insert_many([{"_key": "a"}, {"_key": "b"}])
    assert movies.count() == 2
    assert movies.truncate() and movies.count() == 0
    assert db.delete_collection("movies")
    assert not db.has_collection("movies")
    with pytest.raises(CollectionDeleteError) as err:
        db.delete_collection("movies")
    assert err.value.error_code == 1203
    assert db.delete_collection("movies", ignore_missing=True) is False


def test_unknown_collection_is_1203(db) -> None:
    with pytest.raises(DocumentCountError) as err:
        db.collection("nope").count()
    assert (err.value.http_code, err.value.error_code) == (404, 1203)


def test_graph_lifecycle_creates_missing_collections(db) -> None:
    definition = {"edge_collection": "rated", "from_vertex_collections": ["users"], "to_vertex_collections": ["movies"]}
    db.create_graph("ratings", edge_definitions=[definition])
    assert db.has_graph("ratings") and not db.has_graph("other")
    assert db.collection("rated").properties()["edge"] is True
    assert db.has_collection("users") and db.has_collection("movies")
    graph = db.graph("ratings")
    assert graph.properties()["edge_definitions"] == [definition]
    assert graph.vertex_collections() == ["movies", "users"]
    assert [g["name"] for g in db.graphs()] == ["ratings"]
    with pytest.raises(GraphCreateError) as err:
        db.create_graph("ratings", edge_definitions=[definition])
    assert err.value.error_code == 1925
    assert db.delete_graph("ratings", drop_collections=True)
    assert not db.has_graph("ratings") and not db.has_collection("rated")
    with pytest.raises(GraphDeleteError) as err:
        db.delete_graph("ratings")
    assert (err.value.http_code, err.value.error_code) == (404, 1924)


# ----------------------------------------------------------------------------- documents


def test_insert_and_get_documents(db) -> None:
    movies = db.create_collection("movies")
    meta = movies.insert({"title": "Alien"})
    assert meta["_key"].isdigit() and meta["_id"] == f"movies/{meta['_key']}" and meta["_rev"]
    assert movies.get(meta["_key"])["title"] == "Alien"
    assert movies.get("missing") is None
    movies.insert({"_key": "m1", "title": "Heat", "tags": {"a": 1}})
    with pytest.raises(DocumentInsertError) as err:
        movies.insert({"_key": "m1"})
    assert (err.value.http_code, err.value.error_code) == (409, 1210)
    assert "unique constraint violated" in err.value.error_message
    movies.insert({"_key": "m1", "year": 1995, "tags": {"b": 2}}, overwrite_mode="update")
    assert movies.get("m1")["tags"] == {"a": 1, "b": 2} and movies.get("m1")["title"] == "Heat"
    movies.insert({"_key": "m1", "year": 1995}, overwrite_mode="replace")
    assert "title" not in movies.get("m1")
    movies.insert({"_key": "m1", "year": 2000}, overwrite_mode="ignore")
    assert movies.get("m1")["year"] == 1995
    with pytest.raises(DocumentInsertError) as err:
        movies.insert({"_key": "bad key/"})
    assert err.value.error_code == 1221


def test_edges_require_from_and_to(db) -> None:
    rated = db.create_collection("rated", edge=True)
    rated.insert({"_from": "users/u1", "_to": "movies/m1", "rating": 4.5})
    for bad in ({"_to": "movies/m1"}, {"_from": "u1", "_to": "movies/m1"}):
        with pytest.raises(DocumentInsertError) as err:
            rated.insert(bad)
        assert (err.value.http_code, err.value.error_code) == (400, 1233)


def test_insert_many_reports_errors_per_document(db) -> None:
    movies = db.create_collection("movies")
    results = movies.insert_many([{"_key": "a"}, {"_key": "a"}, {"_key": "b"}])
    assert [r["_key"] for r in (results[0], results[2])] == ["a", "b"]
    assert isinstance(results[1], DocumentInsertError) and results[1].error_code == 1210
    assert movies.count() == 2


# ----------------------------------------------------------------------------- import


def test_import_bulk_on_duplicate_modes(db) -> None:
    movies = db.create_collection("movies")
    movies.import_bulk([{"_key": "a", "x": 1, "keep": True}, {"_key": "b", "x": 1}])
    result = movies.import_bulk([{"_key": "a", "x": 2}, {"_key": "c"}], halt_on_error=False)
    assert (result["created"], result["errors"], result["updated"]) == (1, 1, 0)
    assert len(result["details"]) == 1 and "unique constraint violated" in result["details"][0]
    result = movies.import_bulk([{"_key": "a", "x": 3}], on_duplicate="update")
    assert (result["created"], result["updated"]) == (0, 1)
    assert movies.get("a")["x"] == 3 and movies.get("a")["keep"] is True
    movies.import_bulk([{"_key": "a", "x": 4}], on_duplicate="replace")
    assert movies.get("a")["x"] == 4 and "keep" not in movies.get("a")
    result = movies.import_bulk([{"_key": "b", "x": 9}, {"_key": "d"}], on_duplicate="ignore")
    assert (result["created"], result["ignored"], result["errors"]) == (1, 1, 0)
    assert movies.get("b")["x"] == 1 and movies.count() == 4


def test_import_bulk_complete_is_all_or_nothing(db) -> None:
    movies = db.create_collection("movies")
    movies.import_bulk([{"_key": "a"}])
    with pytest.raises(DocumentInsertError) as err:
        movies.import_bulk([{"_key": "x1"}, {"_key": "x2"}, {"_key": "a"}])  # halt_on_error=True
    assert (err.value.http_code, err.value.error_code) == (409, 1210)
    assert movies.count() == 1 and movies.get("x1") is None


def test_import_edges_with_prefixes_and_errors(db) -> None:
    rated = db.create_collection("rated", edge=True)
    result = rated.import_bulk(
        [{"_from": "u1", "_to": "m1"}, {"_from": "users/u2", "_to": "m2"}], from_prefix="users", to_prefix="movies"
    )
    assert result["created"] == 2
    rows = db.aql.execute("FOR e IN @@c SORT e._key RETURN [e._from, e._to]", bind_vars={"@c": "rated"})
    assert list(rows) == [["users/u1", "movies/m1"], ["users/u2", "movies/m2"]]
    result = rated.import_bulk([{"_from": "users/u3"}, {"_from": "users/u4", "_to": "movies/m4"}], halt_on_error=False)
    assert (result["created"], result["errors"]) == (1, 1)
    assert "'_from' or '_to'" in result["details"][0]
    with pytest.raises(DocumentInsertError) as err:
        rated.import_bulk([{"_from": "users/u5"}])
    assert (err.value.http_code, err.value.error_code) == (400, 1233)
    assert rated.count() == 3


def test_import_bulk_sends_one_request_per_batch(db, double: ArangoDouble) -> None:
    movies = db.create_collection("movies")
    results = movies.import_bulk([{"_key": f"k{i}"} for i in range(2500)], batch_size=1000)
    assert [r["created"] for r in results] == [1000, 1000, 500]
    imports = double.requests.matching("POST", "/_api/import")
    assert [r.body_items for r in imports] == [1000, 1000, 500]
    assert imports[0].query == {"type": "array", "collection": "movies", "complete": "1", "details": "1"}
    assert double.documents(db.name, "movies")[0]["_key"] == "k0"


# ----------------------------------------------------------------------------- AQL shapes


def test_key_pagination_is_ordered_and_complete(db) -> None:
    _movies(db, 53)
    query = """
        for doc in @@c
            FILTER doc._key > @after  SORT doc._key
            LIMIT @limit RETURN [doc._key, doc.@attr, doc.missing]"""
    seen, after = [], ""
    while True:
        page = list(db.aql.execute(query, bind_vars={"@c": "movies", "after": after, "limit": 10, "attr": "i"}))
        if not page:
            break
        seen.extend(page)
        after = page[-1][0]
    assert seen == [[f"m{i:06d}", i, None] for i in range(53)]


def test_full_scan_without_sort_is_in_insertion_order(db, double: ArangoDouble) -> None:
    movies = db.create_collection("movies")
    movies.import_bulk([{"_key": k} for k in ("b", "c", "a")])
    assert list(db.aql.execute("FOR v IN @@c RETURN v._key", bind_vars={"@c": "movies"})) == ["b", "c", "a"]
    assert list(movies.keys()) == ["b", "c", "a"]
    sorted_keys = db.aql.execute("FOR v IN @@c SORT v._key ASC RETURN v", bind_vars={"@c": "movies"})
    assert [d["_key"] for d in sorted_keys] == ["a", "b", "c"]


def test_edge_projection_length_and_remove(db) -> None:
    rated = db.create_collection("rated", edge=True)
    rated.import_bulk(
        [
            {"_key": f"e{i}", "_from": f"users/u{i % 3}", "_to": f"movies/m{i}", "run_id": "old" if i < 6 else "new"}
            for i in range(9)
        ]
    )
    rows = list(
        db.aql.execute(
            "FOR e IN @@c SORT e._key LIMIT @n RETURN [e._key, e._from, e._to]", bind_vars={"@c": "rated", "n": 2}
        )
    )
    assert rows == [["e0", "users/u0", "movies/m0"], ["e1", "users/u1", "movies/m1"]]
    assert list(db.aql.execute("RETURN LENGTH(@@c)", bind_vars={"@c": "rated"})) == [9]
    cursor = db.aql.execute(
        "FOR e IN @@c FILTER e._from IN @froms FILTER e.run_id != @run_id REMOVE e IN @@c",
        bind_vars={"@c": "rated", "froms": ["users/u0", "users/u1"], "run_id": "new"},
    )
    assert list(cursor) == [] and cursor.statistics()["modified"] == 4
    cursor = db.aql.execute(
        "FOR e IN @@c FILTER e._from IN @froms AND e.run_id != @run_id REMOVE e._key IN @@c",
        bind_vars={"@c": "rated", "froms": ["users/u2"], "run_id": "new"},
    )
    assert cursor.statistics()["modified"] == 2
    assert sorted(rated.keys()) == ["e6", "e7", "e8"]


ADBPYG_QUERY = """FOR doc IN @@col RETURN
                MERGE(
                    { _key: doc._key, _from: doc._from, _to: doc._to },
                    KEEP(doc, ['rating', 'missing'])
                )
            """  # adbpyg-adapter 1.1.4 __fetch_adb_docs, metagraph {"edge_weight": "rating", "x": "missing"}


def test_adbpyg_adapter_merge_keep_query(db) -> None:
    db.create_collection("users").import_bulk([{"_key": "u1", "age": 30}, {"_key": "u2"}])
    db.create_collection("rates", edge=True).import_bulk(
        [
            {"_key": "e1", "_from": "users/u1", "_to": "users/u2", "rating": 4.5, "other": 1},
            {"_key": "e2", "_from": "users/u2", "_to": "users/u1"},
        ]
    )
    edges = list(db.aql.execute(ADBPYG_QUERY, bind_vars={"@col": "rates"}, stream=True, batch_size=1))
    assert sorted(edges, key=lambda d: d["_key"]) == [
        {"_key": "e1", "_from": "users/u1", "_to": "users/u2", "rating": 4.5},
        {"_key": "e2", "_from": "users/u2", "_to": "users/u1"},
    ]  # KEEP leaves a missing attribute out
    users = list(db.aql.execute(ADBPYG_QUERY.replace("'rating', 'missing'", "'age'"), bind_vars={"@col": "users"}))
    assert sorted(users, key=lambda d: d["_key"]) == [
        {"_key": "u1", "_from": None, "_to": None, "age": 30},  # an object literal's missing attribute is null
        {"_key": "u2", "_from": None, "_to": None},
    ]
    # adbpyg with an empty attribute list: KEEP(doc, [])
    empty = list(db.aql.execute(ADBPYG_QUERY.replace("'rating', 'missing'", ""), bind_vars={"@col": "rates"}))
    assert sorted(d["_key"] for d in empty) == ["e1", "e2"] and all(set(d) == {"_key", "_from", "_to"} for d in empty)


def test_keep_semantics(db) -> None:
    db.create_collection("docs").import_bulk([{"_key": "k", "a": 1, "b": None, "c": [1, 2], "d": {"x": 1}}])

    def one(expr: str, **binds):
        return list(db.aql.execute(f"FOR v IN @@c RETURN {expr}", bind_vars={"@c": "docs", **binds}))[0]

    assert one("KEEP(v, 'a', 'c')") == {"a": 1, "c": [1, 2]}  # variadic names
    assert one("KEEP(v, ['a', 'd'])") == {"a": 1, "d": {"x": 1}}  # one array of names
    assert one("KEEP(v, 'b')") == {"b": None}  # a stored null is kept
    assert one("KEEP(v, 'nope', 'a')") == {"a": 1}  # missing: left out, not null
    assert one("KEEP(v, [])") == {}
    assert one("KEEP(v, @names)", names=["a", "zzz"]) == {"a": 1}
    assert one("KEEP(v, ['a', 1, null])") == {"a": 1}  # non-string names ignored
    assert one('KEEP({x: 1, y: v.a}, "y")') == {"y": 1}  # any object, double quotes


def test_merge_semantics(db) -> None:
    db.create_collection("docs").import_bulk([{"_key": "k", "a": 1, "b": {"x": 1, "y": 2}}])

    def one(expr: str, **binds):
        cursor = db.aql.execute(f"FOR v IN @@c RETURN {expr}", bind_vars={"@c": "docs", **binds})
        return list(cursor)[0], cursor.warnings()

    assert one("MERGE(v, {a: 2, c: 3})")[0] == {
        "_key": "k",
        "_id": "docs/k",
        "_rev": one("v._rev")[0],
        "a": 2,
        "b": {"x": 1, "y": 2},
        "c": 3,
    }  # later wins
    assert one("MERGE({a: 1, b: 2}, {b: null})")[0] == {"a": 1, "b": None}  # null overrides
    assert one("MERGE({b: v.b}, {b: {z: 1}})")[0] == {"b": {"z": 1}}  # shallow, not recursive
    assert one("MERGE([{a: 1}, {b: 2}, {a: 3}])")[0] == {"a": 3, "b": 2}  # one array of objects
    assert one("MERGE({a: v.missing})")[0] == {"a": None}
    assert one("MERGE({_key: v._key}, KEEP(v, 'nope'))")[0] == {"_key": "k"}
    value, warnings = one("MERGE({a: 1}, v.a)")  # not an object
    assert value is None and [w["code"] for w in warnings] == [1542]
    value, warnings = one("KEEP(v.a, 'a')")
    assert value is None and [w["code"] for w in warnings] == [1542]


def test_function_call_errors(db) -> None:
    db.create_collection("docs")
    for query, error_num in [
        ("FOR v IN @@c RETURN NO_SUCH_FUNCTION(v)", 1540),
        ("FOR v IN @@c RETURN KEEP(v)", 1541),
        ("FOR v IN @@c RETURN MERGE()", 1541),
        ("FOR v IN @@c RETURN MERGE({a: w.b})", 1512),
    ]:
        with pytest.raises(AQLQueryExecuteError) as err:
            db.aql.execute(query, bind_vars={"@c": "docs"})
        assert err.value.error_code == error_num, query


def test_aql_errors(db) -> None:
    db.create_collection("movies")
    cases = [
        ("FOR v IN @@c RETRUN v", {"@c": "movies"}, 1501),
        ("FOR v IN @@c FILTER v._key > @after RETURN v", {"@c": "movies"}, 1551),
        ("FOR v IN @@c RETURN v", {"@c": "movies", "extra": 1}, 1552),
        ("FOR v IN @@c RETURN v", {"@c": "no_such_collection"}, 1203),
    ]
    for query, bind_vars, error_num in cases:
        with pytest.raises(AQLQueryExecuteError) as err:
            db.aql.execute(query, bind_vars=bind_vars)
        assert err.value.error_code == error_num, query
    with pytest.raises(AQLQueryExecuteError) as err:
        db.aql.execute("FOR v IN @@c RETRUN v", bind_vars={"@c": "movies"})
    assert err.value.http_code == 400 and err.value.error_message.startswith("AQL: syntax error, unexpected")


def test_double_rejects_aql_outside_its_shapes(db, double: ArangoDouble) -> None:
    db.create_collection("movies")
    for query, bind_vars in [
        ("FOR v IN @@c FILTER v.year > @y RETURN v", {"@c": "movies", "y": 1}),
        ("FOR v IN @@c SORT v._key DESC RETURN v", {"@c": "movies"}),
        ("FOR v IN movies RETURN v", {}),
        ("FOR v IN @@c LIMIT 10 RETURN v", {"@c": "movies"}),
    ]:
        with pytest.raises(AQLQueryExecuteError) as err:
            db.aql.execute(query, bind_vars=bind_vars)
        assert err.value.error_code == 1501, query
    with pytest.raises(Exception) as err:
        db.collection("movies").all()
    assert getattr(err.value, "error_code", None) == 1501
    with pytest.raises(AQLQueryExecuteError) as err:
        db.aql.execute("FOR v IN @@c RETURN w", bind_vars={"@c": "movies"})
    assert err.value.error_code == 1512


# ----------------------------------------------------------------------------- cursors


def test_stream_cursor_paging_ids_only_while_has_more(db, double: ArangoDouble) -> None:
    _movies(db, 10)
    cursor = db.aql.execute(
        "FOR v IN @@c SORT v._key RETURN v._key", bind_vars={"@c": "movies"}, batch_size=4, stream=True
    )
    first_id = cursor.id
    assert first_id and cursor.has_more() and len(cursor.batch()) == 4
    keys = [cursor.pop() for _ in range(4)]
    infos = []
    while cursor.has_more():
        infos.append(cursor.fetch())
        keys.extend(cursor.pop() for _ in range(len(cursor.batch())))
    assert keys == [f"m{i:06d}" for i in range(10)]
    assert [("id" in i, i["has_more"]) for i in infos] == [(True, True), (False, False)]
    assert "next_batch_id" not in infos[0]
    assert double.open_cursors() == 0
    assert _raw_cursor_post(db, first_id).status_code == 404


def _raw_cursor_post(db, cursor_id: str) -> requests.Response:
    conn = db.conn
    return conn._sessions[0].post(f"{conn._url_prefixes[0]}/_api/cursor/{cursor_id}", auth=conn._auth, timeout=10)


def test_single_batch_result_has_no_cursor_id(db) -> None:
    _movies(db, 3)
    cursor = db.aql.execute("FOR v IN @@c RETURN v", bind_vars={"@c": "movies"}, count=True)
    assert cursor.id is None and not cursor.has_more() and cursor.count() == 3


def test_retry_protocol_over_raw_http(arango_endpoint: ArangoEndpoint, db) -> None:
    _movies(db, 7)
    body = {
        "query": "FOR v IN @@c SORT v._key RETURN v._key",
        "bindVars": {"@c": "movies"},
        "batchSize": 2,
        "options": {"allowRetry": True},
    }
    created = _raw(arango_endpoint, "POST", "/_api/cursor", json=body)
    first = created.json()
    assert created.status_code == 201 and first["nextBatchId"] == 2 and first["cached"] is False
    assert first["extra"]["warnings"] == [] and "stats" in first["extra"]
    cid = first["id"]
    second = _raw(arango_endpoint, "POST", f"/_api/cursor/{cid}/2").json()
    assert second["result"] == ["m000002", "m000003"] and second["nextBatchId"] == 3
    assert _raw(arango_endpoint, "POST", f"/_api/cursor/{cid}/2").json()["result"] == second["result"]
    assert _raw(arango_endpoint, "POST", f"/_api/cursor/{cid}/1").status_code == 400
    assert _raw(arango_endpoint, "POST", f"/_api/cursor/{cid}/5").status_code == 400
    assert _raw(arango_endpoint, "PUT", f"/_api/cursor/{cid}").json()["result"] == ["m000004", "m000005"]
    last = _raw(arango_endpoint, "POST", f"/_api/cursor/{cid}/4").json()
    assert last["result"] == ["m000006"] and last["hasMore"] is False and "nextBatchId" not in last
    assert _raw(arango_endpoint, "POST", f"/_api/cursor/{cid}/4").json()["result"] == ["m000006"]
    assert _raw(arango_endpoint, "DELETE", f"/_api/cursor/{cid}").status_code == 202
    gone = _raw(arango_endpoint, "DELETE", f"/_api/cursor/{cid}")
    assert gone.status_code == 404 and gone.json()["errorNum"] == 1600


def test_allow_retry_survives_a_lost_response(db, arango_faults: Faults, double: ArangoDouble) -> None:
    _movies(db, 30)
    arango_faults.drop_connection_after_batches(2)  # the 3rd batch is produced, then lost
    cursor = db.aql.execute(
        "FOR v IN @@c SORT v._key RETURN v._key",
        bind_vars={"@c": "movies"},
        batch_size=5,
        stream=True,
        allow_retry=True,
    )
    assert list(cursor) == [f"m{i:06d}" for i in range(30)]
    fetches = double.requests.matching("POST", "/_api/cursor/")
    assert [r.dropped for r in fetches].count(True) == 1
    dropped = next(i for i, r in enumerate(fetches) if r.dropped)
    assert fetches[dropped + 1].path == fetches[dropped].path  # python-arango resent batch id 3
    assert double.open_cursors() == 1  # allowRetry keeps the cursor for a last-batch retry...
    assert cursor.close() is True and double.open_cursors() == 0  # ...until DELETE


def test_lost_response_without_allow_retry_skips_a_batch(db, arango_faults: Faults) -> None:
    """python-arango silently resends POST /_api/cursor/{id}; ArangoDB hands out the next batch."""
    _movies(db, 30)
    arango_faults.drop_connection_after_batches(2)
    cursor = db.aql.execute(
        "FOR v IN @@c SORT v._key RETURN v._key", bind_vars={"@c": "movies"}, batch_size=5, stream=True
    )
    keys = list(cursor)
    assert len(keys) == 25 and f"m{10:06d}" not in keys


def test_dropped_connection_surfaces_as_connection_error(
    arango_endpoint: ArangoEndpoint, db, arango_faults: Faults
) -> None:
    _movies(db, 20)
    client = ArangoClient(hosts=arango_endpoint.url, resolver_max_tries=1)
    one_try = client.db(db.name, username=arango_endpoint.username, password=arango_endpoint.password)
    arango_faults.drop_connection_after_batches(1, lose_response=False)
    cursor = one_try.aql.execute("FOR v IN @@c RETURN v", bind_vars={"@c": "movies"}, batch_size=5, stream=True)
    with pytest.raises(ConnectionAbortedError):
        list(cursor)
    arango_faults.drop_connection_after_batches(1, times=3)  # python-arango's default: 3 tries
    cursor = db.aql.execute("FOR v IN @@c RETURN v", bind_vars={"@c": "movies"}, batch_size=5)
    with pytest.raises(ConnectionError):
        list(cursor)
    client.close()


def test_cursor_ttl_expiry_is_1600(db, double: ArangoDouble) -> None:
    """Double only: a real server drops expired cursors from a periodic garbage collection."""
    _movies(db, 6)
    cursor = db.aql.execute("FOR v IN @@c RETURN v", bind_vars={"@c": "movies"}, batch_size=2, ttl=0.3, stream=True)
    time.sleep(0.5)
    with pytest.raises(CursorNextError) as err:
        list(cursor)
    assert (err.value.http_code, err.value.error_code) == (404, 1600)


def test_expire_cursor_faults(db, arango_faults: Faults) -> None:
    _movies(db, 6)
    query, bind_vars = "FOR v IN @@c RETURN v", {"@c": "movies"}
    cursor = db.aql.execute(query, bind_vars=bind_vars, batch_size=2)
    assert arango_faults.expire_cursors() == 1
    with pytest.raises(CursorNextError) as err:
        list(cursor)
    assert err.value.error_code == 1600
    arango_faults.expire_cursor_after_batches(2)
    cursor = db.aql.execute(query, bind_vars=bind_vars, batch_size=2)
    cursor.fetch()
    with pytest.raises(CursorNextError) as err:
        cursor.fetch()
    assert err.value.error_code == 1600


# ----------------------------------------------------------------------------- other faults


def test_503_once_on_import_is_retried_by_python_arango(db, arango_faults: Faults, double: ArangoDouble) -> None:
    movies = db.create_collection("movies")
    arango_faults.fail_next("/_api/import")
    assert movies.import_bulk([{"_key": "a"}])["created"] == 1
    assert [r.status for r in double.requests.matching("POST", "/_api/import")] == [503, 201]
    arango_faults.fail_next("/_api/import", times=3)
    with pytest.raises(ConnectionAbortedError):
        movies.import_bulk([{"_key": "b"}])
    arango_faults.fail_next("/_api/import", error_num=21, message="shutdown in progress")
    with pytest.raises(DocumentInsertError) as err:
        movies.import_bulk([{"_key": "c"}])
    assert (err.value.http_code, err.value.error_code) == (503, 21)
    assert movies.count() == 1


def test_lost_import_response_is_resent_by_python_arango(db, arango_faults: Faults) -> None:
    """The import happened, its response was lost, python-arango resent it: not idempotent unless
    on_duplicate makes it so."""
    movies = db.create_collection("movies")
    arango_faults.drop_next("/_api/import", lose_response=True)
    with pytest.raises(DocumentInsertError) as err:
        movies.import_bulk([{"_key": "a"}])
    assert err.value.error_code == 1210 and movies.count() == 1
    arango_faults.drop_next("/_api/import", lose_response=True)
    assert movies.import_bulk([{"_key": "b"}], on_duplicate="replace")["updated"] == 1
    assert movies.count() == 2


def test_failed_get_is_retried_by_urllib3(db, arango_faults: Faults, double: ArangoDouble) -> None:
    arango_faults.fail_next("/_api/collection", method="GET")
    assert db.collections() is not None
    assert [r.status for r in double.requests.matching("GET", "/_api/collection")] == [503, 200]


def test_import_type_documents_over_raw_http(arango_endpoint: ArangoEndpoint, db) -> None:
    db.create_collection("movies")
    lines = '{"_key": "a"}\n\n{"_key": "b"}\nnot json\n'
    response = _raw(
        arango_endpoint,
        "POST",
        "/_api/import",
        params={"collection": "movies", "type": "documents", "details": "true"},
        data=lines,
    )
    body = response.json()
    assert response.status_code == 201
    assert (body["created"], body["errors"], body["empty"]) == (2, 1, 1) and len(body["details"]) == 1


def test_delay_and_request_log(db, arango_faults: Faults, double: ArangoDouble) -> None:
    arango_faults.delay(0.2, "/_api/version", times=1)
    started = time.perf_counter()
    db.version()
    assert time.perf_counter() - started >= 0.2
    db.version()
    assert time.perf_counter() - started < 1.0
    record = double.requests.matching("GET", "/_api/version")[0]
    assert (record.db, record.path, record.status) == (db.name, f"/_db/{db.name}/_api/version", 200)


def test_100k_documents_stream_through_a_cursor_quickly(db, double: ArangoDouble) -> None:
    movies = db.create_collection("movies")
    movies.import_bulk([{"_key": f"{i:07d}", "i": i} for i in range(100_000)], batch_size=50_000)
    started = time.perf_counter()
    cursor = db.aql.execute(
        "FOR v IN @@c FILTER v._key > @after SORT v._key RETURN [v._key, v.i]",
        bind_vars={"@c": "movies", "after": ""},
        batch_size=10_000,
        stream=True,
    )
    assert cursor.statistics()["scanned_index"] <= 11_000  # lazy: one batch plus one chunk read
    total = last = 0
    for total, (key, i) in enumerate(cursor, start=1):
        assert i == last + (total > 1) and key == f"{i:07d}"
        last = i
    assert total == 100_000
    assert time.perf_counter() - started < 5.0


# ----------------------------------------------------------------------------- issue 10: cluster, versions, roles


def _client_db(double, name="t", user=None, password=None):
    from arango import ArangoClient

    if name not in double._state.databases:
        double.create_database(name)
    return ArangoClient(hosts=double.url).db(
        name, username=user or double.username, password=password or double.password
    )


MIXED = ["a", "B", "_x", "b", "A", "1", "a:b", "a.b", "Zz", "z", "-k", "a@b"]


def test_icu_sort_on_a_cluster_and_byte_order_on_a_single_server():
    import heapq

    from arango_double import ArangoDouble, icu_key

    query = "FOR v IN @@c SORT v._key RETURN v._key"
    with ArangoDouble(role="COORDINATOR", shards=3) as double:
        db = _client_db(double)
        db.create_collection("C").import_bulk([{"_key": k} for k in MIXED])
        coll = double._state.databases["t"].collections["C"]
        shard_streams = [sorted(k for k in MIXED if coll.shard_of(k) == s) for s in range(3)]  # byte order
        merged = list(heapq.merge(*shard_streams, key=icu_key))  # what the coordinator's gather does
        got = list(db.aql.execute(query, bind_vars={"@c": "C"}))
        assert got == merged and sorted(got) == sorted(MIXED)
        assert got != sorted(MIXED) and got != sorted(MIXED, key=icu_key)  # neither order end to end
        assert sorted(MIXED, key=icu_key)[:4] == ["_x", "-k", "1", "a"] and sorted(MIXED)[:3] == ["-k", "1", "A"]
        # each shard filters `_key > @after` in byte order: "_x" is last in bytes, so after it only
        # keys above it in byte order remain, although ICU order puts "_x" first
        after = list(
            db.aql.execute(
                "FOR v IN @@c FILTER v._key > @after SORT v._key RETURN v._key", bind_vars={"@c": "C", "after": "_x"}
            )
        )
        assert sorted(after) == sorted(k for k in MIXED if k > "_x")
    with ArangoDouble() as double:
        db = _client_db(double)
        db.create_collection("C").import_bulk([{"_key": k} for k in MIXED])
        assert list(db.aql.execute(query, bind_vars={"@c": "C"})) == sorted(MIXED)


def test_md5_bucket_filter_partitions_a_collection():
    import hashlib

    from arango_double import ArangoDouble

    with ArangoDouble(role="COORDINATOR", shards=2) as double:
        db = _client_db(double)
        keys = [f"k{i}" for i in range(300)]
        db.create_collection("C").import_bulk([{"_key": k} for k in keys])
        query = "FOR v IN @@c FILTER SUBSTRING(MD5(v._key), 0, 1) IN @b RETURN [v._key]"
        low = [r[0] for r in db.aql.execute(query, bind_vars={"@c": "C", "b": list("01234567")})]
        high = [r[0] for r in db.aql.execute(query, bind_vars={"@c": "C", "b": list("89abcdef")})]
        assert sorted(low + high) == sorted(keys) and not set(low) & set(high)
        assert all(hashlib.md5(k.encode()).hexdigest()[0] in "01234567" for k in low)


def test_per_shard_reads_with_shard_ids_scan_only_that_shard():
    from arango_double import ArangoDouble

    with ArangoDouble(role="COORDINATOR", shards=3) as double:
        db = _client_db(double)
        keys = [f"k{i}" for i in range(300)] + MIXED
        db.create_collection("C").import_bulk([{"_key": k} for k in keys])
        ids = db.collection("C").shards()["shards"]
        assert len(ids) == 3 and len(set(ids)) == 3 and all(i.startswith("s") for i in ids)
        url, auth = f"{double.url}/_db/t/_api/cursor", (double.username, double.password)
        seen = []
        for shard in ids:
            before = double.documents_scanned
            body = requests.post(
                url,
                auth=auth,
                timeout=10,
                json={
                    "query": "FOR v IN @@c RETURN [v._key]",
                    "bindVars": {"@c": "C"},
                    "batchSize": 1000,
                    "options": {"stream": True, "shardIds": [shard]},
                },
            ).json()
            got = [r[0] for r in body["result"]]
            assert not body["hasMore"] and body["extra"]["stats"]["scannedFull"] == len(got) > 0
            assert double.documents_scanned - before == len(got)  # this shard only, not the collection
            seen += got
        assert sorted(seen) == sorted(keys)  # the shards are disjoint and cover the collection
        before = double.documents_scanned
        list(
            db.aql.execute(
                "FOR v IN @@c FILTER SUBSTRING(MD5(v._key), 0, 1) IN @b RETURN [v._key]",
                bind_vars={"@c": "C", "b": ["0"]},
            )
        )
        assert double.documents_scanned - before == len(keys)  # a hash filter still visits every document
        bad = requests.post(
            url,
            auth=auth,
            timeout=10,
            json={"query": "FOR v IN @@c RETURN v", "bindVars": {"@c": "C"}, "options": {"shardIds": ["s0"]}},
        )
        assert bad.status_code == 500 and bad.json()["errorNum"] == 1521  # no shard left to lock, as a coordinator
    with ArangoDouble() as double:
        db = _client_db(double)
        db.create_collection("C")
        reply = requests.get(
            f"{double.url}/_db/t/_api/collection/C/shards", auth=(double.username, double.password), timeout=10
        )
        assert reply.status_code == 501 and reply.json()["errorNum"] == 1471


def test_version_and_role_switches():
    from arango_double import ArangoDouble

    with ArangoDouble(version="3.10", role="COORDINATOR", shards=2) as double:
        db = _client_db(double)
        assert db.version().startswith("3.10.") and db.role() == "COORDINATOR"
        db.create_collection("C").import_bulk([{"_key": str(i)} for i in range(30)])
        cursor = db.aql.execute(
            "FOR v IN @@c RETURN v._key", bind_vars={"@c": "C"}, batch_size=10, stream=True, allow_retry=True
        )
        assert cursor._next_batch_id is None  # 3.10: no nextBatchId even when allowRetry is asked for
    with pytest.raises(ValueError, match="'shards' needs to be 1"):
        ArangoDouble(shards=3)


def test_310_resent_fetch_skips_a_batch():
    from arango_double import ArangoDouble

    with ArangoDouble(version="3.10") as double:
        db = _client_db(double)
        db.create_collection("C").import_bulk([{"_key": f"{i:03d}"} for i in range(30)])
        double.faults.drop_connection_after_batches(1, lose_response=True)
        got = list(
            db.aql.execute(
                "FOR v IN @@c RETURN v._key", bind_vars={"@c": "C"}, batch_size=10, stream=True, allow_retry=True
            )
        )
        assert len(got) == 20  # the lost second batch is never seen: what the 3.10 export mode guards against


def test_import_conflicts_and_read_only_users():
    from arango.exceptions import DocumentInsertError
    from arango_double import ArangoDouble

    with ArangoDouble({"root": "pw", "ro": "pw"}, read_only=("ro",)) as double:
        db = _client_db(double)
        db.create_collection("C")
        double.faults.conflict_next_imports([1])
        result = db.collection("C").import_bulk([{"_key": "a"}, {"_key": "b"}], details=True, halt_on_error=False)
        assert (result["created"], result["errors"]) == (1, 1) and "write-write conflict" in result["details"][0]
        assert "at position 1:" in result["details"][0] and db.collection("C").count() == 1
        ro = _client_db(double, user="ro", password="pw")
        assert ro.collection("C").count() == 1  # reads are allowed
        with pytest.raises(DocumentInsertError) as err:
            ro.collection("C").insert({"_key": "x"})
        assert (err.value.http_code, err.value.error_code) == (403, 11)


def test_import_error_positions_follow_the_server(db) -> None:
    # RestImportHandler: validation errors by 1-based request position, insert errors by 0-based
    # position among the documents that passed validation (contract test: also a real server).
    db.create_collection("E", edge=True)
    docs = [
        {"_key": "e1", "_from": "V/1", "_to": "V/2"},
        "not an object",
        {"_key": "e2", "_from": "V/1"},
        {"_key": "e3 bad", "_from": "V/1", "_to": "V/2"},
        {"_key": "e1", "_from": "V/3", "_to": "V/4"},
    ]
    result = db.collection("E").import_bulk(docs, halt_on_error=False, details=True, on_duplicate="error")
    assert (result["created"], result["errors"]) == (1, 4)
    lines = sorted(result["details"], key=lambda d: ("creating" in d, d))
    assert lines[0].startswith("at position 2: invalid JSON type (expecting object)")
    assert lines[1].startswith("at position 3: missing '_from' or '_to' attribute")
    assert lines[2].startswith("at position 1: creating document failed with error 'illegal document key'")
    assert lines[3].startswith("at position 2: creating document failed with error 'unique constraint violated")


def test_fetch_of_a_busy_cursor_is_1601() -> None:
    # A fetch whose connection dropped while the server still works on it holds the cursor; the
    # driver's immediate re-send is answered 409 / 1601 (CursorRepository::find), not queued.
    from arango_double import ArangoDouble

    with ArangoDouble() as double:
        db = _client_db(double)
        db.create_collection("C").import_bulk([{"_key": f"{i:03d}"} for i in range(30)])
        double.faults.drop_connection_after_batches(1, busy_for=0.5)
        cursor = db.aql.execute(
            "FOR v IN @@c RETURN v._key", bind_vars={"@c": "C"}, batch_size=10, stream=True, allow_retry=True
        )
        with pytest.raises(CursorNextError) as err:
            list(cursor)
        assert (err.value.http_code, err.value.error_code) == (409, 1601)
        assert [r.status for r in double.requests.matching("POST", "/_api/cursor/")] == [None, 409]


def test_hardened_server_hides_the_version_from_users_who_are_not_admins() -> None:
    from arango_double import ArangoDouble

    with ArangoDouble({"root": "pw", "app": "pw"}, hardened=True) as double:
        app = _client_db(double, user="app", password="pw")
        assert "version" not in app.version(details=True)
        with pytest.raises(KeyError):  # what python-arango's db.version() does there
            app.version()
        assert _client_db(double, user="root", password="pw").version().startswith("3.11.")


def test_a_database_the_user_may_not_see_is_401_existing_or_not() -> None:
    from arango_double import ArangoDouble

    with ArangoDouble({"root": "pw", "app": "pw"}, access={"app": ("t",)}) as double:
        double.create_database("t")
        double.create_database("other")
        assert _client_db(double, "t", user="app", password="pw").collections() is not None
        for name in ("other", "missing"):
            reply = requests.get(f"{double.url}/_db/{name}/_api/collection", auth=("app", "pw"), timeout=10)
            assert (reply.status_code, reply.json()["errorNum"]) == (401, 11)


def test_37_server_fetches_with_put_only() -> None:
    from arango_double import ArangoDouble

    with ArangoDouble(version="3.7") as double:
        db = _client_db(double)
        db.create_collection("C").import_bulk([{"_key": f"{i:03d}"} for i in range(30)])
        cursor = db.aql.execute("FOR v IN @@c RETURN v._key", bind_vars={"@c": "C"}, batch_size=10)
        with pytest.raises(CursorNextError) as err:
            list(cursor)
        assert (err.value.http_code, err.value.error_code) == (405, 405)


def test_stream_transaction_commit_abort_and_expiry() -> None:
    from arango_double import ArangoDouble

    query = 'FOR d IN @docs INSERT d INTO @@c OPTIONS { overwriteMode: "replace" } RETURN OLD._key'
    with ArangoDouble() as double:
        db = _client_db(double)
        db.create_collection("E", edge=True)
        edge = {"_key": "a", "_from": "U/1", "_to": "M/1"}
        txn = db.begin_transaction(write=["E"])
        assert list(txn.aql.execute(query, bind_vars={"@c": "E", "docs": [edge]})) == [None]  # created
        txn.abort_transaction()
        assert db.collection("E").count() == 0
        txn = db.begin_transaction(write=["E"])
        txn.aql.execute(query, bind_vars={"@c": "E", "docs": [edge]})
        txn.commit_transaction()
        assert list(db.aql.execute(query, bind_vars={"@c": "E", "docs": [{**edge, "_to": "M/2"}]})) == ["a"]
        txn = db.begin_transaction(write=["E"])
        txn.aql.execute("FOR v IN @@c FILTER v._from IN @u REMOVE v IN @@c", bind_vars={"@c": "E", "u": ["U/1"]})
        assert db.collection("E").count() == 0  # no isolation: visible before the commit
        assert double.expire_transactions() == 1 and db.collection("E").count() == 1  # undone
        with pytest.raises(AQLQueryExecuteError) as err:  # a finished transaction takes no more requests
            txn.aql.execute(query, bind_vars={"@c": "E", "docs": [edge]})
        assert (err.value.http_code, err.value.error_code) == (410, 1653)
        with pytest.raises(AQLQueryExecuteError) as err:  # the first bad document fails the whole insert
            db.aql.execute(query, bind_vars={"@c": "E", "docs": [{**edge, "_key": "b"}, {"_key": "c", "_from": "x"}]})
        assert err.value.error_code == 1233 and db.collection("E").count() == 1
