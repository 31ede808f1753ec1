"""A user's messages weighted by its ratings' deviation from its own mean (``rating_messages``
``center``): ``lin_l(mean x) + lin_r(x_u) + lin_c(mean (r − r̄_u) x)``, ``lin_c`` zero at the
start (the model starts as ``none``); movies aggregate as under ``none``."""

import pytest
import torch
from rating_fixtures import small_model as _model
from rating_fixtures import target_excluding_loader
from rating_fixtures import three_user_graph as _graph
from sync_count import HostSyncs

from scalable_rec.graph import MOVIE, RATES, REV_RATES, USER
from scalable_rec.model.rating_center import (
    RatingCenterConv,
    coo_deviation_adjacency,
    deviation_adjacency,
    deviation_values,
)
from scalable_rec.refresh import check_refreshable
from scalable_rec.train import ModelConfig, Recommender


def _center_convs(model: Recommender) -> list[RatingCenterConv]:
    return [c for hetero in model.encoder.convs for c in hetero.convs.values() if isinstance(c, RatingCenterConv)]


def _random_lin_c(model: Recommender) -> Recommender:
    with torch.no_grad():
        for conv in _center_convs(model):
            conv.lin_c.weight.normal_(generator=torch.Generator().manual_seed(1))
    return model


@pytest.mark.parametrize("num_layers", [1, 2])
def test_with_a_zero_lin_c_the_model_is_the_default(num_layers):
    """``center`` holds ``none``'s parameters plus one zero ``lin_c`` per layer, on the
    users' side only; with them it embeds every node, and predicts, as ``none`` does."""
    g = _graph([1.0, 5.0, 4.5, 3.0])
    none, center = _model("none", num_layers), _model("center", num_layers)
    missing, unexpected = center.load_state_dict(none.state_dict(), strict=False)
    assert unexpected == [] and len(missing) == num_layers
    assert all("rev_rates" in k and k.endswith("lin_c.weight") for k in missing)
    assert all(torch.equal(c.lin_c.weight, torch.zeros(4, 4)) for c in _center_convs(center))
    a, b = none.encode_all(g.hetero_data()), center.encode_all(g.hetero_data())
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=0, rtol=0, msg=key)
    uid, mid = torch.tensor([0, 1, 2]), torch.tensor([1, 0, 1])
    assert torch.equal(none.predict_pairs(a, uid, mid), center.predict_pairs(b, uid, mid))


def test_a_users_output_adds_lin_c_of_its_deviation_weighted_mean():
    """User 0 rated movie 0 at 1.0 and movie 1 at 3.0 (mean 2.0): its output is
    ``lin_l((x_0 + x_1)/2) + lin_r(x_u) + lin_c((−1·x_0 + 1·x_1)/2)``; movies get no such term."""
    g = _graph([1.0, 5.0, 4.5, 3.0])
    model = _random_lin_c(_model("center"))
    enc = model.encoder
    x = enc.input_features({USER: torch.arange(3), MOVIE: torch.arange(2)}, g.movie_x)
    got = model.encode_all(g.hetero_data())
    to_user, to_movie = enc.convs[0].convs[REV_RATES], enc.convs[0].convs[RATES]
    assert isinstance(to_user, RatingCenterConv) and not isinstance(to_movie, RatingCenterConv)
    with torch.no_grad():
        mean = (x[MOVIE][0] + x[MOVIE][1]) / 2
        plain = to_user.lin_l(mean) + to_user.lin_r(x[USER][0])
        want = plain + to_user.lin_c((x[MOVIE][1] - x[MOVIE][0]) / 2)
        torch.testing.assert_close(got[USER][0], want)
        assert not torch.allclose(got[USER][0], plain, atol=1e-4)  # the rating term is there
        # user 1 has one movie: its deviation is zero, so it gets the plain mean
        torch.testing.assert_close(got[USER][1], to_user.lin_l(x[MOVIE][0]) + to_user.lin_r(x[USER][1]))
        movie = to_movie.lin_l((x[USER][0] + x[USER][1] + x[USER][2]) / 3) + to_movie.lin_r(x[MOVIE][0])
        torch.testing.assert_close(got[MOVIE][0], movie)


def test_the_rating_reaches_the_messages_on_the_users_own_scale():
    """User 0's ratings 1.0/3.0 → 1.0/4.0 change its embedding; shifting both by the same
    amount (1.0/3.0 → 2.5/4.5: the same deviations) does not; nor does any rating change
    the movies' (one layer: their messages ignore the rating)."""
    model = _random_lin_c(_model("center"))
    a = model.encode_all(_graph([1.0, 5.0, 4.5, 3.0]).hetero_data())
    b = model.encode_all(_graph([1.0, 5.0, 4.5, 4.0]).hetero_data())
    c = model.encode_all(_graph([2.5, 5.0, 4.5, 4.5]).hetero_data())
    assert not torch.allclose(a[USER][0], b[USER][0], atol=1e-4)
    torch.testing.assert_close(a[USER][0], c[USER][0])
    assert torch.equal(a[USER][1], b[USER][1]) and torch.equal(a[MOVIE], b[MOVIE])


def test_deviation_values_are_centred_per_destination_and_over_its_degree():
    dst = torch.tensor([0, 0, 0, 2, 2])
    rating = torch.tensor([1.0, 2.0, 6.0, 2.5, 2.5])
    torch.testing.assert_close(deviation_values(dst, rating, 3), torch.tensor([-2 / 3, -1 / 3, 1.0, 0.0, 0.0]))
    with pytest.raises(ValueError, match="'rating' needs one entry per edge \\(got 4 for 5 edges\\)"):
        deviation_values(dst, rating[:4], 3)


def test_lin_c_learns_from_the_first_step():
    """Zero at the start, but not stuck there: one step's gradient reaches every ``lin_c``."""
    g = _graph([1.0, 5.0, 4.5, 3.0])
    model = _model("center", num_layers=2).train()
    data = g.hetero_data()
    data[RATES].edge_label_index = data[RATES].edge_index
    data[USER].n_id, data[MOVIE].n_id = torch.arange(3), torch.arange(2)
    pred, _ = model(data)
    ((pred - g.rating) ** 2).mean().backward()
    convs = _center_convs(model)
    assert len(convs) == 2 and all(c.lin_c.weight.grad.abs().sum() > 0 for c in convs)


def test_a_batchs_targets_do_not_count_in_its_users_deviations(tiny_shards):
    """With target exclusion each user's mean and deviations are over the batch's edges
    left after the targets are taken out: a target's rating reaches no message."""
    g, truth, loader = target_excluding_loader(tiny_shards)
    model = Recommender(g.num_users, g.num_movies, g.movie_x.size(1), ModelConfig(hidden=4, rating_messages="center"))
    checked = 0
    for batch in loader:
        dev = model._rating_inputs(batch, torch.device("cpu"))
        assert set(dev) == {REV_RATES}
        dense = dev[REV_RATES].to_dense()  # [users, movies]
        u, m = batch[RATES].edge_label_index
        targets = set(zip(batch[USER].n_id[u].tolist(), batch[MOVIE].n_id[m].tolist()))
        per_user: dict[int, list[tuple[int, float]]] = {}
        src, dst = batch[REV_RATES].edge_index  # movie → user
        for mv, us in zip(src.tolist(), dst.tolist()):
            pair = (batch[USER].n_id[us].item(), batch[MOVIE].n_id[mv].item())
            assert pair not in targets
            per_user.setdefault(us, []).append((mv, truth[pair]))
        want = torch.zeros_like(dense)
        for us, items in per_user.items():
            mean = sum(r for _, r in items) / len(items)
            for mv, r in items:
                want[us, mv] = (r - mean) / len(items)
        torch.testing.assert_close(dense, want)
        checked += len(per_user)
    assert checked > 50


def test_center_needs_each_edges_rating():
    g = _graph([1.0, 5.0, 4.5, 3.0])
    data = g.hetero_data()
    del data[REV_RATES].rating
    with pytest.raises(ValueError, match="rating_messages 'center' needs each edge's 'rating'"):
        _model("center").encode_all(data)
    check_refreshable(ModelConfig(rating_messages="center"))  # refresh keeps its rating sums


@pytest.mark.parametrize("aggr", ["sum", "max"])
def test_with_another_aggregation_the_rating_term_is_still_a_deviation_mean(aggr):
    """Under ``aggr`` sum or max SAGEConv aggregates as told and ``lin_c`` still reads the
    deviation *mean* (user 0: ``(x_1 − x_0) / 2``)."""
    g = _graph([1.0, 5.0, 4.5, 3.0])
    model = _random_lin_c(_model("center", aggr=aggr))
    enc = model.encoder
    x = enc.input_features({USER: torch.arange(3), MOVIE: torch.arange(2)}, g.movie_x)
    got = model.encode_all(g.hetero_data())
    conv = enc.convs[0].convs[REV_RATES]
    with torch.no_grad():
        pair = torch.stack([x[MOVIE][0], x[MOVIE][1]])
        agg = pair.sum(0) if aggr == "sum" else pair.max(0).values
        want = conv.lin_l(agg) + conv.lin_r(x[USER][0]) + conv.lin_c((x[MOVIE][1] - x[MOVIE][0]) / 2)
        torch.testing.assert_close(got[USER][0], want)


@pytest.mark.parametrize("sparse_tensor", [True, False], ids=["SparseTensor", "csr"])
def test_a_batchs_deviation_adjacency_is_built_without_a_host_sync(sparse_tensor):
    """A training step builds ``D`` from the batch's COO edges: no operation whose output
    size or value the host must read on a GPU (counted on the CPU, where the same operations
    run), and the CSR equals the one built from sorted edges."""
    gen = torch.Generator().manual_seed(0)
    edge_index = torch.stack([torch.randint(0, 40, (500,), generator=gen), torch.randint(0, 30, (500,), generator=gen)])
    rating = torch.randint(1, 11, (500,), generator=gen) / 2
    with HostSyncs() as syncs:
        adj = coo_deviation_adjacency(edge_index, rating, 40, 30, torch.device("cpu"), sparse_tensor)
    assert syncs.total == 0, syncs.counts
    perm = torch.argsort(edge_index[1] * 40 + edge_index[0])
    rowptr = torch.zeros(31, dtype=torch.long)
    rowptr[1:] = torch.bincount(edge_index[1], minlength=30).cumsum(0)
    ref = deviation_adjacency(rowptr, edge_index[0][perm], rating[perm], 40, torch.device("cpu"), sparse_tensor)
    dense = adj.to_dense()
    assert torch.equal(dense, ref.to_dense()) and dense.abs().sum() > 0
