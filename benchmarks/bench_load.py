"""Shards → tensors → ``HeteroData``: edges/s (memory-mapped read, checksums off and on).

scripts/bench.sh -k load
"""

import pytest

from scalable_rec.graph import RatingGraph
from scalable_rec.shards import GraphShards


@pytest.mark.parametrize("verify", [False, True])
def test_shards_to_heterodata(benchmark, synthetic_shards, verify):
    def load():
        g = RatingGraph.from_shards(GraphShards(synthetic_shards.directory, verify=verify))
        return g, g.hetero_data()

    g, data = benchmark.pedantic(load, rounds=3, warmup_rounds=1)
    assert data["user", "rates", "movie"].edge_index.size(1) == g.num_edges
    benchmark.extra_info.update(
        edges=g.num_edges, verify_sha256=verify, edges_per_s=g.num_edges / benchmark.stats.stats.median
    )
