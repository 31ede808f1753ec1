import pytest
import torch
from quick_train import quick_cfg
from scipy.stats import chisquare
from torch_geometric.data import HeteroData
from torch_geometric.sampler import EdgeSamplerInput, NegativeSampling, NodeSamplerInput

from scalable_rec.dist import DistEnv
from scalable_rec.graph import MOVIE, RATES, REV_RATES, USER, RatingGraph, SplitConfig, split_edges
from scalable_rec.graph.index import GraphIndex, build_index
from scalable_rec.graph.store import open_stores
from scalable_rec.train import ModelConfig, TrainConfig, train
from scalable_rec.train.batches import SupervisionEdges, make_loader, resolve_sampler
from scalable_rec.train.draws import DRAW_FROM
from scalable_rec.train.sampler import TorchNeighborSampler, device_stores, sampler_bytes

CPU = torch.device("cpu")
# The sampler's checks run on every device present; CUDA ones are skipped with a reason here.
DEVICES = [pytest.param(CPU, id="cpu"), pytest.param(torch.device("cuda"), id="cuda", marks=pytest.mark.cuda)]
NUM_USERS, NUM_MOVIES = 70, 50


def hub_graph() -> HeteroData:
    """Random ratings plus two hubs: movie 0 rated by every user, user 0 rating every movie
    (degrees 70 and 50: past DRAW_FROM × the fanouts used here, so hubs are drawn, not sorted)."""
    g = torch.Generator().manual_seed(0)
    pairs = torch.stack(
        [torch.randint(0, NUM_USERS, (600,), generator=g), torch.randint(0, NUM_MOVIES, (600,), generator=g)]
    )
    hubs = torch.cat(
        [
            torch.stack([torch.arange(NUM_USERS), torch.zeros(NUM_USERS, dtype=torch.long)]),
            torch.stack([torch.zeros(NUM_MOVIES, dtype=torch.long), torch.arange(NUM_MOVIES)]),
        ],
        1,
    )
    key = torch.cat([hubs, pairs], 1)
    key = torch.unique(key[0] * NUM_MOVIES + key[1])  # one rating per pair
    src, dst = key // NUM_MOVIES, key % NUM_MOVIES
    data = HeteroData()
    data[USER].num_nodes, data[MOVIE].num_nodes = NUM_USERS, NUM_MOVIES
    data[MOVIE].x = torch.randn(NUM_MOVIES, 3, generator=g)
    data[RATES].edge_index = torch.stack([src, dst])
    data[REV_RATES].edge_index = torch.stack([dst, src])
    return data


def edges_of(data: HeteroData) -> SupervisionEdges:
    src, dst = data[RATES].edge_index
    return SupervisionEdges(src, dst, torch.full((src.numel(),), 4.0), torch.arange(src.numel()))


def torch_loader(data, num_neighbors, seed=0, exclude=True, batch_size=16, device=CPU):
    """The training loader with the torch sampler on ``device``; its batches on the CPU."""
    cfg = TrainConfig(sampler="torch", num_neighbors=num_neighbors, seed=seed, progress=False)
    loader, epochs = make_loader(
        data, edges_of(data), cfg, batch_size, DistEnv(), shuffle=True, device=device, exclude_targets=exclude
    )
    epochs.set_epoch(0)
    for batch in loader:
        assert batch[MOVIE].n_id.device.type == device.type and batch[MOVIE].x.device.type == device.type
        yield batch.to(CPU)


def pairs(batch, et) -> torch.Tensor:
    """Global ``(user, movie)`` keys of the sampled edges of ``et`` (reverse edges flipped)."""
    src, dst = batch[et].edge_index
    u, m = batch[et[0]].n_id[src], batch[et[2]].n_id[dst]
    if et == REV_RATES:
        u, m = m, u
    return u * NUM_MOVIES + m


def graph_keys(data) -> torch.Tensor:
    src, dst = data[RATES].edge_index
    return src * NUM_MOVIES + dst


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("num_neighbors", [[3, 2], [20, 5], [-1, 4]])
def test_every_sampled_edge_exists_and_its_e_id_is_that_edge(num_neighbors, device):
    data = hub_graph()
    keys = graph_keys(data)
    for batch in torch_loader(data, num_neighbors, device=device):
        for et in (RATES, REV_RATES):
            got = pairs(batch, et)
            assert torch.isin(got, keys).all()
            src, dst = data[et].edge_index[:, batch[et].e_id]  # e_id: the edge's column in data
            u, m = (src, dst) if et == RATES else (dst, src)
            assert torch.equal(u * NUM_MOVIES + m, got)
            assert batch[et].e_id.unique().numel() == batch[et].e_id.numel()  # no edge twice
        assert torch.equal(batch[MOVIE].x, data[MOVIE].x[batch[MOVIE].n_id])


def test_every_sampled_edge_exists_over_the_mapped_index(tiny_shards, tmp_path):
    """Over the index's (feature_store, graph_store): e_id are CSC positions, as PyG's."""
    index = GraphIndex.open(build_index(tiny_shards, SplitConfig(), root=tmp_path))
    g, split = RatingGraph.from_shards(tiny_shards), index.split()
    features, graph = open_stores(index, "train")
    edges = SupervisionEdges(g.src, g.dst, g.rating, split.train)
    loader, sampler = make_loader(
        (features, graph),
        edges,
        TrainConfig(sampler="torch", num_neighbors=[4, 2]),
        32,
        DistEnv(),
        shuffle=True,
        device=CPU,
        exclude_targets=True,
    )
    train_keys = g.src[split.train] * g.num_movies + g.dst[split.train]
    csc = index.csc("train")
    n = 0
    for batch in loader:
        for et, rel in ((RATES, "rates"), (REV_RATES, "rev_rates")):
            src, dst = batch[et].edge_index
            s, d = batch[et[0]].n_id[src], batch[et[2]].n_id[dst]
            u, m = (s, d) if et == RATES else (d, s)
            assert torch.isin(u * g.num_movies + m, train_keys).all()
            assert torch.equal(csc[rel][0][batch[et].e_id], s)  # the CSC row at each position
            n += src.numel()
    assert n > 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("num_neighbors", [[3, 2], [20, 5], [4, -1]])
def test_fanout_is_each_frontier_nodes_allowed_degree_capped_per_hop_and_edge_type(num_neighbors, device):
    """Per hop and edge type, each node added by the hop before gets exactly
    min(fanout, neighbours that are not this batch's targets) in-edges: never more, and
    not fewer (a hub whose draws fell short must still be filled)."""
    data = hub_graph()
    keys = graph_keys(data)
    src_all, dst_all = data[RATES].edge_index
    for batch in torch_loader(data, num_neighbors, device=device):
        lab = batch[RATES]
        u, m = lab.edge_label_index
        targets = batch[USER].n_id[u] * NUM_MOVIES + batch[MOVIE].n_id[m]
        allowed = ~torch.isin(keys, targets)
        for et in (RATES, REV_RATES):
            dst_type = et[2]
            nodes = batch[dst_type].num_sampled_nodes
            counts = batch[et].num_sampled_edges
            assert len(counts) == len(num_neighbors)
            dst_local = batch[et].edge_index[1]
            at = 0
            for hop, k in enumerate(num_neighbors):
                lo, hi = sum(nodes[:hop]), sum(nodes[: hop + 1])  # the nodes the hop before added
                hop_dst = dst_local[at : at + counts[hop]]
                at += counts[hop]
                assert ((hop_dst >= lo) & (hop_dst < hi)).all()
                got = torch.bincount(hop_dst - lo, minlength=hi - lo)
                frontier = batch[dst_type].n_id[lo:hi]
                ends = dst_all if et == RATES else src_all  # a node's in-edges over et
                degree = torch.stack([(allowed & (ends == v)).sum() for v in frontier]) if hi > lo else got
                want = degree if k < 0 else degree.clamp(max=k)
                assert torch.equal(got, want), (et, hop)
            assert at == dst_local.numel()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k", [20, 5], ids=["sorted", "drawn"])
def test_each_neighbour_of_a_hub_is_drawn_equally_often(k, device):
    """Movie 0's 70 users: a batch of one target (user 3, movie 0) draws k of the other
    69, with 2,000 batches' counts uniform within a chi-square test (p > 0.001); the target
    user never. k 20 sorts the whole range (70 ≤ DRAW_FROM × 20), k 5 draws (70 > 20)."""
    assert (NUM_USERS <= DRAW_FROM * k) == (k == 20)
    data = hub_graph()
    _, graph, perm = device_stores(data, device)
    sampler = TorchNeighborSampler(graph, [k], seed=7, exclude_targets=True, edge_permutation=perm)
    counts = torch.zeros(NUM_USERS, dtype=torch.long)
    trials = 2000
    for t in range(trials):
        out = sampler.sample_from_edges(
            EdgeSamplerInput(
                input_id=torch.tensor([t]), row=torch.tensor([3]), col=torch.tensor([0]), label=None, input_type=RATES
            )
        )
        users = out.node[USER][out.row[RATES]].cpu()
        assert users.unique().numel() == k
        counts += torch.bincount(users, minlength=NUM_USERS)
    assert counts[3] == 0
    others = torch.cat([counts[:3], counts[4:]])
    assert int(others.sum()) == trials * k
    assert chisquare(others.numpy()).pvalue > 1e-3


@pytest.mark.parametrize("device", DEVICES)
def test_no_target_pair_nor_its_reverse_is_in_its_own_subgraph(device):
    data = hub_graph()
    seen_targets = 0
    for exclude in (True, False):
        for batch in torch_loader(data, [10, 10], exclude=exclude, device=device):
            u, m = batch[RATES].edge_label_index
            targets = batch[USER].n_id[u] * NUM_MOVIES + batch[MOVIE].n_id[m]
            for et in (RATES, REV_RATES):
                hit = int(torch.isin(pairs(batch, et), targets).sum())
                if exclude:
                    assert hit == 0, et
                seen_targets += hit * (not exclude)
    assert seen_targets > 0  # without exclusion the same batches do hold their targets


def test_pads_exclude_nothing():
    """A pad (``input_id >= num_edges``, weight 0) repeats an edge; it must not remove that
    edge from the subgraph of the batch it lands in."""
    data = hub_graph()
    _, graph, perm = device_stores(data, CPU)
    sampler = TorchNeighborSampler(graph, [-1], exclude_targets=True, num_edges=5, edge_permutation=perm)
    inputs = EdgeSamplerInput(
        input_id=torch.tensor([5]), row=torch.tensor([0]), col=torch.tensor([0]), label=None, input_type=RATES
    )
    out = sampler.sample_from_edges(inputs)
    assert 0 in out.node[USER][out.row[RATES]].tolist()  # movie 0's user 0 stays
    inputs.input_id = torch.tensor([4])
    out = sampler.sample_from_edges(inputs)
    assert 0 not in out.node[USER][out.row[RATES]].tolist()


def _batches(loader):
    return [(b[USER].n_id, b[MOVIE].n_id, b[RATES].edge_index, b[REV_RATES].edge_index, b[RATES].e_id) for b in loader]


@pytest.mark.parametrize("device", DEVICES)
def test_same_seed_same_batches_other_seed_other_batches(device):
    data = hub_graph()
    first = _batches(torch_loader(data, [3, 2], seed=1, device=device))
    again = _batches(torch_loader(data, [3, 2], seed=1, device=device))
    assert len(first) == len(again) > 1
    assert all(torch.equal(x, y) for a, b in zip(first, again) for x, y in zip(a, b))
    other = _batches(torch_loader(data, [3, 2], seed=2, device=device))
    assert any(not torch.equal(x, y) for a, b in zip(first, other) for x, y in zip(a, b))
    # the sampler alone (the same input edges): another seed draws other neighbours
    _, graph, perm = device_stores(data, device)
    inputs = EdgeSamplerInput(
        input_id=torch.arange(8),
        row=torch.arange(8),
        col=torch.zeros(8, dtype=torch.long),
        label=None,
        input_type=RATES,
    )
    draw = [
        TorchNeighborSampler(graph, [3, 2], seed=s, edge_permutation=perm).sample_from_edges(inputs) for s in (0, 0, 1)
    ]
    assert torch.equal(draw[0].edge[RATES], draw[1].edge[RATES])
    assert not torch.equal(draw[0].edge[RATES], draw[2].edge[RATES])


def test_a_batch_draws_the_same_whatever_was_sampled_before():
    """A resumed run (or another worker) samples a batch as the uninterrupted run did."""
    data = hub_graph()
    _, graph, perm = device_stores(data, CPU)
    batch = EdgeSamplerInput(
        input_id=torch.arange(4), row=torch.arange(4), col=torch.arange(4), label=None, input_type=RATES
    )
    other = EdgeSamplerInput(
        input_id=torch.arange(4, 8), row=torch.arange(4, 8), col=torch.arange(4), label=None, input_type=RATES
    )
    fresh = TorchNeighborSampler(graph, [5, 5], edge_permutation=perm)
    used = TorchNeighborSampler(graph, [5, 5], edge_permutation=perm)
    used.sample_from_edges(other)
    a, b = fresh.sample_from_edges(batch), used.sample_from_edges(batch)
    for et in (RATES, REV_RATES):
        assert torch.equal(a.edge[et], b.edge[et]) and torch.equal(a.row[et], b.row[et])


def test_batches_carry_what_the_pyg_loader_gives_the_model(tiny):
    """The fields the model and loss read, with PyG's meaning: n_id, movie x, edge_index,
    e_id, edge_label_index, edge_label, input_id."""
    g, split = tiny
    edges = SupervisionEdges(g.src, g.dst, g.rating, split.train)
    got = {}
    for kind in ("pyg", "torch"):
        loader, sampler = make_loader(
            g.hetero_data(split.train),
            edges,
            TrainConfig(sampler=kind, num_neighbors=[3, 2]),
            32,
            DistEnv(),
            shuffle=True,
            device=CPU,
            exclude_targets=True,
        )
        sampler.set_epoch(0)
        got[kind] = next(iter(loader))
    pyg, ours = got["pyg"], got["torch"]
    for key in ("input_id", "edge_label"):
        assert torch.equal(pyg[RATES][key], ours[RATES][key])
    for b in (pyg, ours):  # the labelled pairs, in global ids, are the batch's input edges
        u, m = b[RATES].edge_label_index
        ids = split.train[b[RATES].input_id]
        assert torch.equal(b[USER].n_id[u], g.src[ids]) and torch.equal(b[MOVIE].n_id[m], g.dst[ids])
        assert torch.equal(b[MOVIE].x, g.movie_x[b[MOVIE].n_id])
        for et in (RATES, REV_RATES):
            assert b[et].edge_index.dtype == torch.long and b[et].e_id.numel() == b[et].edge_index.size(1)
    for nt in (USER, MOVIE):  # seeds first, in the same order
        seeds = pyg[RATES].edge_label_index[0 if nt == USER else 1].unique().numel()
        assert torch.equal(pyg[nt].n_id[:seeds], ours[nt].n_id[:seeds])


@pytest.fixture(scope="module")
def tiny(tiny_shards):
    g = RatingGraph.from_shards(tiny_shards)
    return g, split_edges(g, SplitConfig())


def test_trains_through_the_loop_on_cpu(tiny, tmp_path):
    g, split = tiny
    result = train(
        g,
        split,
        ModelConfig(hidden=16),
        quick_cfg(sampler="torch", batch_size=64, max_steps=3, epochs=1),
        tmp_path / "run",
    )
    assert result.global_step == 3
    assert all(torch.isfinite(p).all() for p in result.model.parameters())


def test_sampler_option_is_checked_and_auto_keeps_pyg_on_the_cpu():
    with pytest.raises(ValueError, match=r"'sampler' needs to be 'auto', 'pyg' or 'torch' \(got 'gpu'\)"):
        TrainConfig(sampler="gpu")
    assert resolve_sampler("auto", hub_graph(), CPU) == "pyg"
    assert resolve_sampler("torch", hub_graph(), CPU) == "torch"


def test_sampler_refuses_what_it_does_not_do():
    _, graph, perm = device_stores(hub_graph(), CPU)
    with pytest.raises(ValueError, match="'num_neighbors' needs as many hops for every edge type"):
        TorchNeighborSampler(graph, {RATES: [2, 2], REV_RATES: [2]})
    with pytest.raises(ValueError, match="'num_neighbors' has no fanout for edge type"):
        TorchNeighborSampler(graph, {RATES: [2]})
    sampler = TorchNeighborSampler(graph, [2])
    inputs = EdgeSamplerInput(
        input_id=torch.arange(2), row=torch.arange(2), col=torch.arange(2), label=None, input_type=RATES
    )
    with pytest.raises(ValueError, match="draws no negatives"):
        sampler.sample_from_edges(inputs, neg_sampling=NegativeSampling("binary"))


@pytest.mark.cuda
def test_auto_picks_the_torch_sampler_on_cuda_and_trains_there(tiny, tmp_path):
    g, split = tiny
    assert resolve_sampler("auto", g.hetero_data(split.train), torch.device("cuda")) == "torch"
    result = train(
        g,
        split,
        ModelConfig(hidden=16),
        quick_cfg(device="cuda", batch_size=64, max_steps=3, epochs=1),
        tmp_path / "run",
    )
    assert result.global_step == 3
    assert all(torch.isfinite(p).all() for p in result.model.parameters())


def test_node_seeds_come_first_and_every_hop_counts_per_edge_type():
    """Seeds of one type (no frontier of the other at hop 0): every edge type still has
    one count per hop, and the counts add up to its edges."""
    _, graph, perm = device_stores(hub_graph(), CPU)
    sampler = TorchNeighborSampler(graph, [3, 2], edge_permutation=perm)
    seeds = torch.tensor([5, 0, 7])
    out = sampler.sample_from_nodes(NodeSamplerInput(input_id=torch.arange(3), node=seeds, input_type=MOVIE))
    assert torch.equal(out.node[MOVIE][:3], seeds)
    for et in (RATES, REV_RATES):
        assert len(out.num_sampled_edges[et]) == 2
        assert sum(out.num_sampled_edges[et]) == out.row[et].numel() == out.col[et].numel()
    assert out.num_sampled_edges[REV_RATES][0] == 0 and out.num_sampled_edges[RATES][0] > 0


def test_auto_takes_the_torch_sampler_on_cuda_only_where_the_graph_fits_half_the_free_memory(monkeypatch):
    data = hub_graph()
    need = sampler_bytes(data)
    # the graph: CSC + permutation of both directions, movie features, one id-map entry per node
    edges = data[RATES].edge_index.size(1)
    assert need >= 2 * 2 * 8 * edges + data[MOVIE].x.nbytes + 8 * (NUM_USERS + NUM_MOVIES)
    cuda = torch.device("cuda", 0)
    for free, kind in ((2 * need, "torch"), (2 * need - 2, "pyg")):
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None, free=free: (free, 4 * need))
        assert resolve_sampler("auto", data, cuda) == kind
