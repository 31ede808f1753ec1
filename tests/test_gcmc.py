"""GC-MC's normalisation (``rating_messages`` ``gcmc``): each rating relation's sum over the
destination's in-degree in all relations, the degree read alike from every adjacency kind."""

import dataclasses

import pytest
import torch
from rating_fixtures import small_model as _model
from rating_fixtures import three_user_graph as _graph

from scalable_rec.graph import MOVIE, RATES, REV_RATES, USER, RatingGraph
from scalable_rec.graph.relations import relation
from scalable_rec.model.gcmc import in_degree
from scalable_rec.model.recommender import edge_adjacency
from scalable_rec.train import ModelConfig


def test_each_relations_sum_is_divided_by_the_total_degree():
    """Movie 0 has one ``lo`` neighbour (1.0) and two ``hi`` ones (5.0, 4.5): its output is
    Σ_b lin_l_b(Σ_{u in b} x_u / 3) + lin_r_b(x_m), every relation over the total degree 3
    (the ``hi`` sum halved, as a per-bucket mean would have it, is not the output)."""
    g = _graph([1.0, 5.0, 4.5, 3.0])
    model = _model("gcmc")
    enc = model.encoder
    x = enc.input_features({USER: torch.arange(3), MOVIE: torch.arange(2)}, g.movie_x)
    got = model.encode_all(g.hetero_data())
    convs = enc.convs[0].convs

    def expected(dst, sums: dict[int, torch.Tensor], degree: dict[int, float], edge_type) -> torch.Tensor:
        out = torch.zeros(4)
        for b in range(3):
            conv = convs[relation(edge_type, b)]
            s = sums.get(b, torch.zeros(4)) / degree.get(b, 1.0)
            out += conv.lin_l(s) + conv.lin_r(dst)
        return out

    with torch.no_grad():
        sums = {0: x[USER][0], 2: x[USER][1] + x[USER][2]}
        want = expected(x[MOVIE][0], sums, {0: 3.0, 2: 3.0}, RATES)
        torch.testing.assert_close(got[MOVIE][0], want)
        per_bucket = expected(x[MOVIE][0], sums, {0: 1.0, 2: 2.0}, RATES)  # the 'relation' mode's means
        assert not torch.allclose(got[MOVIE][0], per_bucket, atol=1e-4)
        # user 0: movie 0 in lo (1.0), movie 1 in mid (3.0); total degree 2
        want = expected(x[USER][0], {0: x[MOVIE][0], 1: x[MOVIE][1]}, {0: 2.0, 1: 2.0}, REV_RATES)
        torch.testing.assert_close(got[USER][0], want)


@pytest.mark.parametrize("num_layers", [1, 2])
def test_one_edges_rating_changes_its_destinations_embedding(tiny_shards, num_layers):
    """Moving one edge from bucket ``lo`` to ``hi`` changes both endpoints' embeddings; with
    one layer nothing else (only the endpoints receive that edge's messages). A rating
    moved within its bucket changes nothing: the bucket is what reaches the messages."""
    g = RatingGraph.from_shards(tiny_shards)
    model = _model("gcmc", num_layers, g.num_users, g.num_movies, g.movie_x.size(1))
    e = 0
    lo = dataclasses.replace(g, rating=g.rating.clone().index_fill_(0, torch.tensor([e]), 1.0))
    hi = dataclasses.replace(g, rating=g.rating.clone().index_fill_(0, torch.tensor([e]), 5.0))
    also_hi = dataclasses.replace(g, rating=g.rating.clone().index_fill_(0, torch.tensor([e]), 4.5))
    a, b, c = (model.encode_all(x.hetero_data()) for x in (lo, hi, also_hi))
    u, m = int(g.src[e]), int(g.dst[e])
    assert not torch.allclose(a[MOVIE][m], b[MOVIE][m], atol=1e-6)
    assert not torch.allclose(a[USER][u], b[USER][u], atol=1e-6)
    if num_layers == 1:
        others = torch.ones(g.num_movies, dtype=torch.bool).index_fill_(0, torch.tensor([m]), False)
        torch.testing.assert_close(a[MOVIE][others], b[MOVIE][others])
    for key in b:
        torch.testing.assert_close(b[key], c[key])


def test_every_adjacency_kind_gives_the_same_degree_and_encoding(tiny_shards):
    """Training aggregates over SparseTensor or COO ``edge_index``, full-graph encoding over
    SparseTensor or torch CSR: the degree read from each, and the encoding, agree."""
    g = RatingGraph.from_shards(tiny_shards)
    model = _model("gcmc", 2, g.num_users, g.num_movies, g.movie_x.size(1))
    data = g.hetero_data()
    ref = torch.bincount(g.dst, minlength=g.num_movies)
    outs = []
    for kind in ("torch_sparse", "csr", "edge_index"):
        adj = edge_adjacency(data[RATES].edge_index, g.num_users, g.num_movies, "sum", kind)
        assert torch.equal(in_degree(adj, g.num_movies), ref), kind
        n_id = {USER: torch.arange(g.num_users), MOVIE: torch.arange(g.num_movies)}
        with torch.no_grad():
            outs.append(model.encoder(n_id, g.movie_x, model._adjacency(data, torch.device("cpu"), kind)))
    for out in outs[1:]:
        for key in out:
            torch.testing.assert_close(out[key], outs[0][key], atol=1e-5, rtol=1e-5)


def test_gcmc_refuses_a_non_mean_aggregation_and_needs_ratings():
    with pytest.raises(ValueError, match="'rating_messages' gcmc .* needs 'aggr' mean \\(got 'max'\\)"):
        ModelConfig(rating_messages="gcmc", aggr="max")
    data = _graph([1.0, 5.0, 4.5, 3.0]).hetero_data()
    del data[REV_RATES].rating
    with pytest.raises(ValueError, match="rating_messages 'gcmc' needs each edge's 'rating'"):
        _model("gcmc").encode_all(data)
