"""ArangoDB export and writeback against the article's patterns, in the same run.

    SCALABLE_REC_BENCH_ARANGO_EDGES=1000000 OMP_NUM_THREADS=1 PYTHONPATH=$PWD:$PWD/tests \
        SCALABLE_REC_BENCH_ARANGO_REPORT=benchmarks/reference/arango-export-1m.json \
        python -m pytest benchmarks/bench_arango.py -k 'export or partition or adbpyg' -p no:randomly
    python benchmarks/arango_report.py benchmarks/reference/arango-export-1m.json --doc docs/RESULTS.md
    SCALABLE_REC_BENCH_ARANGO_EDGES=20000 scripts/bench.sh -k arango      # quick

Export: rows/s, client CPU and peak RSS of ``export_shards`` (hash partitions, stream cursors,
compact arrays, prefetch, Arrow shards) with 1 and 4 workers and with the stdlib JSON decoder
instead of orjson and with Python's cyclic GC left on, beside the article's loop (``FOR d IN @@col RETURN d``, one Python dict per
document, Python lists of indices) and adbpyg-adapter's ``arangodb_to_pyg`` (in its own venv,
``benchmarks/adbpyg_venv.sh``; skipped with the reason when that cannot be built), over the
same synthetic rating edges on the same double. ``test_partition_scan_cost`` exports with 1
worker and 1, 2, 4, 8, 16 hash partitions of the ratings and measures the double's CPU: every
partition is one server-side scan of the whole collection.
Writeback: edges/s of ``write_recommendations`` beside ``import_bulk`` in batches of 100.

With ``SCALABLE_REC_BENCH_ARANGO_REPORT=<file.json>`` the export results (and the command,
thread setting, machine and load) are written there at the end of the module;
``benchmarks/arango_report.py`` renders them as the table in ``benchmarks/reference/`` and the
ArangoDB block of docs/RESULTS.md.

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

import json
import math
import multiprocessing as mp
import os
import platform
import resource
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
import psutil
import pyarrow as pa
import pytest
from arango import ArangoClient

EDGES = int(os.environ.get("SCALABLE_REC_BENCH_ARANGO_EDGES", 1_000_000))
WRITEBACK = int(os.environ.get("SCALABLE_REC_BENCH_ARANGO_WRITEBACK", 200_000))
DATABASE = "bench"
RESULTS: dict[str, dict] = {}
REPORT = os.environ.get("SCALABLE_REC_BENCH_ARANGO_REPORT")
HERE = Path(__file__).resolve().parent
ADBPYG_VENV = Path(os.environ.get("SCALABLE_REC_ADBPYG_VENV", Path.home() / ".cache" / "scalable-rec" / "adbpyg-venv"))
PARTITIONS = (1, 2, 4, 8, 16)


class Server(NamedTuple):
    """The double's address and credentials, and its process id (for its CPU time)."""

    url: str
    username: str
    password: str
    pid: int


def _graph_size(edges: int) -> tuple[int, int]:
    """Users and movies scaled from ML-25M's shape (as ``benchmarks/conftest.py`` does)."""
    ratio = edges / 25_000_000
    return max(100, int(162_000 * ratio**0.75)), max(100, int(59_000 * ratio**0.6))


def _fill(db, edges: int, seed: int = 0, chunk: int = 50_000) -> None:
    """Users, movies and ``edges`` distinct random rating edges, imported in big batches."""
    rng = np.random.default_rng(seed)
    users, movies = _graph_size(edges)
    pairs = np.unique(rng.integers(0, users * movies, int(edges * 1.2)))
    pairs = rng.permutation(pairs)[:edges]
    assert len(pairs) == edges, "graph too dense for the requested edges"
    db.create_collection("Users").import_bulk([{"_key": str(u)} for u in range(users)], batch_size=chunk)
    db.create_collection("Movie").import_bulk(
        [
            {"_key": str(m), "title": f"Movie {m} ({1950 + m % 70})", "genres": ["Drama", "Comedy"][: 1 + m % 2]}
            for m in range(movies)
        ],
        batch_size=chunk,
    )
    ratings = db.create_collection("Ratings", edge=True)
    stars = rng.integers(1, 11, edges) / 2
    for i in range(0, edges, chunk):
        ratings.import_bulk(
            [
                {
                    "_key": f"{p // movies}-{p % movies}",
                    "_from": f"Users/{p // movies}",
                    "_to": f"Movie/{p % movies}",
                    "rating": float(r),
                    "timestamp": 1_000_000_000 + j,
                }
                for j, (p, r) in enumerate(zip(pairs[i : i + chunk].tolist(), stars[i : i + chunk].tolist()), start=i)
            ]
        )


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
    yield Server(url, username, password, proc.pid)
    parent.send("stop")
    proc.join(30)


@pytest.fixture(scope="module", autouse=True)
def report():
    """Writes the export results to ``SCALABLE_REC_BENCH_ARANGO_REPORT`` after the module."""
    load_before = os.getloadavg()
    yield
    if REPORT and RESULTS:
        cpu = next(
            (
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")
            ),
            platform.processor(),
        )
        env = {k: v for k, v in os.environ.items() if k.startswith("SCALABLE_REC_BENCH") or k == "OMP_NUM_THREADS"}
        if os.environ.get("PYTHONPATH"):
            env["PYTHONPATH"] = os.environ["PYTHONPATH"].replace(os.getcwd(), "$PWD")
        doc = {
            "edges": EDGES,
            "command": shlex.join(["python", "-m", "pytest", *sys.argv[1:]]),
            "env": env,
            "machine": {
                "cpu": cpu,
                "cores": os.cpu_count(),
                "python": platform.python_version(),
                "load_average_before": load_before,
                "load_average_after": os.getloadavg(),
            },
            "variants": {k: v for k, v in RESULTS.items() if "client_cpu_s" in v or "skipped" in v},
        }
        Path(REPORT).parent.mkdir(parents=True, exist_ok=True)
        Path(REPORT).write_text(json.dumps(doc, indent=2) + "\n")


def _db(server: Server):
    return ArangoClient(hosts=server.url, request_timeout=600).db(
        DATABASE, username=server.username, password=server.password
    )


def _package_export(
    server: Server, out: str, parallelism: int, fast_json: bool, partitions: int | None = None, pause_gc: bool = True
) -> int:
    from scalable_rec.connection import ArangoConfig, ArangoSettings, connect
    from scalable_rec.source import SkipReport
    from scalable_rec.source.arango import ArangoSource, ExportConfig
    from scalable_rec.source.arango_export import export_shards

    db = connect(
        ArangoSettings(
            url=server.url, database=DATABASE, username=server.username, password=server.password, request_timeout=600
        ),
        fast_json=fast_json,
    )
    export = ExportConfig(parallelism=parallelism, pause_gc=pause_gc)
    if partitions is not None:  # the ratings in `partitions` hash partitions (users, movies: 1)
        export = ExportConfig(
            parallelism=parallelism, pause_gc=pause_gc, export_partition_rows=math.ceil(EDGES / partitions)
        )
    source = ArangoSource(db, ArangoConfig(), export)
    manifest = export_shards(source, out, SkipReport(), progress=False)
    return manifest.edge_types["user__rates__movie"].num_rows


EXPORTS = {
    "article_loop": lambda server, out: _article_loop(server, out),
    "export_1": lambda server, out: _package_export(server, out, 1, True),
    "export_4": lambda server, out: _package_export(server, out, 4, True),
    "export_1_stdlib_json": lambda server, out: _package_export(server, out, 1, False),
    "export_1_gc_on": lambda server, out: _package_export(server, out, 1, True, pause_gc=False),
    **{f"export_1_p{p}": (lambda server, out, p=p: _package_export(server, out, 1, True, p)) for p in PARTITIONS[1:]},
}


def _article_loop(server: Server, out: str) -> int:
    """The article's ``create_pyg_edges`` pattern: whole documents, a dict each, Python lists."""
    db = _db(server)
    user_index = {
        d["_key"]: i for i, d in enumerate(db.aql.execute("FOR d IN @@col RETURN d", bind_vars={"@col": "Users"}))
    }
    movie_index = {
        d["_key"]: i for i, d in enumerate(db.aql.execute("FOR d IN @@col RETURN d", bind_vars={"@col": "Movie"}))
    }
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
    conn.send(
        {
            "rows": rows,
            "seconds": time.perf_counter() - t0,
            "client_cpu_s": time.process_time() - cpu0,
            "baseline_rss_mb": baseline / (1 << 20),
            "peak_rss_mb": _peak_rss_mb(),
        }
    )


def _server_cpu_s(server: Server) -> float:
    times = psutil.Process(server.pid).cpu_times()
    return times.user + times.system


def _record(benchmark, variant: str, result: dict, server_cpu_s: float) -> None:
    assert result["rows"] == EDGES, (variant, result["rows"])
    result = {**result, "server_cpu_s": server_cpu_s}
    RESULTS[variant] = result
    extra = {
        "edges": EDGES,
        "rows_per_s": result["rows"] / result["seconds"],
        "export_s": result["seconds"],
        "client_cpu_s": result["client_cpu_s"],
        "rows_per_client_cpu_s": result["rows"] / result["client_cpu_s"],
        "client_cpu_s_per_1m": result["client_cpu_s"] * 1e6 / result["rows"],
        "server_cpu_s": server_cpu_s,
        "peak_rss_mb": result["peak_rss_mb"],
        "peak_minus_baseline_rss_mb": result["peak_rss_mb"] - result["baseline_rss_mb"],
    }
    if variant != "article_loop" and "article_loop" in RESULTS:
        extra["speedup"] = RESULTS["article_loop"]["seconds"] / result["seconds"]
        extra["client_cpu_ratio"] = RESULTS["article_loop"]["client_cpu_s"] / result["client_cpu_s"]
    benchmark.extra_info.update(extra)


@pytest.mark.parametrize("variant", [v for v in EXPORTS if "_p" not in v])
def test_export_rows_per_s(benchmark, server, tmp_path, variant):
    cpu0 = _server_cpu_s(server)
    result = benchmark.pedantic(
        _in_child, args=(_child, variant, server, str(tmp_path / "shards")), rounds=1, iterations=1
    )
    _record(benchmark, variant, result, _server_cpu_s(server) - cpu0)


@pytest.mark.parametrize("partitions", PARTITIONS[1:])
def test_partition_scan_cost(benchmark, server, tmp_path, partitions):
    """1 worker, the ratings in ``partitions`` hash partitions: each is one server-side scan."""
    variant = f"export_1_p{partitions}"
    cpu0 = _server_cpu_s(server)
    result = benchmark.pedantic(
        _in_child, args=(_child, variant, server, str(tmp_path / "shards")), rounds=1, iterations=1
    )
    _record(benchmark, variant, result, _server_cpu_s(server) - cpu0)


def adbpyg_python() -> tuple[str | None, str]:
    """adbpyg-adapter's venv python (built by ``benchmarks/adbpyg_venv.sh`` when missing), or None and why."""
    try:
        done = subprocess.run(
            ["bash", str(HERE / "adbpyg_venv.sh"), str(ADBPYG_VENV)], capture_output=True, text=True, timeout=1800
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        return None, f"building its venv failed: {err}"
    if done.returncode != 0:
        return None, f"building its venv at {ADBPYG_VENV} failed (exit {done.returncode}): {done.stderr.strip()[-400:]}"
    return done.stdout.strip().splitlines()[-1], ""


def test_adbpyg_adapter_export(benchmark, server):
    """adbpyg-adapter's ``arangodb_to_pyg`` in its own venv (python-arango 7.x), over HTTP to the same double."""
    python, why = adbpyg_python()
    if python is None:
        RESULTS["adbpyg"] = {"skipped": why}
        pytest.skip(f"adbpyg-adapter not measured: {why}")
    env = {
        **os.environ,
        "SCALABLE_REC_ARANGO_URL": server.url,
        "SCALABLE_REC_ARANGO_DB": DATABASE,
        "SCALABLE_REC_ARANGO_USER": server.username,
        "SCALABLE_REC_ARANGO_PASSWORD": server.password,
        "ADBPYG_BATCH_SIZE": "10000",
        "PYTHONPATH": "",
    }

    def run() -> dict:
        done = subprocess.run(
            [python, str(HERE / "adbpyg_export.py")], env=env, capture_output=True, text=True, timeout=3600
        )
        if done.returncode != 0:
            raise AssertionError(f"adbpyg_export.py failed (exit {done.returncode}): {done.stderr[-2000:]}")
        lines = [line for line in done.stdout.splitlines() if line.startswith("ADBPYG_RESULT ")]
        if not lines:
            raise AssertionError(f"adbpyg_export.py printed no result: {done.stdout[-2000:]} {done.stderr[-2000:]}")
        return json.loads(lines[-1].split(" ", 1)[1])

    cpu0 = _server_cpu_s(server)
    result = benchmark.pedantic(run, rounds=1, iterations=1)
    _record(benchmark, "adbpyg", result, _server_cpu_s(server) - cpu0)


def _ranked_iter(n: int, k: int = 10, seed: int = 1) -> Iterator[pa.RecordBatch]:
    """``n`` ranked rows (``n // k`` users × top ``k``), generated 1,000 users at a time."""
    rng = np.random.default_rng(seed)
    users = n // k
    _, movies = _graph_size(EDGES)
    for start in range(0, users, 1000):
        u = np.arange(start, min(users, start + 1000))
        yield pa.record_batch(
            {
                "user_key": pa.array(np.repeat(u, k)),
                "movie_key": pa.array(rng.integers(0, movies, len(u) * k)),
                "score": pa.array(rng.random(len(u) * k), pa.float32()),
                "rank": pa.array(np.tile(np.arange(1, k + 1, dtype=np.int32), len(u))),
            }
        )


def _ranked(n: int, k: int = 10, seed: int = 1) -> list[pa.RecordBatch]:
    return list(_ranked_iter(n, k, seed))


def _import_bulk_100(db, batches, run_id: str) -> int:
    """The article's writeback: one dict per edge, ``import_bulk`` every 100 documents."""
    name = f"Recs_{run_id}"
    collection = db.create_collection(name, edge=True)
    pending, written = [], 0
    for batch in batches:
        for u, m, s, r in zip(*(batch.column(c).to_pylist() for c in ("user_key", "movie_key", "score", "rank"))):
            pending.append(
                {
                    "_key": f"{run_id}-{u}-{m}-{r}",
                    "_from": f"Users/{u}",
                    "_to": f"Movie/{m}",
                    "score": s,
                    "rank": r,
                    "run_id": run_id,
                }
            )
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
    conn.send(
        {
            "sent": sent,
            "seconds": time.perf_counter() - t0,
            "baseline_rss_mb": baseline / (1 << 20),
            "peak_rss_mb": _peak_rss_mb(),
        }
    )


@pytest.mark.parametrize("scale", [1, 4])
def test_writeback_peak_rss_is_flat(benchmark, server, scale):
    """Writeback memory must not grow with the number of edges (beyond the set of user keys)."""
    n = WRITEBACK * scale

    result = benchmark.pedantic(_in_child, args=(_writeback_child, server, n, f"rss_{scale}"), rounds=1, iterations=1)
    assert result["sent"] == n
    growth = result["peak_rss_mb"] - result["baseline_rss_mb"]
    RESULTS[f"writeback_rss_{scale}"] = growth
    benchmark.extra_info.update(
        edges=n, edges_per_s=n / result["seconds"], peak_rss_mb=result["peak_rss_mb"], peak_minus_baseline_rss_mb=growth
    )
    if scale == 4 and "writeback_rss_1" in RESULTS:
        # 4× the edges may add the user-key set (n/10 short strings) and allocator noise, not 4× memory.
        assert growth <= RESULTS["writeback_rss_1"] + 32, (RESULTS["writeback_rss_1"], growth)
