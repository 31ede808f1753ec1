"""Benchmark fixtures: cached synthetic and MovieLens shards, sizes from the environment.

Sizes: ``SCALABLE_REC_BENCH_EDGES`` (default 1,000,000 synthetic rating edges, with
users/movies scaled like MovieLens-25M). Shards are cached under
``~/.cache/scalable-rec/bench`` (``SCALABLE_REC_BENCH_CACHE``) and reused when the
generator config is unchanged, so reruns time the stages, not the data generation.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from scalable_rec.shards import GraphShards, Manifest  # noqa: E402
from scalable_rec.source import SkipReport, write_rating_shards  # noqa: E402
from scalable_rec.source.synthetic import SyntheticSource  # noqa: E402

CACHE = Path(os.environ.get("SCALABLE_REC_BENCH_CACHE", Path.home() / ".cache" / "scalable-rec" / "bench"))
EDGES = int(os.environ.get("SCALABLE_REC_BENCH_EDGES", 1_000_000))
MOVIELENS = Path(
    os.environ.get(
        "SCALABLE_REC_TEST_DATA", Path(__file__).resolve().parents[2] / "shared" / "data" / "ml-latest-small"
    )
)


def synthetic_for_edges(edges: int, seed: int = 0) -> SyntheticSource:
    """Users and movies scaled from ML-25M's shape (162k users, 59k movies, 25M edges)."""
    ratio = edges / 25_000_000
    return SyntheticSource(
        num_users=max(100, int(162_000 * ratio**0.75)),
        num_movies=max(100, int(59_000 * ratio**0.6)),
        num_edges=edges,
        seed=seed,
    )


def cached_shards(source, name: str) -> GraphShards:
    out = CACHE / name
    if (out / "manifest.json").is_file() and Manifest.load(out).fingerprint == source.fingerprint():
        return GraphShards(out, verify=False)
    write_rating_shards(source, str(out), SkipReport(), overwrite=True)
    return GraphShards(out, verify=False)


@pytest.fixture(scope="session")
def synthetic_shards() -> GraphShards:
    return cached_shards(synthetic_for_edges(EDGES), f"synthetic-{EDGES}")


@pytest.fixture(scope="session")
def movielens_shards() -> GraphShards:
    from scalable_rec.graph import movie_features
    from scalable_rec.source import MovieLensSource

    if not (MOVIELENS / "ratings.csv").is_file():
        pytest.skip(f"MovieLens not found at {MOVIELENS} (set SCALABLE_REC_TEST_DATA)")
    shards = cached_shards(MovieLensSource(str(MOVIELENS)), "ml-latest-small")
    movie_features(shards)  # sentence-transformer encode once, cached beside the shards
    return shards


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device; none is present"))
