"""Messages scaled by a learned scalar per rating bucket (``rating_messages`` ``scale``).

The default encoder averages its neighbours, ``lin_l(mean_j x_j) + lin_r(x_i)``; ``scale``
averages them weighted by their edge's rating bucket,

    h_i = lin_l(mean_j s_{b(j)} x_j) + lin_r(x_i),

``s`` one learned ``[len(BUCKETS)]`` vector per direction and layer, initialised to ones, so
an untrained ``scale`` model computes what ``none`` does (to float rounding). A bucket's
messages can be damped, dropped or turned against the mean (a disliked movie pushes its user
away) while the default's weights stay shared by every edge: ``relation`` and ``gcmc`` split
them three ways, ``embed`` adds a rating-tendency offset but leaves every message its full
weight.

It reuses ``gcmc``'s split and normalisation: ``mean_j s_{b(j)} x_j = Σ_b s_b · Σ_{j∈N_b(i)}
x_j / |N(i)|``, so every path that already splits the edges into the bucket relations and
divides by the total in-degree (sampled batches, the full graph, layer-wise encoding,
refresh) computes it. ``ScaledMean`` holds one direction's parameters; each relation of that
direction gets a ``RatingScaleConv`` view of it, which ``HeteroConv`` sums: every view adds
its bucket's scaled share through ``lin_l``'s weight, the ``hi`` view also adds ``lin_l``'s
bias and the root term once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch_geometric.nn import HeteroConv, MessagePassing
from torch_geometric.utils import spmm

from scalable_rec.graph.hetero import RATES, REV_RATES
from scalable_rec.graph.relations import BUCKETS, message_types, parse


class ScaledMean(nn.Module):
    """One direction's parameters: ``lin_l`` (with bias), ``lin_r`` (without), as
    ``SAGEConv``'s, and ``scale``, one scalar per rating bucket (ones at the start)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.lin_l = nn.Linear(in_channels, out_channels, bias=True)
        self.lin_r = nn.Linear(in_channels, out_channels, bias=False)
        self.scale = nn.Parameter(torch.ones(len(BUCKETS)))

    def reset_parameters(self) -> None:
        self.lin_l.reset_parameters()
        self.lin_r.reset_parameters()
        nn.init.ones_(self.scale)


class RatingScaleConv(MessagePassing):
    """Bucket ``bucket``'s relation of one direction: sums its messages (``aggr`` sum),
    scales the sum by ``inv_degree`` (1 / the destination's in-degree over all buckets) and
    ``core.scale[bucket]``, and maps it with ``core.lin_l``'s weight. The last bucket's view
    also adds ``lin_l``'s bias and ``lin_r(x_dst)``, so the views of one direction, summed,
    are ``lin_l(mean_j s_{b(j)} x_j) + lin_r(x_i)``."""

    def __init__(self, core: ScaledMean, bucket: int) -> None:
        super().__init__(aggr="sum")
        self.core = core  # shared by the direction's views (PyTorch's tied-weight sharing)
        self.bucket = bucket
        self.root = bucket == len(BUCKETS) - 1

    def forward(self, x, edge_index, inv_degree: Tensor) -> Tensor:
        if isinstance(x, Tensor):
            x = (x, x)
        agg = self.propagate(edge_index, x=x, size=None)
        return self.combine(agg * inv_degree.to(agg.dtype)[:, None], x[1])

    def combine(self, agg: Tensor, x_dst: Tensor) -> Tensor:
        """This view's share of the layer's output from its relation's normalised aggregate."""
        core = self.core
        out = F.linear(agg * core.scale[self.bucket].to(agg.dtype), core.lin_l.weight)
        if self.root:
            out = out + core.lin_l.bias + core.lin_r(x_dst)
        return out

    def message(self, x_j: Tensor) -> Tensor:
        return x_j

    def message_and_aggregate(self, adj_t, x) -> Tensor:
        return spmm(adj_t, x[0], reduce=self.aggr)


def scaled_mean_layer(hidden: int) -> HeteroConv:
    """One encoder layer of ``scale``: a ``ScaledMean`` per direction, each seen by a
    ``RatingScaleConv`` per bucket relation, summed by ``HeteroConv``."""
    cores = {et: ScaledMean(hidden, hidden) for et in (RATES, REV_RATES)}
    views = {}
    for et in message_types("scale"):
        base, bucket = parse(et)
        views[et] = RatingScaleConv(cores[base], bucket)
    return HeteroConv(views, aggr="sum")
