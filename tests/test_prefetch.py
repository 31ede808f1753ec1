"""Batches built on a side stream (scalable_rec.train.prefetch)."""

import pytest
import torch

from scalable_rec.dist import DistEnv
from scalable_rec.graph import MOVIE
from scalable_rec.train import TrainConfig
from scalable_rec.train.batches import SupervisionEdges, make_loader
from scalable_rec.train.feed import Feed
from scalable_rec.train.prefetch import DevicePrefetcher, batch_tensors


def _feed(small, device="cpu", build_on_device=None, num_workers=0):
    g, split = small
    return make_loader(
        g.hetero_data(split.train),
        SupervisionEdges(g.src, g.dst, g.rating, split.train[:4000]),
        TrainConfig(num_neighbors=[3, 2], progress=False, sampler="pyg", num_workers=num_workers),
        512,
        DistEnv(),
        shuffle=True,
        device=torch.device(device),
        generator=torch.Generator().manual_seed(0),
        exclude_targets=True,
        build_on_device=build_on_device,
    )


def _fingerprint(batch):
    """Every tensor of the batch by (store, key), on the CPU."""
    return {(s._key, k): v.cpu() for s in batch.stores for k, v in s.items() if isinstance(v, torch.Tensor)}


def _same(a, b):
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("build_on_device", [False, True])
def test_on_the_cpu_the_prefetcher_yields_the_feeds_batches_in_order_and_stops(small, build_on_device):
    feed, sampler = _feed(small, build_on_device=build_on_device)
    sampler.set_epoch(0)
    torch.manual_seed(1)
    direct = [_fingerprint(b) for b in feed]
    sampler.set_epoch(0)
    torch.manual_seed(1)
    prefetcher = DevicePrefetcher(feed, torch.device("cpu"))
    assert len(prefetcher) == len(feed) == 8
    through = [_fingerprint(b) for b in prefetcher]
    assert len(through) == len(direct) and all(_same(a, b) for a, b in zip(direct, through))


def test_a_prefetcher_left_mid_epoch_fetched_nothing_beyond_its_last_batch(small):
    """The loop may leave after any step (max_steps, a signal): the prefetcher has asked
    the loader for no batch the loop did not get, and a new pass starts afresh."""
    fetched = []
    feed, sampler = _feed(small)

    class Counting:
        def __init__(self, loader):
            self.loader = loader

        def __iter__(self):
            for item in self.loader:
                fetched.append(item)
                yield item

    counted = Feed(Counting(feed.loader), feed.build)
    sampler.set_epoch(0)
    it = iter(DevicePrefetcher(counted, torch.device("cpu")))
    got = [next(it) for _ in range(3)]
    assert len(fetched) == 3 and all(a is b for a, b in zip(fetched, got))
    it.close()  # the loop's break: the generator is closed, the loader's iterator with it
    sampler.set_epoch(0)
    assert len(list(DevicePrefetcher(counted, torch.device("cpu")))) == 8


@pytest.mark.cuda
@pytest.mark.parametrize("build_on_device", [False, True])
def test_on_cuda_batches_are_built_on_a_side_stream_and_the_compute_stream_waits(small, build_on_device):
    device = torch.device("cuda")
    feed, sampler = _feed(small, "cuda", build_on_device=build_on_device, num_workers=2)
    streams = []
    build = feed.build

    def recording_build(item):
        streams.append(torch.cuda.current_stream(device))
        return build(item)

    compute = torch.cuda.current_stream(device)
    sampler.set_epoch(0)
    batches = []
    for batch in DevicePrefetcher(Feed(feed.loader, recording_build), device):
        assert torch.cuda.current_stream(device) == compute  # the caller's stream is untouched
        assert all(t.is_cuda for t in batch_tensors(batch))
        # read on the compute stream at once: it must see the finished copy and gather
        batches.append((batch[MOVIE].x.double().sum(), batch[MOVIE].x, batch[MOVIE].n_id))
    assert len(streams) == len(batches) == 8 and all(s != compute for s in streams)
    torch.cuda.synchronize()
    g, _ = small
    for x_sum, x, n_id in batches:
        expected = g.movie_x[n_id.cpu()]
        assert torch.equal(x.cpu(), expected)
        torch.testing.assert_close(x_sum.cpu(), expected.double().sum())


@pytest.mark.cuda
def test_prefetched_batches_equal_the_cpu_batches(small):
    feed, sampler = _feed(small)
    sampler.set_epoch(0)
    torch.manual_seed(3)
    cpu = [_fingerprint(b) for b in feed]
    feed, sampler = _feed(small, "cuda", num_workers=0)
    sampler.set_epoch(0)
    torch.manual_seed(3)
    gpu = [_fingerprint(b) for b in DevicePrefetcher(feed, torch.device("cuda"))]
    assert len(cpu) == len(gpu) and all(_same(a, b) for a, b in zip(cpu, gpu))


@pytest.mark.cuda
def test_the_torch_sampler_samples_on_the_side_stream_and_gives_its_own_batches(small):
    """With the torch sampler on the device the sampling runs inside the loader's
    ``next``: on the side stream, and the batches are those of a plain iteration."""
    device = torch.device("cuda")
    g, split = small

    def feed():
        loader, sampler = make_loader(
            g.hetero_data(split.train),
            SupervisionEdges(g.src, g.dst, g.rating, split.train[:4000]),
            TrainConfig(num_neighbors=[3, 2], progress=False, sampler="torch"),
            512,
            DistEnv(),
            shuffle=True,
            device=device,
            exclude_targets=True,
        )
        sampler.set_epoch(0)
        return loader

    streams = []

    class Recording:
        def __init__(self, loader):
            self.loader = loader

        def __iter__(self):
            for item in self.loader:
                streams.append(torch.cuda.current_stream(device))
                yield item

    plain = [_fingerprint(b) for b in feed()]
    inner = feed()
    through = [_fingerprint(b) for b in DevicePrefetcher(Feed(Recording(inner.loader), inner.build), device)]
    compute = torch.cuda.current_stream(device)
    assert len(streams) == 8 and all(s != compute for s in streams)
    assert len(plain) == len(through) == 8 and all(_same(a, b) for a, b in zip(plain, through))
