"""Full-catalog scoring: every user against every movie, in chunks, keeping the top K.

Embeddings come in (encode once), ranked ``(user, movie, score, rank)`` record batches
go out; sinks (Parquet, ArangoDB) consume them. Peak memory is one ``[chunk, movies]``
score block, set by ``memory_mb``, not by users × movies.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor


@dataclass
class ScoreConfig:
    """Full-catalog scoring settings.

    Args:
        k: Recommendations per user, positive.
        score_memory_mb: MiB of one block of scores (users × movies × 4 bytes), positive; sets
            how many users are scored per chunk.
        exclude_rated: Never recommend a movie the user has rated anywhere in the input.
        score_device: Where ``score`` encodes and ranks: ``run`` (the device the run trained
            on), ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (e.g. score a GPU-trained run on a
            CPU machine).
    """

    k: int = 10
    score_memory_mb: int = 256
    exclude_rated: bool = True
    score_device: str = "run"

    def __post_init__(self) -> None:
        problems = []
        if self.k <= 0:
            problems.append(f"'k' needs to be positive (got {self.k})")
        if self.score_memory_mb <= 0:
            problems.append(f"'score_memory_mb' needs to be positive (got {self.score_memory_mb})")
        if not re.fullmatch(r"run|auto|cpu|cuda(:\d+)?", self.score_device):
            problems.append(f"'score_device' needs run, auto, cpu, cuda or cuda:N (got {self.score_device!r})")
        if problems:
            raise ValueError("; ".join(problems))

    def chunk_users(self, num_movies: int) -> int:
        return max(1, (self.score_memory_mb << 20) // (4 * max(1, num_movies)))


@dataclass
class RatedIndex:
    """Movies each user rated, as CSR (``rowptr[u]:rowptr[u+1]`` slices ``col``)."""

    rowptr: Tensor
    col: Tensor

    @classmethod
    def from_edges(cls, src: Tensor, dst: Tensor, num_users: int) -> "RatedIndex":
        order = torch.argsort(src, stable=True)
        counts = torch.bincount(src, minlength=num_users)
        rowptr = torch.zeros(num_users + 1, dtype=torch.long)
        torch.cumsum(counts, 0, out=rowptr[1:])
        return cls(rowptr=rowptr, col=dst[order])

    def mask_(self, scores: Tensor, users: Tensor) -> None:
        """Sets ``scores[i, m] = -inf`` for every movie ``m`` that ``users[i]`` rated."""
        start, end = self.rowptr[users], self.rowptr[users + 1]
        deg = end - start
        if int(deg.sum()) == 0:
            return
        rows = torch.repeat_interleave(torch.arange(users.numel()), deg)
        # Position of each rated entry inside col: start[row] + offset within the row.
        offsets = torch.arange(int(deg.sum())) - torch.repeat_interleave(torch.cumsum(deg, 0) - deg, deg)
        cols = self.col[torch.repeat_interleave(start, deg) + offsets]
        scores[rows.to(scores.device), cols.to(scores.device)] = float("-inf")


ScoreFn = Callable[[Tensor], Tensor]
"""Maps a chunk of user ids to a ``[len(users), num_movies]`` score block."""


def topk_chunks(score_fn: ScoreFn, num_users: int, num_movies: int, cfg: ScoreConfig,
                exclude: RatedIndex | None = None, users: Tensor | None = None,
                ) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """Yields ``(users [c], movies [c, k], scores [c, k])`` per chunk, best first.

    Entries whose score is ``-inf`` (a user who rated almost everything) are kept in the
    tensors; ``to_record_batch`` drops them.
    """
    users = torch.arange(num_users) if users is None else users
    k = min(cfg.k, num_movies)
    step = cfg.chunk_users(num_movies)
    for i in range(0, users.numel(), step):
        chunk = users[i:i + step]
        with torch.no_grad():
            scores = score_fn(chunk).float()
            if exclude is not None:
                exclude.mask_(scores, chunk)
            top = torch.topk(scores, k, dim=1, sorted=True)
        yield chunk, top.indices.cpu(), top.values.cpu()


RECOMMENDATION_SCHEMA_FIELDS = ("user_key", "movie_key", "score", "rank")


def to_record_batch(users: Tensor, movies: Tensor, scores: Tensor, user_keys: pa.Array,
                    movie_keys: pa.Array, predicted_rating: Tensor | None = None) -> pa.RecordBatch:
    """Ranked rows with the source's original keys; rank 1 is the best.

    ``predicted_rating`` (``[c, k]``, optional) becomes an extra column of that name.
    """
    c, k = movies.shape
    valid = torch.isfinite(scores).flatten().numpy()
    u = np.repeat(users.numpy(), k)[valid]
    m = movies.flatten().numpy()[valid]
    rank = np.tile(np.arange(1, k + 1, dtype=np.int32), c)[valid]
    columns = [user_keys.take(pa.array(u)), movie_keys.take(pa.array(m)),
               pa.array(scores.flatten().numpy()[valid], pa.float32()), pa.array(rank)]
    names = list(RECOMMENDATION_SCHEMA_FIELDS)
    if predicted_rating is not None:
        columns.append(pa.array(predicted_rating.flatten().float().numpy()[valid], pa.float32()))
        names.append("predicted_rating")
    return pa.record_batch(columns, names=names)
