import math

import pytest
import torch

from scalable_rec.errors import CheckpointError
from scalable_rec.graph import RatingGraph, SplitConfig, split_edges
from scalable_rec.train import ModelConfig, TrainConfig, train
from scalable_rec.train import checkpoint as ckpt
from scalable_rec.train.losses import rating_class_weights


@pytest.fixture(scope="module")
def small(small_shards):
    g = RatingGraph.from_shards(small_shards)
    return g, split_edges(g, SplitConfig())


def _cfg(**kw):
    base = dict(epochs=2, batch_size=1024, num_neighbors=[5, 3], progress=False, patience=5)
    return TrainConfig(**{**base, **kw})


def test_training_learns_signal_and_writes_checkpoints(small, tmp_path):
    g, split = small
    result = train(g, split, ModelConfig(hidden=32), _cfg(epochs=3), tmp_path)
    h = result.history
    assert len(h) == 3 and all(math.isfinite(r["val_rmse"]) for r in h)
    assert h[-1]["train_rmse"] < h[0]["train_rmse"]
    # beats predicting the training mean everywhere
    mean_rmse = float((g.rating[split.val] - g.rating[split.train].mean()).pow(2).mean().sqrt())
    assert result.best_val_rmse < mean_rmse - 0.05
    assert (tmp_path / "best.pt").is_file() and (tmp_path / "last.pt").is_file()
    state = ckpt.load(tmp_path / "last.pt")
    assert state["epoch"] == 3 and state["config"]["train"]["epochs"] == 3


def test_bf16_autocast_runs_on_cpu(small, tmp_path):
    g, split = small
    result = train(g, split, ModelConfig(hidden=16), _cfg(epochs=1, precision="bf16"), tmp_path)
    assert math.isfinite(result.best_val_rmse)


def test_fp16_needs_cuda(small, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CUDA present: fp16 is covered by tests/test_cuda.py")
    g, split = small
    with pytest.raises(ValueError, match="fp16 needs CUDA"):
        train(g, split, ModelConfig(), _cfg(precision="fp16"), tmp_path)


def test_early_stopping(small, tmp_path):
    g, split = small
    result = train(g, split, ModelConfig(hidden=8), _cfg(epochs=50, patience=1, lr=0.05), tmp_path)
    assert result.stopped_early and len(result.history) < 50


def test_in_batch_softmax_loss_masks_repeated_movies_and_pads():
    from scalable_rec.train.losses import in_batch_softmax_loss
    ru = torch.tensor([[5.0, 0.0], [0.0, 5.0], [5.0, 0.0]])
    rm = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    movies = torch.tensor([7, 8, 7])  # rows 0 and 2 share a movie: not each other's negative
    log_q = torch.zeros(10)
    loss = in_batch_softmax_loss(ru, rm, movies, movies, log_q, torch.ones(3))
    assert loss.item() < 0.01
    padded = in_batch_softmax_loss(ru, rm, movies, movies, log_q, torch.tensor([1.0, 1.0, 0.0]))
    # a pad row (weight 0) adds nothing: same as dropping the row but keeping its column
    assert padded.item() == pytest.approx(
        in_batch_softmax_loss(ru[:2], rm, movies[:2], movies, log_q, torch.ones(2)).item(), abs=1e-6)
    # logQ correction: a popular negative is penalised less
    popular = torch.log(torch.tensor([0.0] * 7 + [0.9, 0.1, 0.0]).clamp(min=1e-9))
    assert in_batch_softmax_loss(ru, rm, movies, movies, popular, torch.ones(3)) != loss
    # with an offset, rows pick their column inside a larger (gathered) batch
    wide = torch.cat([torch.tensor([[0.0, 0.0]]), rm])
    cols = torch.cat([torch.tensor([3]), movies])
    shifted = in_batch_softmax_loss(ru, wide, movies, cols, log_q, torch.ones(3), offset=1)
    assert shifted.item() < 0.05


def test_rating_class_weights_half_stars():
    r = torch.tensor([4.0, 4.0, 4.0, 4.5, 0.5, 0.5])
    w = rating_class_weights(r)
    assert w.mean().item() == pytest.approx(1.0)
    # half-star classes are distinct (4.5 ≠ 4.0) and rarer classes weigh more
    assert w[3] > w[0] and w[4] > w[0] and w[3] == pytest.approx(2 * w[4])


def test_weighted_mse_trains(small, tmp_path):
    g, split = small
    result = train(g, split, ModelConfig(hidden=16), _cfg(epochs=1, loss="weighted_mse"), tmp_path)
    assert math.isfinite(result.best_val_rmse)


def test_train_config_reports_all_problems():
    with pytest.raises(ValueError, match="'epochs' needs to be positive.*'loss'.*'precision'"):
        TrainConfig(epochs=0, loss="hinge", precision="fp8")


def test_checkpoint_is_atomic_and_torn_file_is_reported(tmp_path):
    ckpt.save_atomic({"a": 1}, tmp_path / "x.pt")
    assert ckpt.load(tmp_path / "x.pt") == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["x.pt"]
    (tmp_path / "x.pt").write_bytes((tmp_path / "x.pt").read_bytes()[:10])
    with pytest.raises(CheckpointError, match="x.pt' cannot be read"):
        ckpt.load(tmp_path / "x.pt")


def test_config_mismatch_names_the_fields():
    saved = {"model": {"hidden": 64, "decoder": "dot"}, "train": {"lr": 0.01, "epochs": 5}}
    now = {"model": {"hidden": 32, "decoder": "dot"}, "train": {"lr": 0.01, "epochs": 9}}
    with pytest.raises(CheckpointError, match="model.hidden: checkpoint 64 vs now 32"):
        ckpt.check_compatible(saved, now)
    ckpt.check_compatible(saved, {**saved, "train": {"lr": 0.01, "epochs": 9}})  # epochs may change


def test_steps_per_epoch_caps_each_epoch(small, tmp_path):
    g, split = small
    result = train(g, split, ModelConfig(hidden=8), _cfg(epochs=2, steps_per_epoch=3), tmp_path)
    assert [h["steps"] for h in result.history] == [3, 3] and result.global_step == 6
