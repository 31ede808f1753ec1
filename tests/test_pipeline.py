"""End to end: shards → train → evaluate → full-catalog top-K → Parquet."""

import json
import math

import pyarrow.parquet as pq
import pytest
import torch

from scalable_rec import pipeline
from scalable_rec.config import DataConfig, RunConfig
from scalable_rec.errors import ShardError
from scalable_rec.graph import features as feat
from scalable_rec.shards import Manifest
from scalable_rec.train import ModelConfig, TrainConfig


def _check_recommendations(run_dir, shards, k):
    table = pq.read_table(run_dir / "recommendations.parquet")
    assert table.column_names == ["user_key", "movie_key", "score", "rank", "predicted_rating"]
    predicted = table.column("predicted_rating").to_pylist()
    assert min(predicted) >= 0.5 and max(predicted) <= 5.0
    users = shards.nodes("user").column("key").to_pylist()
    movies = shards.nodes("movie").column("key").to_pylist()
    edges = shards.edges("user", "rates", "movie")
    rated = {(users[s], movies[d]) for s, d in zip(edges.column("src").to_pylist(), edges.column("dst").to_pylist())}
    per_user = {}
    for row in table.to_pylist():
        per_user.setdefault(row["user_key"], []).append(row)
    # every user with an unrated movie gets min(k, unrated) of them (a synthetic user can
    # rate the whole catalogue)
    unrated = {u: len(movies) - sum(1 for (ru, _) in rated if ru == u) for u in users}
    assert set(per_user) == {u for u in users if unrated[u]}
    for user, rows in per_user.items():
        assert [r["rank"] for r in rows] == list(range(1, min(k, unrated[user]) + 1))
        assert len({r["movie_key"] for r in rows}) == min(k, unrated[user])
        scores = [r["score"] for r in rows]
        assert scores == sorted(scores, reverse=True) and all(math.isfinite(s) for s in scores)
        assert not any((user, r["movie_key"]) in rated for r in rows), f"user {user} got a rated movie"
    return table


def _check_metrics(run_dir):
    metrics = json.loads((run_dir / "metrics.json").read_text())
    test = metrics["test"]
    for value in (
        test["rmse"],
        test["mae"],
        test["model"]["recall@10"],
        test["model"]["ndcg@10"],
        test["popularity"]["recall@10"],
    ):
        assert math.isfinite(value)
    assert metrics["history"] and all(math.isfinite(h["val_rmse"]) for h in metrics["history"])
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["train"]["epochs"] == metrics["history"][-1]["epoch"] + 1 or metrics["stopped_early"]
    return metrics


def test_tiny_synthetic_end_to_end(tiny_shards, tmp_path):
    cfg = RunConfig(
        data=DataConfig(shards=str(tiny_shards.directory), workdir=str(tmp_path)),
        model=ModelConfig(hidden=16),
        train=TrainConfig(epochs=2, batch_size=64, progress=False),
        run_dir=str(tmp_path / "run"),
    )
    pipeline.train_stage(cfg)
    pipeline.score_stage(cfg, cfg.run_dir)
    run_dir = tmp_path / "run"
    _check_recommendations(run_dir, tiny_shards, k=10)
    _check_metrics(run_dir)
    assert (run_dir / "best.pt").is_file() and (run_dir / "curves.png").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("decoder", ["dot", "mlp"])
def test_movielens_short_schedule_end_to_end(movielens_run_config, tmp_path, decoder):
    cfg = RunConfig.from_json(movielens_run_config.to_json())
    cfg.model = ModelConfig(decoder=decoder)
    # raw weights: after 2 epochs (80 steps) a 0.99 moving average still holds much of the init
    cfg.train = TrainConfig(epochs=2, progress=False, ema_decay=0.0)
    cfg.run_dir = str(tmp_path / "run")
    metrics = pipeline.run(cfg)
    run_dir = tmp_path / "run"
    shards = pipeline.GraphShards(cfg.data.shards_dir())
    table = _check_recommendations(run_dir, shards, k=10)
    assert table.num_rows == 671 * 10
    metrics = _check_metrics(run_dir)
    assert metrics["test"]["rmse"] < 1.0  # far better than the article's full-batch model (1.10)
    assert metrics["test"]["test_edges"] == 10_000


def test_second_prepare_reuses_shards_and_features(movielens_run_config, monkeypatch):
    cfg = movielens_run_config
    before = Manifest.load(cfg.data.shards_dir())
    monkeypatch.setattr(feat, "embed_titles", lambda *a: pytest.fail("features were re-encoded"))
    pipeline.prepare(cfg)
    after = Manifest.load(cfg.data.shards_dir())
    assert after.created_at == before.created_at and after.fingerprint == before.fingerprint


def test_prepare_detects_corrupted_shard(tmp_path):
    d = tmp_path / "ml"
    d.mkdir()
    (d / "movies.csv").write_text("movieId,title,genres\n1,A (1990),Drama\n2,B (1991),Comedy\n")
    (d / "ratings.csv").write_text("userId,movieId,rating,timestamp\n1,1,4.5,1\n2,2,3.0,2\n")
    cfg = RunConfig(data=DataConfig(data=str(d), workdir=str(tmp_path / "w")))
    pipeline.prepare(cfg)
    victim = next((cfg.data.shards_dir() / "edges").rglob("part-*.arrow"))
    data = bytearray(victim.read_bytes())
    data[-40] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=victim.name):
        pipeline.prepare(cfg)


def test_store_backend_trains_evaluates_and_scores_like_memory(tiny_shards, tmp_path):
    """``--graph-backend store``: mapped graph index for train, layer-wise evaluate and score."""
    import shutil

    from scalable_rec.graph.store import StoreConfig

    shards_dir = tmp_path / "shards"
    shutil.copytree(tiny_shards.directory, shards_dir)
    results = {}
    for backend in ("auto", "store"):  # auto: 500 edges stay in memory
        cfg = RunConfig(
            data=DataConfig(shards=str(shards_dir), workdir=str(tmp_path)),
            model=ModelConfig(hidden=16, dropout=0.0, user_id_dropout=0.0, movie_id_dropout=0.0),
            train=TrainConfig(epochs=2, batch_size=64, num_neighbors=[-1, -1], progress=False),
            store=StoreConfig(graph_backend=backend),
            run_dir=str(tmp_path / backend),
        )
        metrics = pipeline.train_stage(cfg)
        assert (shards_dir / "index").exists() == (backend == "store")  # built on first use
        pipeline.score_stage(cfg, cfg.run_dir)
        table = pq.read_table(tmp_path / backend / "recommendations.parquet")
        results[backend] = metrics, table
        _check_recommendations(tmp_path / backend, pipeline.GraphShards(shards_dir), k=10)
    (m_mem, t_mem), (m_store, t_store) = results["auto"], results["store"]
    assert m_store["test"]["rmse"] == pytest.approx(m_mem["test"]["rmse"], abs=1e-5)
    assert m_store["test"]["model"]["ndcg@10"] == pytest.approx(m_mem["test"]["model"]["ndcg@10"], abs=1e-4)
    assert t_store.column("score").to_pylist() == pytest.approx(t_mem.column("score").to_pylist(), abs=1e-4)


def test_refit_trains_on_training_and_validation_edges_with_either_backend(tiny_shards, tmp_path, monkeypatch):
    """``TrainConfig.refit``: validation edges supervise and pass messages (the mapped index's
    'seen' CSC on the store path), test edges stay out, nothing is validated."""
    import shutil

    from scalable_rec.graph import split_edges
    from scalable_rec.graph.store import StoreConfig

    shards_dir = tmp_path / "shards"
    shutil.copytree(tiny_shards.directory, shards_dir)
    seen_splits, trained = [], pipeline.train

    def spy(graph, split, *args, **kwargs):
        seen_splits.append((graph, split))
        return trained(graph, split, *args, **kwargs)

    monkeypatch.setattr(pipeline, "train", spy)
    results = {}
    for backend in ("auto", "store"):
        cfg = RunConfig(
            data=DataConfig(shards=str(shards_dir), workdir=str(tmp_path)),
            model=ModelConfig(hidden=16, dropout=0.0, user_id_dropout=0.0, movie_id_dropout=0.0),
            train=TrainConfig(
                epochs=2,
                batch_size=64,
                num_neighbors=[-1, -1],
                progress=False,
                refit=True,
                select_metric="last",
                patience=1,
            ),
            store=StoreConfig(graph_backend=backend),
            run_dir=str(tmp_path / backend),
        )
        results[backend] = pipeline.train_stage(cfg)
        assert len(results[backend]["history"]) == 2  # no early stop: nothing to select by
    graph, split = seen_splits[0]
    usual = split_edges(graph, RunConfig().split)
    assert sorted(split.train.tolist()) == sorted(torch.cat([usual.train, usual.val]).tolist())
    assert split.val.numel() == 0 and torch.equal(split.test, usual.test)
    # the store path passed messages over the same edges as the in-memory graph did
    m_mem, m_store = results["auto"]["test"], results["store"]["test"]
    assert m_store["rmse"] == pytest.approx(m_mem["rmse"], abs=1e-5)
    assert m_store["model"]["ndcg@10"] == pytest.approx(m_mem["model"]["ndcg@10"], abs=1e-4)
    with pytest.raises(ValueError, match="'refit' needs whole epochs"):
        TrainConfig(refit=True, max_steps=10)


def test_refit_flag_selects_on_validation_then_refits_for_the_chosen_epochs(tiny_shards, tmp_path):
    """``train --refit``: a selecting run in ``select/``, then the refit in the run directory
    for best.pt's epoch + 1 epochs, which is what 'score' reads."""
    from scalable_rec.train import checkpoint as ckpt

    cfg = RunConfig(
        data=DataConfig(shards=str(tiny_shards.directory), workdir=str(tmp_path)),
        model=ModelConfig(hidden=16),
        train=TrainConfig(
            epochs=6, patience=2, lr=0.003, batch_size=64, num_neighbors=[5, 5], progress=False, refit=True
        ),
        run_dir=str(tmp_path / "run"),
    )
    metrics = pipeline.train_stage(cfg)
    run = tmp_path / "run"
    chosen = ckpt.load(run / "select" / "best.pt")["epoch"] + 1
    assert metrics["selection"]["epochs"] == chosen and metrics["selection"]["select_metric"] == "recall"
    assert len(metrics["history"]) == chosen  # every chosen epoch, none validated, no early stop
    assert all(math.isnan(r["val_rmse"]) for r in metrics["history"])
    # the test split is evaluated once, on the refit model; the selecting run records none
    assert math.isfinite(metrics["test"]["rmse"]) and "test" not in metrics["selection"]
    assert "test" not in json.loads((run / "select" / "metrics.json").read_text())
    saved = RunConfig.load(run / "config.json")
    assert saved.train.refitting() and saved.train.epochs == chosen
    assert ckpt.load(run / "best.pt")["epoch"] == chosen - 1
    pipeline.score_stage(cfg, run)
    assert (run / "recommendations.parquet").is_file()
