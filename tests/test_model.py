import pytest
import torch
import torch.nn.functional as F

from scalable_rec.graph import RATES, RatingGraph
from scalable_rec.model.recommender import ModelConfig, Recommender


@pytest.mark.parametrize("decoder", ["dot", "mlp"])
def test_score_block_equals_pairwise_decoder(tiny_shards, decoder):
    g = RatingGraph.from_shards(tiny_shards)
    torch.manual_seed(0)
    model = Recommender(
        g.num_users, g.num_movies, g.movie_x.size(1), ModelConfig(hidden=16, decoder=decoder), rating_mean=3.5
    ).eval()
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
    model = Recommender(
        g.num_users,
        g.num_movies,
        g.movie_x.size(1),
        ModelConfig(hidden=16, dropout=0.0, retrieval_ids=False, retrieval_temperature=0.0, retrieval_bias=False),
    ).eval()
    z = model.encode_all(g.hetero_data())
    users, movies = torch.tensor([3, 9]), torch.tensor([0, 5, 7])
    expected = model.retrieval.user(z["user"][users]) @ model.retrieval.movie(z["movie"][movies]).T
    torch.testing.assert_close(model.rank_block(z, users, movies), expected)
    # with all neighbours, the mini-batch logits equal the full-graph ones
    loader = LinkNeighborLoader(
        g.hetero_data(),
        num_neighbors=[-1, -1],
        batch_size=8,
        edge_label_index=(RATES, torch.stack([g.src[:8], g.dst[:8]])),
    )
    pred, (ru, rm, *_) = model(next(iter(loader)))
    assert ru.shape == rm.shape == (8, 16)
    torch.testing.assert_close(ru @ rm.T, model.rank_block(z, g.src[:8], g.dst[:8]), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(pred, model.predict_pairs(z, g.src[:8], g.dst[:8]), rtol=1e-4, atol=1e-4)


def test_retrieval_ids_add_each_node_its_own_ranking_vector(tiny_shards):
    from torch_geometric.loader import LinkNeighborLoader

    from scalable_rec.graph import RATES

    g = RatingGraph.from_shards(tiny_shards)
    torch.manual_seed(0)
    model = Recommender(
        g.num_users,
        g.num_movies,
        g.movie_x.size(1),
        ModelConfig(hidden=16, dropout=0.0, retrieval_ids=True, retrieval_temperature=0.0, retrieval_bias=False),
    ).eval()
    head = model.retrieval
    z = model.encode_all(g.hetero_data())
    users, movies = torch.tensor([3, 9]), torch.tensor([0, 5, 7])
    expected = (head.user(z["user"][users]) + head.user_id.weight[users]) @ (
        head.movie(z["movie"][movies]) + head.movie_id.weight[movies]
    ).T
    torch.testing.assert_close(model.rank_block(z, users, movies), expected)
    # the ID vectors matter: without them the scores differ
    assert not torch.allclose(expected, head.user(z["user"][users]) @ head.movie(z["movie"][movies]).T, atol=1e-3)
    # mini-batch logits (all neighbours) equal the full-graph ones, ID rows included
    loader = LinkNeighborLoader(
        g.hetero_data(),
        num_neighbors=[-1, -1],
        batch_size=8,
        edge_label_index=(RATES, torch.stack([g.src[:8], g.dst[:8]])),
    )
    _, (ru, rm, *_) = model(next(iter(loader)))
    torch.testing.assert_close(ru @ rm.T, model.rank_block(z, g.src[:8], g.dst[:8]), rtol=1e-4, atol=1e-4)
    # a user past the table (unknown) has no ID vector: the projection alone
    zu = z["user"][:2]
    got = head.project_user(zu, torch.tensor([1, g.num_users + 5]))
    torch.testing.assert_close(got[1], head.user(zu[1:2])[0])
    torch.testing.assert_close(got[0], head.user(zu[:1])[0] + head.user_id.weight[1])
    # a cold movie (untrained row, or past the table) has no ID vector either
    model.encoder.movie_trained[5] = 0
    zm = z["movie"][[4, 5, 5]]
    mid = torch.tensor([4, 5, g.num_movies + 2])
    got = head.project_movie(zm, mid, model.encoder.movie_known(mid))
    torch.testing.assert_close(got[0], head.movie(zm[:1])[0] + head.movie_id.weight[4])
    torch.testing.assert_close(got[1:], head.movie(zm[1:]))
    torch.testing.assert_close(
        model.encode_all(g.hetero_data())["movie_rank"][5],
        head.movie(model.encode_all(g.hetero_data())["movie"][5:6])[0],
    )
    # movie ID dropout hides batch movies past the table: trains, and those rows get no ID vector
    dropping = Recommender(
        g.num_users,
        g.num_movies,
        g.movie_x.size(1),
        ModelConfig(hidden=16, retrieval_ids=True, movie_id_dropout=0.5, user_id_dropout=0.5),
    ).train()
    _, (ru, rm, *_) = dropping(next(iter(loader)))
    (ru.sum() + rm.sum()).backward()
    assert dropping.retrieval.movie_id.weight.grad is not None
    # switched off: no tables
    plain = Recommender(g.num_users, g.num_movies, g.movie_x.size(1), ModelConfig(hidden=16, retrieval_ids=False))
    assert plain.retrieval.user_id is None and plain.retrieval.movie_id is None


def test_a_config_saved_before_retrieval_ids_existed_loads_without_them():
    from scalable_rec.config import RunConfig

    saved = RunConfig().to_json()
    assert saved["model"]["retrieval_ids"] is True  # today's default
    del saved["model"]["retrieval_ids"]
    assert RunConfig.from_json(saved).model.retrieval_ids is False  # what that run was trained with
    assert RunConfig.from_json(RunConfig().to_json()).model.retrieval_ids is True


def test_a_config_saved_before_the_temperature_existed_loads_with_raw_dot_products():
    from scalable_rec.config import RunConfig

    saved = RunConfig().to_json()
    assert saved["model"]["retrieval_temperature"] == 0.15  # today's default
    del saved["model"]["retrieval_temperature"]
    assert RunConfig.from_json(saved).model.retrieval_temperature == 0.0


def test_without_retrieval_head_ranking_uses_predicted_ratings(tiny_shards):
    g = RatingGraph.from_shards(tiny_shards)
    model = Recommender(g.num_users, g.num_movies, g.movie_x.size(1), ModelConfig(hidden=8, retrieval_head=False))
    z = model.encode_all(g.hetero_data())
    u, m = torch.arange(3), torch.arange(4)
    assert model.retrieval is None and torch.equal(model.rank_block(z, u, m), model.score_block(z, u, m))


def test_mlp_block_chunking_is_exact():
    from scalable_rec.model.recommender import MLPDecoder

    dec = MLPDecoder(8)
    zu, zm = torch.randn(5, 8), torch.randn(11, 8)
    ids_u, ids_m = torch.arange(5), torch.arange(11)
    torch.testing.assert_close(
        dec.score_block(zu, zm, ids_u, ids_m, max_elements=8 * 11), dec.score_block(zu, zm, ids_u, ids_m)
    )


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
    return RatingGraph(
        user_keys=pa.array(range(num_users)),
        movie_keys=pa.array([0, 1]),
        movie_x=torch.ones(2, 4),
        src=torch.cat([src, torch.tensor([0])]),
        dst=torch.cat([torch.zeros(num_users, dtype=torch.long), torch.tensor([1])]),
        rating=torch.full((num_users + 1,), 4.0),
        timestamp=torch.zeros(num_users + 1, dtype=torch.long),
    )


@pytest.mark.parametrize("decoder,aggr", [("dot", "sum"), ("mlp", "sum"), ("dot", "mean")])
def test_fp16_autocast_with_sum_aggregation_over_100k_neighbours_stays_finite(decoder, aggr):
    """CPU autocast supports float16, so the overflow guard is exercised here: a sum over
    100k neighbours (≫ 65504) must neither reach fp16 in the conv's linear layers nor in
    the heads that read it, in full-graph encoding and in a training step."""
    from scalable_rec.graph import MOVIE, RATES, USER

    g = _hub_graph()
    torch.manual_seed(0)
    model = Recommender(
        g.num_users, g.num_movies, 4, ModelConfig(hidden=8, aggr=aggr, decoder=decoder, dropout=0.0), rating_mean=3.5
    )
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
        pred, (ru, rm, *_) = model(data)
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

    from scalable_rec.model.recommender import adjacency_kind, torch_sparse_runs_on, training_adjacency_kind

    cuda = torch.device("cuda")
    if pyg_typing.WITH_TORCH_SPARSE and torch.ops.torch_sparse.cuda_version() == -1:
        assert not torch_sparse_runs_on(cuda)
        assert adjacency_kind(cuda, "mean") == adjacency_kind(cuda, "sum") == "csr"
        assert adjacency_kind(cuda, "max") == "edge_index"
        assert training_adjacency_kind(cuda) == "edge_index"  # never torch's CSR under CUDA autocast
    expected = "torch_sparse" if pyg_typing.WITH_TORCH_SPARSE else None
    assert adjacency_kind(torch.device("cpu"), "mean") == (expected or "csr")


@pytest.mark.parametrize("aggr", ["mean", "sum", "max"])
def test_every_adjacency_kind_encodes_and_trains_alike(aggr):
    """SparseTensor, torch CSR and edge_index give the same encoder output and the same
    gradients: training aggregates through the sparse kinds as the full-graph encode does."""
    import torch_geometric.typing as pyg_typing

    from scalable_rec.graph import MOVIE, RATES, REV_RATES, USER
    from scalable_rec.model.recommender import edge_adjacency

    torch.manual_seed(0)
    nu, nm, e = 30, 20, 200
    pairs = torch.randperm(nu * nm)[:e]
    src, dst = pairs // nm, pairs % nm
    model = Recommender(nu, nm, 4, ModelConfig(hidden=8, aggr=aggr, dropout=0.0))
    x = torch.randn(nm, 4)
    n_id = {USER: torch.arange(nu), MOVIE: torch.arange(nm)}
    kinds = ["csr", "edge_index"] + (["torch_sparse"] if pyg_typing.WITH_TORCH_SPARSE else [])
    if aggr == "max":
        kinds.remove("csr")  # torch's CSR has no max reduction on CUDA; never chosen for max
    outs, grads = [], []
    for kind in kinds:
        adj = {
            RATES: edge_adjacency(torch.stack([src, dst]), nu, nm, aggr, kind),
            REV_RATES: edge_adjacency(torch.stack([dst, src]), nm, nu, aggr, kind),
        }
        model.zero_grad()
        z = model.encoder(n_id, x, adj)
        (z[USER].pow(2).sum() + z[MOVIE].sum()).backward()
        outs.append({t: v.detach() for t, v in z.items()})
        grads.append({n: p.grad.clone() for n, p in model.encoder.named_parameters() if p.grad is not None})
    assert len(grads[0]) > 4  # every conv's weights, the ID tables, the movie projection
    for other, other_grads in zip(outs[1:], grads[1:]):
        for t in (USER, MOVIE):
            torch.testing.assert_close(other[t], outs[0][t], rtol=1e-5, atol=1e-5)
        assert other_grads.keys() == grads[0].keys()
        for n, g in other_grads.items():
            torch.testing.assert_close(g, grads[0][n], rtol=1e-4, atol=1e-5, msg=n)


def test_training_aggregates_over_sparse_adjacency_not_edge_index(tiny_shards, monkeypatch):
    """A training forward hands SAGEConv its batch's ``SparseTensor`` (no ``[E, hidden]``
    message tensor) where torch-sparse has kernels for the device, else its ``edge_index``."""
    from torch_geometric.nn import SAGEConv

    from scalable_rec.model.recommender import training_adjacency_kind

    seen = []
    forward = SAGEConv.forward

    def spy(self, x, edge_index, *args, **kwargs):
        seen.append(
            type(edge_index).__name__
            if not isinstance(edge_index, torch.Tensor)
            else ("csr" if edge_index.layout == torch.sparse_csr else "edge_index")
        )
        return forward(self, x, edge_index, *args, **kwargs)

    monkeypatch.setattr(SAGEConv, "forward", spy)
    from torch_geometric.loader import LinkNeighborLoader

    from scalable_rec.graph import RATES

    g = RatingGraph.from_shards(tiny_shards)
    model = Recommender(g.num_users, g.num_movies, g.movie_x.size(1), ModelConfig(hidden=8)).train()
    loader = LinkNeighborLoader(
        g.hetero_data(),
        num_neighbors=[-1, -1],
        batch_size=8,
        edge_label_index=(RATES, torch.stack([g.src[:8], g.dst[:8]])),
    )
    pred, _ = model(next(iter(loader)))
    pred.sum().backward()
    want = {"torch_sparse": "SparseTensor", "edge_index": "edge_index"}[training_adjacency_kind(torch.device("cpu"))]
    assert seen and set(seen) == {want}
    import torch_geometric.typing as pyg_typing

    assert want == ("SparseTensor" if pyg_typing.WITH_TORCH_SPARSE else "edge_index")


# --- cold movies: no trained ID row, no edges --------------------------------------------

COLD = torch.tensor([0, 1, 2])


def _without_movies(g: RatingGraph, movies: torch.Tensor) -> RatingGraph:
    """``g`` with every rating of ``movies`` removed (the movies stay in the catalog)."""
    import dataclasses

    keep = ~torch.isin(g.dst, movies)
    return dataclasses.replace(g, src=g.src[keep], dst=g.dst[keep], rating=g.rating[keep], timestamp=g.timestamp[keep])


def _cold_model(g: RatingGraph, **kw) -> Recommender:
    torch.manual_seed(0)
    model = Recommender(
        g.num_users, g.num_movies, g.movie_x.size(1), ModelConfig(hidden=8, **kw), rating_mean=3.5
    ).eval()
    with torch.no_grad():
        model.encoder.movie_trained[COLD] = 0
        if model.cfg.decoder == "dot":
            model.decoder.movie_bias.weight.uniform_(0.5, 1.5)  # untrained rows would be garbage
    return model


def test_untrained_and_past_the_table_movies_get_features_plus_the_unknown_input(tiny_shards):
    g = RatingGraph.from_shards(tiny_shards)
    model = _cold_model(g, movie_id_dropout=0.0)
    enc = model.encoder
    mid = torch.tensor([0, 5, g.num_movies + 2])  # untrained, trained, no ID row at all
    x = torch.randn(3, g.movie_x.size(1))
    got = enc.input_features({"user": torch.arange(1), "movie": mid}, x)["movie"]
    trained = enc.movie_trained.bool()
    mean = enc.movie_emb.weight[trained].mean(0)
    torch.testing.assert_close(got[0], mean + enc.movie_lin(x[0]))
    torch.testing.assert_close(got[2], mean + enc.movie_lin(x[2]))
    torch.testing.assert_close(got[1], enc.movie_emb.weight[5] + enc.movie_lin(x[1]))
    # the dot decoder's bias: the trained movies' mean, not the untrained row
    bias = model.decoder._movie_bias(mid, enc.movie_trained)
    torch.testing.assert_close(bias[[0, 2]], model.decoder.movie_bias.weight[trained].mean().expand(2))
    assert bias[1] == model.decoder.movie_bias.weight[5, 0]
    # with movie ID dropout the learned vector and bias stand in
    learned = _cold_model(g, movie_id_dropout=0.2)
    with torch.no_grad():
        learned.encoder.unknown_movie.fill_(0.25)
        learned.decoder.unknown_movie_bias.fill_(-1.0)
    got = learned.encoder.input_features({"user": torch.arange(1), "movie": mid}, x)["movie"]
    torch.testing.assert_close(got[2], torch.full((8,), 0.25) + learned.encoder.movie_lin(x[2]))
    assert learned.decoder._movie_bias(mid, learned.encoder.movie_trained)[0] == -1.0


@pytest.mark.parametrize("decoder", ["dot", "mlp"])
def test_cold_movie_score_comes_from_its_features_not_its_untrained_row(tiny_shards, decoder):
    """A movie with no edges and an untrained row: finite scores and predicted ratings that
    move with its features and not at all with its (random) ID row or bias."""
    g = _without_movies(RatingGraph.from_shards(tiny_shards), COLD)
    model = _cold_model(g, decoder=decoder)
    data, users, movies = g.hetero_data(), torch.arange(g.num_users), torch.arange(g.num_movies)

    def scores():
        z = model.encode_all(data)
        return model.rank_block(z, users, movies), model.score_block(z, users, movies)

    rank, rating = scores()
    assert torch.isfinite(rank).all() and torch.isfinite(rating).all()
    with torch.no_grad():  # re-draw the untrained rows: nothing may change
        model.encoder.movie_emb.weight[COLD] = torch.randn(len(COLD), 8) * 10
        if decoder == "dot":
            model.decoder.movie_bias.weight[COLD] = 100.0
    rank2, rating2 = scores()
    torch.testing.assert_close(rank2, rank)
    torch.testing.assert_close(rating2, rating)
    g.movie_x[COLD] += 1.0  # its features do move it
    rank3, _ = scores()
    assert not torch.allclose(rank3[:, COLD], rank[:, COLD])


def test_training_marks_movies_without_training_ratings_and_scoring_keeps_them(tiny_shards, tmp_path):
    """Through train → best.pt → recommend: the cold movies are marked untrained, and with
    k = the whole catalog every user's list holds every unrated movie, cold ones included,
    with finite scores (a cold movie is never silently dropped)."""
    import math

    from scalable_rec.graph import split_edges
    from scalable_rec.graph.hetero import SplitConfig
    from scalable_rec.model.topk import ScoreConfig
    from scalable_rec.score.recommend import recommend
    from scalable_rec.train import TrainConfig
    from scalable_rec.train import checkpoint as ckpt
    from scalable_rec.train.loop import train

    g = _without_movies(RatingGraph.from_shards(tiny_shards), COLD)
    split = split_edges(g, SplitConfig())
    only_test = g.dst[split.test][~torch.isin(g.dst[split.test], g.dst[split.train])].unique()
    train(g, split, ModelConfig(hidden=8), TrainConfig(epochs=1, batch_size=64, progress=False, device="cpu"), tmp_path)
    model = Recommender(g.num_users, g.num_movies, g.movie_x.size(1), ModelConfig(hidden=8))
    model.load_state_dict(ckpt.load(tmp_path / "best.pt")["model"])
    model.eval()
    trained = model.encoder.movie_trained.bool()
    assert not trained[COLD].any() and not trained[only_test].any()
    assert trained.sum() == torch.unique(g.dst[split.train]).numel()
    batches = list(recommend(model, g, ScoreConfig(k=g.num_movies)))
    rows = [r for b in batches for r in b.to_pylist()]
    cold_keys = set(g.movie_keys.take(COLD.numpy()).to_pylist())
    for user in range(g.num_users):
        mine = [r for r in rows if r["user_key"] == g.user_keys[user].as_py()]
        rated = set(g.dst[g.src == user].tolist())
        assert len(mine) == g.num_movies - len(rated)
        assert cold_keys <= {r["movie_key"] for r in mine}
        assert all(math.isfinite(r["score"]) and math.isfinite(r["predicted_rating"]) for r in mine)


def test_movie_id_dropout_trains_the_unknown_movie_vector(tiny_shards):
    from scalable_rec.graph import split_edges
    from scalable_rec.graph.hetero import SplitConfig
    from scalable_rec.train import TrainConfig
    from scalable_rec.train.loop import build_job, training_loss

    g = RatingGraph.from_shards(tiny_shards)
    job = build_job(
        g,
        split_edges(g, SplitConfig()),
        ModelConfig(hidden=8, movie_id_dropout=0.5),
        TrainConfig(batch_size=64, progress=False, device="cpu"),
        tiny_shards.directory.parent / "jm",
        None,
    )
    job.model.train()
    loss, _, _ = training_loss(job, next(iter(job.train_loader)))
    loss.backward()
    assert job.model.encoder.unknown_movie.grad.abs().sum() > 0
    assert job.model.decoder.unknown_movie_bias.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="'movie_id_dropout' needs to be in \\[0, 1\\) \\(got -0.1\\)"):
        ModelConfig(movie_id_dropout=-0.1)


def test_checkpoint_without_movie_trained_loads_with_every_row_trained(tiny_shards):
    g = RatingGraph.from_shards(tiny_shards)
    model = _cold_model(g)
    state = {k: v for k, v in model.state_dict().items() if k != "encoder.movie_trained"}
    fresh = Recommender(g.num_users, g.num_movies, g.movie_x.size(1), ModelConfig(hidden=8))
    fresh.encoder.movie_trained.zero_()
    fresh.load_state_dict(state)
    assert fresh.encoder.movie_trained.all()


def test_retrieval_temperature_ranks_by_cosine_over_tau(tiny_shards):
    """With τ the scores are cosines over τ of the head's vectors, in the full-graph ranking
    and in the mini-batch logits alike."""
    from torch_geometric.loader import LinkNeighborLoader

    from scalable_rec.graph import RATES

    g = RatingGraph.from_shards(tiny_shards)
    torch.manual_seed(0)
    model = Recommender(
        g.num_users, g.num_movies, g.movie_x.size(1), ModelConfig(hidden=16, dropout=0.0, retrieval_temperature=0.2)
    ).eval()
    z = model.encode_all(g.hetero_data())
    head, users, movies = model.retrieval, torch.tensor([3, 9]), torch.tensor([0, 5, 7])
    raw_u = head.user(z["user"][users]) + head.user_id.weight[users]
    raw_m = head.movie(z["movie"][movies]) + head.movie_id.weight[movies]
    expected = F.normalize(raw_u, dim=-1) @ F.normalize(raw_m, dim=-1).T / 0.2
    torch.testing.assert_close(model.rank_block(z, users, movies), expected, rtol=1e-5, atol=1e-5)
    loader = LinkNeighborLoader(
        g.hetero_data(),
        num_neighbors=[-1, -1],
        batch_size=8,
        edge_label_index=(RATES, torch.stack([g.src[:8], g.dst[:8]])),
    )
    _, (ru, rm, *_) = model(next(iter(loader)))
    torch.testing.assert_close(ru @ rm.T, model.rank_block(z, g.src[:8], g.dst[:8]), rtol=1e-4, atol=1e-4)


def test_a_checkpoint_from_before_the_temperature_keeps_raw_dot_products():
    model = Recommender(5, 4, 3, ModelConfig(hidden=4, retrieval_temperature=0.2, retrieval_bias=False))
    head = model.retrieval
    z, ids, known = torch.randn(4, 4), torch.arange(4), torch.ones(4, dtype=torch.bool)
    assert torch.allclose(head.project_movie(z, ids, known).norm(dim=-1), torch.full((4,), 0.2**-0.5))
    old = {k: v for k, v in model.state_dict().items() if k != "retrieval.temperature"}
    model.load_state_dict(old)  # strict: the missing buffer is filled in, not an error
    assert head.tau == 0.0 and float(head.temperature) == 0.0
    torch.testing.assert_close(head.project_movie(z, ids, known), head.movie(z) + head.movie_id.weight[ids])
    with pytest.raises(ValueError, match="retrieval_temperature"):
        ModelConfig(retrieval_temperature=-1.0)


def test_retrieval_bias_adds_each_movies_learned_bias_to_every_ranking_score(tiny_shards):
    """With ``retrieval_bias`` the score is ``cos/τ + b_m`` in the full-graph ranking and the
    mini-batch logits alike; a movie without a trained row gets the unknown-movie bias."""
    from torch_geometric.loader import LinkNeighborLoader

    from scalable_rec.graph import RATES

    g = RatingGraph.from_shards(tiny_shards)
    torch.manual_seed(0)
    model = Recommender(
        g.num_users,
        g.num_movies,
        g.movie_x.size(1),
        ModelConfig(hidden=16, dropout=0.0, retrieval_bias=True, retrieval_temperature=0.2),
    ).eval()
    head = model.retrieval
    with torch.no_grad():
        head.movie_bias.weight.copy_(torch.randn_like(head.movie_bias.weight))
        head.unknown_movie_bias.fill_(-7.0)
        model.encoder.movie_trained[5] = 0  # movie 5: no trained row
    z = model.encode_all(g.hetero_data())
    users, movies = torch.tensor([3, 9]), torch.tensor([0, 5, 7])
    raw_u = head.user(z["user"][users]) + head.user_id.weight[users]
    raw_m = head.movie(z["movie"][movies]) + head.movie_id.weight[movies] * torch.tensor([[1.0], [0.0], [1.0]])
    bias = torch.stack([head.movie_bias.weight[0, 0], torch.tensor(-7.0), head.movie_bias.weight[7, 0]])
    expected = F.normalize(raw_u, dim=-1) @ F.normalize(raw_m, dim=-1).T / 0.2 + bias[None, :]
    torch.testing.assert_close(model.rank_block(z, users, movies), expected, rtol=1e-5, atol=1e-5)
    assert head.out_features == 17
    loader = LinkNeighborLoader(
        g.hetero_data(),
        num_neighbors=[-1, -1],
        batch_size=8,
        edge_label_index=(RATES, torch.stack([g.src[:8], g.dst[:8]])),
    )
    _, (ru, rm, *_) = model(next(iter(loader)))
    torch.testing.assert_close(ru @ rm.T, model.rank_block(z, g.src[:8], g.dst[:8]), rtol=1e-4, atol=1e-4)


def test_a_config_saved_before_the_retrieval_bias_existed_loads_without_it():
    from scalable_rec.config import RunConfig

    saved = RunConfig(model=ModelConfig(retrieval_bias=True)).to_json()
    del saved["model"]["retrieval_bias"]
    assert RunConfig.from_json(saved).model.retrieval_bias is False
    assert Recommender(5, 4, 3, ModelConfig(hidden=4, retrieval_bias=False)).retrieval.out_features == 4


def test_aggr_max_on_cuda_without_cuda_scatter_kernels_is_refused(monkeypatch):
    """PyG hands a max that needs gradients on CUDA to torch-scatter; a CPU-only build fails
    there mid-step, so the combination is refused up front (mean/sum and the CPU are fine)."""
    from scalable_rec.errors import ConfigError
    from scalable_rec.model import recommender as model_mod

    cuda, cpu = torch.device("cuda"), torch.device("cpu")  # device objects only
    monkeypatch.setattr(model_mod, "torch_sparse_runs_on", lambda device: device.type == "cpu")
    monkeypatch.setattr(model_mod, "torch_scatter_runs_on", lambda device: device.type == "cpu")
    with pytest.raises(ConfigError, match="'aggr' max on CUDA needs torch-scatter or torch-sparse with CUDA kernels"):
        model_mod.check_model_device(ModelConfig(aggr="max"), cuda)
    model_mod.check_model_device(ModelConfig(aggr="mean"), cuda)
    model_mod.check_model_device(ModelConfig(aggr="max"), cpu)
    monkeypatch.setattr(model_mod, "torch_scatter_runs_on", lambda device: None)  # not installed: torch's own
    model_mod.check_model_device(ModelConfig(aggr="max"), cuda)
    monkeypatch.setattr(model_mod, "torch_scatter_runs_on", lambda device: True)  # CUDA kernels
    model_mod.check_model_device(ModelConfig(aggr="max"), cuda)


def _rerated(graph: RatingGraph, seed: int) -> RatingGraph:
    """``graph`` with the same edges and other ratings (every bucket still present)."""
    import dataclasses

    gen = torch.Generator().manual_seed(seed)
    return dataclasses.replace(graph, rating=torch.randint(1, 11, graph.rating.shape, generator=gen) / 2)


@pytest.mark.parametrize("mode", ["none", "relation", "gcmc"])
def test_the_rating_reaches_the_messages_only_with_rating_relations(tiny_shards, mode):
    """Two graphs identical but for their ratings: a model with rating relations embeds them
    differently, one without embeds them identically (its messages ignore the rating)."""
    g = RatingGraph.from_shards(tiny_shards)
    torch.manual_seed(0)
    model = Recommender(
        g.num_users, g.num_movies, g.movie_x.size(1), ModelConfig(hidden=8, rating_messages=mode)
    ).eval()
    a = model.encode_all(g.hetero_data())
    b = model.encode_all(_rerated(g, 1).hetero_data())
    for key in a:
        assert torch.equal(a[key], b[key]) == (mode == "none"), key


def test_rating_relations_need_each_edges_rating():
    import pyarrow as pa

    g = RatingGraph(
        user_keys=pa.array([0, 1]),
        movie_keys=pa.array([0]),
        movie_x=torch.ones(1, 4),
        src=torch.tensor([0, 1]),
        dst=torch.tensor([0, 0]),
        rating=torch.tensor([1.0, 5.0]),
        timestamp=torch.zeros(2, dtype=torch.long),
    )
    model = Recommender(2, 1, 4, ModelConfig(hidden=4, rating_messages="relation")).eval()
    data = g.hetero_data()
    del data[RATES].rating
    with pytest.raises(ValueError, match="rating_messages 'relation' needs each edge's 'rating'"):
        model.encode_all(data)
    with pytest.raises(
        ValueError,
        match="'rating_messages' needs to be 'none', 'relation', 'gcmc', 'scale', 'embed' or 'center' \\(got 'x'\\)",
    ):
        ModelConfig(rating_messages="x")
    with pytest.raises(ValueError, match="'rating_messages' gcmc .* needs 'aggr' mean \\(got 'sum'\\)"):
        ModelConfig(rating_messages="gcmc", aggr="sum")


def test_a_config_saved_before_rating_messages_existed_loads_without_them():
    from scalable_rec.config import RunConfig

    saved = RunConfig(model=ModelConfig(rating_messages="relation")).to_json()
    del saved["model"]["rating_messages"]
    assert RunConfig.from_json(saved).model.rating_messages == "none"
