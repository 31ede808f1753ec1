"""Ranked recommendations for every user: encode once, rank the catalog in chunks.

Embeddings in, ranked record batches out; the sinks (Parquet, ArangoDB) consume them.
"""

from __future__ import annotations

from collections.abc import Iterator

import pyarrow as pa
import torch

from scalable_rec.graph import RatingGraph
from scalable_rec.model.recommender import Recommender
from scalable_rec.model.topk import RatedIndex, ScoreConfig, to_record_batch, topk_chunks


def user_slice(num_users: int, rank: int, world_size: int) -> torch.Tensor:
    """Rank ``rank``'s contiguous block of user ids: blocks in rank order are all users
    in order, so parts concatenated by rank equal one process's output."""
    per = -(-num_users // world_size)
    return torch.arange(min(rank * per, num_users), min((rank + 1) * per, num_users))


def recommend(
    model: Recommender,
    graph: RatingGraph,
    cfg: ScoreConfig,
    z: dict[str, torch.Tensor] | None = None,
    rated: RatedIndex | None = None,
    users: torch.Tensor | None = None,
    rating_range: tuple[float, float] = (0.5, 5.0),
) -> Iterator[pa.RecordBatch]:
    """Yields ranked record batches for every user, or for ``users`` in that order (rated
    movies excluded when ``cfg.exclude_rated``).

    ``score`` is the ranking score (``Recommender.rank_block``); ``predicted_rating`` is the
    rating the model predicts for that pair, clamped to ``rating_range`` (the run's
    ``--rating-min``/``--rating-max``).

    Args:
        z: Embeddings of every node (e.g. ``scalable_rec.model.layerwise.encode_layerwise``); default:
            ``model.encode_all`` over the whole graph in memory.
        rated: Each user's rated movies (e.g. the graph index's ``rev_rates`` CSC); default:
            built from ``graph``'s edges.
        users: Only these users (e.g. one torchrun rank's ``user_slice``); default: all.
    """
    device = model.rating_mean.device
    z = model.encode_all(graph.hetero_data()) if z is None else model.movies_here(z)
    exclude = None
    if cfg.exclude_rated:
        exclude = RatedIndex.from_edges(graph.src, graph.dst, graph.num_users) if rated is None else rated
    movies = torch.arange(graph.num_movies, device=device)

    def predicted(users: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
        """The top-K's predicted ratings, on the device before the copy back."""
        pairs = model.predict_pairs(z, users.to(device).repeat_interleave(top.size(1)), top.flatten())
        return pairs.view_as(top).clamp(*rating_range).float()

    for chunk, top, scores, rated in topk_chunks(
        lambda u: model.rank_block(z, u.to(device), movies),
        graph.num_users,
        graph.num_movies,
        cfg,
        exclude,
        users,
        device=device,
        pair_fn=predicted,
    ):
        yield to_record_batch(chunk, top, scores, graph.user_keys, graph.movie_keys, predicted_rating=rated)
