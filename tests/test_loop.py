import math

import pytest
import torch
from quick_train import quick_cfg as _cfg

from scalable_rec.errors import CheckpointError
from scalable_rec.train import ModelConfig, TrainConfig, train
from scalable_rec.train import checkpoint as ckpt
from scalable_rec.train.losses import rating_class_weights


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


def test_bf16_autocast_learns_like_fp32_on_cpu(small, tmp_path):
    g, split = small
    cfg = dict(epochs=2, select_metric="rmse")
    # no ID dropout: two epochs on the small graph learn too little with IDs hidden
    model = ModelConfig(hidden=16, user_id_dropout=0.0, movie_id_dropout=0.0)
    fp32 = train(g, split, model, _cfg(**cfg), tmp_path / "fp32")
    bf16 = train(g, split, model, _cfg(**cfg, precision="bf16"), tmp_path / "bf16")
    mean_rmse = float((g.rating[split.val] - g.rating[split.train].mean()).pow(2).mean().sqrt())
    assert bf16.best_val_rmse < mean_rmse - 0.05  # it learns
    assert abs(bf16.best_val_rmse - fp32.best_val_rmse) < 0.03, (fp32.best_val_rmse, bf16.best_val_rmse)
    # and it did run in bf16: the parameters differ from the fp32 run's
    assert not torch.equal(bf16.model.encoder.user_emb.weight, fp32.model.encoder.user_emb.weight)


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
        in_batch_softmax_loss(ru[:2], rm, movies[:2], movies, log_q, torch.ones(2)).item(), abs=1e-6
    )
    # logQ correction: logits minus log q of the column's movie. Row 1 (rare movie 8) sees
    # popular movie 7 as its negative, which is discounted: its loss drops; row 0 (popular
    # movie 7) sees rare movie 8 as its negative, which is boosted: its loss rises.
    popular = torch.log(torch.tensor([0.0] * 7 + [0.9, 0.1, 0.0]).clamp(min=1e-9))
    ru1 = ru * 0.2  # keep the logits soft so the change is visible
    row = [torch.tensor(w) for w in ([1.0, 0, 0], [0, 1.0, 0])]
    plain = [in_batch_softmax_loss(ru1, rm, movies, movies, log_q, w).item() for w in row]
    corrected = [in_batch_softmax_loss(ru1, rm, movies, movies, popular, w).item() for w in row]
    assert corrected[1] < plain[1] and corrected[0] > plain[0]
    # and exactly: row 1's logits are [1, 0, 1] (col 2 is row 0's movie again) minus log q
    logits = torch.tensor([0.0, 1.0, 0.0]) - popular[movies]
    expected = torch.logsumexp(logits, 0) - logits[1]
    assert corrected[1] == pytest.approx(expected.item(), rel=1e-5)
    # pad columns (movie id -1) are nobody's negative
    with_pad = in_batch_softmax_loss(
        ru1, torch.cat([rm, torch.tensor([[0.0, 5.0]])]), movies, torch.cat([movies, torch.tensor([-1])]), log_q, row[1]
    )
    assert with_pad.item() == pytest.approx(plain[1], rel=1e-6)
    # with an offset, rows pick their column inside a larger (gathered) batch
    wide = torch.cat([torch.tensor([[0.0, 0.0]]), rm])
    cols = torch.cat([torch.tensor([3]), movies])
    shifted = in_batch_softmax_loss(ru, wide, movies, cols, log_q, torch.ones(3), offset=1)
    assert shifted.item() < 0.05


def test_dislike_rows_push_their_own_movie_down_in_the_same_softmax():
    from scalable_rec.train.losses import in_batch_softmax_loss

    ru = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    rm = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.7, 0.2]], requires_grad=True)
    movies, log_q = torch.tensor([3, 4, 5]), torch.log(torch.tensor([0.1] * 6))
    positive, dislike = torch.tensor([1.0, 1.0, 0.0]), torch.tensor([0.0, 0.0, 0.5])
    plain = in_batch_softmax_loss(ru, rm, movies, movies, log_q, positive)
    both = in_batch_softmax_loss(ru, rm, movies, movies, log_q, positive, dislike=dislike)
    # row 2's own movie (column 2) among the same logQ-corrected logits, times its weight 0.5
    logits = ru[2] @ rm.T - log_q[movies]
    p = torch.softmax(logits, 0)[2]
    assert both.item() == pytest.approx(plain.item() - 0.5 * torch.log1p(-p).item() / 2, rel=1e-5)
    # its gradient lowers that movie's score for that user: the movie vector moves away from ru[2]
    (grad,) = torch.autograd.grad(both - plain, rm)
    assert (grad[2] @ ru[2]).item() > 0  # descent (-grad) lowers ru[2] . rm[2]
    # a row that is neither (weight 0 in both) adds nothing; no dislike tensor: the old loss
    none = in_batch_softmax_loss(ru, rm, movies, movies, log_q, positive, dislike=torch.zeros(3))
    assert none.item() == pytest.approx(plain.item())


def test_rating_class_weights_half_stars():
    r = torch.tensor([4.0, 4.0, 4.0, 4.5, 0.5, 0.5])
    w = rating_class_weights(r)
    assert w.mean().item() == pytest.approx(1.0)
    # half-star classes are distinct (4.5 ≠ 4.0) and rarer classes weigh more
    assert w[3] > w[0] and w[4] > w[0] and w[3] == pytest.approx(2 * w[4])


def test_weighted_mse_pulls_predictions_towards_rare_ratings(small, tmp_path):
    """Class weights make rare (low) ratings count more: validation edges rated ≤ 2 get
    lower predictions than under plain MSE, which shrinks everything towards the mean."""
    g, split = small
    low = split.val[g.rating[split.val] <= 2.0]
    assert low.numel() > 100
    preds = {}
    for loss in ("mse", "weighted_mse"):
        result = train(
            g, split, ModelConfig(hidden=16), _cfg(epochs=2, loss=loss, select_metric="rmse"), tmp_path / loss
        )
        assert result.best_val_rmse < 1.5
        z = result.model.encode_all(g.hetero_data(split.train))
        preds[loss] = result.model.predict_pairs(z, g.src[low], g.dst[low]).mean().item()
    assert preds["weighted_mse"] < preds["mse"] - 0.05, preds


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


@pytest.mark.parametrize("supervision", ["exclude_targets", "disjoint"])
def test_no_target_pair_is_in_its_own_batch_in_either_direction(small, supervision):
    from scalable_rec.dist import DistEnv
    from scalable_rec.graph import RATES, REV_RATES
    from scalable_rec.train.batches import SupervisionEdges, make_loader, supervision_edges

    g, split = small
    cfg = _cfg(supervision=supervision, num_neighbors=[-1, -1])  # all neighbours: every target would be in
    message_ids, target_ids = supervision_edges(split.train, cfg)
    edges = SupervisionEdges(g.src, g.dst, g.rating, target_ids)
    loader, _ = make_loader(
        g.hetero_data(message_ids),
        edges,
        cfg,
        512,
        DistEnv(),
        shuffle=True,
        device=torch.device("cpu"),
        exclude_targets=supervision == "exclude_targets",
    )
    checked = 0
    for step, batch in enumerate(loader):
        users, movies = batch["user"].n_id, batch["movie"].n_id
        u, m = batch[RATES].edge_label_index
        targets = set(zip(users[u].tolist(), movies[m].tolist()))
        fwd = batch[RATES].edge_index
        rev = batch[REV_RATES].edge_index
        forward_pairs = set(zip(users[fwd[0]].tolist(), movies[fwd[1]].tolist()))
        reverse_pairs = set(zip(users[rev[1]].tolist(), movies[rev[0]].tolist()))
        assert forward_pairs and reverse_pairs
        assert not (targets & forward_pairs), f"batch {step}: user→movie target edges in message passing"
        assert not (targets & reverse_pairs), f"batch {step}: movie→user reverse of a target in message passing"
        checked += len(targets)
        if step == 4:
            break
    assert checked > 2000


def test_adamw_leaves_embedding_rows_outside_the_batch_in_place(small, tmp_path):
    from scalable_rec.model.recommender import Recommender
    from scalable_rec.train.loop import make_optimizer

    g, _ = small
    torch.manual_seed(0)
    model = Recommender(g.num_users, g.num_movies, g.movie_x.size(1), ModelConfig(hidden=8))
    opt = make_optimizer(model, _cfg(weight_decay=0.1))
    before = model.encoder.user_emb.weight.detach().clone()
    lin_before = model.encoder.movie_lin.weight.detach().clone()
    seen = torch.tensor([1, 2, 3])
    loss = model.encoder.user_emb(seen).pow(2).sum() + model.encoder.movie_lin.weight.sum() * 0
    loss.backward()
    opt.step()
    after = model.encoder.user_emb.weight.detach()
    assert not torch.equal(after[seen], before[seen])  # rows in the batch moved
    untouched = torch.ones(g.num_users, dtype=torch.bool)
    untouched[seen] = False
    assert torch.equal(after[untouched], before[untouched])  # no decay on rows outside it
    # dense weights are decayed (decoupled: they shrink even with a zero gradient)
    assert model.encoder.movie_lin.weight.abs().sum() < lin_before.abs().sum()


def test_ranking_positives_are_relevant_ratings_weighted_one():
    from scalable_rec.train.losses import in_batch_softmax_loss, ranking_positives

    rating = torch.tensor([0.5, 4.0, 5.0, 3.5, 4.5])
    class_weight = rating_class_weights(rating)  # what weighted_mse puts in the label
    class_weight[4] = 0.0  # a pad
    pos = ranking_positives(rating, class_weight, 4.0)
    assert pos.tolist() == [0.0, 1.0, 1.0, 0.0, 0.0]
    assert ranking_positives(rating, class_weight, 3.5).tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]
    # the loss sees only the relevant rows, each weighing the same whatever its class weight
    torch.manual_seed(0)
    ru, rm = torch.randn(5, 4), torch.randn(5, 4)
    movies = torch.arange(5)
    full = in_batch_softmax_loss(ru, rm, movies, movies, torch.zeros(5), pos)
    ce = torch.nn.functional.cross_entropy(ru @ rm.T, torch.arange(5), reduction="none")
    assert full.item() == pytest.approx(ce[[1, 2]].mean().item(), rel=1e-6)


def test_training_loss_ranking_term_ignores_dislikes_and_class_weights(small, tmp_path):
    import types

    from scalable_rec.dist import DistEnv
    from scalable_rec.graph import RATES
    from scalable_rec.model.recommender import Recommender
    from scalable_rec.train.batches import SupervisionEdges, make_loader
    from scalable_rec.train.loop import training_loss

    g, split = small
    ids = split.train[:256]
    torch.manual_seed(0)
    model = Recommender(
        g.num_users,
        g.num_movies,
        g.movie_x.size(1),  # no dropout: the same forward each call
        ModelConfig(hidden=8, dropout=0.0, user_id_dropout=0.0, movie_id_dropout=0.0),
    )
    cfg = _cfg(num_neighbors=[-1, -1])
    loader, _ = make_loader(
        g.hetero_data(split.train),
        SupervisionEdges(g.src, g.dst, g.rating, ids),
        cfg,
        256,
        DistEnv(),
        shuffle=False,
        device=torch.device("cpu"),
    )
    batch = next(iter(loader))

    def loss(rank_weight, label, dislike_weight=0.0, dislike_below=None):
        batch[RATES].edge_label = label
        # the ranking term alone (without the ranking vectors' L2, which a batch of dislikes pays too)
        job = types.SimpleNamespace(
            autocast=torch.autocast("cpu", enabled=False),
            ddp_model=model,
            model=model,
            cfg=_cfg(
                rank_loss_weight=rank_weight,
                rank_id_l2=0.0,
                rank_dislike_weight=dislike_weight,
                rank_dislike_below=dislike_below,
            ),
            env=DistEnv(),
            log_q=torch.zeros(g.num_movies),
        )
        return training_loss(job, batch)[0].item()

    rating = batch[RATES].edge_label[:, 0].clone()
    ones = torch.ones_like(rating)
    rank_part = loss(1.0, torch.stack([rating, ones], 1)) - loss(0.0, torch.stack([rating, ones], 1))
    assert rank_part > 0
    # weighted_mse-style class weights change the rating loss, not the ranking term
    weighted = torch.stack([rating, rating_class_weights(rating)], 1)
    assert loss(1.0, weighted) - loss(0.0, weighted) == pytest.approx(rank_part, rel=1e-5)
    # only dislikes: no ranking term at all
    dislikes = torch.stack([rating.clamp(max=3.5), ones], 1)
    assert loss(1.0, dislikes) == pytest.approx(loss(0.0, dislikes), rel=1e-6)
    # with rank_dislike_weight, ratings below relevant_min (4.0; or rank_dislike_below) add
    # their push-down term; relevant ratings and pads do not
    labelled = torch.stack([rating, ones], 1)
    assert (rating < 3.0).any() and ((rating >= 3.0) & (rating < 4.0)).any() and (rating >= 4.0).any()
    assert loss(1.0, labelled, dislike_weight=1.0) > loss(1.0, labelled)
    padded = torch.stack([rating, (rating >= 4.0).float()], 1)
    assert loss(1.0, padded, dislike_weight=1.0) == pytest.approx(loss(1.0, padded), rel=1e-6)
    # below 3.0 only: 3.0-3.5 adds nothing
    middling = torch.stack([torch.where(rating < 3.0, 3.0, rating), ones], 1)
    below3 = dict(dislike_weight=1.0, dislike_below=3.0)
    assert loss(1.0, middling, **below3) == pytest.approx(loss(1.0, middling), rel=1e-6)
    assert loss(1.0, labelled, **below3) > loss(1.0, labelled)
    assert loss(1.0, labelled, dislike_weight=1.0) > loss(1.0, labelled, **below3)


def test_dislike_settings_are_checked():
    with pytest.raises(ValueError, match="'rank_dislike_weight' needs to be non-negative"):
        TrainConfig(rank_dislike_weight=-1.0)
    with pytest.raises(ValueError, match="'rank_dislike_below' needs to be at most 'relevant_min' 4.0"):
        TrainConfig(rank_dislike_below=4.5)


def test_validation_runs_like_the_test_and_selects_by_the_configured_metric(small, tmp_path):
    from scalable_rec.score import evaluate_edges

    g, split = small
    # raw weights (no moving average): two epochs of an average stay near the init, whose
    # predictions all lie near the mean, inside any range, so the clamp check below needs them
    # (and no ID dropout, ranking-vector L2, cosine ranking or ranking bias, which leave the
    # 2-epoch predictions inside [3, 4])
    result = train(
        g,
        split,
        ModelConfig(
            hidden=16, user_id_dropout=0.0, movie_id_dropout=0.0, retrieval_temperature=0.0, retrieval_bias=False
        ),
        _cfg(epochs=2, select_metric="recall", ema_decay=0.0, rank_id_l2=0.0),
        tmp_path,
        rating_range=(3.0, 4.0),
    )
    h = result.history
    assert all(0.0 <= r["val_recall@10"] <= 1.0 for r in h)
    best = max(h, key=lambda r: r["val_recall@10"])
    assert result.best_val_recall == pytest.approx(best["val_recall@10"])
    assert ckpt.load(tmp_path / "best.pt")["epoch"] == best["epoch"]
    # the loaded best model, evaluated the way the test is (full neighbourhoods over train),
    # gives the recorded validation numbers, with predictions clamped to the given range
    again = evaluate_edges(result.model, g, split.train, split.val, rating_min=3.0, rating_max=4.0)
    assert again["model"]["recall@10"] == pytest.approx(result.best_val_recall, abs=1e-6)
    assert again["rmse"] == pytest.approx(result.best_val_rmse, abs=1e-6)
    wide = evaluate_edges(result.model, g, split.train, split.val, rating_min=0.5, rating_max=5.0)
    assert wide["rmse"] < again["rmse"] - 0.003  # the bounds are really applied (a narrow range costs)
    from scalable_rec.score import ScoreConfig, recommend

    rated = torch.cat(
        [
            torch.from_numpy(b.column("predicted_rating").to_numpy().copy())
            for b in recommend(result.model, g, ScoreConfig(k=5), rating_range=(3.0, 4.0))
        ]
    )
    assert rated.min() >= 3.0 and rated.max() == 4.0  # clamped to the run's range, not 0.5–5.0


def test_select_last_trains_every_epoch_without_validation_edges_and_keeps_the_last(small, tmp_path):
    """A refit on training + validation edges (``select_metric='last'``) has nothing to
    validate on: it must neither stop early nor select, and ``best.pt`` is the last epoch."""
    from scalable_rec.graph import EdgeSplit

    g, split = small
    both = EdgeSplit(train=torch.cat([split.train, split.val]), val=split.val[:0], test=split.test)
    result = train(g, both, ModelConfig(hidden=8), _cfg(epochs=3, patience=1, select_metric="last"), tmp_path)
    assert [r["epoch"] for r in result.history] == [0, 1, 2] and not result.stopped_early
    assert all(math.isnan(r["val_rmse"]) and math.isnan(r["val_recall@10"]) for r in result.history)
    best = ckpt.load(tmp_path / "best.pt")
    assert best["epoch"] == 2 and best["select_metric"] == "last"
    for name, value in result.model.state_dict().items():
        torch.testing.assert_close(value, best["model"][name])


def test_logq_correction_can_be_switched_off(small, tmp_path):
    from scalable_rec.train.loop import build_job

    g, split = small
    job = build_job(g, split, ModelConfig(hidden=8), _cfg(), tmp_path, None)
    share = torch.bincount(g.dst[split.train], minlength=g.num_movies).float().clamp(min=1) / split.train.numel()
    torch.testing.assert_close(job.log_q, share.log())  # on by default: each movie's log share of the edges
    off = build_job(g, split, ModelConfig(hidden=8), _cfg(logq_correction=False), tmp_path, None)
    assert torch.equal(off.log_q, torch.zeros(g.num_movies))


def test_ema_weights_are_validated_saved_and_returned(small, tmp_path):
    from scalable_rec.score import evaluate_edges

    g, split = small
    # one epoch: best.pt is that epoch's average; last.pt holds the raw weights beside it
    result = train(g, split, ModelConfig(hidden=16), _cfg(epochs=1, ema_decay=0.9), tmp_path)
    last, best = ckpt.load(tmp_path / "last.pt"), ckpt.load(tmp_path / "best.pt")
    assert int(last["ema"]["n_averaged"]) == result.global_step > 1
    got = result.model.state_dict()
    name = "encoder.user_emb.weight"
    assert not torch.equal(got[name], last["model"][name])  # not the raw weights
    for key, value in got.items():
        torch.testing.assert_close(value, last["ema"][f"module.{key}"], rtol=0, atol=0)
        torch.testing.assert_close(value, best["model"][key], rtol=0, atol=0)
    # and the recorded validation numbers are the average's
    again = evaluate_edges(result.model, g, split.train, split.val)
    assert again["rmse"] == pytest.approx(result.best_val_rmse, abs=1e-6)
    assert again["model"]["recall@10"] == pytest.approx(result.best_val_recall, abs=1e-6)
    with pytest.raises(ValueError, match=r"'ema_decay' needs to be in \[0, 1\) \(got 1.0\)"):
        TrainConfig(ema_decay=1.0)


def test_no_moving_average_of_rowwise_sparse_tables(small, tmp_path):
    """A large graph's row-wise tables get no EMA copy (a second dense copy of every table)."""
    from scalable_rec.train.loop import build_job

    g, split = small
    sparse = build_job(
        g,
        split,
        ModelConfig(hidden=8),
        _cfg(ema_decay=0.99, table_optimizer="rowwise_adagrad"),
        tmp_path / "sparse",
        None,
    )
    assert sparse.ema is None and sparse.scored is sparse.model
    dense = build_job(
        g, split, ModelConfig(hidden=8), _cfg(ema_decay=0.99, table_optimizer="adamw"), tmp_path / "dense", None
    )
    assert dense.ema is not None and dense.scored is dense.ema.module


def test_validation_ranks_in_blocks_bounded_by_val_memory_mb(small, tmp_path):
    from scalable_rec.train.loop import build_job, validate

    g, split = small
    job = build_job(g, split, ModelConfig(hidden=8), _cfg(val_memory_mb=1), tmp_path, None)
    blocks = []
    rank_block = job.scored.rank_block  # the model validation scores (the EMA copy by default)

    def recording(z, uid, mid):
        out = rank_block(z, uid, mid)
        blocks.append(out.numel())
        return out

    job.scored.rank_block = recording  # this instance only
    val = validate(job)
    assert math.isfinite(val["recall"]) and len(blocks) > 1
    assert max(blocks) * 4 <= 2**20, f"a score block of {max(blocks) * 4 / 2**20:.1f} MiB (knob: 1 MiB)"


def test_rank_id_l2_shrinks_the_batch_rows_only(small, tmp_path):
    """The ranking vectors' L2 acts on rows a batch uses: trained rows end smaller than
    without it, rows no batch ever held (movies without a training rating) stay as drawn."""
    g, split = small
    split = type(split)(train=split.train[g.dst[split.train] >= 2], val=split.val, test=split.test)
    runs = {}
    for l2 in (0.0, 1.0):
        torch.manual_seed(0)
        # no ID dropout (it hides rows from the forward, and so from the L2) and no ranking bias
        # (it takes over what the ID vectors grew for, leaving the L2 less to shrink: 0.85
        # with it); τ 0.2 as when the 0.8 below was set
        model = ModelConfig(
            hidden=8, user_id_dropout=0.0, movie_id_dropout=0.0, retrieval_temperature=0.2, retrieval_bias=False
        )
        runs[l2] = train(g, split, model, _cfg(rank_id_l2=l2, ema_decay=0.0), tmp_path / str(l2)).model
    trained = torch.bincount(g.dst[split.train], minlength=g.num_movies) > 0
    assert (~trained).any()
    plain, shrunk = (runs[k].retrieval.movie_id.weight.detach() for k in (0.0, 1.0))
    assert shrunk[trained].norm(dim=1).mean() < 0.8 * plain[trained].norm(dim=1).mean()
    assert torch.equal(shrunk[~trained], plain[~trained])
    users = (runs[k].retrieval.user_id.weight.detach() for k in (0.0, 1.0))
    assert next(users).norm() > next(users).norm()


def test_id_sq_norms_are_those_of_the_rows_the_vectors_used():
    """The L2's squared norms come from the forward's own lookups: a user past the table or
    a movie without a trained row (``known`` False: past the table, or cold) adds nothing."""
    from scalable_rec.model.recommender import RetrievalHead

    head = RetrievalHead(2, num_users=2, num_movies=3, id_embeddings=True)
    with torch.no_grad():
        head.user_id.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
        head.movie_id.weight.copy_(torch.tensor([[3.0, 0.0], [0.0, 0.0], [1.0, 1.0]]))
    z = torch.zeros(4, 2)
    known = torch.tensor([True, True, False, False])  # movie_known: 7 is past the table, the last is cold
    ru, rm, sq_u, sq_m = head(z, z, torch.tensor([0, 1, 5, 0]), torch.tensor([0, 2, 7, 0]), known)
    assert sq_u.tolist() == [1.0, 4.0, 0.0, 1.0] and sq_m.tolist() == [9.0, 2.0, 0.0, 0.0]
    assert torch.equal(ru, head.project_user(z, torch.tensor([0, 1, 5, 0])))
    assert torch.equal(rm, head.project_movie(z, torch.tensor([0, 2, 7, 0]), known))


# What reads a tensor's value on the host: on CUDA each of these waits for the device.
HOST_READS = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__")


def _count_host_reads(monkeypatch, host_side: set[int] = frozenset()) -> list[str]:
    """Wraps ``torch.Tensor``'s value-reading methods (pytest's monkeypatch undoes it) and
    returns the list every call appends its name to; tensors whose ``id`` is in
    ``host_side`` live on the CPU by design (not counted)."""
    calls: list[str] = []
    for name in HOST_READS:
        original = getattr(torch.Tensor, name)

        def spy(self, *args, _original=original, _name=name, **kwargs):
            if id(self) not in host_side:
                calls.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, spy)
    return calls


@pytest.mark.parametrize("table_optimizer", ["adamw", "rowwise_adagrad"])
def test_a_training_step_reads_nothing_back_from_the_device(small, tmp_path, monkeypatch, table_optimizer):
    """``train_step`` (loss, backward, optimiser, EMA) reads no tensor value on the host:
    on CUDA the host then never waits for the device inside a step (docs/gpu.md)."""
    from scalable_rec.train.loop import build_job, train_step

    g, split = small
    job = build_job(
        g, split, ModelConfig(hidden=8), _cfg(ema_decay=0.9, table_optimizer=table_optimizer), tmp_path, None
    )
    assert job.ema is not None or table_optimizer == "rowwise_adagrad"
    batches = [b.to(job.device) for _, b in zip(range(4), job.train_loader)]
    train_step(job, batches[0])  # creates the optimiser's state
    # torch keeps a non-fused optimiser's step counters on the CPU (on CUDA too): reading
    # them waits for nothing. The fused optimiser used on CUDA keeps them on the device.
    steps = {id(state["step"]) for state in job.optimizer.state.values() if "step" in state}
    assert steps
    calls = _count_host_reads(monkeypatch, steps)
    for batch in batches[1:]:
        train_step(job, batch)
    assert calls == []


def test_ema_update_is_torchs_averaged_model_bit_for_bit(small, tmp_path):
    """``update_ema`` (no host read of the count) gives exactly what
    ``AveragedModel.update_parameters`` gives, first update (a copy) included."""
    from scalable_rec.train.loop import build_job, train_step

    g, split = small
    job = build_job(g, split, ModelConfig(hidden=8), _cfg(ema_decay=0.9), tmp_path, None)
    reference = torch.optim.swa_utils.AveragedModel(
        job.model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(0.9), use_buffers=False
    )
    for _, batch in zip(range(3), job.train_loader):
        train_step(job, batch)  # updates job.ema through update_ema
        reference.update_parameters(job.model)
    assert job.ema_updates == int(job.ema.n_averaged) == int(reference.n_averaged) == 3
    ours, theirs = job.ema.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
    assert not torch.equal(ours["module.encoder.user_emb.weight"], job.model.encoder.user_emb.weight)
