"""Shards → tensors → ``HeteroData``, and the deterministic train/val/test edge split."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch
from torch_geometric.data import HeteroData

from scalable_rec.errors import ShardError
from scalable_rec.graph.config import SplitConfig  # re-export
from scalable_rec.graph.features import FeatureConfig, movie_features
from scalable_rec.shards import GraphShards

log = logging.getLogger(__name__)

USER, MOVIE = "user", "movie"
RATES = (USER, "rates", MOVIE)
REV_RATES = (MOVIE, "rev_rates", USER)


def _to_tensor(col: pa.ChunkedArray | pa.Array, dtype: torch.dtype) -> torch.Tensor:
    arr = col.to_numpy() if isinstance(col, pa.ChunkedArray) else col.to_numpy(zero_copy_only=False)
    return torch.from_numpy(np.array(arr, copy=True)).to(dtype)  # writable: the mmapped shard is read-only


@dataclass
class RatingGraph:
    """All rating edges of a shard directory as tensors, plus node keys and movie features."""

    user_keys: pa.Array
    movie_keys: pa.Array
    movie_x: torch.Tensor
    src: torch.Tensor
    dst: torch.Tensor
    rating: torch.Tensor
    timestamp: torch.Tensor
    given_split: torch.Tensor | None = None  # 0 train, 1 test: a split given with the input

    @property
    def num_users(self) -> int:
        return len(self.user_keys)

    @property
    def num_movies(self) -> int:
        return len(self.movie_keys)

    @property
    def num_edges(self) -> int:
        return self.src.numel()

    @classmethod
    def from_shards(cls, shards: GraphShards, features: FeatureConfig = FeatureConfig()) -> RatingGraph:
        edges = shards.edges(*RATES)
        ts = edges.column("timestamp")
        return cls(
            user_keys=shards.nodes(USER).column("key").combine_chunks(),
            movie_keys=shards.nodes(MOVIE).column("key").combine_chunks(),
            movie_x=torch.from_numpy(movie_features(shards, features)),
            src=_to_tensor(edges.column("src"), torch.long),
            dst=_to_tensor(edges.column("dst"), torch.long),
            rating=_to_tensor(edges.column("rating"), torch.float32),
            timestamp=_to_tensor(ts.fill_null(0), torch.long),
            given_split=(
                _to_tensor(edges.column("given_split"), torch.int8) if "given_split" in edges.column_names else None
            ),
        )

    def hetero_data(self, edge_ids: torch.Tensor | None = None) -> HeteroData:
        """A message-passing graph over the given rating edges (all when ``None``).

        The reverse relation ``movie -rev_rates-> user`` is added so users receive
        messages too. Users carry no features: the model looks up ``n_id`` in an
        embedding table. Both relations carry each edge's ``rating`` (one tensor, shared:
        the reverse edges are in the same order), which loaders gather per sampled edge and
        rating-aware message passing reads.
        """
        src, dst = (self.src, self.dst) if edge_ids is None else (self.src[edge_ids], self.dst[edge_ids])
        rating = self.rating if edge_ids is None else self.rating[edge_ids]
        data = HeteroData()
        data[USER].num_nodes = self.num_users
        data[MOVIE].num_nodes = self.num_movies
        data[MOVIE].x = self.movie_x
        data[RATES].edge_index = torch.stack([src, dst])
        data[REV_RATES].edge_index = torch.stack([dst, src])
        data[RATES].rating = rating
        data[REV_RATES].rating = rating
        return data


@dataclass
class EdgeSplit:
    """Edge ids (positions in ``RatingGraph``) of each split; disjoint and covering all edges."""

    train: torch.Tensor
    val: torch.Tensor
    test: torch.Tensor

    def refit(self) -> EdgeSplit:
        """The validation edges joined to the training edges (a refit once validation has
        chosen the epoch count: ``TrainConfig.refit``); the same test edges, no validation."""
        return EdgeSplit(train=torch.cat([self.train, self.val]), val=self.val[:0], test=self.test)


def split_edges(graph: RatingGraph, cfg: SplitConfig) -> EdgeSplit:
    """Splits edge ids by ``cfg``; every (user, movie) pair is on one side only.

    Shards hold one rating per pair (``write_rating_shards`` keeps the latest), so an edge
    split is a pair split. Shards written before that rule are refused here rather than
    split with one pair on both sides.
    """
    n = graph.num_edges
    repeats = n - torch.unique(graph.src * graph.num_movies + graph.dst).numel()
    if repeats:
        raise ShardError(
            f"The graph has {repeats} repeated (user, movie) pairs; shards need one rating per "
            "pair (rebuild them: 'scalable-rec prepare --overwrite' or 'synth --overwrite')"
        )
    if graph.given_split is not None:
        return _given_split(graph, cfg)
    n_val, n_test = int(round(n * cfg.val_ratio)), int(round(n * cfg.test_ratio))
    n_train = n - n_val - n_test
    order = _order(graph, torch.arange(n), cfg)
    return EdgeSplit(
        train=order[:n_train].sort().values,
        val=order[n_train : n_train + n_val].sort().values,
        test=order[n_train + n_val :].sort().values,
    )


def _order(graph: RatingGraph, ids: torch.Tensor, cfg: SplitConfig) -> torch.Tensor:
    """``ids`` shuffled with the split seed, or oldest first for ``temporal``."""
    if cfg.strategy == "random":
        return ids[torch.randperm(ids.numel(), generator=torch.Generator().manual_seed(cfg.split_seed))]
    return ids[torch.from_numpy(np.argsort(graph.timestamp[ids].numpy(), kind="stable"))]


def _given_split(graph: RatingGraph, cfg: SplitConfig) -> EdgeSplit:
    """Test edges exactly as given; validation is ``val_ratio`` of the given training edges
    (seeded, or the newest with ``temporal``); ``test_ratio`` does not apply."""
    given = graph.given_split.long()
    test = torch.nonzero(given == 1).flatten()
    rest = _order(graph, torch.nonzero(given == 0).flatten(), cfg)
    n_val = int(round(rest.numel() * cfg.val_ratio))
    n_train = rest.numel() - n_val
    return EdgeSplit(train=rest[:n_train].sort().values, val=rest[n_train:].sort().values, test=test)
