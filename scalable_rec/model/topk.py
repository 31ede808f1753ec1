"""Full-catalog scoring: every user against every movie, in chunks, keeping the top K.

Embeddings come in (encode once), ranked ``(user, movie, score, rank)`` record batches
go out; sinks (Parquet, ArangoDB) consume them. Peak memory is one ``[chunk, movies]``
score block, set by ``memory_mb`` on the CPU and by the device's free memory on CUDA
(``device_chunk_users``), not by users × movies.

On CUDA a chunk's scores, rated mask and top-K stay on the device; only the top-K comes
back, copied without blocking into pinned memory while the next chunk is computed
(docs/gpu.md "Scoring on the device").
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor

from scalable_rec.model.config import ScoreConfig  # re-export

# Device bytes a chunk needs per score: the fp32 block, the score function's own
# intermediate (a matmul result before the bias adds, or an autocast block and its fp32
# copy) and top-K's workspace.
DEVICE_BYTES_PER_SCORE = 12
# Share of the device's free memory (when scoring starts) that one chunk may take.
DEVICE_MEMORY_SHARE = 0.5


def device_chunk_users(num_movies: int, device: torch.device) -> int:
    """Users per chunk on a CUDA ``device``: ``DEVICE_MEMORY_SHARE`` of its free memory
    (``torch.cuda.mem_get_info``) over ``DEVICE_BYTES_PER_SCORE`` per user × movie."""
    free, _ = torch.cuda.mem_get_info(device)
    return max(1, int(free * DEVICE_MEMORY_SHARE) // (DEVICE_BYTES_PER_SCORE * max(1, num_movies)))


@dataclass
class RatedIndex:
    """Movies each user rated, as CSR (``rowptr[u]:rowptr[u+1]`` slices ``col``)."""

    rowptr: Tensor
    col: Tensor

    @classmethod
    def from_edges(cls, src: Tensor, dst: Tensor, num_users: int) -> RatedIndex:
        order = torch.argsort(src, stable=True)
        counts = torch.bincount(src, minlength=num_users)
        rowptr = torch.zeros(num_users + 1, dtype=torch.long)
        torch.cumsum(counts, 0, out=rowptr[1:])
        return cls(rowptr=rowptr, col=dst[order])

    def mask_(self, scores: Tensor, users: Tensor) -> None:
        """Sets ``scores[i, m] = -inf`` for every movie ``m`` that ``users[i]`` rated.

        ``rowptr``/``col`` stay on the CPU (or mapped from the graph index); ``users`` are
        host ids. Only the chunk's rated movies and per-user counts travel to the scores'
        device (pinned, without blocking there), where the mask is built; the counts' total
        is read from the host's ``rowptr``, so nothing waits for the device.
        """
        users = users.cpu()
        start, end = self.rowptr[users], self.rowptr[users + 1]
        deg = end - start
        total = int(deg.sum())
        if total == 0:
            return
        n = users.numel()
        if n == 1 or bool((users[1:] - users[:-1] == 1).all()):
            cols = self.col[int(start[0]) : int(end[-1])]  # consecutive users: one slice of col
        else:
            # Position of each rated entry inside col: start[row] + offset within the row.
            offsets = torch.arange(total) - torch.repeat_interleave(torch.cumsum(deg, 0) - deg, deg, output_size=total)
            cols = self.col[torch.repeat_interleave(start, deg, output_size=total) + offsets]
        device = scores.device
        if device.type == "cuda":
            cols = cols.pin_memory().to(device, non_blocking=True)
            deg = deg.pin_memory().to(device, non_blocking=True)
        rows = torch.repeat_interleave(torch.arange(n, device=device), deg, output_size=total)
        scores[rows, cols.to(device=device, dtype=torch.long)] = float("-inf")


ScoreFn = Callable[[Tensor], Tensor]
"""Maps a chunk of user ids to a ``[len(users), num_movies]`` score block."""


PairFn = Callable[[Tensor, Tensor], Tensor]
"""Maps a chunk's user ids and its top-K movies ``[c, k]`` (on the device) to ``[c, k]`` values."""


class _HostCopy:
    """A chunk's results on their way to the host: on CUDA copied without blocking into
    pinned memory, ``ready()`` waits for that copy only (an event), not for later work."""

    def __init__(self, users: Tensor, tensors: list[Tensor]) -> None:
        self.users, self.event = users, None
        if tensors and tensors[0].is_cuda:
            self.tensors = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
            for host, dev in zip(self.tensors, tensors):
                host.copy_(dev, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.tensors = tensors

    def ready(self) -> tuple[Tensor, ...]:
        if self.event is not None:
            self.event.synchronize()  # sync point: this chunk's copy, once per chunk
        return (self.users, *self.tensors)


def topk_chunks(
    score_fn: ScoreFn,
    num_users: int,
    num_movies: int,
    cfg: ScoreConfig,
    exclude: RatedIndex | None = None,
    users: Tensor | None = None,
    device: torch.device | str | None = None,
    pair_fn: PairFn | None = None,
) -> Iterator[tuple[Tensor, ...]]:
    """Yields ``(users [c], movies [c, k], scores [c, k])`` per chunk on the CPU, best first,
    and ``pair_fn(users, movies)`` as a fourth ``[c, k]`` tensor when given. ``score_fn``
    and ``pair_fn`` get the chunk's user ids on ``device``.

    Entries whose score is ``-inf`` (a user who rated almost everything) are kept in the
    tensors; ``to_record_batch`` drops them.

    Args:
        device: Where ``score_fn`` puts its blocks. CUDA sizes the chunks by the device's
            free memory (``device_chunk_users``) and returns each chunk's results while the
            next one is computed; default: the CPU, chunks of ``cfg.chunk_users``.
        pair_fn: Per-pair values of each chunk's top-K, computed on the device before the
            copy back (e.g. the predicted rating).
    """
    users = torch.arange(num_users) if users is None else users
    device = torch.device("cpu") if device is None else torch.device(device)
    k = min(cfg.k, num_movies)
    step = device_chunk_users(num_movies, device) if device.type == "cuda" else cfg.chunk_users(num_movies)
    pending: _HostCopy | None = None
    for i in range(0, users.numel(), step):
        chunk = users[i : i + step]
        # score_fn and pair_fn get the ids on the device: a blocking copy there would wait
        # for the device's queue every chunk
        ids = chunk.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else chunk
        with torch.no_grad():
            scores = score_fn(ids).float()
            if exclude is not None:
                exclude.mask_(scores, chunk)
            top = torch.topk(scores, k, dim=1, sorted=True)
            del scores  # the next chunk's block may take its place
            extra = [pair_fn(ids, top.indices)] if pair_fn is not None else []
        copy = _HostCopy(chunk, [top.indices, top.values, *extra])
        if pending is not None:
            yield pending.ready()
        pending = copy
    if pending is not None:
        yield pending.ready()


RECOMMENDATION_SCHEMA_FIELDS = ("user_key", "movie_key", "score", "rank")


def to_record_batch(
    users: Tensor,
    movies: Tensor,
    scores: Tensor,
    user_keys: pa.Array,
    movie_keys: pa.Array,
    predicted_rating: Tensor | None = None,
) -> pa.RecordBatch:
    """Ranked rows with the source's original keys; rank 1 is the best.

    ``predicted_rating`` (``[c, k]``, optional) becomes an extra column of that name.
    """
    c, k = movies.shape
    valid = torch.isfinite(scores).flatten().numpy()
    u = np.repeat(users.numpy(), k)[valid]
    m = movies.flatten().numpy()[valid]
    rank = np.tile(np.arange(1, k + 1, dtype=np.int32), c)[valid]
    columns = [
        user_keys.take(pa.array(u)),
        movie_keys.take(pa.array(m)),
        pa.array(scores.flatten().numpy()[valid], pa.float32()),
        pa.array(rank),
    ]
    names = list(RECOMMENDATION_SCHEMA_FIELDS)
    if predicted_rating is not None:
        columns.append(pa.array(predicted_rating.flatten().float().numpy()[valid], pa.float32()))
        names.append("predicted_rating")
    return pa.record_batch(columns, names=names)
