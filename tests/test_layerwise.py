import pytest
import torch

from scalable_rec.graph import RatingGraph, SplitConfig
from scalable_rec.graph.index import GraphIndex, build_index
from scalable_rec.graph.store import open_stores
from scalable_rec.model.layerwise import encode_layerwise
from scalable_rec.train import ModelConfig, Recommender


@pytest.fixture(scope="module")
def small(small_shards, tmp_path_factory):
    g = RatingGraph.from_shards(small_shards)
    index = GraphIndex.open(build_index(small_shards, SplitConfig(), root=tmp_path_factory.mktemp("index")))
    return g, index


@pytest.mark.parametrize(
    "model_cfg,batch_size,spill",
    [
        (ModelConfig(hidden=16, num_layers=2), 257, False),
        (ModelConfig(hidden=16, num_layers=1, retrieval_head=False, decoder="mlp"), 4096, False),
        (ModelConfig(hidden=8, num_layers=3), 100, True),
        (ModelConfig(hidden=8, num_layers=2, aggr="sum"), 999, False),
        (ModelConfig(hidden=8, user_id_dropout=0.2), 300, False),
        (ModelConfig(hidden=8, retrieval_ids=False), 300, False),
        (ModelConfig(hidden=8, rating_messages="relation"), 300, False),
        (ModelConfig(hidden=8, num_layers=3, rating_messages="relation"), 100, True),
        (ModelConfig(hidden=8, rating_messages="gcmc"), 300, False),
        (ModelConfig(hidden=8, num_layers=3, rating_messages="gcmc"), 100, True),
    ],
)
def test_layerwise_equals_full_graph_encoding(small, tmp_path, model_cfg, batch_size, spill):
    g, index = small
    torch.manual_seed(0)
    model = Recommender(g.num_users, g.num_movies, g.movie_x.size(1), model_cfg).eval()
    ref = model.encode_all(g.hetero_data())
    got = encode_layerwise(
        model, *open_stores(index, "all"), batch_size=batch_size, spill_dir=tmp_path if spill else None
    )
    assert set(got) == set(ref)
    for key in ref:
        # sums over hundreds of neighbours in another order: tolerance relative to the scale
        atol = 5e-5 * max(1.0, float(ref[key].abs().max()))
        torch.testing.assert_close(got[key], ref[key], atol=atol, rtol=1e-4, msg=key)
    if spill:
        assert list(tmp_path.iterdir()) == []  # spill files are unlinked on return


def test_layerwise_on_the_training_subset_sees_only_training_edges(small, small_shards):
    g, index = small
    split = index.split()
    model = Recommender(g.num_users, g.num_movies, g.movie_x.size(1), ModelConfig(hidden=8)).eval()
    ref = model.encode_all(g.hetero_data(split.train))
    got = encode_layerwise(model, *open_stores(index, "train"), batch_size=500)
    torch.testing.assert_close(got["user"], ref["user"], atol=1e-5, rtol=1e-4)
    everything = model.encode_all(g.hetero_data())
    assert not torch.allclose(got["user"], everything["user"], atol=1e-3)


def test_layerwise_rejects_bad_arguments(small):
    g, index = small
    model = Recommender(g.num_users, g.num_movies, g.movie_x.size(1), ModelConfig(hidden=8)).eval()
    with pytest.raises(ValueError, match="'batch_size' needs to be positive \\(got 0\\)"):
        encode_layerwise(model, *open_stores(index, "all"), batch_size=0)
