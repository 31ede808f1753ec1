import numpy as np
import pytest

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
    batches = _edges(SyntheticSource(num_users=2000, num_movies=2000, num_edges=200_000))
    movies = np.concatenate([b.column("movie_key").to_numpy() for b in batches])
    counts = np.sort(np.bincount(movies, minlength=2000))[::-1]
    assert counts[:20].sum() > 10 * counts[-200:].sum()  # a head of blockbusters, a long tail


def test_ratings_carry_learnable_signal():
    """The latent-factor part explains variance: per-movie means differ beyond noise."""
    batches = _edges(SyntheticSource(num_users=500, num_movies=50, num_edges=50_000, noise=0.3))
    m = np.concatenate([b.column("movie_key").to_numpy() for b in batches])
    r = np.concatenate([b.column("rating").to_numpy() for b in batches])
    means = np.bincount(m, weights=r) / np.bincount(m)
    assert means.std() > 0.3


def test_shards_have_movielens_feature_width(tiny_shards):
    g = RatingGraph.from_shards(tiny_shards)
    assert g.movie_x.shape == (50, MOVIELENS_FEATURE_DIM)
    assert g.num_edges == 500


def test_presets_and_validation():
    assert PRESETS["ml-25m"] == (162_000, 59_000, 25_000_000)
    with pytest.raises(ValueError, match="Unknown synthetic preset 'huge'"):
        SyntheticSource.preset("huge")
    with pytest.raises(ValueError, match="'num_edges' needs to be positive"):
        SyntheticSource(num_edges=0)


def test_generator_writes_shards_directly(tmp_path):
    write_rating_shards(SyntheticSource.preset("tiny"), str(tmp_path / "s"), SkipReport(), max_rows_per_shard=128)
    shards = GraphShards(tmp_path / "s")
    assert len(shards.manifest.edge_types["user__rates__movie"].files) == 4
    assert shards.manifest.config["source"] == "synthetic"
