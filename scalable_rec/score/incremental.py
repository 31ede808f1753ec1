"""Layer-wise encoding with every layer kept, and re-encoding of only the rows a graph
change can reach.

A ``k``-layer GraphSAGE output of node ``v`` at layer ``l`` depends on ``v``'s own layer
``l-1`` state, its neighbours' layer ``l-1`` states and its neighbour *set*. Adding edges
therefore changes, at layer ``l``, exactly the nodes in

    D_1 = E  (endpoints of the new edges, new users included),
    D_l = D_{l-1} ∪ N(D_{l-1})   (neighbours in the updated graph),

so ``recompute`` evaluates layer ``l`` only on the rows of ``D_l``, reading the cached
layer ``l-1`` states of everything else. With ``D_l = E`` for every layer (``bounded``)
the endpoints are refreshed from their neighbours' cached (possibly stale) states, and
nothing further away is touched.

The per-row aggregation uses the same sparse CSR ``spmm`` as ``Recommender.encode_all``,
over rows taken from the same sorted adjacency, so a row's sum runs in the same order as
in a full encode.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch_sparse import SparseTensor

from scalable_rec.graph.hetero import MOVIE, RATES, REV_RATES, USER
from scalable_rec.train.model import Recommender

NodeSets = dict[str, Tensor]
"""Sorted node indices per node type (``user``, ``movie``)."""


@dataclass
class EdgeList:
    """All user→movie rating edges of the message-passing graph (trained + folded)."""

    src: Tensor
    dst: Tensor
    num_users: int
    num_movies: int

    def _rows(self, edge_type: tuple[str, str, str], rows: Tensor | None) -> SparseTensor:
        """Adjacency ``[len(rows), num_src]`` for destination ``rows`` of ``edge_type``
        (all destinations when ``None``), sorted by (row, col) as ``ToSparseTensor`` sorts."""
        if edge_type == RATES:
            dst, src, n_dst, n_src = self.dst, self.src, self.num_movies, self.num_users
        else:
            dst, src, n_dst, n_src = self.src, self.dst, self.num_users, self.num_movies
        if rows is None:
            return SparseTensor(row=dst, col=src, sparse_sizes=(n_dst, n_src))
        local = torch.full((n_dst,), -1, dtype=torch.long)
        local[rows] = torch.arange(rows.numel())
        keep = local[dst] >= 0
        return SparseTensor(row=local[dst[keep]], col=src[keep], sparse_sizes=(rows.numel(), n_src))

    def neighbours(self, nodes: NodeSets) -> NodeSets:
        """Users adjacent to ``nodes[movie]`` and movies adjacent to ``nodes[user]``."""
        users = _members(nodes[USER], self.num_users)
        movies = _members(nodes[MOVIE], self.num_movies)
        return {USER: torch.unique(self.src[movies[self.dst]]), MOVIE: torch.unique(self.dst[users[self.src]])}


def _members(index: Tensor, size: int) -> Tensor:
    mask = torch.zeros(size, dtype=torch.bool)
    mask[index] = True
    return mask


def union(a: NodeSets, b: NodeSets) -> NodeSets:
    return {t: torch.unique(torch.cat([a[t], b[t]])) for t in (USER, MOVIE)}


def affected_sets(edges: EdgeList, endpoints: NodeSets, num_layers: int, exact: bool) -> list[NodeSets]:
    """``D_1..D_L``: rows whose layer-``l`` output changes when the ``endpoints``' edges are
    added (``exact``), or just the endpoints at every layer (``bounded``)."""
    sets = [endpoints]
    for _ in range(1, num_layers):
        sets.append(union(sets[-1], edges.neighbours(sets[-1])) if exact else endpoints)
    return sets


def _inputs(model: Recommender, edges: EdgeList, movie_x: Tensor) -> dict[str, Tensor]:
    n_id = {USER: torch.arange(edges.num_users), MOVIE: torch.arange(edges.num_movies)}
    return model.encoder.input_features(n_id, movie_x)


def _layer(model: Recommender, i: int, prev: dict[str, Tensor], adj: dict, rows: NodeSets | None) -> dict[str, Tensor]:
    """Layer ``i`` for the given destination rows (all when ``None``): the HeteroConv sum
    over relations, then ReLU between layers (dropout is off in eval)."""
    hetero = model.encoder.convs[i]
    out: dict[str, Tensor] = {}
    for edge_type, conv in hetero.convs.items():
        s, _, d = edge_type
        x_dst = prev[d] if rows is None else prev[d][rows[d]]
        h = conv((prev[s].float(), x_dst.float()), adj[edge_type])
        out[d] = out[d] + h if d in out else h
    if i < len(model.encoder.convs) - 1:
        out = {k: F.relu(v) for k, v in out.items()}
    return out


def _finish(model: Recommender, z: dict[str, Tensor]) -> dict[str, Tensor]:
    if model.retrieval is not None:
        z["user_rank"], z["movie_rank"] = model.retrieval(z[USER], z[MOVIE])
    return z


@torch.no_grad()
def encode_layers(model: Recommender, edges: EdgeList, movie_x: Tensor) -> list[dict[str, Tensor]]:
    """Every layer's output for every node (``[1..L]``; the last also holds the retrieval
    head's ``user_rank``/``movie_rank``). Matches ``Recommender.encode_all``."""
    model.eval()
    adj = {et: edges._rows(et, None) for et in (RATES, REV_RATES)}
    x = _inputs(model, edges, movie_x)
    layers = []
    for i in range(len(model.encoder.convs)):
        x = _layer(model, i, x, adj, None)
        layers.append(x)
    _finish(model, layers[-1])
    return layers


@torch.no_grad()
def recompute(model: Recommender, edges: EdgeList, movie_x: Tensor, cached: list[dict[str, Tensor]],
              sets: list[NodeSets]) -> list[dict[str, Tensor]]:
    """New per-layer states: rows in ``sets[l]`` recomputed at layer ``l`` from layer
    ``l-1`` (the new one), all other rows copied from ``cached``.

    ``cached`` may have fewer user rows than ``edges`` (users added since): their rows
    must be in every ``sets[l]``, and start as zeros here before being computed.
    """
    model.eval()
    x = _inputs(model, edges, movie_x)
    layers = []
    for i, rows in enumerate(sets):
        adj = {et: edges._rows(et, rows[et[2]]) for et in (RATES, REV_RATES)}
        part = _layer(model, i, x, adj, rows)
        new = {t: _grown(cached[i][t], edges.num_users if t == USER else edges.num_movies) for t in (USER, MOVIE)}
        for t in (USER, MOVIE):
            new[t][rows[t]] = part[t]
        layers.append(new)
        x = new
    last = layers[-1]
    if model.retrieval is not None:
        for t, key, proj in ((USER, "user_rank", model.retrieval.user), (MOVIE, "movie_rank", model.retrieval.movie)):
            last[key] = _grown(cached[-1][key], last[t].size(0))
            last[key][sets[-1][t]] = proj(last[t][sets[-1][t]])
    return layers


def _grown(t: Tensor, rows: int) -> Tensor:
    """A copy of ``t`` with zero rows appended up to ``rows``."""
    out = t.new_zeros((rows,) + tuple(t.shape[1:]))
    out[:t.size(0)] = t
    return out
