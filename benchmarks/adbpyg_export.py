"""adbpyg-adapter's ``arangodb_to_pyg`` over the benchmark graph, timed; run by ``bench_arango.py``.

Runs in adbpyg-adapter's own virtual environment (``benchmarks/adbpyg_venv.sh``: it pins
python-arango 7.x, so it cannot share the package's), never imports ``scalable_rec``, and
talks to the benchmark's ArangoDB double over HTTP. Connection settings come from the
environment (``SCALABLE_REC_ARANGO_URL``, ``_DB``, ``_USER``, ``_PASSWORD``), never argv.
Prints one line ``ADBPYG_RESULT <json>``: rows, seconds, client CPU seconds (this process, all threads), peak
and baseline RSS (after imports, as for the package's variants).

The metagraph asks for what the package's export reads: the rating and the timestamp of each
``Ratings`` edge, the vertices' keys (``Users``, ``Movie``); adbpyg then sends
``FOR doc IN @@col RETURN MERGE({_key: doc._key, _from: doc._from, _to: doc._to},
KEEP(doc, [...]))`` per collection as a stream cursor and builds a ``HeteroData``.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import sys
import time
from pathlib import Path

import psutil
from adbpyg_adapter import ADBPyG_Adapter
from arango import ArangoClient

MARK = "ADBPYG_RESULT "  # rich's progress bars share stdout


def _peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> int:
    env = os.environ
    baseline = psutil.Process().memory_info().rss
    t0, cpu0 = time.perf_counter(), time.process_time()
    client = ArangoClient(hosts=env["SCALABLE_REC_ARANGO_URL"], request_timeout=600)
    db = client.db(
        env["SCALABLE_REC_ARANGO_DB"],
        username=env["SCALABLE_REC_ARANGO_USER"],
        password=env["SCALABLE_REC_ARANGO_PASSWORD"],
    )
    adapter = ADBPyG_Adapter(db, logging_lvl=logging.WARNING)
    metagraph = {
        "vertexCollections": {"Users": {}, "Movie": {}},
        "edgeCollections": {"Ratings": {"edge_weight": "rating", "time": "timestamp"}},
    }
    data = adapter.arangodb_to_pyg("bench", metagraph, batch_size=int(env.get("ADBPYG_BATCH_SIZE", 10_000)))
    store = data["Users", "Ratings", "Movie"]
    rows = int(store.edge_index.shape[1])
    if rows != int(store.edge_weight.shape[0]) or rows != int(store.time.shape[0]):
        raise SystemExit(f"adbpyg: {rows} edges but {store.edge_weight.shape} weights, {store.time.shape} times")
    result = {
        "rows": rows,
        "seconds": time.perf_counter() - t0,
        "client_cpu_s": time.process_time() - cpu0,
        "baseline_rss_mb": baseline / (1 << 20),
        "peak_rss_mb": _peak_rss_mb(),
        "adbpyg_python": sys.version.split()[0],
    }
    print("\n" + MARK + json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
