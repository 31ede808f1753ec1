import pytest
import torch

from scalable_rec.graph import RatingGraph
from scalable_rec.train.model import ModelConfig, Recommender


@pytest.mark.parametrize("decoder", ["dot", "mlp"])
def test_score_block_equals_pairwise_decoder(tiny_shards, decoder):
    g = RatingGraph.from_shards(tiny_shards)
    torch.manual_seed(0)
    model = Recommender(g.num_users, g.num_movies, g.movie_x.size(1), ModelConfig(hidden=16, decoder=decoder),
                        rating_mean=3.5).eval()
    z = model.encode_all(g.hetero_data())
    users, movies = torch.arange(7), torch.arange(g.num_movies)
    block = model.score_block(z, users, movies)
    uu, mm = torch.meshgrid(users, movies, indexing="ij")
    pairwise = model.decoder(z["user"][uu.flatten()], z["movie"][mm.flatten()], uu.flatten(), mm.flatten())
    torch.testing.assert_close(block, pairwise.view(7, -1) + 3.5, rtol=1e-5, atol=1e-5)


def test_rank_block_and_training_logits_agree(tiny_shards):
    from torch_geometric.loader import LinkNeighborLoader

    from scalable_rec.graph import RATES
    g = RatingGraph.from_shards(tiny_shards)
    torch.manual_seed(0)
    model = Recommender(g.num_users, g.num_movies, g.movie_x.size(1), ModelConfig(hidden=16, dropout=0.0)).eval()
    z = model.encode_all(g.hetero_data())
    users, movies = torch.tensor([3, 9]), torch.tensor([0, 5, 7])
    expected = model.retrieval.user(z["user"][users]) @ model.retrieval.movie(z["movie"][movies]).T
    torch.testing.assert_close(model.rank_block(z, users, movies), expected)
    # with all neighbours, the mini-batch logits equal the full-graph ones
    loader = LinkNeighborLoader(g.hetero_data(), num_neighbors=[-1, -1], batch_size=8,
                                edge_label_index=(RATES, torch.stack([g.src[:8], g.dst[:8]])))
    pred, (ru, rm) = model(next(iter(loader)))
    assert ru.shape == rm.shape == (8, 16)
    torch.testing.assert_close(ru @ rm.T, model.rank_block(z, g.src[:8], g.dst[:8]), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(pred, model.predict_pairs(z, g.src[:8], g.dst[:8]), rtol=1e-4, atol=1e-4)


def test_without_retrieval_head_ranking_uses_predicted_ratings(tiny_shards):
    g = RatingGraph.from_shards(tiny_shards)
    model = Recommender(g.num_users, g.num_movies, g.movie_x.size(1), ModelConfig(hidden=8, retrieval_head=False))
    z = model.encode_all(g.hetero_data())
    u, m = torch.arange(3), torch.arange(4)
    assert model.retrieval is None and torch.equal(model.rank_block(z, u, m), model.score_block(z, u, m))


def test_mlp_block_chunking_is_exact():
    from scalable_rec.train.model import MLPDecoder
    dec = MLPDecoder(8)
    zu, zm = torch.randn(5, 8), torch.randn(11, 8)
    ids_u, ids_m = torch.arange(5), torch.arange(11)
    torch.testing.assert_close(dec.score_block(zu, zm, ids_u, ids_m, max_elements=8 * 11),
                               dec.score_block(zu, zm, ids_u, ids_m))


def test_message_passing_aggregates_in_fp32_under_autocast(tiny_shards):
    g = RatingGraph.from_shards(tiny_shards)
    model = Recommender(g.num_users, g.num_movies, g.movie_x.size(1), ModelConfig(hidden=8))
    seen = []
    for conv in model.encoder.convs:
        for sage in conv.convs.values():
            sage.register_forward_pre_hook(lambda mod, args: seen.append(args[0][0].dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model.encode_all(g.hetero_data())
    assert seen and all(dt == torch.float32 for dt in seen)


def test_model_config_validation():
    with pytest.raises(ValueError, match="'decoder' needs to be 'dot' or 'mlp'"):
        ModelConfig(decoder="bilinear")
    with pytest.raises(ValueError, match="'hidden' needs to be positive.*'num_layers'"):
        ModelConfig(hidden=0, num_layers=0)


def _hub_graph(num_users: int = 100_000):
    """One movie rated by every user (a hub with 100k neighbours) plus one quiet movie."""
    import pyarrow as pa

    src = torch.arange(num_users)
    return RatingGraph(user_keys=pa.array(range(num_users)), movie_keys=pa.array([0, 1]),
                       movie_x=torch.ones(2, 4), src=torch.cat([src, torch.tensor([0])]),
                       dst=torch.cat([torch.zeros(num_users, dtype=torch.long), torch.tensor([1])]),
                       rating=torch.full((num_users + 1,), 4.0), timestamp=torch.zeros(num_users + 1, dtype=torch.long))


@pytest.mark.parametrize("decoder,aggr", [("dot", "sum"), ("mlp", "sum"), ("dot", "mean")])
def test_fp16_autocast_with_sum_aggregation_over_100k_neighbours_stays_finite(decoder, aggr):
    """CPU autocast supports float16, so the overflow guard is exercised here: a sum over
    100k neighbours (≫ 65504) must neither reach fp16 in the conv's linear layers nor in
    the heads that read it, in full-graph encoding and in a training step."""
    from scalable_rec.graph import MOVIE, RATES, USER

    g = _hub_graph()
    torch.manual_seed(0)
    model = Recommender(g.num_users, g.num_movies, 4, ModelConfig(hidden=8, aggr=aggr, decoder=decoder,
                                                                 dropout=0.0), rating_mean=3.5)
    with torch.no_grad():  # coherent messages: the hub's sum is ~1e5 per dimension
        model.encoder.user_emb.weight.fill_(1.0)
    data = g.hetero_data()
    with torch.autocast("cpu", dtype=torch.float16):
        z = model.encode_all(data)
        scores = model.score_block(z, torch.arange(5), torch.arange(2))
    # (without the guard, this test sees nan/inf: the hub's 1e5 sum is cast to fp16)
    for name, t in {**z, "scores": scores}.items():
        assert torch.isfinite(t).all(), f"{name} has inf/nan under fp16 autocast"
    data[USER].n_id, data[MOVIE].n_id = torch.arange(g.num_users), torch.arange(2)
    data[RATES].edge_label_index = torch.tensor([[0, 1, 2, 0], [0, 0, 0, 1]])
    opt = torch.optim.SGD(model.parameters(), lr=1e-9)
    with torch.autocast("cpu", dtype=torch.float16):
        pred, (ru, rm) = model(data)
    # losses in fp32 outside autocast, as train/loop.py's training_loss computes them
    loss = (pred.float() - 4.0).pow(2).mean() + (ru.float() @ rm.float().T).logsumexp(1).mean()
    loss.backward()
    assert torch.isfinite(pred).all() and torch.isfinite(loss)
    bad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    assert not bad, f"non-finite gradients under fp16 autocast: {bad}"
    opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_adjacency_kind_fits_the_device():
    """A CPU-only torch-sparse (enough for sampling) has no CUDA kernels: on a GPU the
    full-graph encode must then use torch's CSR (or edge_index for max), never SparseTensor
    (seen on an H200: 'Not compiled with CUDA support' in validation)."""
    import torch_geometric.typing as pyg_typing

    from scalable_rec.train.model import adjacency_kind, torch_sparse_runs_on

    cuda = torch.device("cuda")
    if pyg_typing.WITH_TORCH_SPARSE and torch.ops.torch_sparse.cuda_version() == -1:
        assert not torch_sparse_runs_on(cuda)
        assert adjacency_kind(cuda, "mean") == adjacency_kind(cuda, "sum") == "csr"
        assert adjacency_kind(cuda, "max") == "edge_index"
    expected = "torch_sparse" if pyg_typing.WITH_TORCH_SPARSE else None
    assert adjacency_kind(torch.device("cpu"), "mean") == (expected or "csr")


@pytest.mark.parametrize("aggr", ["mean", "sum", "max"])
def test_every_adjacency_kind_encodes_alike(aggr):
    """SparseTensor, torch CSR and edge_index give the same encoder output."""
    import torch_geometric.typing as pyg_typing

    from scalable_rec.graph import MOVIE, REV_RATES, USER, RATES
    from scalable_rec.train.model import sparse_adjacency

    torch.manual_seed(0)
    nu, nm, e = 30, 20, 200
    pairs = torch.randperm(nu * nm)[:e]
    src, dst = pairs // nm, pairs % nm
    model = Recommender(nu, nm, 4, ModelConfig(hidden=8, aggr=aggr, dropout=0.0)).eval()
    x = torch.randn(nm, 4)
    n_id = {USER: torch.arange(nu), MOVIE: torch.arange(nm)}
    kinds = ["csr", "edge_index"] + (["torch_sparse"] if pyg_typing.WITH_TORCH_SPARSE else [])
    if aggr == "max":
        kinds.remove("csr")  # torch's CSR has no max reduction on CUDA; never chosen for max
    outs = []
    for kind in kinds:
        adj = {}
        for et, (s_, d_, ns, nd) in {RATES: (src, dst, nu, nm), REV_RATES: (dst, src, nm, nu)}.items():
            perm = torch.argsort(d_ * ns + s_)
            rowptr = torch.zeros(nd + 1, dtype=torch.long)
            rowptr[1:] = torch.bincount(d_, minlength=nd).cumsum(0)
            adj[et] = sparse_adjacency(rowptr, s_[perm], ns, torch.device("cpu"), aggr, kind)
        with torch.no_grad():
            outs.append(model.encoder(n_id, x, adj))
    for other in outs[1:]:
        for t in (USER, MOVIE):
            torch.testing.assert_close(other[t], outs[0][t], rtol=1e-5, atol=1e-5)
