"""Incremental refresh: exact mode equals a full re-score, bounded mode touches only the
raters, the run directory is updated atomically and idempotently, new users are served."""

from __future__ import annotations

import csv
import json

import pyarrow.parquet as pq
import pytest
import torch
from rating_fixtures import vary_scale_scalars

from scalable_rec import cli
from scalable_rec.graph import RatingGraph
from scalable_rec.model.recommender import ModelConfig, Recommender
from scalable_rec.refresh import (
    RefreshConfig,
    RefreshState,
    apply_edges,
    edge_list,
    empty_extra,
    initial_state,
    refresh,
)
from scalable_rec.score.incremental import encode_layers
from scalable_rec.shards import GraphShards
from scalable_rec.source import SkipReport, write_rating_shards
from scalable_rec.source.synthetic import SyntheticSource
from scalable_rec.train import checkpoint as ckpt

K = 5
NEW_USER = 10**6  # not a key of the tiny synthetic graph


@pytest.fixture(scope="module")
def sparse_graph(tmp_path_factory) -> RatingGraph:
    """120 users × 150 movies × 600 ratings: sparse enough that two hops of a few new
    edges do not reach everything, so the column-merge path is exercised."""
    out = tmp_path_factory.mktemp("sparse") / "shards"
    write_rating_shards(
        SyntheticSource(num_users=120, num_movies=150, num_edges=600, feature_dim=12, seed=3), str(out), SkipReport()
    )
    return RatingGraph.from_shards(GraphShards(out))


def _model(graph: RatingGraph, **kw) -> Recommender:
    torch.manual_seed(0)
    cfg = ModelConfig(hidden=16, **kw)
    return vary_scale_scalars(Recommender(graph.num_users, graph.num_movies, graph.movie_x.size(1), cfg).eval())


def _new_edges(graph: RatingGraph, seed: int, n: int = 8, new_users: int = 2):
    gen = torch.Generator().manual_seed(seed)
    src = torch.randint(0, graph.num_users, (n,), generator=gen)
    first_new = graph.num_users + seed * 10  # unique per call: grows with earlier calls' users
    src = torch.cat([src, torch.arange(new_users).repeat_interleave(2) + first_new])
    dst = torch.randint(0, graph.num_movies, (src.numel(),), generator=gen)
    rating = torch.randint(1, 11, (src.numel(),), generator=gen) / 2  # every rating bucket
    return src, dst, rating, torch.zeros(src.numel(), dtype=torch.long)


@pytest.mark.parametrize("num_layers", [1, 2, 3])
@pytest.mark.parametrize(
    "head",
    [
        dict(retrieval_head=True),
        dict(retrieval_head=False),
        dict(retrieval_ids=False),
        dict(rating_messages="relation"),
        dict(rating_messages="gcmc"),
        dict(rating_messages="scale"),
        dict(rating_messages="center"),
    ],
)
def test_encode_layers_matches_encode_all(sparse_graph, num_layers, head):
    model = _model(sparse_graph, num_layers=num_layers, **head)
    z = model.encode_all(sparse_graph.hetero_data())
    layers = encode_layers(model, edge_list(sparse_graph, empty_extra(), 0), sparse_graph.movie_x).layers
    for key in z:
        torch.testing.assert_close(layers[-1][key], z[key])


@pytest.mark.parametrize("num_layers", [1, 2, 3])
@pytest.mark.parametrize(
    "head",
    [
        dict(decoder="dot"),
        dict(decoder="dot", retrieval_head=False),
        dict(decoder="mlp", retrieval_head=False),
        dict(decoder="dot", retrieval_ids=False),
        dict(decoder="dot", rating_messages="relation"),
        dict(decoder="dot", rating_messages="gcmc"),
        dict(decoder="dot", rating_messages="scale"),
        dict(decoder="dot", rating_messages="center"),
    ],
)
@pytest.mark.parametrize("margin", [0, 10])
def test_exact_refresh_equals_full_rescore(sparse_graph, num_layers, head, margin):
    """Three successive refreshes (new users included); after each, every user's top-k
    equals a full encode + score of the updated graph, scores within float tolerance."""
    model = _model(sparse_graph, num_layers=num_layers, **head)
    state = initial_state(model, sparse_graph, K, margin, 1, "sha")
    merged = 0
    for step in range(3):
        src, dst, rating, ts = _new_edges(sparse_graph, step)
        # new users are numbered from the current total: remap this call's ones onto it
        total = sparse_graph.num_users + len(state.new_user_keys)
        new = src >= sparse_graph.num_users
        src[new] = src[new] - src[new].min() + total
        keys = [f"new-{step}-{i}" for i in range(int(src[new].unique().numel()))]
        out = apply_edges(model, sparse_graph, state, src, dst, rating, ts, keys, "exact", memory_mb=1)
        merged += out.stats["column_merged_users"]
        full = initial_state(model, sparse_graph, K, margin, 1, "sha", state.extra, state.new_user_keys)
        assert torch.equal(state.cand_idx[:, :K], full.cand_idx[:, :K])
        torch.testing.assert_close(state.cand_score[:, :K], full.cand_score[:, :K], rtol=1e-5, atol=1e-5)
        if num_layers < 3:  # not a full re-score in disguise (3 hops reach most of this graph)
            assert out.stats["rescored_users"] < state.cand_idx.size(0)
    if num_layers < 3:
        assert merged > 0  # the column-merge path ran


def test_refresh_detects_when_margin_is_exhausted(sparse_graph):
    """With no margin, a changed movie leaving a top-k list forces that user's full re-score."""
    model = _model(sparse_graph, num_layers=1)
    state = initial_state(model, sparse_graph, K, 0, 1, "sha")
    # new ratings on the movies most often in top-k lists: their embeddings change
    popular = torch.bincount(state.cand_idx[:, :K].flatten(), minlength=sparse_graph.num_movies).topk(5).indices
    src = torch.arange(5)
    out = apply_edges(
        model,
        sparse_graph,
        state,
        src,
        popular,
        torch.ones(5),
        torch.zeros(5, dtype=torch.long),
        [],
        "exact",
        memory_mb=1,
    )
    assert out.stats["fallback_users"] > 0
    full = initial_state(model, sparse_graph, K, 0, 1, "sha", state.extra)
    assert torch.equal(state.cand_idx[:, :K], full.cand_idx[:, :K])


def test_bounded_rescores_only_raters(sparse_graph):
    model = _model(sparse_graph, num_layers=2)
    state = initial_state(model, sparse_graph, K, 10, 1, "sha")
    before = state.cand_idx.clone()
    src, dst, rating, ts = _new_edges(sparse_graph, 0, new_users=1)
    out = apply_edges(model, sparse_graph, state, src, dst, rating, ts, ["n"], "bounded", memory_mb=1)
    raters = set(src.tolist())
    assert set(out.replaced_users.tolist()) <= raters
    untouched = [u for u in range(sparse_graph.num_users) if u not in raters]
    assert torch.equal(state.cand_idx[untouched], before[untouched])
    assert out.stats["rescored_users"] == len(raters)
    assert state.exact is False
    # the next exact refresh repairs the stale states: full re-score, then exact again
    src2, dst2, r2, t2 = _new_edges(sparse_graph, 5, new_users=0)
    out2 = apply_edges(model, sparse_graph, state, src2, dst2, r2, t2, [], "exact", memory_mb=1)
    assert out2.stats["full_rescore"]
    full = initial_state(model, sparse_graph, K, 10, 1, "sha", state.extra, state.new_user_keys)
    assert torch.equal(state.cand_idx[:, :K], full.cand_idx[:, :K])


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("num_layers", [1, 2])
def test_bounded_refresh_saves_a_row_delta_that_reloads_to_the_same_state(sparse_graph, tmp_path, num_layers):
    """Two bounded refreshes (the second with a new user) after a full save: the base file
    stays as written, and loading base + delta gives exactly the in-memory state."""
    model = _model(sparse_graph, num_layers=num_layers)
    path = tmp_path / "refresh" / "state.pt"
    initial_state(model, sparse_graph, K, 10, 1, "sha").save(path)
    base_bytes = path.read_bytes()
    for seed, new_users, keys in ((1, 0, []), (0, 1, ["n"])):
        state = RefreshState.load(path)
        src, dst, rating, ts = _new_edges(sparse_graph, seed, new_users=new_users)
        apply_edges(model, sparse_graph, state, src, dst, rating, ts, keys, "bounded", memory_mb=1)
        state.save(path)
        assert path.read_bytes() == base_bytes and path.with_name("state.pt.delta").is_file()
        again = RefreshState.load(path)
        for name in ("layers", "aggs", "degree", "cand_idx", "cand_score", "floor", "extra"):
            assert _same(getattr(again, name), getattr(state, name)), name
        assert again.exact is False and again.new_user_keys == keys


@pytest.fixture
def trained_run(tiny_shards, tmp_path):
    """A run directory (config.json, best.pt, recommendations.parquet) on the tiny graph."""
    run = tmp_path / "run"
    code = cli.main(
        [
            "train",
            "--shards",
            str(tiny_shards.directory),
            "--run-dir",
            str(run),
            "--epochs",
            "1",
            "--hidden",
            "16",
            "--batch-size",
            "128",
            "--no-progress",
            "--user-id-dropout",
            "0.2",
        ]
    )
    assert code == 0
    assert cli.main(["score", "--run-dir", str(run), "--k", str(K)]) == 0
    return run


def _rows_by_user(table) -> dict:
    out: dict = {}
    for row in table.to_pylist():
        out.setdefault(row["user_key"], []).append(tuple(row.values()))
    return out


def _write_ratings(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["userId", "movieId", "rating", "timestamp"])
        w.writerows(rows)


def test_refresh_command_replaces_exactly_changed_users_and_is_idempotent(trained_run, tiny_shards, tmp_path):
    graph = RatingGraph.from_shards(tiny_shards)
    users, movies = graph.user_keys.to_pylist(), graph.movie_keys.to_pylist()
    new = tmp_path / "new.csv"
    _write_ratings(
        new,
        [
            [users[0], movies[1], 4.5, 1],
            [users[1], movies[2], 3.0, 2],
            [NEW_USER, movies[3], 5.0, 3],
            [NEW_USER, movies[4], 4.0, 4],
            [users[2], 10**9, 4.0, 5],
            [users[2], "x", 4.0, 5],
            [users[2], movies[5], 9.0, 6],
        ],
    )
    out = trained_run / "recommendations.parquet"
    before = _rows_by_user(pq.read_table(out))
    code = cli.main(["refresh", "--run-dir", str(trained_run), "--new-ratings", str(new), "--k", str(K)])
    assert code == 0
    report = json.loads((trained_run / "refresh" / "last_report.json").read_text())
    assert report["new_users"] == 1 and report["new_edges"] == 4
    assert report["input_report"]["skipped"] == {
        "unparseable_movie_id": 1,
        "rating_out_of_range": 1,
        "unknown_movie": 1,
    }
    after = _rows_by_user(pq.read_table(out))
    assert NEW_USER not in before and len(after[NEW_USER]) == K
    # exactly the reported number of users got new rows; everyone else's are identical
    changed = {u for u in after if after[u] != before.get(u)}
    assert len(changed) == report["replaced_users"] > 1
    # equal to a full re-score of the updated graph (from the state the refresh saved)
    model = Recommender(
        graph.num_users, graph.num_movies, graph.movie_x.size(1), ModelConfig(hidden=16, user_id_dropout=0.2)
    )
    model.load_state_dict(ckpt.load(trained_run / "best.pt")["model"])
    model.eval()
    saved = RefreshState.load(trained_run / "refresh" / "state.pt")
    full = initial_state(model, graph, K, 20, 256, "sha", saved.extra, saved.new_user_keys)
    assert torch.equal(saved.cand_idx[:, :K], full.cand_idx[:, :K])
    # a repeated refresh of the same input changes nothing
    state_dir = trained_run / "refresh"
    state_bytes, parquet_bytes = {p.name: p.read_bytes() for p in state_dir.iterdir()}, out.read_bytes()
    report2 = refresh(trained_run, model, graph, RefreshConfig(new_ratings=str(new)), k=K)
    assert report2["already_folded"]
    assert {p.name: p.read_bytes() for p in state_dir.iterdir()} == state_bytes
    assert out.read_bytes() == parquet_bytes
    assert len(json.loads((trained_run / "refresh" / "folded.json").read_text())) == 1


def test_refresh_cli_errors(trained_run, tmp_path):
    assert cli.main(["refresh", "--run-dir", str(trained_run)]) == 2
    assert cli.main(["refresh", "--run-dir", str(trained_run), "--new-ratings", str(tmp_path / "nope.csv")]) == 2
    assert cli.main(["refresh", "--run-dir", str(trained_run), "--new-ratings", "x", "--candidate-margin", "-1"]) == 2
    bad = tmp_path / "bad.csv"
    bad.write_text("user,movie\n1,2\n")
    assert cli.main(["refresh", "--run-dir", str(trained_run), "--new-ratings", str(bad)]) == 2


def test_new_user_is_unknown_to_the_table_and_uses_the_learned_vector(sparse_graph):
    model = _model(sparse_graph, user_id_dropout=0.1)
    with torch.no_grad():
        model.encoder.unknown_user.fill_(0.5)
    n_id = {"user": torch.tensor([0, sparse_graph.num_users + 3]), "movie": torch.arange(2)}
    x = model.encoder.input_features(n_id, sparse_graph.movie_x[:2])
    assert torch.equal(x["user"][1], torch.full((16,), 0.5))
    assert torch.equal(x["user"][0], model.encoder.user_emb.weight[0])
    no_dropout = _model(sparse_graph, user_id_dropout=0.0)
    assert no_dropout.encoder.unknown_user is None  # falls back to the table mean
    x = no_dropout.encoder.input_features(n_id, sparse_graph.movie_x[:2])
    torch.testing.assert_close(x["user"][1], no_dropout.encoder.user_emb.weight.mean(0))


def test_user_id_dropout_trains_the_unknown_vector(tiny_shards):
    from scalable_rec.graph import split_edges
    from scalable_rec.graph.hetero import SplitConfig
    from scalable_rec.train import TrainConfig
    from scalable_rec.train.loop import build_job, training_loss

    graph = RatingGraph.from_shards(tiny_shards)
    job = build_job(
        graph,
        split_edges(graph, SplitConfig()),
        ModelConfig(hidden=16, user_id_dropout=0.5),
        TrainConfig(batch_size=64, progress=False, device="cpu"),
        tiny_shards.directory.parent / "j",
        None,
    )
    job.model.train()
    loss, _, _ = training_loss(job, next(iter(job.train_loader)))
    loss.backward()
    assert job.model.encoder.unknown_user.grad is not None and job.model.encoder.unknown_user.grad.abs().sum() > 0
    assert job.model.decoder.unknown_bias.grad is not None


def test_user_id_dropout_is_validated():
    with pytest.raises(ValueError, match="'user_id_dropout' needs to be in \\[0, 1\\) \\(got 1.5\\)"):
        ModelConfig(user_id_dropout=1.5)


def test_refresh_into_arango_replaces_exactly_the_refreshed_users(
    trained_run, tiny_shards, tmp_path, arango_endpoint, monkeypatch
):
    from scalable_rec.connection import ENV_DATABASE, ENV_PASSWORD, ENV_URL, ENV_USER, ArangoConfig, connect

    for var, value in (
        (ENV_URL, arango_endpoint.url),
        (ENV_DATABASE, arango_endpoint.database),
        (ENV_USER, arango_endpoint.username),
        (ENV_PASSWORD, arango_endpoint.password),
    ):
        monkeypatch.setenv(var, value)
    assert cli.main(["score", "--run-dir", str(trained_run), "--sink", "arango", "--k", str(K)]) == 0
    db = connect(ArangoConfig().settings())
    query = "FOR v IN @@c RETURN [v._from, v._to, v.score, v.rank, v.run_id]"

    def by_user() -> dict:
        out: dict = {}
        for row in db.aql.execute(query, bind_vars={"@c": "Recommendation_Inferences"}):
            out.setdefault(row[0], set()).add(tuple(row[1:]))
        return out

    before = by_user()
    graph = RatingGraph.from_shards(tiny_shards)
    users, movies = graph.user_keys.to_pylist(), graph.movie_keys.to_pylist()
    new = tmp_path / "new.csv"
    _write_ratings(new, [[users[0], movies[1], 4.5, 1], [NEW_USER, movies[3], 5.0, 3]])
    assert (
        cli.main(
            ["refresh", "--run-dir", str(trained_run), "--new-ratings", str(new), "--k", str(K), "--sink", "arango"]
        )
        == 0
    )
    report = json.loads((trained_run / "refresh" / "last_report.json").read_text())
    after = by_user()
    changed = {u for u in after if after[u] != before.get(u)}
    assert len(changed) == report["replaced_users"] == report["written"]["users"]
    assert f"Users/{NEW_USER}" in changed and all(len(after[u]) == K for u in after)
    assert all({r[-1] for r in after[u]} == {report["written"]["run_id"]} for u in changed)


@pytest.mark.parametrize("rating_messages", ["none", "relation", "gcmc", "scale", "center"])
def test_bounded_incremental_mean_matches_full_aggregate_at_layer_one(sparse_graph, rating_messages):
    """Layer-1 inputs of existing nodes do not change, so the incremental mean update of
    the endpoints' first-layer aggregates (one per rating relation) must equal a full
    recomputation."""
    from scalable_rec.score.incremental import Encoded, bounded_update

    model = _model(sparse_graph, num_layers=2, rating_messages=rating_messages)
    state = initial_state(model, sparse_graph, K, 10, 1, "sha")
    src, dst, rating, _ = _new_edges(sparse_graph, 0, new_users=2)
    extra = {"src": src, "dst": dst, "rating": rating, "timestamp": src * 0}
    edges = edge_list(sparse_graph, extra, 2)
    enc = bounded_update(
        model, edges, sparse_graph.movie_x, Encoded(state.layers, state.aggs, state.degree), src, dst, rating
    )
    full = encode_layers(model, edges, sparse_graph.movie_x)
    for t, rows in (("user", src.unique()), ("movie", dst.unique())):
        torch.testing.assert_close(enc.aggs[0][t][rows], full.aggs[0][t][rows], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(enc.layers[0][t][rows], full.layers[0][t][rows], rtol=1e-5, atol=1e-6)
    assert set(enc.degree) == set(full.degree)
    for key in full.degree:  # with center each user's rating sum too
        assert torch.equal(enc.degree[key], full.degree[key]), key


@pytest.mark.parametrize("shuffled", [False, True])
def test_rated_subset_by_binary_search_equals_the_scan(shuffled):
    """User-sorted edges are sliced by binary search (few users), unsorted ones scanned;
    both give every rated movie of exactly the asked users, extra (folded) edges too."""
    from scalable_rec.refresh import _rated_subset
    from scalable_rec.score.incremental import EdgeList

    gen = torch.Generator().manual_seed(0)
    src = torch.sort(torch.randint(0, 300, (5000,), generator=gen)).values
    dst = torch.randint(0, 400, (5000,), generator=gen)
    if shuffled:
        perm = torch.randperm(5000, generator=gen)
        src, dst = src[perm], dst[perm]
    extra_src, extra_dst = torch.tensor([7, 299, 7]), torch.tensor([1, 2, 3])
    edges = EdgeList(src, dst, 300, 400, extra_src, extra_dst)
    users = torch.tensor([299, 0, 7, 150])
    scores = torch.zeros(users.numel(), 400)
    _rated_subset(edges, users).mask_(scores, torch.arange(users.numel()))
    expected = torch.zeros(users.numel(), 400)
    for i, u in enumerate(users.tolist()):
        rated = torch.cat([dst[src == u], extra_dst[extra_src == u]])
        expected[i, rated] = float("-inf")
    assert torch.equal(scores, expected) and (scores == float("-inf")).sum() > 20


@pytest.mark.parametrize("mode", ["exact", "bounded"])
def test_refresh_reaches_a_cold_movie_by_messages_with_its_features_only_input(sparse_graph, mode):
    """A movie without a trained row that gets its first ratings in a refresh: the state
    equals a full encode of the updated graph (exact), its input stays features-only (its
    untrained row has no effect), and the new messages change its embedding."""
    cold = 5
    model = _model(sparse_graph)
    with torch.no_grad():
        model.encoder.movie_trained[cold] = 0
    state = initial_state(model, sparse_graph, K, 10, 1, "sha")
    before = state.layers[-1]["movie"][cold].clone()
    src, dst = torch.tensor([0, 1, 2]), torch.full((3,), cold)
    apply_edges(
        model,
        sparse_graph,
        state,
        src,
        dst,
        torch.full((3,), 5.0),
        torch.zeros(3, dtype=torch.long),
        [],
        mode,
        memory_mb=1,
    )
    after = state.layers[-1]["movie"][cold].clone()
    assert not torch.allclose(after, before)
    with torch.no_grad():  # a different untrained row: the same states
        model.encoder.movie_emb.weight[cold] += 10.0
    again = initial_state(model, sparse_graph, K, 10, 1, "sha")
    apply_edges(
        model,
        sparse_graph,
        again,
        src,
        dst,
        torch.full((3,), 5.0),
        torch.zeros(3, dtype=torch.long),
        [],
        mode,
        memory_mb=1,
    )
    torch.testing.assert_close(again.layers[-1]["movie"][cold], after)
    if mode == "exact":
        full = initial_state(model, sparse_graph, K, 10, 1, "sha", state.extra)
        torch.testing.assert_close(full.layers[-1]["movie"][cold], after)


def test_parquet_is_on_disk_before_its_name_points_at_it(tmp_path, monkeypatch):
    """``write_parquet`` fsyncs the temporary file before the rename: the refresh state,
    fsynced after it, must never describe recommendations a power loss can take back."""
    import os

    import pyarrow as pa

    from scalable_rec.sink import parquet

    events, real_fsync, real_replace = [], os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.fspath(src)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    out = tmp_path / "recommendations.parquet"
    assert parquet.write_parquet([pa.record_batch([pa.array([1, 2])], names=["user_key"])], out) == 2
    renamed = [path for what, path in events if what == "replace"]
    assert len(renamed) == 1 and events.index(("fsync", renamed[0])) < events.index(("replace", renamed[0]))
    assert pq.read_table(out).num_rows == 2


def _refresh_fails(argv: list[str], caplog, match: str) -> None:
    caplog.clear()
    assert cli.main(["refresh", *argv]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "\n" not in errors[0] and match in errors[0], errors
    assert "Traceback" not in caplog.text


def test_refresh_keeps_the_parquets_k_refuses_what_it_ignores_and_waits_for_no_lock(
    trained_run, tiny_shards, tmp_path, caplog
):
    import fcntl

    from scalable_rec.locking import lock_path

    graph = RatingGraph.from_shards(tiny_shards)
    new = tmp_path / "new.csv"
    _write_ratings(new, [[NEW_USER, graph.movie_keys[3].as_py(), 5.0, 3]])
    run = ["--run-dir", str(trained_run), "--new-ratings", str(new)]
    out = trained_run / "recommendations.parquet"
    before = out.read_bytes()
    _refresh_fails([*run, "--score-device", "cuda"], caplog, "does not take --score-device")
    _refresh_fails([*run, "--no-exclude-rated"], caplog, "--exclude-rated/--no-exclude-rated")
    _refresh_fails([*run, "--k", str(K + 2)], caplog, f"differs from the k={K}")
    with open(lock_path(trained_run), "a") as held:  # another command (a 'score') holds the run directory
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        _refresh_fails(run, caplog, "is in use by pid")
        fcntl.flock(held, fcntl.LOCK_UN)
    assert out.read_bytes() == before and not (trained_run / "refresh").exists()
    assert cli.main(["refresh", *run]) == 0  # no --k: the Parquet's (5), not the default 10
    table = pq.read_table(out)
    assert table.schema.metadata[b"k"] == str(K).encode()
    rows = _rows_by_user(table)
    assert len(rows[NEW_USER]) == K and max(len(r) for r in rows.values()) == K


def test_refresh_runs_scores_checks_and_clamps_to_the_runs_rating_range(trained_run, tiny_shards, tmp_path, caplog):
    import shutil

    from scalable_rec.source.synthetic import SyntheticSource

    graph = RatingGraph.from_shards(tiny_shards)
    new = tmp_path / "new.csv"
    movies = graph.movie_keys.to_pylist()
    _write_ratings(new, [[NEW_USER, movies[3], 1.5, 3], [NEW_USER, movies[4], 2, 4]])
    run = ["--run-dir", str(trained_run), "--new-ratings", str(new)]
    metrics_path = trained_run / "metrics.json"
    finished = metrics_path.read_text()
    metrics_path.write_text(json.dumps({**json.loads(finished), "interrupted": True, "interrupted_by": "SIGTERM"}))
    _refresh_fails(run, caplog, "Refusing to refresh")
    metrics_path.write_text(finished)
    # shards that changed since training: node indices would name other users and movies
    shards = tmp_path / "shards"
    shutil.copytree(tiny_shards.directory, shards)
    config_path = trained_run / "config.json"
    config = json.loads(config_path.read_text())
    config["data"]["shards"] = str(shards)
    config_path.write_text(json.dumps(config))
    write_rating_shards(SyntheticSource.preset("tiny", seed=1), str(shards), SkipReport(), overwrite=True)
    _refresh_fails(run, caplog, "not the ones the model")
    shutil.rmtree(shards)
    shutil.copytree(tiny_shards.directory, shards)
    # a run on a 1-2 scale: predictions are clamped to it, not to MovieLens' 0.5-5
    config["data"]["rating_min"], config["data"]["rating_max"] = 1.0, 2.0
    config_path.write_text(json.dumps(config))
    assert cli.main(["refresh", *run]) == 0
    predicted = [r[-1] for r in _rows_by_user(pq.read_table(trained_run / "recommendations.parquet"))[NEW_USER]]
    assert len(predicted) == K and all(1.0 <= p <= 2.0 for p in predicted), predicted
