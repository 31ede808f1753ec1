"""Workers only sample, the batch is built on the device (scalable_rec.train.feed)."""

import pytest
import torch

from scalable_rec.dist import DistEnv
from scalable_rec.graph import MOVIE, RATES, REV_RATES, USER, RatingGraph, SplitConfig, split_edges
from scalable_rec.train import TrainConfig
from scalable_rec.train.batches import SupervisionEdges, make_loader
from scalable_rec.train.feed import BatchBuilder, SampledBatch, SampleOnly

SPLIT = SplitConfig(val_ratio=0.1, test_ratio=0.11)


@pytest.fixture(scope="module")
def tiny(tiny_shards, tmp_path_factory):
    from scalable_rec.graph.index import GraphIndex, build_index

    g = RatingGraph.from_shards(tiny_shards)
    index = GraphIndex.open(build_index(tiny_shards, SPLIT, root=tmp_path_factory.mktemp("index")))
    return g, split_edges(g, SPLIT), index


def _data(tiny, backend):
    from scalable_rec.graph.store import open_stores

    g, split, index = tiny
    return g.hetero_data(split.train) if backend == "memory" else open_stores(index, "train")


def _feed(tiny, data, workers, build_on_device, exclude_targets=True, device="cpu"):
    g, split, _ = tiny
    return make_loader(
        data,
        SupervisionEdges(g.src, g.dst, g.rating, split.train),
        TrainConfig(num_neighbors=[3, 2], progress=False, sampler="pyg", num_workers=workers),
        32,
        DistEnv(),
        shuffle=True,
        device=torch.device(device),
        generator=torch.Generator().manual_seed(0),
        exclude_targets=exclude_targets,
        build_on_device=build_on_device,
    )


def _batches(feed, sampler, seed=5):
    sampler.set_epoch(1)
    torch.manual_seed(seed)  # PyG's sampler draws from torch's generator (the workers' is seeded from it)
    return list(feed)


def assert_same_batch(a, b):
    """The same ``HeteroData``, field for field: types in order, keys, dtypes and values."""
    assert a.node_types == b.node_types and a.edge_types == b.edge_types
    for sa, sb in zip(a.stores, b.stores):
        assert set(sa.keys()) == set(sb.keys()), (sa._key, sorted(sa.keys()), sorted(sb.keys()))
        for key in sa.keys():
            va, vb = sa[key], sb[key]
            if isinstance(va, torch.Tensor):
                assert va.dtype == vb.dtype and va.shape == vb.shape, (sa._key, key)
                assert torch.equal(va.cpu(), vb.cpu()), (sa._key, key)
            else:
                assert va == vb, (sa._key, key)


@pytest.mark.parametrize("backend", ["memory", "store"])
@pytest.mark.parametrize("workers,exclude_targets", [(0, True), (0, False), (2, True)])
def test_batches_built_from_the_sampler_output_equal_the_workers_whole_batches(tiny, backend, workers, exclude_targets):
    """Same seeds, same batches: workers that only sample and a build in the feeding
    process give, tensor for tensor, what workers that build the whole batch give; each
    batch's targets are still out of its subgraph, in both directions."""
    data = _data(tiny, backend)
    whole = _batches(*_feed(tiny, data, workers, False, exclude_targets))
    built = _batches(*_feed(tiny, data, workers, True, exclude_targets))
    assert len(whole) == len(built) == 13
    for a, b in zip(whole, built):
        assert_same_batch(a, b)
    sampled = 0
    for batch in built:
        u, m = batch[RATES].edge_label_index
        targets = set(zip(batch[USER].n_id[u].tolist(), batch[MOVIE].n_id[m].tolist()))
        for edge_type, (ui, mi) in ((RATES, (0, 1)), (REV_RATES, (1, 0))):
            ei = batch[edge_type].edge_index
            pairs = set(zip(batch[USER].n_id[ei[ui]].tolist(), batch[MOVIE].n_id[ei[mi]].tolist()))
            sampled += len(pairs)
            assert not (targets & pairs) if exclude_targets else True
    assert sampled > 500
    if not exclude_targets:  # the sampler does draw targets: exclusion has something to do
        hit = False
        for batch in built:
            u, m = batch[RATES].edge_label_index
            targets = set(zip(batch[USER].n_id[u].tolist(), batch[MOVIE].n_id[m].tolist()))
            ei = batch[RATES].edge_index
            hit |= bool(targets & set(zip(batch[USER].n_id[ei[0]].tolist(), batch[MOVIE].n_id[ei[1]].tolist())))
        assert hit


@pytest.mark.parametrize("backend", ["memory", "store"])
def test_what_crosses_the_worker_boundary_is_the_sampler_output_alone(tiny, backend):
    """A worker returns node ids, edge endpoints, edge ids and the supervision edges'
    ids and labels: no feature row, no rating of a sampled edge."""
    feed, sampler = _feed(tiny, _data(tiny, backend), 2, True)
    sampler.set_epoch(0)
    items = list(feed.loader)  # what the worker processes sent
    assert len(items) == 13
    width = tiny[0].movie_x.size(1)
    for item in items:
        assert type(item) is SampledBatch
        for t in item.tensors():
            if t is item.edge_label:
                assert t.shape == (item.input_id.numel(), 2)  # rating and weight of the targets
            else:
                assert not t.is_floating_point() and t.dim() <= 2 and width not in t.shape[1:]
        assert set(item.node) == {USER, MOVIE} and set(item.edge) == {RATES, REV_RATES}
        for et in item.edge:
            assert item.row[et].numel() == item.col[et].numel() == item.edge[et].numel()


def test_shared_memory_holds_only_what_sampling_workers_read(tiny):
    """With workers that only sample, the sampler's CSC goes to /dev/shm and the movie
    features and ratings stay private; workers that build whole batches get those too."""

    def fresh():  # private copies: the module's graph may have been shared by a test before
        data = _data(tiny, "memory").clone()
        assert not data[MOVIE].x.is_shared()
        return data

    data = fresh()
    feed, _ = _feed(tiny, data, 2, True)
    neighbors = feed.collate_fn.link.link_sampler
    graph = [*neighbors.row_dict.values(), *neighbors.colptr_dict.values()]
    assert graph and all(t.is_shared() for t in graph)
    assert not data[MOVIE].x.is_shared() and not data[RATES].rating.is_shared()
    assert not data[RATES].edge_index.is_shared()  # the COO graph: only the sampler's CSC is read

    data = fresh()
    _feed(tiny, data, 2, False)
    assert data[MOVIE].x.is_shared() and data[RATES].rating.is_shared()


def test_sample_only_needs_a_loader_that_does_not_filter(tiny):
    from torch_geometric.loader import LinkNeighborLoader

    data = _data(tiny, "memory")
    link = LinkNeighborLoader(data, num_neighbors=[2], edge_label_index=RATES, batch_size=4, filter_per_worker=True)
    with pytest.raises(ValueError, match="'link' needs filter_per_worker=False"):
        SampleOnly(link)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["memory", "store"])
@pytest.mark.parametrize("device_share", [0.5, 0.0])
def test_batches_built_on_cuda_equal_the_cpu_batches(tiny, backend, device_share, monkeypatch):
    """On the GPU (features resident on the device, or, with no room, gathered on the
    host into pinned memory) the built batches equal the CPU's whole batches."""
    import scalable_rec.train.batches as batches

    monkeypatch.setattr(batches, "AUTO_DEVICE_SHARE", device_share)
    data = _data(tiny, backend)
    whole = _batches(*_feed(tiny, data, 0, False))
    feed, sampler = _feed(tiny, data, 0, True, device="cuda")
    assert isinstance(feed.build, BatchBuilder) and feed.build.resident == (device_share > 0)
    built = _batches(feed, sampler)
    torch.cuda.synchronize()
    for a, b in zip(whole, built):
        assert b[MOVIE].x.is_cuda and b[RATES].rating.is_cuda
        assert_same_batch(a, b)


@pytest.mark.cuda
def test_training_on_cuda_with_sampling_workers(small, tmp_path):
    """PyG's sampler in two workers that only sample; the batches built on the GPU."""
    import math

    from scalable_rec.train import ModelConfig, train

    g, split = small
    cfg = TrainConfig(epochs=1, device="cuda", sampler="pyg", num_workers=2, progress=False)
    result = train(g, split, ModelConfig(hidden=16), cfg, tmp_path)
    assert math.isfinite(result.best_val_rmse) and result.best_val_rmse < 1.3
