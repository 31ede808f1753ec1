"""Supervision batches: which training edges supervise and which pass messages, and the
``LinkNeighborLoader`` over a rank's slice of them with each batch's targets excluded
from its own subgraph."""
from __future__ import annotations

import os

import torch
from torch_geometric.data import HeteroData
from torch_geometric.loader import LinkNeighborLoader

from scalable_rec.graph.hetero import MOVIE, RATES, REV_RATES, USER
from scalable_rec.train.config import TrainConfig
from scalable_rec.train.distributed import DistEnv, EdgeEpochSampler


class ExcludeTargets:
    """Loader transform: drops a batch's supervision edges, in both directions, from that
    batch's sampled message-passing edges (DGL's ``exclude="reverse_id"``).

    Edges are matched by their (user, movie) pair in global ids (``n_id``): shards hold one
    rating per pair, so a pair is an edge id, valid for the in-memory graph and the
    memory-mapped store alike (whose sampled ``e_id`` are CSC positions, not edge ids).
    Pads (``input_id >= num_edges``, zero-weight copies) exclude nothing. Under DDP each
    rank excludes its own batch's targets (as DGL's per-rank samplers do).

    Args:
        num_edges: Supervision edges before pads.
    """

    def __init__(self, num_edges: int) -> None:
        self.num_edges = num_edges

    def __call__(self, data):
        users, movies = data[USER].n_id, data[MOVIE].n_id
        u, m = data[RATES].edge_label_index
        real = data[RATES].input_id < self.num_edges
        targets = (users[u[real]] << 32) | movies[m[real]]  # node ids stay below 2**31
        for edge_type, (ui, mi) in ((RATES, (0, 1)), (REV_RATES, (1, 0))):
            store = data[edge_type]
            ei = store.edge_index
            keep = ~torch.isin((users[ei[ui]] << 32) | movies[ei[mi]], targets)
            store.edge_index = ei[:, keep]
            if "e_id" in store:
                store.e_id = store.e_id[keep]
        return data


def make_loader(data, src: torch.Tensor, dst: torch.Tensor, label: torch.Tensor, cfg: TrainConfig,
                batch_size: int, env: DistEnv, shuffle: bool, device: torch.device,
                generator: torch.Generator | None = None, exclude_targets: bool = False):
    """A ``LinkNeighborLoader`` over this rank's slice of ``(src, dst)`` supervision edges.

    ``label`` is ``[n, 2]``: rating and sample weight. ``world_size - 1`` zero-weight
    copies are appended so that every rank gets the same number of batches. With
    ``exclude_targets`` each batch's targets leave its subgraph (``ExcludeTargets``).
    """
    n = src.numel()
    pad = env.world_size - 1  # enough for any remainder the sampler deals (also a re-dealt resume)
    if pad:
        src, dst = torch.cat([src, src[:pad]]), torch.cat([dst, dst[:pad]])
        label = torch.cat([label, torch.stack([label[:pad, 0], torch.zeros(pad)], 1)])
    sampler = EdgeEpochSampler(n, env.rank, env.world_size, cfg.seed, shuffle=shuffle)
    workers = cfg.num_workers if cfg.num_workers >= 0 else (
        0 if device.type == "cpu" else min(4, max(1, (os.cpu_count() or 1) // max(1, env.world_size) - 1)))
    if workers > 0 and isinstance(data, HeteroData):
        # Worker processes then map the same pages instead of each holding a copy
        # (a (feature_store, graph_store) pair is file-mapped already).
        for store in data.stores:
            for value in store.values():
                if isinstance(value, torch.Tensor):
                    value.share_memory_()
    loader = LinkNeighborLoader(
        data, num_neighbors=cfg.num_neighbors, edge_label_index=(RATES, torch.stack([src, dst])),
        edge_label=label, batch_size=batch_size, sampler=sampler, num_workers=workers,
        persistent_workers=workers > 0, pin_memory=device.type == "cuda",
        prefetch_factor=4 if workers > 0 else None, generator=generator,
        transform=ExcludeTargets(n) if exclude_targets else None,
    )
    return loader, sampler


def supervision_edges(train_ids: torch.Tensor, cfg: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Training edge ids ``(message passing, supervision)`` for ``cfg.supervision``.

    ``disjoint`` draws its fixed supervision share with ``cfg.seed`` (the same on every
    rank); the other modes supervise and pass messages over all training edges (with
    ``exclude_targets`` each batch then drops its own targets).
    """
    if cfg.supervision != "disjoint":
        return train_ids, train_ids
    order = torch.randperm(train_ids.numel(), generator=torch.Generator().manual_seed(cfg.seed))
    n_target = max(1, int(round(train_ids.numel() * cfg.disjoint_ratio)))
    return train_ids[order[n_target:]].sort().values, train_ids[order[:n_target]].sort().values
