import numpy as np
import pytest
import torch

from scalable_rec.graph import RatingGraph
from scalable_rec.shards import GraphShards
from scalable_rec.source import SkipReport, write_rating_shards
from scalable_rec.source.synthetic import MOVIELENS_FEATURE_DIM, PRESETS, SyntheticSource


def _edges(source):
    return [b for b in source.ratings(SkipReport())]


def test_deterministic_for_a_seed_and_differs_across_seeds():
    a = _edges(SyntheticSource.preset("tiny", seed=1))
    b = _edges(SyntheticSource.preset("tiny", seed=1))
    c = _edges(SyntheticSource.preset("tiny", seed=2))
    assert all(x.equals(y) for x, y in zip(a, b))
    assert not a[0].equals(c[0])


def test_streams_bounded_batches_with_valid_ratings():
    source = SyntheticSource(num_users=300, num_movies=200, num_edges=10_500, batch_edges=2_000)
    batches = _edges(source)
    assert [b.num_rows for b in batches] == [2000] * 5 + [500]
    r = np.concatenate([b.column("rating").to_numpy() for b in batches])
    assert r.min() >= 0.5 and r.max() <= 5.0 and np.all((r * 2) == np.round(r * 2))


def test_power_law_activity_and_popularity():
    # 1.25% dense: at higher densities the most active users (capped at one rating per
    # movie) rate the whole tail and flatten it (at 5%: a 4x ratio)
    batches = _edges(SyntheticSource(num_users=2000, num_movies=2000, num_edges=50_000))
    movies = np.concatenate([b.column("movie_key").to_numpy() for b in batches])
    counts = np.sort(np.bincount(movies, minlength=2000))[::-1]
    assert counts[:20].sum() > 10 * counts[-200:].sum()  # a head of blockbusters, a long tail


def test_ratings_carry_learnable_signal():
    """The latent-factor part explains variance: per-movie means differ beyond noise."""
    batches = _edges(SyntheticSource(num_users=2000, num_movies=50, num_edges=50_000, noise=0.3))
    m = np.concatenate([b.column("movie_key").to_numpy() for b in batches])
    r = np.concatenate([b.column("rating").to_numpy() for b in batches])
    means = np.bincount(m, weights=r) / np.bincount(m)
    assert means.std() > 0.3


def test_shards_have_movielens_feature_width(tiny_shards):
    g = RatingGraph.from_shards(tiny_shards)
    assert g.movie_x.shape == (50, MOVIELENS_FEATURE_DIM)
    assert g.num_edges == 500


def test_presets_and_validation():
    users, movies, edges = PRESETS["small"]
    source = SyntheticSource.preset("small", num_users=700)
    assert (source.num_users, source.num_movies, source.num_edges) == (700, movies, edges)
    assert SyntheticSource.preset("tiny").config()["num_edges"] == PRESETS["tiny"][2]
    with pytest.raises(ValueError, match="'num_edges' needs to be at most num_users \\* num_movies = 20"):
        SyntheticSource(num_users=4, num_movies=5, num_edges=21)
    with pytest.raises(ValueError, match="Unknown synthetic preset 'huge'"):
        SyntheticSource.preset("huge")
    with pytest.raises(ValueError, match="'num_edges' needs to be positive"):
        SyntheticSource(num_edges=0)


def test_generator_writes_shards_directly(tmp_path):
    write_rating_shards(SyntheticSource.preset("tiny"), str(tmp_path / "s"), SkipReport(), max_rows_per_shard=128)
    shards = GraphShards(tmp_path / "s")
    assert len(shards.manifest.edge_types["user__rates__movie"].files) == 4
    assert shards.manifest.config["source"] == "synthetic"


@pytest.mark.parametrize(
    "kw",
    [
        dict(num_users=1000, num_movies=2000, num_edges=100_000, batch_edges=7_000),
        dict(num_users=50, num_movies=50, num_edges=2_000, batch_edges=300),
        dict(num_users=20, num_movies=30, num_edges=600),
    ],
)  # every pair once
def test_every_user_movie_pair_occurs_once(kw):
    """The small preset (first case) had 44% repeated pairs when edges were drawn with
    replacement; dense graphs (the last case is complete) must still reach num_edges."""
    batches = _edges(SyntheticSource(**kw))
    users = np.concatenate([b.column("user_key").to_numpy() for b in batches])
    movies = np.concatenate([b.column("movie_key").to_numpy() for b in batches])
    pairs = users * kw["num_movies"] + movies
    assert len(pairs) == kw["num_edges"]
    assert len(np.unique(pairs)) == len(pairs), f"{len(pairs) - len(np.unique(pairs))} repeated pairs"


def test_generated_shards_have_no_repeated_pairs_or_skips(tmp_path):
    report = SkipReport()
    write_rating_shards(SyntheticSource.preset("small"), str(tmp_path / "s"), report)
    g = RatingGraph.from_shards(GraphShards(tmp_path / "s"))
    assert report.counts == {} and g.num_edges == PRESETS["small"][2]
    assert torch.unique(g.src * g.num_movies + g.dst).numel() == g.num_edges
