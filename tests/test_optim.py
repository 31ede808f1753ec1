"""Row-wise Adagrad, sparse embedding tables and the combined optimiser (train/optim.py)."""

import math

import pytest
import torch
from quick_train import quick_cfg as _cfg

from scalable_rec.graph import RATES
from scalable_rec.model.recommender import Recommender
from scalable_rec.train import ModelConfig, train
from scalable_rec.train import checkpoint as ckpt
from scalable_rec.train.loop import make_optimizer
from scalable_rec.train.optim import CombinedOptimizer, RowWiseAdagrad, embedding_tables


def test_rowwise_adagrad_matches_a_hand_computation_and_keeps_one_float_per_row():
    table = torch.nn.Embedding(6, 3, sparse=True)
    with torch.no_grad():
        table.weight.copy_(torch.arange(18.0).view(6, 3) / 10)
    before = table.weight.detach().clone()
    opt = RowWiseAdagrad([table.weight], lr=0.5, eps=1e-8, initial_accumulator_value=0.1)
    rows = torch.tensor([1, 4, 1])  # row 1 twice: its gradient sums
    coef = torch.tensor([[1.0, 2.0, 3.0], [0.5, 0.0, -1.0], [1.0, 0.0, 0.0]])
    for _ in range(2):
        opt.zero_grad()
        (table(rows) * coef).sum().backward()
        assert table.weight.grad.is_sparse
        opt.step()
    assert opt.state[table.weight]["sum"].shape == (6,)  # O(rows), not O(rows × dim)
    g1, g4 = torch.tensor([2.0, 2.0, 3.0]), torch.tensor([0.5, 0.0, -1.0])
    want = before.clone()
    s1 = s4 = 0.1
    for _ in range(2):  # the gradient is the same each step (linear loss)
        s1 += float(g1.pow(2).mean())
        s4 += float(g4.pow(2).mean())
        want[1] -= 0.5 * g1 / (math.sqrt(s1) + 1e-8)
        want[4] -= 0.5 * g4 / (math.sqrt(s4) + 1e-8)
    torch.testing.assert_close(table.weight.detach(), want)
    untouched = [0, 2, 3, 5]
    assert torch.equal(table.weight.detach()[untouched], before[untouched])
    assert opt.state[table.weight]["sum"][untouched].eq(0.1).all()


def test_rowwise_adagrad_takes_dense_gradients_the_same_way():
    a = torch.nn.Embedding(5, 2, sparse=True)
    b = torch.nn.Embedding(5, 2)
    b.weight.data.copy_(a.weight.data)
    oa, ob = RowWiseAdagrad([a.weight], lr=0.1), RowWiseAdagrad([b.weight], lr=0.1)
    idx = torch.tensor([0, 3, 3])
    for emb, opt in ((a, oa), (b, ob)):
        emb(idx).pow(2).sum().backward()
        opt.step()
    torch.testing.assert_close(a.weight, b.weight)


def test_rowwise_tables_get_sparse_gradients_only_and_the_rest_adamw(small):
    g, split = small
    torch.manual_seed(0)
    model = Recommender(g.num_users, g.num_movies, g.movie_x.size(1), ModelConfig(hidden=8))
    opt = make_optimizer(model, _cfg(table_optimizer="rowwise_adagrad"))
    assert isinstance(opt, CombinedOptimizer)
    tables = {id(m.weight) for m in embedding_tables(model)}
    assert len(tables) == 7  # user/movie ID embeddings, biases, retrieval ID vectors, movie ranking bias
    from scalable_rec.dist import DistEnv
    from scalable_rec.train.batches import SupervisionEdges, make_loader

    cfg = _cfg()
    edges = SupervisionEdges(g.src, g.dst, g.rating, split.train)
    loader, _ = make_loader(
        g.hetero_data(split.train), edges, cfg, 256, DistEnv(), shuffle=False, device=torch.device("cpu")
    )
    batch = next(iter(loader))
    pred, rank = model(batch)
    loss = (pred - batch[RATES].edge_label[:, 0]).pow(2).mean() + (rank[0] * rank[1]).sum()
    loss.backward()
    for name, p in model.named_parameters():
        if id(p) in tables:
            assert p.grad is not None and p.grad.is_sparse, f"{name}: expected a sparse gradient"
            # only the batch's rows: far fewer than the table's
            assert p.grad.coalesce().indices().numel() < p.size(0), name
        elif p.grad is not None:
            assert not p.grad.is_sparse, name
    before = model.encoder.user_emb.weight.detach().clone()
    opt.step()
    state = opt.optimizers["tables"].state
    for p in (m.weight for m in embedding_tables(model)):
        assert state[p]["sum"].numel() == p.size(0)  # one float per row
    assert all(id(p) not in tables for p in opt.optimizers["dense"].state)  # no Adam moments of a table
    moved = (model.encoder.user_emb.weight.detach() != before).any(1)
    assert 0 < int(moved.sum()) < g.num_users  # only rows the batch looked up moved


def test_auto_switches_to_rowwise_tables_by_size(small):
    g, _ = small
    rows = g.num_users + g.num_movies

    def built(**kw):
        model = Recommender(g.num_users, g.num_movies, g.movie_x.size(1), ModelConfig(hidden=8))
        return make_optimizer(model, _cfg(**kw)), model

    opt, model = built(sparse_tables_min_rows=rows)
    assert isinstance(opt, CombinedOptimizer) and model.encoder.user_emb.sparse
    opt, model = built(sparse_tables_min_rows=rows + 1)
    assert isinstance(opt, torch.optim.AdamW) and not model.encoder.user_emb.sparse
    opt, _ = built(table_optimizer="adamw", sparse_tables_min_rows=0)
    assert isinstance(opt, torch.optim.AdamW)
    with pytest.raises(ValueError, match="table_optimizer"):
        _cfg(table_optimizer="sgd")
    with pytest.raises(ValueError, match="val_memory_mb"):
        _cfg(val_memory_mb=0)


def test_rowwise_training_learns_and_resumes_exactly(small, tmp_path):
    g, split = small
    cfg = dict(epochs=2, table_optimizer="rowwise_adagrad", table_lr=0.05, select_metric="rmse")
    model_cfg = ModelConfig(hidden=16, dropout=0.0)
    full = train(g, split, model_cfg, _cfg(**cfg), tmp_path / "full")
    mean_rmse = float((g.rating[split.val] - g.rating[split.train].mean()).pow(2).mean().sqrt())
    assert full.best_val_rmse < mean_rmse - 0.05  # it learns
    state = ckpt.load(tmp_path / "full" / "last.pt")
    assert set(state["optimizer"]) == {"dense", "tables"}
    train(g, split, model_cfg, _cfg(**{**cfg, "epochs": 1}), tmp_path / "half")
    resumed = train(g, split, model_cfg, _cfg(**cfg, resume=True), tmp_path / "half")
    a, b = ckpt.load(tmp_path / "full" / "last.pt")["model"], ckpt.load(tmp_path / "half" / "last.pt")["model"]
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=name)
    assert resumed.history[-1]["val_rmse"] == pytest.approx(full.history[-1]["val_rmse"], abs=1e-6)
    # a checkpoint of the dense optimiser does not load into the row-wise one
    with pytest.raises(ValueError, match="table_optimizer"):
        CombinedOptimizer(
            {
                "dense": torch.optim.AdamW([torch.zeros(1, requires_grad=True)]),
                "tables": RowWiseAdagrad([torch.zeros(2, 2, requires_grad=True)]),
            }
        ).load_state_dict({"state": {}, "param_groups": []})
