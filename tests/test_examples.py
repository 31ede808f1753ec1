"""examples/ run end to end on a slice of the shared MovieLens data, with one thread."""

from __future__ import annotations

import collections
import csv
import importlib.util
import itertools
import math
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "movielens_quickstart.py"


def movielens_slice(src: Path, out: Path, users: int, movies: int) -> Path:
    """A MovieLens folder holding the first ``users`` users' ratings of ``src`` on their
    ``movies`` most rated movies (few titles: the text encoder's time goes with them)."""
    out.mkdir(parents=True)
    with open(src / "ratings.csv", newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        rows = list(itertools.takewhile(lambda row: int(row[0]) <= users, reader))  # sorted by userId
    kept = {m for m, _ in collections.Counter(row[1] for row in rows).most_common(movies)}
    with open(out / "ratings.csv", "w", newline="") as f:
        csv.writer(f).writerows([header, *(row for row in rows if row[1] in kept)])
    with open(src / "movies.csv", newline="") as fin, open(out / "movies.csv", "w", newline="") as fout:
        reader, writer = csv.reader(fin), csv.writer(fout)
        writer.writerow(next(reader))
        writer.writerows(row for row in reader if row[0] in kept)
    return out


def load_example():
    spec = importlib.util.spec_from_file_location("movielens_quickstart", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quickstart_prepares_trains_and_writes_top_10(movielens_dir, tmp_path):
    data = movielens_slice(movielens_dir, tmp_path / "ml-slice", users=50, movies=300)
    threads = torch.get_num_threads()
    start, cpu = time.monotonic(), time.process_time()
    try:
        out = load_example().main(
            [
                "--data",
                str(data),
                "--workdir",
                str(tmp_path / "work"),
                "--epochs",
                "2",
                "--batch-size",
                "512",
                "--hidden",
                "32",
                "--threads",
                "1",
            ]
        )
    finally:
        torch.set_num_threads(threads)
    elapsed, cpu = time.monotonic() - start, time.process_time() - cpu
    table = pq.read_table(out["recommendations"])
    assert out["users"] == 50 and out["rows"] == table.num_rows == 50 * 10
    per_user = table.group_by("user_key").aggregate([("rank", "count"), ("rank", "min"), ("rank", "max")])
    assert set(per_user.column("rank_count").to_pylist()) == {10}
    assert set(per_user.column("rank_min").to_pylist()) == {1} and set(per_user.column("rank_max").to_pylist()) == {10}
    rated = {(r["userId"], r["movieId"]) for r in csv.DictReader(open(data / "ratings.csv"))}
    recommended = zip(table.column("user_key").to_pylist(), table.column("movie_key").to_pylist())
    assert not rated & {(str(u), str(m)) for u, m in recommended}, "a rated movie was recommended"
    metrics = [out["test"]["rmse"], out["test"]["model"]["recall@10"], out["test"]["model"]["ndcg@10"]]
    assert all(math.isfinite(m) for m in metrics), out["test"]
    # CPU time, not wall time: on a shared machine the wall clock measures the neighbours.
    assert cpu < 30, f"the example took {cpu:.0f} s of CPU ({elapsed:.0f} s wall)"
