#!/usr/bin/env python
"""Optimiser memory and step time of the learnable tables: dense Adam vs sparse gradients.

    python experiments/embedding_optim.py --index runs/scale/shards-25000000/index/<key>
    python experiments/embedding_optim.py --index ... --users 2000000    # a wider user table

Builds the real ``Recommender`` at the index's shape (or with ``--users`` rows in the user
table, to see how the cost grows with users), draws real mini-batches from
``LinkNeighborLoader`` over the memory-mapped stores, and runs ``--steps`` optimiser steps
two ways:

- ``dense``: what the training loop does today: ``torch.optim.Adam`` over every
  parameter; each step materialises a dense gradient of every table and updates every
  row (moments and weight decay touch all rows);
- ``sparse``: ``nn.Embedding(sparse=True)`` tables (gradients hold only the batch's rows)
  stepped by ``torch.optim.SparseAdam`` (lazy: only rows in the batch move), the rest by
  ``Adam``;
- ``rowwise``: what training uses from ``sparse_tables_min_rows`` on
  (``TrainConfig.table_optimizer``): the loop's own ``make_optimizer`` with
  ``rowwise_adagrad``: sparse table gradients, one state float per row, AdamW for the rest.

Every ``nn.Embedding`` of the model counts as a table (ID embeddings, biases and the
retrieval head's ID vectors).

Reports, per mode, the bytes of parameters, of gradients after backward and of optimiser
state (counted from the tensors, not estimated), and the median step time. Writes JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore", message=".*pyg-lib.*")


def tensor_bytes(tensors) -> int:
    total = 0
    for t in tensors:
        if t is None:
            continue
        if t.is_sparse:
            t = t.coalesce()
            total += t.indices().numel() * t.indices().element_size() + t.values().numel() * t.values().element_size()
        else:
            total += t.numel() * t.element_size()
    return total


def state_bytes(optimizers) -> int:
    return tensor_bytes(
        v for opt in optimizers for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)
    )


def run(mode: str, index_dir: Path, users: int | None, steps: int, batch_size: int, seed: int) -> dict:
    from torch_geometric.loader import LinkNeighborLoader

    from scalable_rec.graph import RATES
    from scalable_rec.graph.index import GraphIndex
    from scalable_rec.graph.store import open_stores
    from scalable_rec.train import ModelConfig, Recommender, TrainConfig
    from scalable_rec.train.loop import make_optimizer
    from scalable_rec.train.optim import embedding_tables

    torch.manual_seed(seed)
    index = GraphIndex.open(index_dir, verify=False)
    split = index.split()
    train = split.train[torch.randperm(split.train.numel())[: batch_size * (steps + 2)]]
    src, dst, rating = (
        index.tensor("edges/src")[train],
        index.tensor("edges/dst")[train],
        index.tensor("edges/rating")[train],
    )
    loader = LinkNeighborLoader(
        open_stores(index, "train"),
        num_neighbors=[10, 5],
        edge_label_index=(RATES, torch.stack([src, dst])),
        edge_label=rating,
        batch_size=batch_size,
        shuffle=False,
    )
    num_users = users or index.num_users
    model = Recommender(num_users, index.num_movies, index.tensor("movie_x").size(1), ModelConfig())
    tables = embedding_tables(model)
    if mode == "rowwise":
        optimizers = [make_optimizer(model, TrainConfig(table_optimizer="rowwise_adagrad"))]
    elif mode == "sparse":
        for emb in tables:
            emb.sparse = True  # F.embedding then returns a sparse gradient of the looked-up rows
        table_params = {id(e.weight) for e in tables}
        optimizers = [
            torch.optim.SparseAdam([e.weight for e in tables], lr=0.003),
            torch.optim.Adam([p for p in model.parameters() if id(p) not in table_params], lr=0.003, weight_decay=1e-4),
        ]
    else:
        optimizers = [torch.optim.Adam(model.parameters(), lr=0.003, weight_decay=1e-4)]
    times, grad_b = [], 0
    for i, batch in enumerate(loader):
        if i >= steps:
            break
        t0 = time.perf_counter()
        pred, rank = model(batch)
        # the rating loss plus a stand-in for the ranking loss, so the retrieval head's ID
        # tables get gradients too
        loss = ((pred - batch[RATES].edge_label) ** 2).mean() + (rank[0] * rank[1]).sum(-1).mean()
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_b = max(grad_b, tensor_bytes(p.grad for p in model.parameters()))
        for opt in optimizers:
            opt.step()
        times.append(time.perf_counter() - t0)
    table_b = tensor_bytes(e.weight for e in tables)
    return {
        "mode": mode,
        "users": num_users,
        "movies": index.num_movies,
        "steps": len(times),
        "param_mib": tensor_bytes(model.parameters()) / 2**20,
        "table_param_mib": table_b / 2**20,
        "grad_mib": grad_b / 2**20,
        "optimizer_state_mib": state_bytes(optimizers) / 2**20,
        "median_step_s": statistics.median(times[1:] or times),
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--index", required=True, type=Path, help="a graph index directory (scalable_rec.graph.index)")
    p.add_argument("--users", type=int, help="rows of the user table (default: the index's users)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="write the results here as JSON")
    args = p.parse_args()
    rows = [
        run(mode, args.index, args.users, args.steps, args.batch_size, args.seed)
        for mode in ("dense", "sparse", "rowwise")
    ]
    for r in rows:
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()}))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
