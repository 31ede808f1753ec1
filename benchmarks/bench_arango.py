"""ArangoDB export and writeback against the article's patterns, in the same run.

    SCALABLE_REC_BENCH_ARANGO_EDGES=1000000 python -m pytest benchmarks/bench_arango.py \
        --benchmark-json=benchmarks/results/arango.json
    SCALABLE_REC_BENCH_ARANGO_EDGES=20000 scripts/bench.sh -k arango      # quick

Export: rows/s, client CPU and peak RSS of ``export_shards`` (hash partitions, stream cursors,
compact arrays, prefetch, Arrow shards) with 1 and 4 workers and with the stdlib JSON decoder
instead of orjson, beside the article's loop (``FOR d IN @@col RETURN d``, one Python dict per
document, Python lists of indices), over the same synthetic rating edges.
Writeback: edges/s of ``write_recommendations`` beside ``import_bulk`` in batches of 100.

The test double serves the data from its own process (its JSON work would otherwise share
this process's GIL) and is filled once per session by bulk import. Each export variant runs
in a fresh child process, so its peak RSS (``VmHWM``) is its own; ``rows_per_s`` times the
export call inside the child, while the benchmark's median also includes starting it.

The double is pure Python: a projection ``RETURN [v._key, ...]`` costs it a Python list per
row, more than handing out the stored dict, while a real server projects in C++ and sends
fewer bytes. Wall-clock rows/s against the double is therefore bounded by the double; the
client's CPU seconds (``client_cpu_s``, main and prefetch thread) carry over to a real server.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import resource
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import psutil
import pyarrow as pa
import pytest
from arango import ArangoClient

EDGES = int(os.environ.get("SCALABLE_REC_BENCH_ARANGO_EDGES", 1_000_000))
WRITEBACK = int(os.environ.get("SCALABLE_REC_BENCH_ARANGO_WRITEBACK", 200_000))
DATABASE = "bench"
RESULTS: dict[str, dict] = {}


def _graph_size(edges: int) -> tuple[int, int]:
    """Users and movies scaled from ML-25M's shape (as ``benchmarks/conftest.py`` does)."""
    ratio = edges / 25_000_000
    return max(100, int(162_000 * ratio ** 0.75)), max(100, int(59_000 * ratio ** 0.6))


def _fill(db, edges: int, seed: int = 0, chunk: int = 50_000) -> None:
    """Users, movies and ``edges`` distinct random rating edges, imported in big batches."""
    rng = np.random.default_rng(seed)
    users, movies = _graph_size(edges)
    pairs = np.unique(rng.integers(0, users * movies, int(edges * 1.2)))
    pairs = rng.permutation(pairs)[:edges]
    assert len(pairs) == edges, "graph too dense for the requested edges"
    db.create_collection("Users").import_bulk([{"_key": str(u)} for u in range(users)], batch_size=chunk)
    db.create_collection("Movie").import_bulk(
        [{"_key": str(m), "title": f"Movie {m} ({1950 + m % 70})", "genres": ["Drama", "Comedy"][: 1 + m % 2]}
         for m in range(movies)], batch_size=chunk)
    ratings = db.create_collection("Ratings", edge=True)
    stars = rng.integers(1, 11, edges) / 2
    for i in range(0, edges, chunk):
        ratings.import_bulk([{"_key": f"{p // movies}-{p % movies}", "_from": f"Users/{p // movies}",
                              "_to": f"Movie/{p % movies}", "rating": float(r), "timestamp": 1_000_000_000 + j}
                             for j, (p, r) in enumerate(zip(pairs[i:i + chunk].tolist(),
                                                            stars[i:i + chunk].tolist()), start=i)])


def _serve(conn, edges: int) -> None:
    """Server process: a filled double until the benchmark says stop."""
    from arango_double import ArangoDouble

    with ArangoDouble() as double:
        double.create_database(DATABASE)
        client = ArangoClient(hosts=double.url, request_timeout=600)
        _fill(client.db(DATABASE, username=double.username, password=double.password), edges)
        conn.send((double.url, double.username, double.password))
        conn.recv()


@pytest.fixture(scope="module")
def server():
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_serve, args=(child, EDGES), daemon=True)
    proc.start()
    if not parent.poll(1800):
        proc.kill()
        pytest.fail("the ArangoDB double did not come up with its data within 30 minutes")
    url, username, password = parent.recv()
    yield url, username, password
    parent.send("stop")
    proc.join(30)


def _db(server):
    url, username, password = server
    return ArangoClient(hosts=url, request_timeout=600).db(DATABASE, username=username, password=password)


def _package_export(server, out: str, parallelism: int, fast_json: bool) -> int:
    from scalable_rec.connection import ArangoConfig, ArangoSettings, connect
    from scalable_rec.source import SkipReport
    from scalable_rec.source.arango import ArangoSource, ExportConfig
    from scalable_rec.source.arango_export import export_shards

    url, username, password = server
    db = connect(ArangoSettings(url=url, database=DATABASE, username=username, password=password,
                                request_timeout=600), fast_json=fast_json)
    source = ArangoSource(db, ArangoConfig(), ExportConfig(parallelism=parallelism))
    manifest = export_shards(source, out, SkipReport(), progress=False)
    return manifest.edge_types["user__rates__movie"].num_rows


EXPORTS = {
    "article_loop": lambda server, out: _article_loop(server, out),
    "export_1": lambda server, out: _package_export(server, out, 1, True),
    "export_4": lambda server, out: _package_export(server, out, 4, True),
    "export_1_stdlib_json": lambda server, out: _package_export(server, out, 1, False),
}


def _article_loop(server, out: str) -> int:
    """The article's ``create_pyg_edges`` pattern: whole documents, a dict each, Python lists."""
    db = _db(server)
    user_index = {d["_key"]: i for i, d in enumerate(db.aql.execute("FOR d IN @@col RETURN d",
                                                                      bind_vars={"@col": "Users"}))}
    movie_index = {d["_key"]: i for i, d in enumerate(db.aql.execute("FOR d IN @@col RETURN d",
                                                                       bind_vars={"@col": "Movie"}))}
    src, dst, ratings = [], [], []
    for doc in db.aql.execute("FOR d IN @@col RETURN d", bind_vars={"@col": "Ratings"}):
        src.append(user_index[doc["_from"].split("/")[1]])
        dst.append(movie_index[doc["_to"].split("/")[1]])
        ratings.append(doc["rating"])
    edge_index, edge_rating = np.array([src, dst], dtype=np.int64), np.array(ratings, dtype=np.float32)
    assert edge_index.shape[1] == len(edge_rating)
    return edge_index.shape[1]


def _peak_rss_mb() -> float:
    # VmHWM belongs to this process image; ru_maxrss would also count the RSS of the parent
    # at fork time, since Linux carries it across exec.
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _in_child(target, *args) -> dict:
    """Runs ``target(conn, *args)`` in a fresh (spawned) process, so its peak RSS is its own."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=target, args=(child, *args))
    proc.start()
    result = parent.recv()
    proc.join()
    return result


def _child(conn, variant: str, server, out: str) -> None:
    import scalable_rec.source.arango_export  # noqa: F401 - imports are not part of the export

    baseline = psutil.Process().memory_info().rss
    t0, cpu0 = time.perf_counter(), time.process_time()
    rows = EXPORTS[variant](server, out)
    conn.send({"rows": rows, "seconds": time.perf_counter() - t0, "client_cpu_s": time.process_time() - cpu0,
               "baseline_rss_mb": baseline / (1 << 20), "peak_rss_mb": _peak_rss_mb()})


@pytest.mark.parametrize("variant", list(EXPORTS))
def test_export_rows_per_s(benchmark, server, tmp_path, variant):
    result = benchmark.pedantic(_in_child, args=(_child, variant, server, str(tmp_path / "shards")),
                                rounds=1, iterations=1)
    assert result["rows"] == EDGES
    RESULTS[variant] = result
    extra = {"edges": EDGES, "rows_per_s": result["rows"] / result["seconds"], "export_s": result["seconds"],
             "client_cpu_s": result["client_cpu_s"], "rows_per_client_cpu_s": result["rows"] / result["client_cpu_s"],
             "peak_rss_mb": result["peak_rss_mb"],
             "peak_minus_baseline_rss_mb": result["peak_rss_mb"] - result["baseline_rss_mb"]}
    if variant != "article_loop" and "article_loop" in RESULTS:
        extra["speedup"] = RESULTS["article_loop"]["seconds"] / result["seconds"]
        extra["client_cpu_ratio"] = RESULTS["article_loop"]["client_cpu_s"] / result["client_cpu_s"]
    benchmark.extra_info.update(extra)


def test_adbpyg_adapter_export():
    pytest.skip("adbpyg-adapter's arangodb_to_pyg is not measured: it pins python-arango 7.x, so it needs its "
                "own virtual environment with torch and torch-geometric, which was not built on this machine; "
                "its 'RETURN MERGE({...}, KEEP(doc, [...]))' query is also outside the double's AQL subset")


def _ranked_iter(n: int, k: int = 10, seed: int = 1) -> Iterator[pa.RecordBatch]:
    """``n`` ranked rows (``n // k`` users × top ``k``), generated 1,000 users at a time."""
    rng = np.random.default_rng(seed)
    users = n // k
    _, movies = _graph_size(EDGES)
    for start in range(0, users, 1000):
        u = np.arange(start, min(users, start + 1000))
        yield pa.record_batch({
            "user_key": pa.array(np.repeat(u, k)), "movie_key": pa.array(rng.integers(0, movies, len(u) * k)),
            "score": pa.array(rng.random(len(u) * k), pa.float32()),
            "rank": pa.array(np.tile(np.arange(1, k + 1, dtype=np.int32), len(u)))})


def _ranked(n: int, k: int = 10, seed: int = 1) -> list[pa.RecordBatch]:
    return list(_ranked_iter(n, k, seed))


def _import_bulk_100(db, batches, run_id: str) -> int:
    """The article's writeback: one dict per edge, ``import_bulk`` every 100 documents."""
    name = f"Recs_{run_id}"
    collection = db.create_collection(name, edge=True)
    pending, written = [], 0
    for batch in batches:
        for u, m, s, r in zip(*(batch.column(c).to_pylist() for c in ("user_key", "movie_key", "score", "rank"))):
            pending.append({"_key": f"{run_id}-{u}-{m}-{r}", "_from": f"Users/{u}", "_to": f"Movie/{m}",
                            "score": s, "rank": r, "run_id": run_id})
            if len(pending) == 100:
                written += collection.import_bulk(pending, on_duplicate="replace")["created"]
                pending = []
    if pending:
        written += collection.import_bulk(pending, on_duplicate="replace")["created"]
    return written


def _sink(db, batches, run_id: str) -> int:
    from scalable_rec.connection import ArangoConfig
    from scalable_rec.sink.arango import WritebackConfig, write_recommendations

    cfg = WritebackConfig(sink="arango", inference_collection=f"Recs_{run_id}")
    return write_recommendations(db, batches, ArangoConfig(), cfg, run_id, "2024-01-01T00:00:00+00:00").counts.sent


@pytest.mark.parametrize("variant", ["import_bulk_100", "sink"])
def test_writeback_edges_per_s(benchmark, server, variant):
    db, batches = _db(server), _ranked(WRITEBACK)
    fn = {"import_bulk_100": _import_bulk_100, "sink": _sink}[variant]
    rounds = iter(range(100))
    written = benchmark.pedantic(lambda: fn(db, batches, f"{variant}_{next(rounds)}"), rounds=1, iterations=1)
    assert written == WRITEBACK
    RESULTS[variant] = {"seconds": benchmark.stats.stats.median}
    extra = {"edges": WRITEBACK, "edges_per_s": WRITEBACK / benchmark.stats.stats.median}
    if variant == "sink" and "import_bulk_100" in RESULTS:
        extra["speedup"] = RESULTS["import_bulk_100"]["seconds"] / benchmark.stats.stats.median
    benchmark.extra_info.update(extra)


def _writeback_child(conn, server, n: int, run_id: str) -> None:
    import scalable_rec.sink.arango  # noqa: F401 - imports are not part of the writeback

    baseline = psutil.Process().memory_info().rss
    t0 = time.perf_counter()
    sent = _sink(_db(server), _ranked_iter(n), run_id)  # batches generated lazily, as scoring yields them
    conn.send({"sent": sent, "seconds": time.perf_counter() - t0, "baseline_rss_mb": baseline / (1 << 20),
               "peak_rss_mb": _peak_rss_mb()})


@pytest.mark.parametrize("scale", [1, 4])
def test_writeback_peak_rss_is_flat(benchmark, server, scale):
    """Writeback memory must not grow with the number of edges (beyond the set of user keys)."""
    n = WRITEBACK * scale

    result = benchmark.pedantic(_in_child, args=(_writeback_child, server, n, f"rss_{scale}"), rounds=1, iterations=1)
    assert result["sent"] == n
    growth = result["peak_rss_mb"] - result["baseline_rss_mb"]
    RESULTS[f"writeback_rss_{scale}"] = growth
    benchmark.extra_info.update(edges=n, edges_per_s=n / result["seconds"], peak_rss_mb=result["peak_rss_mb"],
                                peak_minus_baseline_rss_mb=growth)
    if scale == 4 and "writeback_rss_1" in RESULTS:
        # 4× the edges may add the user-key set (n/10 short strings) and allocator noise, not 4× memory.
        assert growth <= RESULTS["writeback_rss_1"] + 32, (RESULTS["writeback_rss_1"], growth)
