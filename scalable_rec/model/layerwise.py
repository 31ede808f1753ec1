"""Layer-wise full-catalog encoding over a graph store (PyG's layer-wise inference pattern).

``Recommender.encode_all`` runs every layer on the whole graph at once: it holds the
sparse adjacency of all edges (a private copy) and every layer's activations. Here each
layer runs over destination nodes in batches with their *full* neighbourhood, read as one
contiguous slice of the memory-mapped CSC index, so a step needs the previous layer's
embeddings and one batch's neighbourhood; with ``spill_dir`` the per-layer embeddings are
memory-mapped files too. The result equals ``encode_all`` up to float summation order.
With rating relations (``ModelConfig.rating_messages``) a batch's CSC slice is split by
the ratings stored beside it (``store.edge_ratings``) into one adjacency per relation (and
with ``gcmc`` and ``scale`` each destination's sums are divided by its degree over all of them); with
``embed`` the slice's ratings give each destination's bucket fractions, with ``center``
each user's deviation adjacency (``model.rating_center``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch_geometric.data import FeatureStore, GraphStore

from scalable_rec.graph.hetero import MOVIE, RATES, REV_RATES, USER
from scalable_rec.graph.relations import csc_bucket_fractions, split_csc, splits_by_rating
from scalable_rec.graph.store import edge_ratings
from scalable_rec.model.gcmc import inverse_total_degree
from scalable_rec.model.rating_center import deviation_adjacency
from scalable_rec.model.recommender import sparse_adjacency, torch_sparse_runs_on

# Destination type → the edge type whose messages it receives (one each in this model).
INCOMING = {MOVIE: RATES, USER: REV_RATES}


def _adjacency(
    edge_type,
    colptr: Tensor,
    row: Tensor,
    rating: Tensor | None,
    start: int,
    stop: int,
    num_src: int,
    device: torch.device,
    aggr: str,
) -> dict:
    """Sparse ``[stop - start, num_src]`` adjacency of destinations ``start:stop`` on ``device``
    (the same kind ``model.encode_all`` builds) by edge type: ``edge_type`` itself, or with
    ``rating`` (rating relations) one per relation, split from this slice alone."""
    ptr = colptr[start : stop + 1]
    lo, hi = int(ptr[0]), int(ptr[-1])
    if rating is None:
        return {edge_type: sparse_adjacency(ptr - lo, row[lo:hi], num_src, device, aggr)}
    parts = split_csc(edge_type, ptr - lo, row[lo:hi], rating[lo:hi])
    return {et: sparse_adjacency(p, r, num_src, device, aggr) for et, (p, r) in parts.items()}


class _Buffers:
    """Per-layer ``[n, hidden]`` float32 tables: in memory (pinned with ``pin``), or files
    under ``spill_dir``."""

    def __init__(self, spill_dir: Path | None, pin: bool = False) -> None:
        self.spill_dir = spill_dir
        self.pin = pin and spill_dir is None
        self.count = 0

    def new(self, rows: int, cols: int) -> Tensor:
        if self.spill_dir is None:
            return torch.empty(rows, cols, pin_memory=self.pin)
        self.count += 1
        path = self.spill_dir / f"z-{self.count}.npy"
        return torch.from_numpy(np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(rows, cols)))

    def put(self, out: Tensor, h: Tensor) -> None:
        """One batch's result ``h`` into its rows ``out`` of a table. Into pinned memory the
        copy does not block: the host waits once, before it reads the tables (``encode_layerwise``'s
        return), and the device reads them back in stream order. Elsewhere (the CPU, spill
        files) a plain copy."""
        out.copy_(h.float(), non_blocking=self.pin)


@torch.no_grad()
def encode_layerwise(
    model,
    feature_store: FeatureStore,
    graph_store: GraphStore,
    batch_size: int = 16384,
    spill_dir: str | os.PathLike | None = None,
) -> dict[str, Tensor]:
    """Embeds every user and movie like ``model.encode_all``, one layer and node batch at a time.

    Args:
        model: A ``Recommender`` (its device is used for the compute; tables stay on CPU).
        feature_store: Holds ``movie.x`` (e.g. ``scalable_rec.graph.store.open_stores``).
        graph_store: Holds the CSC of ``rates`` and ``rev_rates`` with their sizes (and
            ``feature_store`` their ratings, for a model with rating relations).
        batch_size: Destination nodes per step.
        spill_dir: Write each layer's embeddings to memory-mapped files in a fresh
            directory under this one; the names are removed on return (the returned
            tensors keep their mappings until they are dropped), so nothing is left behind.
            ``None`` keeps them in memory (``(users + movies) × hidden`` floats per layer).

    Returns:
        ``{"user", "movie"}`` embeddings and, with a retrieval head, ``user_rank`` and
        ``movie_rank``, as ``encode_all`` returns them (on CPU).
    """
    if batch_size <= 0:
        raise ValueError(f"'batch_size' needs to be positive (got {batch_size})")
    enc = model.encoder
    device = model.rating_mean.device
    row, colptr, _ = graph_store.csc()
    sizes = {attr.edge_type: attr.size for attr in graph_store.get_all_edge_attrs()}
    num = {USER: sizes[RATES][0], MOVIE: sizes[RATES][1]}
    missing = [et for et in INCOMING.values() if et not in row]
    if missing:
        raise ValueError(f"'graph_store' needs CSC edges of {missing} (got {list(row)})")
    split = splits_by_rating(enc.rating_messages)
    ratings = edge_ratings(feature_store) if split or enc.embed or enc.center else {}
    work = Path(tempfile.mkdtemp(prefix="layerwise-", dir=spill_dir)) if spill_dir is not None else None
    # On CUDA the tables are pinned, so results come back without a wait per batch.
    buffers = _Buffers(work, pin=device.type == "cuda")
    hidden = enc.user_emb.embedding_dim

    def batches(n: int):
        for start in range(0, n, batch_size):
            yield start, min(start + batch_size, n)

    try:
        # ---- layer 0: embedding tables (+ projected movie features) -----------------------
        x = {USER: buffers.new(num[USER], hidden), MOVIE: buffers.new(num[MOVIE], hidden)}
        none = torch.empty(0, dtype=torch.long, device=device)
        no_x = torch.empty(0, enc.movie_lin.in_features, device=device)
        for a, b in batches(num[USER]):
            ids = {USER: torch.arange(a, b, device=device), MOVIE: none}
            buffers.put(x[USER][a:b], enc.input_features(ids, no_x)[USER])
        for a, b in batches(num[MOVIE]):
            feats = feature_store.get_tensor(MOVIE, "x", index=slice(a, b)).to(device)
            ids = {USER: none, MOVIE: torch.arange(a, b, device=device)}
            buffers.put(x[MOVIE][a:b], enc.input_features(ids, feats)[MOVIE])
        # ---- message-passing layers: full neighbourhoods, destination batches -------------
        for i, hetero_conv in enumerate(enc.convs):
            out = {}
            for dst, edge_type in INCOMING.items():
                src = edge_type[0]
                x_src = x[src].to(device, non_blocking=True)
                out[dst] = buffers.new(num[dst], hidden)
                for a, b in batches(num[dst]):
                    adj = _adjacency(
                        edge_type,
                        colptr[edge_type],
                        row[edge_type],
                        ratings.get(edge_type) if split else None,
                        a,
                        b,
                        num[src],
                        device,
                        enc.aggr,
                    )
                    x_dst = x[dst][a:b].to(device, non_blocking=True)
                    # gcmc, scale: the batch's full neighbourhood over all relations is the degree
                    extra = (inverse_total_degree(adj, {dst: b - a})[dst],) if enc.total_degree else ()
                    if enc.embed or (enc.center and edge_type == REV_RATES):
                        ptr = colptr[edge_type][a : b + 1]
                        lo, hi = int(ptr[0]), int(ptr[-1])
                        rating = ratings[edge_type][lo:hi]
                        if enc.embed:  # the bucket fractions over the batch's whole CSC slice
                            extra = (csc_bucket_fractions(ptr - lo, rating).to(device),)
                        else:  # center: the users' deviations over the slice
                            slice_ = ptr - lo, row[edge_type][lo:hi], rating, num[src]
                            extra = (deviation_adjacency(*slice_, device, torch_sparse_runs_on(device)),)
                    # PyG's ModuleDict takes edge-type tuples; relations sum as HeteroConv sums them
                    hs = [hetero_conv.convs[et]((x_src, x_dst), adj[et], *extra) for et in adj]
                    h = hs[0] if len(hs) == 1 else torch.stack(hs).sum(0)
                    if i < len(enc.convs) - 1:
                        h = F.relu(h)  # dropout is the identity in inference
                    buffers.put(out[dst][a:b], h)
            x = out
        z = {USER: x[USER], MOVIE: x[MOVIE]}
        if model.retrieval is not None:
            head = model.retrieval
            for key, node in (("user_rank", USER), ("movie_rank", MOVIE)):
                z[key] = buffers.new(num[node], head.out_features)
                for a, b in batches(num[node]):
                    h = x[node][a:b].to(device, non_blocking=True)
                    ids = torch.arange(a, b, device=device)
                    r = (
                        head.project_user(h, ids)
                        if node == USER
                        else head.project_movie(h, ids, model.encoder.movie_known(ids))
                    )
                    buffers.put(z[key][a:b], r)
        if buffers.pin:
            # sync point: the host reads the tables from here on (once per encoding)
            torch.cuda.current_stream(device).synchronize()
        return z
    finally:
        if work is not None:
            # Open mappings keep their pages after unlink; only the names go.
            shutil.rmtree(work, ignore_errors=True)
