"""Optimisers of the learnable tables: dense AdamW, or sparse gradients + row-wise Adagrad.

With dense ``AdamW`` every embedding and bias table costs four times its size per rank:
the weights, a dense gradient of every row each step and two moments (plus, under DDP, a
gradient bucket of the same size). ``rowwise_adagrad`` is what TorchRec/FBGEMM train large
embedding tables with (``EXACT_ROWWISE_ADAGRAD``): the tables return sparse gradients (the
batch's rows only, ``nn.Embedding(sparse=True)``) and keep one float of state per row, the
running sum of the row's mean squared gradient. Only the rows a batch touched move.
torch has no row-wise Adagrad (``torch.optim.Adagrad`` keeps one state float per element,
``SparseAdam`` two), so it is written here (``RowWiseAdagrad``); the dense weights stay on
AdamW, and ``CombinedOptimizer`` steps, zeroes and checkpoints both as one.

Under DDP the tables are left out of DDP's reducer (``DistributedDataParallel.
_set_params_and_buffers_to_ignore_for_model``) and their sparse gradients are averaged
by ``all_reduce_sparse_grads_`` (an all-gather of each rank's rows, which every backend
has): with sparse ``nn.Embedding`` gradients inside DDP (torch 2.13, gloo) the dense
parameters' averaged gradients came out halved at two ranks, which
``tests/test_distributed.py`` caught against a single process.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn


class RowWiseAdagrad(torch.optim.Optimizer):
    """Row-wise Adagrad for 2-D tables with sparse (or dense) gradients.

    Per step, for each row ``i`` the gradient touched: ``s_i += mean_j g_ij²`` and
    ``w_i -= lr · g_i / (sqrt(s_i) + eps)``. State: ``sum``, one float per row.

    Args:
        params: 2-D parameters (embedding tables).
        lr: Step size (default 0.01).
        eps: Added to the root of the row sum.
        initial_accumulator_value: Starting value of every row's sum.
    """

    def __init__(self, params, lr: float = 0.01, eps: float = 1e-8, initial_accumulator_value: float = 0.0) -> None:
        if lr <= 0:
            raise ValueError(f"'lr' needs to be positive (got {lr})")
        if eps < 0 or initial_accumulator_value < 0:
            raise ValueError(
                f"'eps' and 'initial_accumulator_value' need to be non-negative "
                f"(got {eps}, {initial_accumulator_value})"
            )
        super().__init__(params, {"lr": lr, "eps": eps, "initial_accumulator_value": initial_accumulator_value})
        # False on a rank whose tables are another rank's node-shared copy (``node_tables``):
        # that rank applies the step, this one only takes part in the gradient all-reduce.
        self.applies = True
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(f"RowWiseAdagrad needs 2-D tables (got a parameter of shape {tuple(p.shape)})")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self.applies:
            return loss
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "sum" not in state:
                    state["sum"] = torch.full(
                        (p.size(0),), group["initial_accumulator_value"], dtype=torch.float32, device=p.device
                    )
                grad = p.grad
                if grad.is_sparse:
                    grad = grad.coalesce()  # one entry per row (a row looked up twice sums)
                    rows, values = grad.indices()[0], grad.values().float()
                else:
                    rows = grad.abs().sum(1).nonzero().squeeze(1)
                    values = grad[rows].float()
                if rows.numel() == 0:
                    continue
                total = state["sum"].index_add_(0, rows, values.pow(2).mean(1))[rows]
                step = values / (total.sqrt() + group["eps"])[:, None]
                p.index_add_(0, rows, step.to(p.dtype), alpha=-group["lr"])
        return loss


class CombinedOptimizer:
    """Several optimisers over disjoint parameters, used as one (``step``, ``zero_grad``,
    ``param_groups`` for ``GradScaler``, ``state_dict``/``load_state_dict`` for checkpoints)."""

    def __init__(self, optimizers: dict[str, torch.optim.Optimizer]) -> None:
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [g for opt in self.optimizers.values() for g in opt.param_groups]

    @property
    def state(self) -> dict:
        return {p: s for opt in self.optimizers.values() for p, s in opt.state.items()}

    def step(self, closure=None):
        if closure is not None:
            raise ValueError("CombinedOptimizer.step takes no closure")
        for opt in self.optimizers.values():
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {name: opt.state_dict() for name, opt in self.optimizers.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state) != set(self.optimizers):
            raise ValueError(
                f"optimiser state holds {sorted(state)}, this optimiser {sorted(self.optimizers)} "
                "(a checkpoint written with another 'table_optimizer')"
            )
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state[name])


def embedding_tables(model: nn.Module) -> list[nn.Embedding]:
    """The model's ``nn.Embedding`` tables (ID embeddings and biases)."""
    return [m for m in model.modules() if isinstance(m, nn.Embedding)]


def table_rows(model: nn.Module) -> int:
    """Rows of the largest user and movie tables together: what ``auto`` decides on."""
    enc = getattr(model, "encoder", None)
    if enc is not None:
        return enc.user_emb.num_embeddings + enc.movie_emb.num_embeddings
    return sum(m.num_embeddings for m in embedding_tables(model))


def sparse_table_names(model: nn.Module) -> list[str]:
    """Fully qualified names of the tables' weights that return sparse gradients."""
    return [f"{name}.weight" for name, m in model.named_modules() if isinstance(m, nn.Embedding) and m.sparse]


@torch.no_grad()
def all_reduce_sparse_grads_(params: list[torch.Tensor], world_size: int) -> None:
    """Averages the sparse gradients of ``params`` over the process group, in place.

    Each rank's coalesced rows are padded to the longest rank's count (one all-reduce of
    a count), all-gathered and summed; every rank must call this with the same
    ``params`` in the same order. A parameter without a gradient takes part with no rows.
    """
    if world_size <= 1:
        return
    for p in params:
        if p.grad is not None and not p.grad.is_sparse:
            raise ValueError(
                f"all_reduce_sparse_grads_ needs sparse gradients (got a dense one of shape {tuple(p.shape)})"
            )
        grad = p.grad.coalesce() if p.grad is not None else None
        rows = grad.indices()[0] if grad is not None else torch.empty(0, dtype=torch.long, device=p.device)
        values = grad.values() if grad is not None else p.new_empty(0, *p.shape[1:])
        count = torch.tensor([rows.numel()], device=p.device)
        dist.all_reduce(count, op=dist.ReduceOp.MAX)
        n = int(count)
        padded_rows = torch.cat([rows, rows.new_full((n - rows.numel(),), -1)])
        padded_values = torch.cat([values, values.new_zeros(n - rows.numel(), *values.shape[1:])])
        all_rows = [torch.empty_like(padded_rows) for _ in range(world_size)]
        all_values = [torch.empty_like(padded_values) for _ in range(world_size)]
        dist.all_gather(all_rows, padded_rows)
        dist.all_gather(all_values, padded_values)
        rows, values = torch.cat(all_rows), torch.cat(all_values)
        keep = rows >= 0
        p.grad = torch.sparse_coo_tensor(rows[keep][None], values[keep] / world_size, p.shape).coalesce()
