"""A learned vector per rating bucket added to every message (``rating_messages`` ``embed``).

The default encoder passes ``x_j`` from each neighbour; ``embed`` passes ``x_j + e_{b(j)}``,
``e_b`` a learned row of a ``[3, d_in]`` table for the edge's rating bucket
(``graph.relations.BUCKETS``), one table per direction and layer. It keeps the default's one
``SAGEConv`` per direction and layer (no split weights as under ``relation``/``gcmc``), and the
table starts at zero, so an untrained ``embed`` model computes exactly what ``none`` does.

With mean aggregation the bucket vectors need no per-edge work:

    lin_l(mean_j (x_j + e_{b(j)})) + lin_r(x_i) = SAGEConv(x)_i + (F_i · E) · W_lᵀ,

``F_i`` the destination's bucket fractions over the neighbours it aggregates (bucket counts /
in-degree, 0 without neighbours; ``relations.bucket_fractions``). A user's embedding learns
how its ratings spread over the buckets, a movie's how it is rated — the rating-tendency
signal GC-MC-style models get from their relations.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch_geometric.nn import SAGEConv

from scalable_rec.graph.relations import BUCKETS


class RatingEmbedConv(SAGEConv):
    """``SAGEConv`` (mean) whose neighbour mean gains ``bucket_frac @ bucket_emb`` before
    ``lin_l``; ``bucket_emb`` is ``[len(BUCKETS), source width]``, initialised to zero."""

    def __init__(self, in_channels, out_channels: int) -> None:
        super().__init__(in_channels, out_channels, aggr="mean")
        src = in_channels[0] if isinstance(in_channels, tuple) else in_channels
        self.bucket_emb = nn.Parameter(torch.zeros(len(BUCKETS), src))

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if hasattr(self, "bucket_emb"):  # SAGEConv's __init__ resets before the table exists
            nn.init.zeros_(self.bucket_emb)

    def forward(self, x, edge_index, bucket_frac: Tensor) -> Tensor:  # type: ignore[override]
        """``bucket_frac``: ``[num_dst, len(BUCKETS)]``, each destination's bucket fractions
        over the edges of ``edge_index``."""
        out = super().forward(x, edge_index)
        # lin_l is linear: lin_l(mean + F E) = lin_l(mean) + (F E) W_lᵀ (its bias counted once)
        shift = bucket_frac.to(self.bucket_emb.dtype) @ self.bucket_emb
        return out + F.linear(shift, self.lin_l.weight).to(out.dtype)
