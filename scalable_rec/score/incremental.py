"""Layer-wise encoding with every layer kept, and re-encoding of only the rows a graph
change can reach.

A ``k``-layer GraphSAGE output of node ``v`` at layer ``l`` depends on ``v``'s own layer
``l-1`` state, its neighbours' layer ``l-1`` states and its neighbour *set*. Adding edges
therefore changes, at layer ``l``, exactly the nodes in

    D_1 = E  (endpoints of the new edges, new users included),
    D_l = D_{l-1} ∪ N(D_{l-1})   (neighbours in the updated graph),

so ``recompute`` evaluates layer ``l`` only on the rows of ``D_l``, reading the cached
layer ``l-1`` states of everything else (exact). ``bounded_update`` refreshes only the
endpoints, updating their cached mean aggregates with the new edges' messages alone
(cost O(new edges), however popular the rated movies are), and touches nothing further
away (approximate).

The per-row aggregation uses the same sparse CSR ``spmm`` as ``Recommender.encode_all``,
over rows taken from the same sorted adjacency, so a row's sum runs in the same order as
in a full encode.

With rating relations (``ModelConfig.rating_messages``) a node type receives one
aggregate per relation: ``aggs`` then hold them side by side (``[n, relations × hidden]``)
and ``degree`` one in-degree per relation (``[n, relations]``), so the cached state keeps
one row per node either way. With ``gcmc`` and ``scale`` each relation's aggregate is its sum
over the node's total in-degree (the row sum of ``degree``), as ``model.gcmc`` computes it
(``scale`` then weighs each relation's share by its learned scalar, ``model.rating_scale``).

With ``center`` a user's aggregate is two side by side, its mean ``A`` and its deviation
mean ``D = Σ_j (r_uj − r̄_u) x_j / deg(u)`` (``model.rating_center``), and the degrees keep
each user's rating sum (``user_rating_sum``) beside its in-degree: a bounded update then
recovers ``Σ_j r_uj x_j = (D + r̄_u A) deg(u)``, adds the new edges' ``r x`` and recentres.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F
from torch import Tensor
from torch_geometric.utils import spmm
from torch_sparse import SparseTensor

from scalable_rec.graph.hetero import MOVIE, RATES, USER
from scalable_rec.graph.relations import BUCKETS, bucket_of, incoming, message_types, parse, splits_by_rating
from scalable_rec.model.gcmc import inverse_total_degree
from scalable_rec.model.rating_center import RatingCenterConv, deviation_values
from scalable_rec.model.rating_scale import RatingScaleConv
from scalable_rec.model.recommender import Recommender

NodeSets = dict[str, Tensor]
"""Sorted node indices per node type (``user``, ``movie``)."""
USER_RATING_SUM = "user_rating_sum"
"""``Encoded.degree`` key of each user's rating sum (``center`` only)."""


@dataclass
class EdgeList:
    """All user→movie rating edges of the message-passing graph: the trained graph's
    and the folded ones, concatenated (``src``/``dst``) only on first use; a bounded
    refresh reads the two ``parts`` and never makes the copy."""

    base_src: Tensor
    base_dst: Tensor
    num_users: int
    num_movies: int
    extra_src: Tensor | None = None
    extra_dst: Tensor | None = None
    base_rating: Tensor | None = None  # needed by rating relations only
    extra_rating: Tensor | None = None

    def parts(self) -> list[tuple[Tensor, Tensor]]:
        out = [(self.base_src, self.base_dst)]
        if self.extra_src is not None and self.extra_src.numel():
            out.append((self.extra_src, self.extra_dst))
        return out

    @cached_property
    def bucket(self) -> Tensor:
        """Every edge's rating bucket, in ``src``/``dst`` order."""
        if self.base_rating is None:
            raise ValueError("rating relations need the edges' ratings ('base_rating' and 'extra_rating')")
        rating = self.base_rating
        if self.extra_src is not None and self.extra_src.numel():
            rating = torch.cat([rating, self.extra_rating.to(rating.dtype)])
        return bucket_of(rating)

    @cached_property
    def rating(self) -> Tensor:
        """Every edge's rating, in ``src``/``dst`` order (float)."""
        if self.base_rating is None:
            raise ValueError("rating-aware messages need the edges' ratings ('base_rating' and 'extra_rating')")
        rating = self.base_rating.float()
        if self.extra_src is not None and self.extra_src.numel():
            rating = torch.cat([rating, self.extra_rating.float()])
        return rating

    def user_rating_sums(self) -> Tensor:
        """Per user, the sum of its ratings (float64, as the refresh state keeps it)."""
        return torch.zeros(self.num_users, dtype=torch.float64).index_add_(0, self.src, self.rating.double())

    @cached_property
    def deviation(self) -> Tensor:
        """Every edge's ``(r − r̄_u) / deg(u)`` over its user's edges (``center``'s values)."""
        return deviation_values(self.src, self.rating, self.num_users)

    def _deviation_rows(self, rows: Tensor | None) -> SparseTensor:
        """``[len(rows), num_movies]`` deviation adjacency of users ``rows`` (all when
        ``None``) over all their edges, with the values ``rating_center`` gives them."""
        src, dst, value = self.src, self.dst, self.deviation
        if rows is None:
            return SparseTensor(row=src, col=dst, value=value, sparse_sizes=(self.num_users, self.num_movies))
        local = torch.full((self.num_users,), -1, dtype=torch.long)
        local[rows] = torch.arange(rows.numel())
        keep = local[src] >= 0
        return SparseTensor(
            row=local[src[keep]], col=dst[keep], value=value[keep], sparse_sizes=(rows.numel(), self.num_movies)
        )

    @cached_property
    def _all(self) -> tuple[Tensor, Tensor]:
        parts = self.parts()
        if len(parts) == 1:
            return parts[0]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    @property
    def src(self) -> Tensor:
        return self._all[0]

    @property
    def dst(self) -> Tensor:
        return self._all[1]

    def _rows(self, edge_type: tuple[str, str, str], rows: Tensor | None) -> SparseTensor:
        """Adjacency ``[len(rows), num_src]`` for destination ``rows`` of ``edge_type`` (a
        rating relation: its bucket's edges only; all destinations when ``None``), sorted
        by (row, col) as ``ToSparseTensor`` sorts."""
        base, bucket = parse(edge_type)
        if base == RATES:
            dst, src, n_dst, n_src = self.dst, self.src, self.num_movies, self.num_users
        else:
            dst, src, n_dst, n_src = self.src, self.dst, self.num_users, self.num_movies
        if bucket is not None:
            same = self.bucket == bucket
            dst, src = dst[same], src[same]
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


def affected_sets(edges: EdgeList, endpoints: NodeSets, num_layers: int) -> list[NodeSets]:
    """``D_1..D_L``: rows whose layer-``l`` output changes when the ``endpoints``' edges are
    added (``edges`` already holds them)."""
    sets = [endpoints]
    for _ in range(1, num_layers):
        sets.append(union(sets[-1], edges.neighbours(sets[-1])))
    return sets


def _inputs(model: Recommender, edges: EdgeList, movie_x: Tensor) -> dict[str, Tensor]:
    n_id = {USER: torch.arange(edges.num_users), MOVIE: torch.arange(edges.num_movies)}
    return model.encoder.input_features(n_id, movie_x)


def _check_supported(model: Recommender) -> None:
    """The layer is evaluated from its parts (aggregate, ``lin_l``, ``lin_r``): only the
    SAGEConv options the encoder uses are reproduced."""
    for hetero in model.encoder.convs:
        assert [et for et, _ in hetero.convs.items()] == message_types(model.encoder.rating_messages)
        for conv in hetero.convs.values():
            if isinstance(conv, RatingScaleConv):  # its own combine (rating_scale)
                continue
            assert isinstance(conv.aggr, str) and not conv.project and not conv.normalize and conv.root_weight


def _incoming(model: Recommender) -> dict[str, list[tuple[str, str, str]]]:
    return incoming(model.encoder.rating_messages)


def _conv_output(conv, agg: Tensor, x_dst: Tensor) -> Tensor:
    """One relation's share of the layer output from its aggregate: ``lin_l(agg) +
    lin_r(x_dst)`` as SAGEConv computes it, a ``RatingScaleConv``'s scaled share, or with a
    ``RatingCenterConv`` (``agg`` the mean and the deviation mean side by side) its
    ``lin_c`` of the second added."""
    if isinstance(conv, RatingScaleConv):
        return conv.combine(agg, x_dst)
    if isinstance(conv, RatingCenterConv):
        mean, dev = agg.chunk(2, dim=1)
        return conv.lin_l(mean) + conv.lin_r(x_dst) + conv.lin_c(dev)
    return conv.lin_l(agg) + conv.lin_r(x_dst)


def _combine(model: Recommender, i: int, agg: dict[str, Tensor], x_dst: dict[str, Tensor]) -> dict[str, Tensor]:
    """``lin_l(aggregate) + lin_r(own state)`` per destination type (SAGEConv's forward),
    summed over the relations it receives as HeteroConv sums them, then ReLU between
    layers (dropout is off in eval)."""
    convs, out = model.encoder.convs[i].convs, {}
    for d, types in _incoming(model).items():
        parts = agg[d].chunk(len(types), dim=1)
        outs = [_conv_output(convs[et], a, x_dst[d].float()) for et, a in zip(types, parts)]
        out[d] = outs[0] if len(outs) == 1 else torch.stack(outs).sum(0)
    if i < len(model.encoder.convs) - 1:
        out = {k: F.relu(v) for k, v in out.items()}
    return out


def _aggregate(
    model: Recommender, i: int, prev: dict[str, Tensor], adj: dict, deviation: SparseTensor | None = None
) -> dict[str, Tensor]:
    """Neighbour aggregation of layer ``i`` per destination type, as SAGEConv computes it
    (one per relation it receives, side by side; with ``gcmc``/``scale`` each relation's sum over the
    row's degree in all of ``adj``'s relations, as ``GCMCConv`` scales it; with ``center`` the
    users' deviation mean over ``deviation`` after their mean)."""
    convs = model.encoder.convs[i].convs
    out = {}
    inv = inverse_total_degree(adj, {et[2]: a.size(0) for et, a in adj.items()}) if model.encoder.total_degree else {}
    for d, types in _incoming(model).items():
        parts = [spmm(adj[et], prev[et[0]].float(), reduce=convs[et].aggr) for et in types]
        if deviation is not None and d == USER:
            parts.append(spmm(deviation, prev[MOVIE].float(), reduce="sum"))
        out[d] = torch.cat(parts, dim=1) * (inv[d][:, None] if d in inv else 1.0)
    return out


def _finish(model: Recommender, z: dict[str, Tensor]) -> dict[str, Tensor]:
    if model.retrieval is not None:
        mid = torch.arange(z[MOVIE].size(0), device=z[MOVIE].device)
        z["user_rank"], z["movie_rank"], *_ = model.retrieval(
            z[USER], z[MOVIE], torch.arange(z[USER].size(0), device=z[USER].device), mid, model.encoder.movie_known(mid)
        )
    return z


@dataclass
class Encoded:
    """Per layer ``l`` (``[0..L-1]`` for layers 1..L): node states ``layers[l]`` and the
    neighbour aggregates ``aggs[l]`` that produced them; in-degrees per node type. The
    last layer also holds the retrieval head's ``user_rank``/``movie_rank``."""

    layers: list[dict[str, Tensor]]
    aggs: list[dict[str, Tensor]]
    degree: dict[str, Tensor]


def degrees(edges: EdgeList, relations: bool = False, center: bool = False) -> dict[str, Tensor]:
    """In-degree per node type; with ``relations`` one column per rating bucket; with
    ``center`` also each user's rating sum (``user_rating_sum``)."""
    if not relations:
        out = {
            USER: torch.bincount(edges.src, minlength=edges.num_users),
            MOVIE: torch.bincount(edges.dst, minlength=edges.num_movies),
        }
        if center:
            out[USER_RATING_SUM] = edges.user_rating_sums()
        return out
    return {
        t: _bucket_counts(index, edges.bucket, n)
        for t, index, n in ((USER, edges.src, edges.num_users), (MOVIE, edges.dst, edges.num_movies))
    }


def _bucket_counts(index: Tensor, bucket: Tensor, n: int) -> Tensor:
    """``[n, buckets]``: per node, how many of its ``index`` entries fall in each bucket."""
    return torch.bincount(index * len(BUCKETS) + bucket, minlength=n * len(BUCKETS)).view(n, len(BUCKETS))


def _relations(model: Recommender) -> bool:
    return splits_by_rating(model.encoder.rating_messages)


def _degrees(model: Recommender, edges: EdgeList) -> dict[str, Tensor]:
    return degrees(edges, _relations(model), model.encoder.center)


def _deviation(model: Recommender, edges: EdgeList, rows: Tensor | None) -> SparseTensor | None:
    return edges._deviation_rows(rows) if model.encoder.center else None


@torch.no_grad()
def encode_layers(model: Recommender, edges: EdgeList, movie_x: Tensor) -> Encoded:
    """Every layer's output and aggregate for every node. Matches ``Recommender.encode_all``."""
    model.eval()
    _check_supported(model)
    adj = {et: edges._rows(et, None) for et in message_types(model.encoder.rating_messages)}
    deviation = _deviation(model, edges, None)
    x = _inputs(model, edges, movie_x)
    layers, aggs = [], []
    for i in range(len(model.encoder.convs)):
        agg = _aggregate(model, i, x, adj, deviation)
        x = _combine(model, i, agg, x)
        layers.append(x)
        aggs.append(agg)
    _finish(model, layers[-1])
    return Encoded(layers, aggs, _degrees(model, edges))


def _project_rows(model: Recommender, cached: dict[str, Tensor], last: dict[str, Tensor], rows: NodeSets) -> None:
    if model.retrieval is None:
        return
    head = model.retrieval
    for t, key in ((USER, "user_rank"), (MOVIE, "movie_rank")):
        last[key] = _grown(cached[key], last[t].size(0))
        idx = rows[t]
        last[key][idx] = (
            head.project_user(last[t][idx], idx)
            if t == USER
            else head.project_movie(last[t][idx], idx, model.encoder.movie_known(idx))
        )


def _grown_all(cached: dict[str, Tensor], edges: EdgeList) -> dict[str, Tensor]:
    return {t: _grown(cached[t], edges.num_users if t == USER else edges.num_movies) for t in (USER, MOVIE)}


@torch.no_grad()
def recompute(model: Recommender, edges: EdgeList, movie_x: Tensor, cached: Encoded, sets: list[NodeSets]) -> Encoded:
    """Exact update: rows in ``sets[l]`` recomputed at layer ``l`` from all their
    neighbours' new layer ``l-1`` states; all other rows copied from ``cached``.

    ``cached`` may have fewer user rows than ``edges`` (users added since): their rows
    must be in every ``sets[l]``.
    """
    model.eval()
    x = _inputs(model, edges, movie_x)
    layers, aggs = [], []
    for i, rows in enumerate(sets):
        adj = {et: edges._rows(et, rows[et[2]]) for et in message_types(model.encoder.rating_messages)}
        part_agg = _aggregate(model, i, x, adj, _deviation(model, edges, rows[USER]))
        part = _combine(model, i, part_agg, {t: x[t][rows[t]] for t in (USER, MOVIE)})
        new, agg = _grown_all(cached.layers[i], edges), _grown_all(cached.aggs[i], edges)
        for t in (USER, MOVIE):
            new[t][rows[t]], agg[t][rows[t]] = part[t], part_agg[t]
        layers.append(new)
        aggs.append(agg)
        x = new
    _project_rows(model, cached.layers[-1], layers[-1], sets[-1])
    return Encoded(layers, aggs, _degrees(model, edges))


@torch.no_grad()
def bounded_update(
    model: Recommender,
    edges: EdgeList,
    movie_x: Tensor,
    cached: Encoded,
    src: Tensor,
    dst: Tensor,
    rating: Tensor | None = None,
) -> Encoded:
    """Approximate update for new edges ``(src, dst)``: only their endpoints are
    re-encoded, with mean aggregates updated incrementally,

        agg'[v] = (agg[v]·deg[v] + Σ_new-neighbours h[u]) / (deg[v] + new),

    in O(new edges) instead of O(all edges of the endpoints). Contributions of
    neighbours whose state changed (other endpoints) stay as cached: that, and not
    refreshing anything beyond the endpoints, is the drift from ``recompute``.
    Mean aggregation only. With rating relations each relation's mean is updated with the
    new edges of its bucket (``rating``: the new edges' ratings); with ``gcmc``/``scale`` each
    relation's sum over the node's total degree, by the same rule with the total degree.
    With ``center`` a user's deviation mean is recovered, updated and recentred from its
    rating sum (``rating``: the new edges' ratings).
    """
    model.eval()
    total_degree = model.encoder.total_degree
    for hetero in model.encoder.convs:
        assert total_degree or all(c.aggr == "mean" for c in hetero.convs.values()), (
            "bounded refresh needs mean aggregation"
        )
    center = model.encoder.center
    if center and rating is None:
        raise ValueError("a model with rating_messages 'center' needs the new edges' 'rating' for a bounded refresh")
    rows = {USER: torch.unique(src), MOVIE: torch.unique(dst)}
    old_deg = {t: _grown(cached.degree[t], edges.num_users if t == USER else edges.num_movies) for t in (USER, MOVIE)}
    if _relations(model):
        if rating is None:
            raise ValueError("a model with rating relations needs the new edges' 'rating' for a bounded refresh")
        bucket = bucket_of(rating)
        new_deg = {
            USER: old_deg[USER] + _bucket_counts(src, bucket, edges.num_users),
            MOVIE: old_deg[MOVIE] + _bucket_counts(dst, bucket, edges.num_movies),
        }
    else:
        bucket = torch.zeros_like(src)
        new_deg = {
            USER: old_deg[USER] + torch.bincount(src, minlength=edges.num_users),
            MOVIE: old_deg[MOVIE] + torch.bincount(dst, minlength=edges.num_movies),
        }
    n_rel = len(BUCKETS) if _relations(model) else 1
    if center:
        old_sum = _grown(cached.degree[USER_RATING_SUM], edges.num_users)
        new_deg[USER_RATING_SUM] = old_sum.index_add(0, src, rating.double())
        # per re-encoded user: its mean rating before and after, and each new edge's row
        upos = torch.searchsorted(rows[USER], src)
        old_n, new_n = old_deg[USER][rows[USER]].double(), new_deg[USER][rows[USER]].double()
        old_mean = (old_sum[rows[USER]] / old_n.clamp(min=1)).float()[:, None]
        new_mean = (new_deg[USER_RATING_SUM][rows[USER]] / new_n.clamp(min=1)).float()[:, None]
    # Layer-0 inputs are needed only at the endpoints (the new messages' sources and the
    # re-encoded rows), so the movie-feature projection runs on those rows alone.
    h = cached.layers[0][USER].size(1)
    first = model.encoder.input_features(rows, movie_x[rows[MOVIE]])
    x = {t: torch.zeros(edges.num_users if t == USER else edges.num_movies, h) for t in (USER, MOVIE)}
    for t in (USER, MOVIE):
        x[t][rows[t]] = first[t].float()
    layers, aggs = [], []
    for i in range(len(model.encoder.convs)):
        new, agg = _grown_all(cached.layers[i], edges), _grown_all(cached.aggs[i], edges)
        part_agg = {}
        for t, other, index, own in ((MOVIE, USER, src, dst), (USER, MOVIE, dst, src)):
            # [rows, relations, hidden]: one mean per relation (one relation without buckets)
            old, now = old_deg[t][rows[t]].view(-1, n_rel, 1), new_deg[t][rows[t]].view(-1, n_rel, 1)
            if total_degree:  # every relation's sum is over the total degree
                old, now = old.sum(1, keepdim=True), now.sum(1, keepdim=True)
            cached_agg = agg[t][rows[t]]
            if center and t == USER:
                cached_agg, dev = cached_agg.chunk(2, dim=1)
            total = cached_agg.reshape(-1, n_rel, h) * old
            pos = torch.searchsorted(rows[t], own)
            total.view(-1, h).index_add_(0, pos * n_rel + bucket, x[other][index].float())
            # a relation without any edge of the row keeps its mean at 0, as SAGEConv's
            part_agg[t] = (total / now.clamp(min=1)).view(-1, n_rel * h)
            if center and t == USER:  # Σ r x = (D + r̄ A) deg, plus the new edges' r x, recentred
                weighted = (dev + old_mean * cached_agg) * old.view(-1, 1)
                weighted.index_add_(0, upos, x[MOVIE][dst].float() * rating.float()[:, None])
                now_mean = part_agg[t]
                dev = weighted / now.view(-1, 1).clamp(min=1) - new_mean * now_mean
                part_agg[t] = torch.cat([now_mean, dev], dim=1)
        part = _combine(model, i, part_agg, {t: x[t][rows[t]] for t in (USER, MOVIE)})
        for t in (USER, MOVIE):
            new[t][rows[t]], agg[t][rows[t]] = part[t], part_agg[t]
        layers.append(new)
        aggs.append(agg)
        x = new
    _project_rows(model, cached.layers[-1], layers[-1], rows)
    return Encoded(layers, aggs, new_deg)


def _grown(t: Tensor, rows: int) -> Tensor:
    """``t`` with zero rows appended up to ``rows`` (a copy), or ``t`` itself when it has
    ``rows`` rows already: callers overwrite the rows they re-encode in place, since the
    cached state they read is replaced by the result (no 100 MB copy per refresh)."""
    if t.size(0) == rows:
        return t
    out = t.new_zeros((rows,) + tuple(t.shape[1:]))
    out[: t.size(0)] = t
    return out
