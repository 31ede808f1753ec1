import pytest
import torch

from scalable_rec.errors import ShardError
from scalable_rec.graph import RATES, REV_RATES, RatingGraph, SplitConfig, split_edges


@pytest.fixture(scope="module")
def graph(tiny_shards):
    return RatingGraph.from_shards(tiny_shards)


@pytest.mark.parametrize("strategy", ["random", "temporal"])
def test_split_is_disjoint_covering_and_deterministic(graph, strategy):
    cfg = SplitConfig(strategy=strategy, split_seed=3)
    a, b = split_edges(graph, cfg), split_edges(graph, cfg)
    assert torch.equal(a.train, b.train) and torch.equal(a.test, b.test)
    all_ids = torch.cat([a.train, a.val, a.test])
    assert all_ids.numel() == graph.num_edges == torch.unique(all_ids).numel()
    assert (a.train.numel(), a.val.numel(), a.test.numel()) == (400, 50, 50)


def test_random_split_depends_on_seed(graph):
    a = split_edges(graph, SplitConfig(split_seed=0))
    b = split_edges(graph, SplitConfig(split_seed=1))
    assert not torch.equal(a.test, b.test)


def test_temporal_split_orders_by_time(graph):
    s = split_edges(graph, SplitConfig(strategy="temporal"))
    assert graph.timestamp[s.train].max() <= graph.timestamp[s.val].min()
    assert graph.timestamp[s.val].max() <= graph.timestamp[s.test].min()


def _pairs(graph, ids):
    return set(zip(graph.src[ids].tolist(), graph.dst[ids].tolist()))


@pytest.mark.parametrize("strategy", ["random", "temporal"])
def test_no_user_movie_pair_is_on_two_sides_of_the_split(graph, strategy):
    s = split_edges(graph, SplitConfig(strategy=strategy))
    train, val, test = _pairs(graph, s.train), _pairs(graph, s.val), _pairs(graph, s.test)
    assert len(train) == s.train.numel() and len(val) == s.val.numel() and len(test) == s.test.numel()
    assert not (train & val) and not (train & test) and not (val & test)


def test_split_refuses_a_graph_with_repeated_pairs(graph):
    import dataclasses

    twice = dataclasses.replace(
        graph,
        src=torch.cat([graph.src, graph.src[:3]]),
        dst=torch.cat([graph.dst, graph.dst[:3]]),
        rating=torch.cat([graph.rating, graph.rating[:3]]),
        timestamp=torch.cat([graph.timestamp, graph.timestamp[:3]]),
    )
    with pytest.raises(ShardError, match="3 repeated \\(user, movie\\) pairs"):
        split_edges(twice, SplitConfig())


def test_message_passing_graph_excludes_held_out_edges(graph):
    s = split_edges(graph, SplitConfig())
    data = graph.hetero_data(s.train)
    ei = data[RATES].edge_index
    assert ei.size(1) == s.train.numel()
    assert torch.equal(data[REV_RATES].edge_index, ei.flip(0))
    message_pairs = set(map(tuple, ei.T.tolist()))
    assert not (message_pairs & (_pairs(graph, s.val) | _pairs(graph, s.test)))
    assert data["user"].num_nodes == 50 and data["movie"].x.shape == (50, 403)
    assert "x" not in data["user"]  # users are learnt embeddings, not an identity matrix


def test_split_config_validation_reports_all_problems():
    with pytest.raises(ValueError, match="'val_ratio'.*got 1.5.*'strategy'"):
        SplitConfig(val_ratio=1.5, strategy="by-genre")
