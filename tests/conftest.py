"""Shared fixtures: tiny synthetic shards, the shared MovieLens shards, the ArangoDB double."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from arango_double import *  # noqa: F401,F403  (arango_double, arango_endpoint, arango_faults)

from scalable_rec.shards import GraphShards
from scalable_rec.source import SkipReport, write_rating_shards
from scalable_rec.source.synthetic import SyntheticSource

ROOT = Path(__file__).resolve().parents[1]
MOVIELENS = Path(os.environ.get("SCALABLE_REC_TEST_DATA", ROOT.parent / "shared" / "data" / "ml-latest-small"))

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device; none is present")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device; none is present"))


@pytest.fixture(scope="session")
def movielens_dir() -> Path:
    if not (MOVIELENS / "ratings.csv").is_file():
        pytest.skip(f"shared MovieLens not found at {MOVIELENS} (set SCALABLE_REC_TEST_DATA)")
    return MOVIELENS


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory) -> GraphShards:
    """50 users × 50 movies × 500 ratings with 403-d movie features (PyG-test sized)."""
    out = tmp_path_factory.mktemp("tiny") / "shards"
    write_rating_shards(SyntheticSource.preset("tiny", seed=0), str(out), SkipReport(), max_rows_per_shard=200)
    return GraphShards(out)


@pytest.fixture(scope="session")
def small_shards(tmp_path_factory) -> GraphShards:
    """1,000 users × 2,000 movies × 100,000 ratings: enough signal to learn."""
    out = tmp_path_factory.mktemp("small") / "shards"
    write_rating_shards(SyntheticSource.preset("small", seed=0), str(out), SkipReport())
    return GraphShards(out)


@pytest.fixture(scope="module")
def small(small_shards):
    """The small shards as a graph and its default split (one per test module)."""
    from scalable_rec.graph import RatingGraph, SplitConfig, split_edges

    g = RatingGraph.from_shards(small_shards)
    return g, split_edges(g, SplitConfig())


@pytest.fixture(scope="session")
def movielens_run_config(movielens_dir, tmp_path_factory):
    """A RunConfig whose prepared shards and features (sentence-transformer) are shared."""
    from scalable_rec.config import DataConfig, RunConfig
    from scalable_rec.pipeline import prepare

    workdir = tmp_path_factory.mktemp("ml")
    cfg = RunConfig(data=DataConfig(data=str(movielens_dir), workdir=str(workdir)))
    prepare(cfg)
    return cfg
