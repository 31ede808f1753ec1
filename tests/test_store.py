import pytest
import torch
from torch_geometric.loader import LinkNeighborLoader

from scalable_rec.graph import MOVIE, RATES, REV_RATES, USER, RatingGraph, SplitConfig, split_edges
from scalable_rec.graph.index import GraphIndex, build_index
from scalable_rec.graph.store import MappedFeatureStore, MappedGraphStore, StoreConfig, open_stores
from scalable_rec.train import ModelConfig, TrainConfig, train


@pytest.fixture(scope="module")
def tiny(tiny_shards, tmp_path_factory):
    g = RatingGraph.from_shards(tiny_shards)
    split = split_edges(g, SplitConfig())
    index = GraphIndex.open(build_index(tiny_shards, SplitConfig(), root=tmp_path_factory.mktemp("index")))
    return g, split, index


def _global_edges(batch, edge_type) -> list[tuple[int, int]]:
    src, dst = batch[edge_type].edge_index
    return sorted(zip(batch[edge_type[0]].n_id[src].tolist(), batch[edge_type[2]].n_id[dst].tolist()))


def _loaders(g, split, index, num_neighbors):
    label_index = torch.stack([g.src[split.train], g.dst[split.train]])
    return [
        LinkNeighborLoader(
            data, num_neighbors=num_neighbors, edge_label_index=(RATES, label_index), batch_size=64, shuffle=False
        )
        for data in (g.hetero_data(split.train), open_stores(index, "train"))
    ]


def test_full_neighbourhoods_give_the_same_subgraphs_as_hetero_data(tiny):
    g, split, index = tiny
    memory, stores = _loaders(g, split, index, [-1, -1])
    batches = 0
    for a, b in zip(memory, stores, strict=True):
        for node_type in (USER, MOVIE):
            assert torch.equal(a[node_type].n_id.sort().values, b[node_type].n_id.sort().values)
        for edge_type in (RATES, REV_RATES):
            assert _global_edges(a, edge_type) == _global_edges(b, edge_type)
        order = b[MOVIE].n_id.argsort()
        assert torch.equal(a[MOVIE].x[a[MOVIE].n_id.argsort()], b[MOVIE].x[order])
        batches += 1
    assert batches == len(memory) > 1


def test_sampled_subgraphs_use_only_training_edges_with_the_fanout(tiny):
    g, split, index = tiny
    train_pairs = set(zip(g.src[split.train].tolist(), g.dst[split.train].tolist()))
    _, stores = _loaders(g, split, index, [2, 1])
    degree = torch.bincount(g.dst[split.train], minlength=g.num_movies)
    for batch in stores:
        got = _global_edges(batch, RATES)
        assert set(got) <= train_pairs
        # first hop: each seed movie gets min(2, degree) users
        seeds = batch[MOVIE].n_id[batch[RATES].edge_label_index[1]].unique()
        per_movie = torch.bincount(torch.tensor([m for _, m in got]), minlength=g.num_movies)
        assert bool((per_movie[seeds] >= torch.minimum(degree[seeds], torch.tensor(2))).all())
        assert batch[USER].x.shape == (batch[USER].num_nodes, 0)  # users: zero-width features


@pytest.mark.parametrize("rating_messages", ["none", "relation", "gcmc", "scale", "embed", "center"])
def test_training_through_the_stores_equals_training_on_hetero_data(tiny, tmp_path, rating_messages):
    g, split, index = tiny
    cfg = TrainConfig(epochs=2, batch_size=64, num_neighbors=[-1, -1], progress=False, num_workers=0)
    model_cfg = ModelConfig(
        hidden=16,
        dropout=0.0,
        user_id_dropout=0.0,
        movie_id_dropout=0.0,  # masks follow node order
        rating_messages=rating_messages,
    )
    a = train(g, split, model_cfg, cfg, tmp_path / "memory")
    b = train(g, split, model_cfg, cfg, tmp_path / "stores", data=open_stores(index, "train"))
    assert [h["steps"] for h in a.history] == [h["steps"] for h in b.history]
    assert a.best_val_rmse == pytest.approx(b.best_val_rmse, abs=1e-5)
    sa, sb = a.model.state_dict(), b.model.state_dict()
    for name in sa:
        torch.testing.assert_close(sa[name], sb[name], atol=1e-5, rtol=1e-4, msg=name)


def test_mapped_graph_and_split_train_the_same_model(tiny, tiny_shards, tmp_path):
    """The whole out-of-core input: mapped edge tensors, mapped split, stores."""
    g, split, index = tiny
    cfg = TrainConfig(epochs=1, batch_size=64, num_neighbors=[-1, -1], progress=False, num_workers=0)
    model_cfg = ModelConfig(hidden=8, dropout=0.0, user_id_dropout=0.0, movie_id_dropout=0.0)
    a = train(g, split, model_cfg, cfg, tmp_path / "memory")
    b = train(
        index.rating_graph(tiny_shards),
        index.split(),
        model_cfg,
        cfg,
        tmp_path / "mapped",
        data=open_stores(index, "train"),
    )
    assert a.best_val_rmse == pytest.approx(b.best_val_rmse, abs=1e-5)


def test_store_errors_name_what_is_wrong():
    features, graph = MappedFeatureStore(), MappedGraphStore()
    with pytest.raises(KeyError, match="No tensor 'x' of 'movie'"):
        features.get_tensor(MOVIE, "x", index=None)
    with pytest.raises(ValueError, match="'index' of a put needs to be None"):
        features.put_tensor(torch.zeros(3, 2), group_name=MOVIE, attr_name="x", index=torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="'size' of edge type .* needs to be given"):
        graph.put_edge_index(
            (torch.zeros(1, dtype=torch.long), torch.zeros(2, dtype=torch.long)), edge_type=RATES, layout="csc"
        )
    features.put_tensor(torch.arange(6.0).view(3, 2), group_name=MOVIE, attr_name="x", index=None)
    assert features.get_tensor(MOVIE, "x", index=torch.tensor([2, 0])).tolist() == [[4.0, 5.0], [0.0, 1.0]]
    assert features.get_tensor_size(MOVIE, "x") == (3, 2)
    assert features.remove_tensor(MOVIE, "x", None) and not features.remove_tensor(MOVIE, "x", None)


def test_store_config_chooses_by_size_and_validates():
    assert StoreConfig(graph_backend="auto", store_min_edges=100).use_store(100)
    assert not StoreConfig(graph_backend="auto", store_min_edges=100).use_store(99)
    assert StoreConfig(graph_backend="store").use_store(1)
    assert not StoreConfig(graph_backend="memory").use_store(10**12)
    with pytest.raises(ValueError, match="'graph_backend' needs to be .* \\(got 'disk'\\); 'store_min_edges' needs"):
        StoreConfig(graph_backend="disk", store_min_edges=-1)


def _store_job(tiny, tiny_shards, tmp_path):
    from scalable_rec.train.loop import build_job

    _, _, index = tiny
    graph, split = index.rating_graph(tiny_shards), index.split()
    cfg = TrainConfig(batch_size=64, num_neighbors=[3, 2], progress=False, loss="weighted_mse")
    return build_job(graph, split, ModelConfig(hidden=8), cfg, tmp_path, None, data=open_stores(index, "train"))


def test_store_job_reads_supervision_edges_from_the_mapped_files(tiny, tiny_shards, tmp_path):
    """No rank holds a private copy of the supervision edges: the loader's input is the
    index's mapped ``edges/*`` and ``split/train`` themselves, gathered per batch, and
    PyG's own copy (LinkLoader's ``edge_label_index``) is one placeholder edge."""
    job = _store_job(tiny, tiny_shards, tmp_path)
    link = job.train_loader.collate_fn
    edges = link.input_data
    assert edges.src is job.graph.src and edges.dst is job.graph.dst and edges.rating is job.graph.rating
    assert edges.ids is job.split.train
    assert link.edge_label_index[1].size(1) == 1
    assert len(job.train_loader) == -(-job.split.train.numel() // 64)


def test_validation_through_the_stores_builds_no_in_memory_graph(tiny, tiny_shards, tmp_path, monkeypatch):
    """With the stores, validation encodes layer-wise over the mapped training CSC (no
    ``hetero_data``/``encode_all``), and gives the in-memory path's numbers."""
    from scalable_rec.train.loop import validate

    g, _, _ = tiny
    job = _store_job(tiny, tiny_shards, tmp_path)
    memory = validate(type(job)(**{**vars(job), "stores": None, "graph": g}))

    def refuse(*args, **kwargs):
        raise AssertionError("validation built the in-memory training graph")

    monkeypatch.setattr(RatingGraph, "hetero_data", refuse)
    monkeypatch.setattr(type(job.model), "encode_all", refuse)
    stores = validate(job)
    for key in ("rmse", "mae", "recall", "ndcg"):
        assert stores[key] == pytest.approx(memory[key], rel=1e-5, abs=1e-6), key
