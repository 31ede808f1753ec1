import pytest
import torch
from rating_fixtures import vary_scale_scalars

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
        (ModelConfig(hidden=8, rating_messages="scale"), 300, False),
        (ModelConfig(hidden=8, num_layers=3, rating_messages="scale"), 100, True),
        (ModelConfig(hidden=8, rating_messages="embed"), 300, False),
        (ModelConfig(hidden=8, num_layers=3, rating_messages="embed"), 100, True),
        (ModelConfig(hidden=8, rating_messages="center"), 300, False),
        (ModelConfig(hidden=8, num_layers=3, rating_messages="center"), 100, True),
    ],
)
def test_layerwise_equals_full_graph_encoding(small, tmp_path, model_cfg, batch_size, spill):
    g, index = small
    torch.manual_seed(0)
    model = Recommender(g.num_users, g.num_movies, g.movie_x.size(1), model_cfg).eval()
    with torch.no_grad():  # embed's bucket vectors and center's lin_c start at zero: give them values
        for name, p in model.named_parameters():
            if name.endswith(("bucket_emb", "lin_c.weight")):
                p.normal_()
    vary_scale_scalars(model)
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


def _tables(small, device, spill_dir=None):
    g, index = small
    torch.manual_seed(0)
    model = Recommender(g.num_users, g.num_movies, g.movie_x.size(1), ModelConfig(hidden=16, num_layers=2))
    return encode_layerwise(model.eval().to(device), *open_stores(index, "all"), batch_size=300, spill_dir=spill_dir)


def test_layerwise_copy_back_on_the_cpu_gives_the_bits_of_a_plain_assignment(small, tmp_path, monkeypatch):
    """On the CPU the tables are plain host tensors with the bits the plain
    ``table[a:b] = h.float().cpu()`` gives, into memory and into spill files alike."""
    from scalable_rec.model import layerwise

    memory, spilled = _tables(small, "cpu"), _tables(small, "cpu", tmp_path)

    def assign(self, out, h):
        out[:] = h.float().cpu()

    monkeypatch.setattr(layerwise._Buffers, "put", assign)
    plain = _tables(small, "cpu")
    assert set(memory) == set(spilled) == set(plain) == {"user", "movie", "user_rank", "movie_rank"}
    for key in memory:
        assert memory[key].device.type == "cpu" and memory[key].dtype == torch.float32
        assert not memory[key].is_pinned()
        assert torch.equal(memory[key], plain[key]) and torch.equal(memory[key], spilled[key]), key
        assert (memory[key].abs().sum(1) > 0).all()  # every batch was written


@pytest.mark.cuda
def test_layerwise_on_cuda_copies_back_into_pinned_tables_without_blocking(small, tmp_path):
    """On CUDA each batch's result goes to pinned host tables without a wait; the host
    waits once, at the end. Bit-identical to the blocking copies into spill files, and
    the CPU's result up to float summation order."""
    pinned, spilled = _tables(small, "cuda"), _tables(small, "cuda", tmp_path)
    cpu = _tables(small, "cpu")
    for key in pinned:
        assert pinned[key].is_pinned() and pinned[key].device.type == "cpu"
        assert torch.equal(pinned[key], spilled[key]), key
        torch.testing.assert_close(pinned[key], cpu[key], atol=1e-4, rtol=1e-4)
