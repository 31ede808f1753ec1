"""Messages scaled by a learned scalar per rating bucket (``rating_messages`` ``scale``): one
mean per direction, ``lin_l(mean_j s_{b(j)} x_j) + lin_r(x_i)``."""

import io

import pytest
import torch
from rating_fixtures import small_model as _model
from rating_fixtures import three_user_graph as _graph
from rating_fixtures import vary_scale_scalars
from torch_geometric.nn import SAGEConv

from scalable_rec.graph import MOVIE, RATES, REV_RATES, USER
from scalable_rec.graph.relations import relation
from scalable_rec.model.rating_scale import RatingScaleConv
from scalable_rec.train import ModelConfig, Recommender


def _core(model: Recommender, layer: int, edge_type):
    return model.encoder.convs[layer].convs[relation(edge_type, 0)].core


def test_messages_are_scaled_by_their_buckets_scalar_within_one_mean():
    """Movie 0 has one ``lo`` neighbour (1.0) and two ``hi`` ones (5.0, 4.5): its output is
    lin_l((s_lo x_0 + s_hi (x_1 + x_2)) / 3) + lin_r(x_m), one weight for every bucket."""
    g = _graph([1.0, 5.0, 4.5, 3.0])
    model = _model("scale")
    core = _core(model, 0, RATES)
    with torch.no_grad():
        core.scale.copy_(torch.tensor([-0.5, 0.7, 2.0]))
    enc = model.encoder
    x = enc.input_features({USER: torch.arange(3), MOVIE: torch.arange(2)}, g.movie_x)
    got = model.encode_all(g.hetero_data())
    with torch.no_grad():
        mean = (-0.5 * x[USER][0] + 2.0 * (x[USER][1] + x[USER][2])) / 3
        torch.testing.assert_close(got[MOVIE][0], core.lin_l(mean) + core.lin_r(x[MOVIE][0]))
        # movie 1's one neighbour is rated 3.0 (mid): s_mid x_0 / 1
        torch.testing.assert_close(got[MOVIE][1], core.lin_l(0.7 * x[USER][0]) + core.lin_r(x[MOVIE][1]))


def test_the_rating_reaches_the_messages():
    """The same graph with one rating moved to another bucket embeds its endpoints
    differently once the scalars differ; with the rating dropped from the messages (all
    scalars equal) it would not."""
    model = _model("scale", num_layers=2)
    vary_scale_scalars(model, [-0.5, 0.7, 2.0])
    a = model.encode_all(_graph([1.0, 5.0, 4.5, 3.0]).hetero_data())
    b = model.encode_all(_graph([5.0, 5.0, 4.5, 3.0]).hetero_data())  # user 0 likes movie 0 now
    assert not torch.allclose(a[MOVIE][0], b[MOVIE][0])
    assert not torch.allclose(a[USER][0], b[USER][0])
    assert not torch.allclose(a[MOVIE][1], b[MOVIE][1])  # two hops: movie 1 sees user 0


def test_an_untrained_scale_model_computes_what_the_default_computes():
    """Scalars at one: the default's SAGEConv with the same weights gives the same output
    (to float rounding), so ``scale`` starts at the default and adds only the rating."""
    g = _graph([1.0, 5.0, 4.5, 3.0])
    scale, none = _model("scale", num_layers=2), _model("none", num_layers=2)
    with torch.no_grad():
        none.encoder.user_emb.weight.copy_(scale.encoder.user_emb.weight)
        none.encoder.movie_emb.weight.copy_(scale.encoder.movie_emb.weight)
        none.encoder.movie_lin.load_state_dict(scale.encoder.movie_lin.state_dict())
        for i in range(2):
            for et in (RATES, REV_RATES):
                conv: SAGEConv = none.encoder.convs[i].convs[et]
                core = _core(scale, i, et)
                conv.lin_l.weight.copy_(core.lin_l.weight)
                conv.lin_l.bias.copy_(core.lin_l.bias)
                conv.lin_r.weight.copy_(core.lin_r.weight)
    a, b = scale.encode_all(g.hetero_data()), none.encode_all(g.hetero_data())
    for key in (USER, MOVIE):
        torch.testing.assert_close(a[key], b[key])


def test_one_weight_per_direction_shared_by_its_bucket_relations_and_kept_through_a_checkpoint():
    model = _model("scale", num_layers=2)
    for i in range(2):
        convs = model.encoder.convs[i].convs
        for et in (RATES, REV_RATES):
            views = [convs[relation(et, b)] for b in range(3)]
            assert all(isinstance(v, RatingScaleConv) for v in views)
            assert views[0].core is views[1].core is views[2].core
    # parameters counted once: 2 layers × 2 directions × (2 h×h weights, one bias, 3 scalars)
    conv_params = sum(p.numel() for n, p in model.named_parameters() if ".convs." in n)
    assert conv_params == 2 * 2 * (2 * 16 + 4 + 3)
    buf = io.BytesIO()
    with torch.no_grad():
        _core(model, 1, REV_RATES).scale.copy_(torch.tensor([0.1, 0.2, 0.3]))
    torch.save(model.state_dict(), buf)
    other = _model("scale", num_layers=2)
    buf.seek(0)
    other.load_state_dict(torch.load(buf))
    views = [other.encoder.convs[1].convs[relation(REV_RATES, b)] for b in range(3)]
    assert views[0].core is views[2].core
    torch.testing.assert_close(views[1].core.scale, torch.tensor([0.1, 0.2, 0.3]))


def test_a_training_step_reaches_every_buckets_scalar():
    g = _graph([1.0, 5.0, 4.5, 3.0])
    # no dropout, no hidden IDs: every message path is open
    model = _model("scale", num_layers=2, hidden=16, dropout=0.0, user_id_dropout=0.0, movie_id_dropout=0.0).train()
    data = g.hetero_data()
    data[RATES].edge_label_index = data[RATES].edge_index
    data[USER].n_id, data[MOVIE].n_id = torch.arange(3), torch.arange(2)
    pred, _ = model(data)
    pred.sum().backward()
    for name, p in model.named_parameters():
        if name.endswith("core.scale"):
            # buckets lo (1.0), mid (3.0) and hi (5.0, 4.5) all carry messages both ways
            assert bool((p.grad != 0).all()), name


def test_scale_needs_a_mean_and_each_edges_rating():
    with pytest.raises(ValueError, match="'rating_messages' scale .* needs 'aggr' mean \\(got 'max'\\)"):
        ModelConfig(rating_messages="scale", aggr="max")
    data = _graph([1.0, 5.0, 4.5, 3.0]).hetero_data()
    del data[RATES].rating
    with pytest.raises(ValueError, match="rating_messages 'scale' needs each edge's 'rating'"):
        _model("scale").encode_all(data)
