import pytest
import torch

from scalable_rec.dist import DistEnv
from scalable_rec.graph import RATES, RatingGraph, SplitConfig, split_edges
from scalable_rec.train import TrainConfig
from scalable_rec.train.batches import SupervisionEdges, make_loader, supervision_stats
from scalable_rec.train.losses import rating_class_table, rating_class_weights


@pytest.fixture(scope="module")
def tiny(tiny_shards):
    g = RatingGraph.from_shards(tiny_shards)
    return g, split_edges(g, SplitConfig(val_ratio=0.1, test_ratio=0.11))  # 395 training edges: odd


def test_batches_gather_labels_and_class_weights_of_their_edges_and_pads_weigh_nothing(tiny):
    """Per batch, a rank gets what gathering every supervision edge up front gave:
    (user, movie), rating and the weighted_mse class weight over *all* supervision edges;
    the pad that evens out the ranks repeats edge 0 with weight 0."""
    g, split = tiny
    ids = split.train
    stats = supervision_stats(SupervisionEdges(g.src, g.dst, g.rating, ids), g.num_movies)
    edges = SupervisionEdges(g.src, g.dst, g.rating, ids, class_weight=rating_class_table(stats["class_counts"]))
    expected_weight = rating_class_weights(g.rating[ids])
    seen = []
    for rank in range(2):
        loader, sampler = make_loader(
            g.hetero_data(ids),
            edges,
            TrainConfig(num_neighbors=[2, 2], progress=False),
            32,
            DistEnv(rank, rank, 2),
            shuffle=True,
            device=torch.device("cpu"),
        )
        sampler.set_epoch(1)
        for batch in loader:
            store = batch[RATES]
            pos = store.input_id
            real = pos < ids.numel()
            u, m = store.edge_label_index
            edge = ids[torch.where(real, pos, pos - ids.numel())]
            assert torch.equal(batch["user"].n_id[u], g.src[edge]) and torch.equal(batch["movie"].n_id[m], g.dst[edge])
            assert torch.equal(store.edge_label[:, 0], g.rating[edge])
            torch.testing.assert_close(store.edge_label[real, 1], expected_weight[pos[real]])
            assert (store.edge_label[~real, 1] == 0).all()
            seen += pos.tolist()
    assert sorted(seen) == list(range(ids.numel() + 1))  # every edge once, plus one pad
    assert stats["rating_mean"] == pytest.approx(float(g.rating[ids].double().mean()))
    assert torch.equal(stats["movie_counts"], torch.bincount(g.dst[ids], minlength=g.num_movies))


def test_supervision_edges_refuse_mismatched_arrays(tiny):
    g, split = tiny
    with pytest.raises(ValueError, match=r"'src', 'dst' and 'rating' need one entry per edge \(got 500, 499, 500\)"):
        SupervisionEdges(g.src, g.dst[1:], g.rating, split.train)
    with pytest.raises(ValueError, match="'ids' needs at least one supervision edge"):
        SupervisionEdges(g.src, g.dst, g.rating, split.train[:0])


@pytest.mark.parametrize("sampler", ["pyg", "torch"])
@pytest.mark.parametrize("exclude_targets", [False, True])
@pytest.mark.parametrize("backend", ["memory", "store"])
def test_every_sampled_edge_carries_its_own_rating(tiny, tiny_shards, tmp_path, backend, exclude_targets, sampler):
    """In both directions, each sampled message edge's ``rating`` is the graph's rating of
    its (user, movie) pair: gathered by the loader from ``HeteroData``, looked up at the
    CSC position ``e_id`` from the mapped store pair; target exclusion drops it with its edge."""
    from scalable_rec.graph import MOVIE, REV_RATES, USER
    from scalable_rec.graph.index import GraphIndex, build_index
    from scalable_rec.graph.store import open_stores

    g, split = tiny
    if backend == "store":
        index = GraphIndex.open(build_index(tiny_shards, SplitConfig(val_ratio=0.1, test_ratio=0.11), root=tmp_path))
        assert torch.equal(index.split().train, split.train)
        data = open_stores(index, "train")
    else:
        data = g.hetero_data(split.train)
    truth = {(u, m): r for u, m, r in zip(g.src.tolist(), g.dst.tolist(), g.rating.tolist())}
    edges = SupervisionEdges(g.src, g.dst, g.rating, split.train)
    loader, _ = make_loader(
        data,
        edges,
        TrainConfig(num_neighbors=[3, 2], progress=False, sampler=sampler),
        32,
        DistEnv(),
        shuffle=True,
        device=torch.device("cpu"),
        exclude_targets=exclude_targets,
    )
    checked = 0
    for batch in loader:
        for edge_type, (ui, mi) in ((RATES, (0, 1)), (REV_RATES, (1, 0))):
            ei = batch[edge_type].edge_index
            users, movies = batch[USER].n_id[ei[ui]], batch[MOVIE].n_id[ei[mi]]
            rating = batch[edge_type].rating
            assert rating.numel() == ei.size(1)
            assert rating.tolist() == [truth[p] for p in zip(users.tolist(), movies.tolist())]
            checked += rating.numel()
            if exclude_targets:  # excluded before the encoder splits by bucket: from every relation
                u, m = batch[RATES].edge_label_index
                targets = set(zip(batch[USER].n_id[u].tolist(), batch[MOVIE].n_id[m].tolist()))
                assert not targets & set(zip(users.tolist(), movies.tolist()))
    assert checked > 100
    assert len(set(g.rating[split.train].tolist())) > 3  # ratings differ: a wrong lookup would show


@pytest.mark.parametrize("sampler", ["pyg", "torch"])
@pytest.mark.parametrize("backend", ["memory", "store"])
def test_excluded_targets_leave_every_rating_relation_and_the_gcmc_degree(
    tiny, tiny_shards, tmp_path, backend, sampler
):
    """With target exclusion, no rating relation the encoder aggregates over holds a batch's
    target pair, each relation holds only its bucket's edges, and GC-MC's degree of a node
    is what is left of its edges in the batch (the targets not counted)."""
    from scalable_rec.graph import MOVIE, USER
    from scalable_rec.graph.index import GraphIndex, build_index
    from scalable_rec.graph.relations import bucket_of, parse
    from scalable_rec.graph.store import open_stores
    from scalable_rec.model.gcmc import inverse_total_degree
    from scalable_rec.train import ModelConfig, Recommender

    g, split = tiny
    if backend == "store":
        index = GraphIndex.open(build_index(tiny_shards, SplitConfig(val_ratio=0.1, test_ratio=0.11), root=tmp_path))
        data = open_stores(index, "train")
    else:
        data = g.hetero_data(split.train)
    truth = {(u, m): r for u, m, r in zip(g.src.tolist(), g.dst.tolist(), g.rating.tolist())}
    loader, _ = make_loader(
        data,
        SupervisionEdges(g.src, g.dst, g.rating, split.train),
        TrainConfig(num_neighbors=[-1, -1], progress=False, sampler=sampler),
        32,
        DistEnv(),
        shuffle=True,
        device=torch.device("cpu"),
        exclude_targets=True,
    )
    model = Recommender(g.num_users, g.num_movies, g.movie_x.size(1), ModelConfig(hidden=4, rating_messages="gcmc"))
    checked = 0
    for batch in loader:
        u, m = batch[RATES].edge_label_index
        targets = set(zip(batch[USER].n_id[u].tolist(), batch[MOVIE].n_id[m].tolist()))
        adj = model._adjacency(batch, torch.device("cpu"), "edge_index")
        for et, ei in adj.items():
            base, bucket = parse(et)
            users, movies = (ei[0], ei[1]) if base == RATES else (ei[1], ei[0])
            pairs = list(zip(batch[USER].n_id[users].tolist(), batch[MOVIE].n_id[movies].tolist()))
            assert not targets & set(pairs), et
            assert all(int(bucket_of(torch.tensor(truth[p]))) == bucket for p in pairs), et
            checked += len(pairs)
        inv = inverse_total_degree(adj, {USER: batch[USER].num_nodes, MOVIE: batch[MOVIE].num_nodes})
        left = torch.bincount(batch[RATES].edge_index[1], minlength=batch[MOVIE].num_nodes)
        torch.testing.assert_close(inv[MOVIE], 1.0 / left.clamp(min=1).float())
    assert checked > 100
