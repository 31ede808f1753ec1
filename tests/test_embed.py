"""Rating-bucket vectors added to the messages (``rating_messages`` ``embed``): zero-initialised
(the model starts as ``none``), ``lin_l(mean x + F E) + lin_r(x)`` with ``F`` a destination's
bucket fractions over the edges it aggregates, targets of a batch excluded from ``F``."""

import pytest
import torch
from rating_fixtures import small_model as _model
from rating_fixtures import target_excluding_loader
from rating_fixtures import three_user_graph as _graph

from scalable_rec.graph import MOVIE, RATES, REV_RATES, USER
from scalable_rec.graph.relations import bucket_fractions, bucket_of
from scalable_rec.model.rating_embed import RatingEmbedConv
from scalable_rec.train import ModelConfig, Recommender


def _random_buckets(model: Recommender) -> None:
    with torch.no_grad():
        for conv in _embed_convs(model):
            conv.bucket_emb.normal_(generator=torch.Generator().manual_seed(1))


def _embed_convs(model: Recommender) -> list[RatingEmbedConv]:
    return [c for hetero in model.encoder.convs for c in hetero.convs.values() if isinstance(c, RatingEmbedConv)]


@pytest.mark.parametrize("num_layers", [1, 2])
def test_with_zero_bucket_vectors_the_model_is_the_default_bit_for_bit(num_layers):
    """``embed`` holds ``none``'s parameters plus one zero ``[3, d]`` table per direction and
    layer; with them it embeds every node, and predicts, exactly as ``none``."""
    g = _graph([1.0, 5.0, 4.5, 3.0])
    none, embed = _model("none", num_layers), _model("embed", num_layers)
    missing, unexpected = embed.load_state_dict(none.state_dict(), strict=False)
    assert unexpected == [] and len(missing) == 2 * num_layers and all(k.endswith("bucket_emb") for k in missing)
    assert all(torch.equal(c.bucket_emb, torch.zeros(3, 4)) for c in _embed_convs(embed))
    a, b = none.encode_all(g.hetero_data()), embed.encode_all(g.hetero_data())
    assert set(a) == set(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    uid, mid = torch.tensor([0, 1, 2]), torch.tensor([1, 0, 1])
    assert torch.equal(none.predict_pairs(a, uid, mid), embed.predict_pairs(b, uid, mid))


def test_a_node_with_neighbours_in_two_buckets_gets_the_mean_plus_its_bucket_fractions():
    """Movie 0's neighbours: user 0 (1.0, ``lo``), users 1 and 2 (5.0, 4.5, ``hi``): its output
    is ``lin_l(mean x_u + (1/3) e_lo + (2/3) e_hi) + lin_r(x_m)``; user 0 (movies 0 at 1.0
    and 1 at 3.0) gets ``(e_lo + e_mid) / 2`` in its mean."""
    g = _graph([1.0, 5.0, 4.5, 3.0])
    model = _model("embed")
    _random_buckets(model)
    enc = model.encoder
    x = enc.input_features({USER: torch.arange(3), MOVIE: torch.arange(2)}, g.movie_x)
    got = model.encode_all(g.hetero_data())
    to_movie, to_user = enc.convs[0].convs[RATES], enc.convs[0].convs[REV_RATES]
    with torch.no_grad():
        e = to_movie.bucket_emb
        mean = (x[USER][0] + x[USER][1] + x[USER][2]) / 3
        want = to_movie.lin_l(mean + e[0] / 3 + 2 * e[2] / 3) + to_movie.lin_r(x[MOVIE][0])
        torch.testing.assert_close(got[MOVIE][0], want)
        e = to_user.bucket_emb
        want = to_user.lin_l((x[MOVIE][0] + x[MOVIE][1]) / 2 + (e[0] + e[1]) / 2) + to_user.lin_r(x[USER][0])
        torch.testing.assert_close(got[USER][0], want)
        # without the bucket term the output is another one
        plain = to_movie.lin_l(mean) + to_movie.lin_r(x[MOVIE][0])
        assert not torch.allclose(got[MOVIE][0], plain, atol=1e-4)


def test_moving_one_rating_to_another_bucket_changes_its_endpoints_only():
    """User 1's rating of movie 0 goes from 5.0 (``hi``) to 3.0 (``mid``): movie 0 and user 1
    embed differently (one layer), movie 1 and user 2, whose edges did not change, alike."""
    model = _model("embed")
    _random_buckets(model)
    a = model.encode_all(_graph([1.0, 5.0, 4.5, 3.0]).hetero_data())
    b = model.encode_all(_graph([1.0, 3.0, 4.5, 3.0]).hetero_data())
    assert not torch.allclose(a[MOVIE][0], b[MOVIE][0], atol=1e-4)
    assert not torch.allclose(a[USER][1], b[USER][1], atol=1e-4)
    assert torch.equal(a[MOVIE][1], b[MOVIE][1]) and torch.equal(a[USER][2], b[USER][2])
    # within one bucket the rating does not matter (5.0 → 4.0, both ``hi``)
    c = model.encode_all(_graph([1.0, 4.0, 4.5, 3.0]).hetero_data())
    assert all(torch.equal(a[k], c[k]) for k in a)


def test_bucket_fractions_count_each_destinations_edges_and_give_zero_without_any():
    dst = torch.tensor([0, 0, 0, 2, 2])
    rating = torch.tensor([0.5, 3.5, 4.0, 2.5, 2.0])
    want = torch.tensor([[1 / 3, 1 / 3, 1 / 3], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    torch.testing.assert_close(bucket_fractions(dst, rating, 3), want)
    with pytest.raises(ValueError, match="'rating' needs one entry per edge \\(got 4 for 5 edges\\)"):
        bucket_fractions(dst, rating[:4], 3)


def test_the_bucket_vectors_learn_from_the_first_step():
    """Zero at the start, but not stuck there: one step's gradient reaches every table."""
    g = _graph([1.0, 5.0, 4.5, 3.0])
    model = _model("embed", num_layers=2).train()
    data = g.hetero_data()
    data[RATES].edge_label_index = data[RATES].edge_index
    data[USER].n_id, data[MOVIE].n_id = torch.arange(3), torch.arange(2)
    pred, _ = model(data)
    ((pred - g.rating) ** 2).mean().backward()
    assert all(c.bucket_emb.grad is not None and c.bucket_emb.grad.abs().sum() > 0 for c in _embed_convs(model))


def test_a_batchs_targets_do_not_count_in_its_bucket_fractions(tiny_shards):
    """With target exclusion every destination's fractions are those of the edges left in
    the batch: the targets' ratings reach neither the messages nor ``F``."""
    g, truth, loader = target_excluding_loader(tiny_shards)
    model = Recommender(g.num_users, g.num_movies, g.movie_x.size(1), ModelConfig(hidden=4, rating_messages="embed"))
    differs = 0
    for batch in loader:
        frac = model._rating_inputs(batch, torch.device("cpu"))
        u, m = batch[RATES].edge_label_index
        targets = list(zip(batch[USER].n_id[u].tolist(), batch[MOVIE].n_id[m].tolist()))
        target_set = set(targets)
        src, dst = batch[RATES].edge_index
        kept = list(zip(batch[USER].n_id[src].tolist(), batch[MOVIE].n_id[dst].tolist()))
        assert not target_set & set(kept)
        counts = torch.zeros(batch[MOVIE].num_nodes, 3)  # over the batch's edges that are no target
        for pair, local in zip(kept, dst.tolist()):
            if pair not in target_set:
                counts[local, int(bucket_of(torch.tensor(truth[pair])))] += 1
        torch.testing.assert_close(frac[RATES], counts / counts.sum(1, keepdim=True).clamp(min=1))
        users = frac[REV_RATES].size(0)
        assert frac[REV_RATES].shape == (users, 3) and users == batch[USER].num_nodes
        # counting the targets too would have given other fractions
        for local in m.unique().tolist():
            with_targets = counts[local].clone()
            for pair, target_movie in zip(targets, m.tolist()):
                if target_movie == local:
                    with_targets[int(bucket_of(torch.tensor(truth[pair])))] += 1
            differs += not torch.allclose(with_targets / with_targets.sum(), frac[RATES][local])
    assert differs > 10


def test_embed_refuses_a_non_mean_aggregation_and_needs_ratings():
    with pytest.raises(ValueError, match="'rating_messages' embed .* needs 'aggr' mean \\(got 'sum'\\)"):
        ModelConfig(rating_messages="embed", aggr="sum")
    data = _graph([1.0, 5.0, 4.5, 3.0]).hetero_data()
    del data[REV_RATES].rating
    with pytest.raises(ValueError, match="rating_messages 'embed' needs each edge's 'rating' on .*rev_rates"):
        _model("embed").encode_all(data)
    model = _model("embed")
    with pytest.raises(ValueError, match="rating_messages 'embed' needs each destination's bucket fractions"):
        model.encoder({USER: torch.arange(3), MOVIE: torch.arange(2)}, torch.zeros(2, 4), {})


def test_refresh_refuses_an_embed_run_before_any_work(tmp_path):
    from scalable_rec.errors import ConfigError
    from scalable_rec.refresh import RefreshConfig, refresh

    g = _graph([1.0, 5.0, 4.5, 3.0])
    model = _model("embed")
    cfg = RefreshConfig(new_ratings=str(tmp_path / "new.csv"))
    with pytest.raises(ConfigError, match="'refresh' does not support runs trained with rating_messages 'embed'"):
        refresh(tmp_path, model, g, cfg)
    assert list(tmp_path.iterdir()) == []


def test_an_embed_run_trains_and_scores_by_the_cli_and_refresh_refuses_it_in_one_line(tiny_shards, tmp_path, caplog):
    from scalable_rec import cli

    run = tmp_path / "run"
    common = ["--shards", str(tiny_shards.directory), "--run-dir", str(run)]
    args = ["--epochs", "1", "--hidden", "8", "--batch-size", "128", "--no-progress", "--rating-messages", "embed"]
    assert cli.main(["train", *common, *args]) == 0
    assert cli.main(["score", "--run-dir", str(run), "--k", "5"]) == 0
    new = tmp_path / "new.csv"
    new.write_text("userId,movieId,rating,timestamp\n1,1,4.0,1\n")
    caplog.clear()
    assert cli.main(["refresh", "--run-dir", str(run), "--new-ratings", str(new)]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "'refresh' does not support runs trained with rating_messages 'embed'" in errors[0]
    assert "\n" not in errors[0]
    assert not (run / "refresh").exists()
