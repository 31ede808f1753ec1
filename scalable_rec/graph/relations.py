"""Rating-typed relations: the ``rates`` edges split by rating bucket (GC-MC's relation per
rating level, here per bucket), so each bucket's messages get their own weights. Three
rating-aware modes split this way: ``relation`` (each relation a mean over its own bucket),
``gcmc`` (each relation's sum over the destination's whole degree, ``model.gcmc``) and
``scale`` (the same sums with one shared weight and a learned scalar per bucket,
``model.rating_scale``).

A rating falls in bucket ``lo`` (below 3.0), ``mid`` (3.0 to below 4.0) or ``hi`` (4.0 and
up, the ratings the ranking metrics call relevant). ``rates`` then becomes
``rates_lo``/``rates_mid``/``rates_hi`` and ``rev_rates`` ``rev_rates_lo``/… . The split
keeps each bucket's edges in their original order, so a destination's neighbours are
summed in the same order on every path (in-memory graph, sampled batch, mapped CSC).
"""

from __future__ import annotations

import torch
from torch import Tensor

from scalable_rec.graph.hetero import RATES, REV_RATES

BUCKETS = ("lo", "mid", "hi")
# Lower bounds of ``mid`` and ``hi``: a rating's bucket is how many of them it reaches.
BUCKET_BOUNDS = (3.0, 4.0)
EdgeType = tuple[str, str, str]
# ``ModelConfig.rating_messages`` modes whose encoder has one relation per bucket.
SPLIT_MODES = ("relation", "gcmc", "scale")


def splits_by_rating(mode: str) -> bool:
    """Whether ``rating_messages`` ``mode`` passes messages over one relation per bucket."""
    return mode in SPLIT_MODES


def bucket_of(rating: Tensor) -> Tensor:
    """Bucket index (0 ``lo``, 1 ``mid``, 2 ``hi``) of every rating."""
    rating = rating.float()
    out = torch.zeros(rating.shape, dtype=torch.long, device=rating.device)
    for bound in BUCKET_BOUNDS:
        out += rating >= bound
    return out


def bucket_fractions(dst: Tensor, rating: Tensor, num_dst: int) -> Tensor:
    """``[num_dst, len(BUCKETS)]``: each destination's share of its edges per bucket (bucket
    counts over its in-degree; a row of zeros where it has no edges). ``dst``: every edge's
    destination, ``rating``: its rating. Scattered with ``index_add_``, so no host sync."""
    if rating.numel() != dst.numel():
        raise ValueError(f"'rating' needs one entry per edge (got {rating.numel()} for {dst.numel()} edges)")
    cells = dst * len(BUCKETS) + bucket_of(rating).to(dst.device)
    counts = torch.zeros(num_dst * len(BUCKETS), device=dst.device)
    counts.index_add_(0, cells, torch.ones(cells.shape, device=dst.device))
    counts = counts.view(num_dst, len(BUCKETS))
    return counts / counts.sum(1, keepdim=True).clamp(min=1)


def csc_bucket_fractions(colptr: Tensor, rating: Tensor) -> Tensor:
    """``bucket_fractions`` of a CSC (``colptr`` over destinations, ``rating`` per position)."""
    num_dst = colptr.numel() - 1
    dst = torch.repeat_interleave(torch.arange(num_dst, device=rating.device), colptr.diff().to(rating.device))
    return bucket_fractions(dst, rating, num_dst)


def relation(edge_type: EdgeType, bucket: int) -> EdgeType:
    """``edge_type``'s relation for ``bucket`` (e.g. ``(user, rates_hi, movie)``)."""
    src, rel, dst = edge_type
    return (src, f"{rel}_{BUCKETS[bucket]}", dst)


def message_types(mode: str) -> list[EdgeType]:
    """The encoder's edge types for ``ModelConfig.rating_messages`` ``mode``."""
    if splits_by_rating(mode):
        return [relation(et, b) for et in (RATES, REV_RATES) for b in range(len(BUCKETS))]
    return [RATES, REV_RATES]


def incoming(mode: str) -> dict[str, list[EdgeType]]:
    """Destination node type → the edge types whose messages it receives."""
    out: dict[str, list[EdgeType]] = {}
    for et in message_types(mode):
        out.setdefault(et[2], []).append(et)
    return out


def parse(edge_type: EdgeType) -> tuple[EdgeType, int | None]:
    """``(rates or rev_rates, bucket)`` of an encoder edge type; bucket ``None`` for the
    unsplit ``rates``/``rev_rates`` themselves."""
    for et in (RATES, REV_RATES):
        if edge_type == et:
            return et, None
        for b in range(len(BUCKETS)):
            if edge_type == relation(et, b):
                return et, b
    raise KeyError(f"{edge_type} is neither rates, rev_rates nor one of their rating relations")


def split_coo(edge_type: EdgeType, edge_index: Tensor, rating: Tensor) -> dict[EdgeType, Tensor]:
    """A COO ``edge_index`` of ``edge_type`` as one ``edge_index`` per bucket relation."""
    if rating.numel() != edge_index.size(1):
        raise ValueError(
            f"'rating' needs one entry per edge of {edge_type} (got {rating.numel()} for {edge_index.size(1)} edges)"
        )
    bucket = bucket_of(rating).to(edge_index.device)
    return {relation(edge_type, b): edge_index[:, bucket == b] for b in range(len(BUCKETS))}


def split_csc(
    edge_type: EdgeType, colptr: Tensor, row: Tensor, rating: Tensor
) -> dict[EdgeType, tuple[Tensor, Tensor]]:
    """A CSC (``colptr`` over destinations, ``row`` sources) as one ``(colptr, row)`` per
    bucket relation, each destination's sources in their original order."""
    if rating.numel() != row.numel():
        raise ValueError(
            f"'rating' needs one entry per edge of {edge_type} (got {rating.numel()} for {row.numel()} edges)"
        )
    bucket = bucket_of(rating)
    num_dst = colptr.numel() - 1
    dst = torch.repeat_interleave(torch.arange(num_dst), (colptr[1:] - colptr[:-1]).long())
    out = {}
    for b in range(len(BUCKETS)):
        keep = bucket == b
        ptr = torch.zeros(num_dst + 1, dtype=torch.long)
        ptr[1:] = torch.bincount(dst[keep], minlength=num_dst).cumsum(0)
        out[relation(edge_type, b)] = (ptr, row[keep])
    return out
