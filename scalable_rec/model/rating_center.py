"""A user's messages weighted by how far each rating sits from that user's mean rating
(``rating_messages`` ``center``).

The default encoder averages a user's movies, ``lin_l(mean_j x_j) + lin_r(x_u)``. ``center``
adds a second, rating-weighted mean through its own weight:

    h_u = lin_l(mean_j x_j) + lin_r(x_u) + lin_c(mean_j (r_uj − r̄_u) x_j),

``r̄_u`` the user's mean rating over the movies it aggregates. The extra term is the
covariance of the user's ratings with its movies' embeddings: what the movies it liked
have and the ones it disliked lack, on *that user's* scale (a generous rater's 3.0 counts
as a dislike, a harsh rater's as praise), which fixed rating buckets cannot express.
``lin_c`` starts at zero, so an untrained ``center`` model computes what ``none`` does.
Movies aggregate their raters as in ``none`` (centering them by the movie's mean as well
lost validation Recall@10 in the screen, ``docs/rating.md``).

The weighted mean is one sparse product, ``D @ x`` with ``D[u, j] = (r_uj − r̄_u) / deg(u)``
(``deviation_adjacency``), so no ``[E, hidden]`` message tensor is made.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch_geometric.nn import SAGEConv
from torch_geometric.utils import spmm


def deviation_values(dst: Tensor, rating: Tensor, num_dst: int) -> Tensor:
    """Per edge, ``(r − r̄_dst) / deg(dst)``: its rating's deviation from its destination's
    mean rating over these edges, over that destination's in-degree. Scattered with
    ``index_add_``, so no host sync."""
    if rating.numel() != dst.numel():
        raise ValueError(f"'rating' needs one entry per edge (got {rating.numel()} for {dst.numel()} edges)")
    rating = rating.float().to(dst.device)
    deg = torch.zeros(num_dst, device=dst.device).index_add_(0, dst, torch.ones_like(rating))
    inv = 1.0 / deg.clamp(min=1)
    mean = torch.zeros(num_dst, device=dst.device).index_add_(0, dst, rating) * inv
    return (rating - mean[dst]) * inv[dst]


def deviation_adjacency(
    rowptr: Tensor, col: Tensor, rating: Tensor, num_src: int, device: torch.device, sparse_tensor: bool
):
    """``[num_dst, num_src]`` CSR (``rowptr`` over destinations, ``col`` sources, ``rating``
    per position) with ``deviation_values`` as its values, on ``device``: torch-sparse's
    ``SparseTensor`` where ``sparse_tensor``, else torch's CSR. (Layer-wise encoding's CSC
    slices, which sit on the host.)"""
    num_dst = rowptr.numel() - 1
    dst = torch.repeat_interleave(torch.arange(num_dst, device=rowptr.device), rowptr.diff())
    return _csr(rowptr, col, dst, rating.to(rowptr.device), num_src, device, sparse_tensor)


def coo_deviation_adjacency(
    edge_index: Tensor, rating: Tensor, num_src: int, num_dst: int, device, sparse_tensor: bool
):
    """``deviation_adjacency`` of a COO ``edge_index`` (row 0 sources, row 1 destinations),
    its edges sorted by destination, then source, built where ``edge_index`` is and moved to
    ``device``. On a GPU nothing here waits for the device (no ``bincount`` or
    ``repeat_interleave``, whose output sizes the host would have to read)."""
    src, dst = edge_index
    if rating.numel() != src.numel():
        raise ValueError(f"'rating' needs one entry per edge (got {rating.numel()} for {src.numel()} edges)")
    perm = torch.argsort(dst * num_src + src)
    counts = torch.zeros(num_dst, dtype=torch.long, device=dst.device).index_add_(0, dst, torch.ones_like(dst))
    rowptr = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    return _csr(rowptr, src[perm], dst[perm], rating.to(perm.device)[perm], num_src, device, sparse_tensor)


def _csr(rowptr: Tensor, col: Tensor, dst: Tensor, rating: Tensor, num_src: int, device, sparse_tensor: bool):
    """The CSR of sorted edges (``dst`` each position's destination) with its deviation values."""
    num_dst = rowptr.numel() - 1
    value = deviation_values(dst, rating, num_dst)
    if sparse_tensor:
        from torch_sparse import SparseTensor

        return SparseTensor(
            rowptr=rowptr, col=col, value=value, sparse_sizes=(num_dst, num_src), is_sorted=True, trust_data=True
        ).to(device)
    return torch.sparse_csr_tensor(rowptr, col, value, size=(num_dst, num_src)).to(device)


class RatingCenterConv(SAGEConv):
    """``SAGEConv`` (its ``aggr``, the encoder's) plus ``lin_c`` of the deviation-weighted
    neighbour mean (a mean whatever ``aggr`` is); ``lin_c`` (no bias) starts at zero."""

    def __init__(self, in_channels, out_channels: int, aggr: str = "mean") -> None:
        super().__init__(in_channels, out_channels, aggr=aggr)
        src = in_channels[0] if isinstance(in_channels, tuple) else in_channels
        self.lin_c = nn.Linear(src, out_channels, bias=False)
        nn.init.zeros_(self.lin_c.weight)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if hasattr(self, "lin_c"):  # SAGEConv's __init__ resets before lin_c exists
            nn.init.zeros_(self.lin_c.weight)

    def forward(self, x, edge_index, deviation) -> Tensor:  # type: ignore[override]
        """``deviation``: the ``deviation_adjacency`` over the same edges as ``edge_index``."""
        out = super().forward(x, edge_index)
        x_src = x[0] if isinstance(x, tuple) else x
        # A weighted sum, not a mean: fp32 (the layer's input is), whatever autocast says.
        with torch.autocast(x_src.device.type, enabled=False):
            agg = spmm(deviation, x_src.float(), reduce="sum")
        return out + self.lin_c(agg).to(out.dtype)
