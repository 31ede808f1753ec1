"""The torch sampler's host syncs per hop, and the batches it draws, which where the syncs
fall must not change: recorded digests of every output tensor, on graphs whose hubs take
the draw path and sometimes fall short."""

import hashlib
import warnings

import pytest
import torch
from sync_count import HostSyncs
from torch_geometric.data import HeteroData
from torch_geometric.sampler import EdgeSamplerInput, NodeSamplerInput

from scalable_rec.graph import MOVIE, RATES, REV_RATES, USER
from scalable_rec.train.sampler import TorchNeighborSampler, device_stores

CPU = torch.device("cpu")
NUM_USERS, NUM_MOVIES = 200, 90


def skewed_graph() -> HeteroData:
    """1,520 ratings, Zipf-like movie popularity and user activity: movie degrees up to 154,
    so hubs are drawn at small fanouts, and many short ranges are sorted."""
    g = torch.Generator().manual_seed(11)
    movies = torch.multinomial(1.0 / torch.arange(1, NUM_MOVIES + 1).double() ** 1.1, 2500, True, generator=g)
    users = torch.multinomial(1.0 / torch.arange(1, NUM_USERS + 1).double() ** 0.8, 2500, True, generator=g)
    key = torch.unique(users * NUM_MOVIES + movies)
    key = key[torch.randperm(key.numel(), generator=g)]  # COO not sorted
    src, dst = key // NUM_MOVIES, key % NUM_MOVIES
    data = HeteroData()
    data[USER].num_nodes, data[MOVIE].num_nodes = NUM_USERS, NUM_MOVIES
    data[MOVIE].x = torch.randn(NUM_MOVIES, 2, generator=g)
    data[RATES].edge_index = torch.stack([src, dst])
    data[REV_RATES].edge_index = torch.stack([dst, src])
    return data


def nine_graph() -> HeteroData:
    """Every movie rated by 9 users: at fanout 2 each is a hub (9 > DRAW_FROM × 2) whose 4
    draws miss 2 distinct ones once in 729, without a target among them."""
    g = torch.Generator().manual_seed(5)
    users = torch.stack([torch.randperm(NUM_USERS, generator=g)[:9] for _ in range(NUM_MOVIES)]).flatten()
    movies = torch.arange(NUM_MOVIES).repeat_interleave(9)
    data = HeteroData()
    data[USER].num_nodes, data[MOVIE].num_nodes = NUM_USERS, NUM_MOVIES
    data[MOVIE].x = torch.randn(NUM_MOVIES, 2, generator=g)
    data[RATES].edge_index = torch.stack([users, movies])
    data[REV_RATES].edge_index = torch.stack([movies, users])
    return data


def digest(outs) -> str:
    h = hashlib.sha256()
    for out in outs:
        parts = [out.node[nt] for nt in sorted(out.node)]
        for et in sorted(out.row):
            parts += [out.row[et], out.col[et], out.edge[et]]
        parts += [torch.tensor(out.num_sampled_nodes[nt]) for nt in sorted(out.num_sampled_nodes)]
        parts += [torch.tensor(out.num_sampled_edges[et]) for et in sorted(out.num_sampled_edges)]
        if out.metadata[1] is not None:
            parts.append(out.metadata[1])
        for p in parts:
            p = p.cpu().contiguous()
            h.update(str((p.dtype, tuple(p.shape))).encode())
            h.update(p.numpy().tobytes())
    return h.hexdigest()[:20]


# Recorded from the sampler as it was before its host syncs were cut (``sample``'s batches
# per workload; on the graph of 9-rating movies hub draws fall short without any target).
RECORDED = {
    "k3-2-exclude": (dict(num_neighbors=[3, 2], exclude=True), "b24325c99433691d5d35"),
    "k10-5-exclude": (dict(num_neighbors=[10, 5], exclude=True), "cfc03eb0056a4edceaa9"),
    "all-then-2": (dict(num_neighbors=[-1, 2], exclude=False), "66ee27213c016b9e00e3"),
    "k1-1-exclude": (dict(num_neighbors=[1, 1], exclude=True), "271ab3f8630b62dcc6a2"),
    "per-type-pads": (
        dict(num_neighbors={RATES: [4, 2], REV_RATES: [2, -1]}, exclude=True, num_edges=1000),
        "db73355099546bfb4de0",
    ),
    "k2-3hops": (dict(num_neighbors=[2, 2, 2], exclude=True), "a5a601cd51286d326f21"),
    "nine-k2": (dict(num_neighbors=[2, 2], exclude=False, graph="nine", repeat=40), "212af2dbeb621b1beb05"),
}


def make_sampler(spec: dict, device: torch.device = CPU) -> tuple[TorchNeighborSampler, HeteroData]:
    data = nine_graph() if spec.get("graph") == "nine" else skewed_graph()
    _, graph, perm = device_stores(data, device)
    sampler = TorchNeighborSampler(
        graph,
        spec["num_neighbors"],
        seed=5,
        exclude_targets=spec["exclude"],
        num_edges=spec.get("num_edges"),
        edge_permutation=perm,
    )
    return sampler, data


def sample(sampler: TorchNeighborSampler, data: HeteroData, spec: dict) -> list:
    """8 batches of 64 edges (``repeat`` times), one crowding hub movie 0 with its own
    targets (with exclusion its draws mostly hit targets and fall short), one of movie seeds."""
    src, dst = data[RATES].edge_index
    order = torch.randperm(src.numel(), generator=torch.Generator().manual_seed(3))
    inputs = [(ids, src[ids], dst[ids]) for ids in order.split(64)[:8]] * spec.get("repeat", 1)
    hub = (dst == 0).nonzero().flatten()[:-3]
    inputs.append((hub, src[hub], dst[hub]))
    outs = [
        sampler.sample_from_edges(EdgeSamplerInput(input_id=ids, row=r, col=c, label=None, input_type=RATES))
        for ids, r, c in inputs
    ]
    seeds = torch.tensor([0, 7, 3, 80, 44])
    outs.append(sampler.sample_from_nodes(NodeSamplerInput(input_id=torch.arange(5), node=seeds, input_type=MOVIE)))
    return outs


def batches(spec: dict) -> list:
    return sample(*make_sampler(spec), spec)


@pytest.mark.parametrize("name", list(RECORDED))
def test_batches_are_bit_identical_to_the_recorded_ones(name):
    spec, recorded = RECORDED[name]
    assert digest(batches(spec)) == recorded


def test_the_recorded_workload_takes_every_draw_path(monkeypatch):
    """The digests above guard the draw path and its fallback: hubs are drawn, and some of
    them miss (with and without a target among their draws) and go through the sort."""
    from scalable_rec.train.draws import EdgeDraws

    seen = {"hubs": 0, "missed": 0, "missed_excluding": 0}
    finish = EdgeDraws.finish

    def spy(self, num_missed=0, missed_total=0):
        seen["hubs"] += self.num_hubs
        seen["missed"] += num_missed
        seen["missed_excluding"] += num_missed * (self.allowed is not None)
        return finish(self, num_missed, missed_total)

    monkeypatch.setattr(EdgeDraws, "finish", spy)
    for spec, _ in RECORDED.values():
        batches(spec)
    assert seen["hubs"] > 100 and seen["missed"] > seen["missed_excluding"] > 0, seen


def syncs_per_batch(hops: int, k: int, exclude: bool) -> tuple[int, dict]:
    data = skewed_graph()
    _, graph, perm = device_stores(data, CPU)
    sampler = TorchNeighborSampler(graph, [k] * hops, seed=5, exclude_targets=exclude, edge_permutation=perm)
    src, dst = data[RATES].edge_index
    ids = torch.randperm(src.numel(), generator=torch.Generator().manual_seed(3))[:64]
    inputs = EdgeSamplerInput(input_id=ids, row=src[ids], col=dst[ids], label=None, input_type=RATES)
    sampler.sample_from_edges(inputs)  # warm
    with HostSyncs() as syncs:
        sampler.sample_from_edges(inputs)
    return syncs.total, syncs.counts


@pytest.mark.parametrize("exclude", [True, False], ids=["exclude", "keep-targets"])
def test_three_host_syncs_per_hop_and_one_per_batch(exclude):
    """Fanout 2: hubs in both edge types at every hop. Per hop: the filtered counts with the
    first type's draw outcome, the second type's draw outcome, the new nodes with the next
    hop's hub and candidate counts; per batch one more, the first hop's hub and candidate
    counts. The rest counted here (the seed's input ids, the endpoints' and targets'
    unique) runs on the loader's CPU tensors, no device read."""
    totals = [syncs_per_batch(hops, 2, exclude) for hops in (1, 2, 3)]
    per_hop = {totals[i + 1][0] - totals[i][0] for i in range(2)}
    assert per_hop == {3}, totals
    assert all(set(counts) == {"tolist", "unique", "item/bool/int"} for _, counts in totals), totals
    assert [counts["tolist"] for _, counts in totals] == [4, 7, 10], totals


def test_the_counter_sees_what_syncs():
    """The count above can fail: each kind it knows is seen."""
    x = torch.arange(6)
    with HostSyncs() as syncs:
        x[x > 2]
        bool(x.any())
        x.unique()
        torch.repeat_interleave(x, x)
        torch.isin(x, x[:2])
        x.tolist()
        torch.bincount(x)
        torch.repeat_interleave(x, x, output_size=15)  # not a sync: the size is given
        torch.nonzero_static(x > 2, size=3)  # nor this
    assert syncs.total == 7, syncs.counts


@pytest.mark.cuda
@pytest.mark.parametrize("name", list(RECORDED))
def test_cuda_syncs_per_hop_as_counted_on_the_cpu(name, monkeypatch):
    """On CUDA, ``torch.cuda.set_sync_debug_mode`` sees the syncs: within the hops no more
    than the CPU count allows (3 per hop and 1 per batch, and one more per edge type whose
    hub draws fall short with targets excluded), and none per batch outside them (the
    batch's own bookkeeping runs on its CPU input). The CPU digests do not apply: CUDA's
    generator draws other numbers."""
    spec, _ = RECORDED[name]
    sampler, data = make_sampler(spec, torch.device("cuda"))
    sample(sampler, data, spec)  # warm: lazy initialisation
    torch.cuda.synchronize()
    inside = []
    hops = TorchNeighborSampler._sample

    def timed_hops(self, *args):  # the warnings seen before and after the hops
        inside.append(len(seen))
        out = hops(self, *args)
        inside.append(len(seen))
        return out

    monkeypatch.setattr(TorchNeighborSampler, "_sample", timed_hops)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            sample(sampler, data, spec)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    in_hops = sum(b - a for a, b in zip(inside[::2], inside[1::2]))
    calls, num_hops = len(inside) // 2, sampler.num_hops
    assert in_hops <= (1 + 5 * num_hops) * calls and len(seen) == in_hops, (len(seen), in_hops, calls)
