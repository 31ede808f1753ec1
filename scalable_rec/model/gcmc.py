"""GC-MC's normalisation for rating relations: each relation's messages summed, divided by
the destination's in-degree over *all* relations (``rating_messages`` ``gcmc``).

With one ``SAGEConv`` (mean) per rating bucket, each relation averages over its own bucket,
so a user with one 1-star rating and a hundred 5-star ones gets a ``lo`` channel as loud as
the ``hi`` one. GC-MC (van den Berg et al. 2017) divides every relation's sum by the node's
whole degree instead: the relations together form one mean, with a weight matrix per
bucket, and a bucket's share of a node's ratings sets how much it contributes,

    h_v = Σ_b W_b · (Σ_{u ∈ N_b(v)} x_u) / |N(v)|  +  (root term and bias, as SAGEConv).

The degree is read off the adjacencies the relations aggregate over (whatever kind they
are: ``SparseTensor``, torch CSR, COO ``edge_index``), so every path that builds them
(sampled batches after target exclusion, the full graph, layer-wise destination batches,
refresh) normalises by exactly the neighbours it passes messages from.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch_geometric.nn import SAGEConv
from torch_geometric.typing import SparseTensor

EdgeType = tuple[str, str, str]


class GCMCConv(SAGEConv):
    """``SAGEConv`` whose neighbour *sum* is scaled per destination by ``inv_degree`` (GC-MC:
    1 / the destination's in-degree over every relation) before ``lin_l``; the root term
    ``lin_r`` is SAGEConv's. Inherits SAGEConv's parameters and sparse aggregation."""

    def __init__(self, in_channels, out_channels: int) -> None:
        super().__init__(in_channels, out_channels, aggr="sum")

    def forward(self, x, edge_index, inv_degree: Tensor) -> Tensor:  # type: ignore[override]
        """``inv_degree``: ``[num_dst]``, the factor each destination's sum is scaled by."""
        if isinstance(x, Tensor):
            x = (x, x)
        agg = self.propagate(edge_index, x=x, size=None)
        out = self.lin_l(agg * inv_degree.to(agg.dtype)[:, None])
        return out + self.lin_r(x[1])


def in_degree(adj, num_dst: int) -> Tensor:
    """Edges per destination of one adjacency as the encoder aggregates over it: a
    ``SparseTensor`` or torch CSR tensor (rows = destinations) or a COO ``edge_index``
    (row 1 = destinations). No host sync (the count is scattered, not ``bincount``)."""
    if isinstance(adj, SparseTensor):
        return adj.storage.rowcount()
    if adj.layout == torch.sparse_csr:
        return adj.crow_indices().diff()
    dst = adj[1]
    return torch.zeros(num_dst, dtype=torch.long, device=dst.device).index_add_(0, dst, torch.ones_like(dst))


def inverse_total_degree(adj: dict[EdgeType, object], num_nodes: dict[str, int]) -> dict[str, Tensor]:
    """Per destination node type of ``adj``: 1 / its in-degree summed over the relations
    into it (1 where it has none: its sums are 0 then)."""
    total: dict[str, Tensor] = {}
    for et, a in adj.items():
        d = in_degree(a, num_nodes[et[2]])
        total[et[2]] = d if et[2] not in total else total[et[2]] + d
    return {t: 1.0 / d.clamp(min=1).float() for t, d in total.items()}
