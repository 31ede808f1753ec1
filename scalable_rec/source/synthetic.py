"""Synthetic rating graphs with real signal, streamed in bounded batches.

Users and movies follow power-law (Zipf-like) activity and popularity; a rating is a
latent-factor model plus noise (``μ + b_u + b_m + ⟨p_u, q_m⟩ + ε``, rounded to half
stars), so there is something to learn. Movie features are a noisy linear image of the
movies' latent factors, as wide as the MovieLens features (384-d title embedding + 19
genres), so the model's movie tower sees informative inputs of the real shape.

Every (user, movie) pair occurs at most once (users' ratings are drawn per range of users,
without repeats). Memory is O(users + movies) (factors, sampling tables, degrees) plus
about one batch of edges, whatever ``edges`` is; the same seed gives the same graph.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from scalable_rec.source.config import PRESETS  # re-export
from scalable_rec.source.report import SkipReport

MOVIELENS_FEATURE_DIM = 384 + 19


@dataclass
class SyntheticSource:
    """A deterministic synthetic user–movie rating graph.

    Args:
        num_users: Number of users.
        num_movies: Number of movies.
        num_edges: Number of rating edges, each a distinct (user, movie) pair (at most
            ``num_users * num_movies``).
        feature_dim: Width of the movie feature vector.
        latent_dim: Rank of the latent-factor rating model.
        user_zipf: Power-law exponent of user activity.
        movie_zipf: Power-law exponent of movie popularity.
        noise: Standard deviation of rating noise.
        seed: Random seed.
        batch_edges: Edges generated per record batch (bounds memory).
    """

    num_users: int = 1_000
    num_movies: int = 2_000
    num_edges: int = 100_000
    feature_dim: int = MOVIELENS_FEATURE_DIM
    latent_dim: int = 8
    user_zipf: float = 0.8
    movie_zipf: float = 1.0
    noise: float = 0.5
    seed: int = 0
    batch_edges: int = 1_000_000

    def __post_init__(self) -> None:
        problems = [
            f"'{n}' needs to be positive (got {getattr(self, n)})"
            for n in ("num_users", "num_movies", "num_edges", "feature_dim", "latent_dim", "batch_edges")
            if getattr(self, n) <= 0
        ]
        if not problems and self.num_edges > self.num_users * self.num_movies:
            problems.append(
                f"'num_edges' needs to be at most num_users * num_movies = "
                f"{self.num_users * self.num_movies} (distinct pairs; got {self.num_edges})"
            )
        if problems:
            raise ValueError("; ".join(problems))

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> SyntheticSource:
        if name not in PRESETS:
            raise ValueError(f"Unknown synthetic preset {name!r} (choose from {list(PRESETS)})")
        users, movies, edges = PRESETS[name]
        return cls(**{"num_users": users, "num_movies": movies, "num_edges": edges, **overrides})

    def config(self) -> dict[str, Any]:
        # "generator" changes whenever the same settings would produce different edges, so
        # shards of an older generator are never reused (2: distinct pairs).
        return {"source": "synthetic", "generator": 2, **asdict(self)}

    def fingerprint(self) -> str:
        import hashlib
        import json

        return hashlib.sha256(json.dumps(self.config(), sort_keys=True).encode()).hexdigest()

    def _factors(self) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, 0])
        scale = 1.0 / np.sqrt(self.latent_dim)
        return {
            "p": rng.normal(0, scale, (self.num_users, self.latent_dim)).astype(np.float32),
            "q": rng.normal(0, scale, (self.num_movies, self.latent_dim)).astype(np.float32),
            "bu": rng.normal(0, 0.4, self.num_users).astype(np.float32),
            "bm": rng.normal(0, 0.5, self.num_movies).astype(np.float32),
            "proj": rng.normal(0, 1.0, (self.latent_dim, self.feature_dim)).astype(np.float32),
        }

    @staticmethod
    def _zipf_probs(n: int, exponent: float, rng: np.random.Generator) -> np.ndarray:
        weights = 1.0 / np.arange(1, n + 1) ** exponent
        rng.shuffle(weights)  # popularity is not tied to the id order
        return weights / weights.sum()

    def users(self, report: SkipReport) -> Iterator[pa.RecordBatch]:
        yield pa.record_batch([pa.array(np.arange(self.num_users, dtype=np.int64))], names=["key"])

    def movies(self, report: SkipReport) -> Iterator[pa.RecordBatch]:
        f = self._factors()
        rng = np.random.default_rng([self.seed, 1])
        step = max(1, (64 << 20) // (4 * self.feature_dim))  # ~64 MiB of features per batch
        for start in range(0, self.num_movies, step):
            stop = min(self.num_movies, start + step)
            x = f["q"][start:stop] @ f["proj"] + rng.normal(0, 0.5, (stop - start, self.feature_dim)).astype(np.float32)
            yield pa.record_batch(
                [
                    pa.array(np.arange(start, stop, dtype=np.int64)),
                    pa.FixedSizeListArray.from_arrays(pa.array(x.astype(np.float32).ravel()), self.feature_dim),
                ],
                names=["key", "features"],
            )

    def _degrees(self, p_user: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Ratings per user: multinomial over power-law activity, each capped at the number
        of movies (a user rates a movie at most once); the excess goes to users with room."""
        deg = rng.multinomial(self.num_edges, p_user)
        while excess := int(np.clip(deg - self.num_movies, 0, None).sum()):
            np.minimum(deg, self.num_movies, out=deg)
            room = np.where(deg < self.num_movies, p_user, 0.0)
            deg += rng.multinomial(excess, room / room.sum())
        return deg

    def _user_chunks(self, deg: np.ndarray) -> Iterator[tuple[int, int]]:
        """Consecutive user ranges with about ``batch_edges`` ratings each (at least one user)."""
        ends = np.cumsum(deg)
        start = 0
        while start < self.num_users:
            base = int(ends[start - 1]) if start else 0
            stop = max(start + 1, int(np.searchsorted(ends, base + self.batch_edges, side="right")))
            yield start, min(stop, self.num_users)
            start = stop

    def _distinct_movies(
        self, users: np.ndarray, p_movie: np.ndarray, cdf: np.ndarray, rng: np.random.Generator, rounds: int = 8
    ) -> np.ndarray:
        """One movie per row of ``users`` (sorted), drawn by popularity, distinct per user.

        Light users draw with replacement and redraw the rows that repeat a pair, a few
        rounds over the shrinking set of users that still have repeats (repeats are rare
        for them). Users rating a quarter of the catalogue or more, and light users left
        with repeats, take weighted sampling without replacement (Gumbel top-k, O(movies)
        per user) among the movies they have not rated yet.
        """
        m = self.num_movies
        movies = np.minimum(np.searchsorted(cdf, rng.random(len(users))), m - 1)
        uniq, lo, counts = np.unique(users, return_index=True, return_counts=True)
        dense = counts * 4 >= m
        repeat = np.repeat(dense, counts)  # rows still to draw exactly
        active = ~repeat
        for _ in range(rounds):
            rows = np.flatnonzero(active)
            if not len(rows):
                break
            _, first = np.unique(users[rows] * m + movies[rows], return_index=True)
            again = np.ones(len(rows), dtype=bool)
            again[first] = False
            if not again.any():
                break
            redo = rows[again]
            movies[redo] = np.minimum(np.searchsorted(cdf, rng.random(len(redo))), m - 1)
            active[:] = False
            active[np.isin(users, users[redo])] = True
        else:
            rows = np.flatnonzero(active)
            _, first = np.unique(users[rows] * m + movies[rows], return_index=True)
            again = np.ones(len(rows), dtype=bool)
            again[first] = False
            repeat[rows[again]] = True
        log_p = np.log(np.maximum(p_movie, 1e-300))
        for u in np.flatnonzero(np.bincount(np.searchsorted(uniq, users[repeat]), minlength=len(uniq))):
            span = np.arange(lo[u], lo[u] + counts[u])
            redo = span[repeat[span]]
            score = log_p + rng.gumbel(size=m)
            score[movies[span[~repeat[span]]]] = -np.inf
            movies[redo] = np.argpartition(-score, len(redo) - 1)[: len(redo)]
        return movies

    def _pairs(self) -> Iterator[tuple[np.ndarray, np.ndarray, np.random.Generator]]:
        """Distinct (user, movie) pairs, one user range at a time, with that range's RNG."""
        table_rng = np.random.default_rng([self.seed, 2])
        p_user = self._zipf_probs(self.num_users, self.user_zipf, table_rng)
        p_movie = self._zipf_probs(self.num_movies, self.movie_zipf, table_rng)
        cdf = np.cumsum(p_movie)
        deg = self._degrees(p_user, table_rng)
        for i, (lo, hi) in enumerate(self._user_chunks(deg)):
            rng = np.random.default_rng([self.seed, 3, i])
            users = np.repeat(np.arange(lo, hi, dtype=np.int64), deg[lo:hi])
            if len(users):
                yield users, self._distinct_movies(users, p_movie, cdf, rng), rng

    def ratings(self, report: SkipReport) -> Iterator[pa.RecordBatch]:
        """Record batches of exactly ``batch_edges`` rows (the last one shorter).

        Each (user, movie) pair occurs once: the pairs of one range of users are drawn
        together and made distinct there (``_distinct_movies``), and ranges do not share
        users, so no pair can repeat across batches. Timestamps are drawn independently of
        the user order, so a temporal split is not a split by user id.
        """
        f = self._factors()
        mu = 3.5
        pending: list[pa.RecordBatch] = []
        buffered = 0
        for src, dst, rng in self._pairs():
            raw = (
                mu
                + f["bu"][src]
                + f["bm"][dst]
                + 3.0 * np.einsum("ij,ij->i", f["p"][src], f["q"][dst])
                + rng.normal(0, self.noise, len(src))
            )
            rating = np.clip(np.round(raw * 2) / 2, 0.5, 5.0)
            ts = 1_000_000_000 + rng.integers(0, 10 * self.num_edges, len(src), dtype=np.int64)
            pending.append(
                pa.record_batch(
                    [pa.array(src), pa.array(dst.astype(np.int64)), pa.array(rating), pa.array(ts)],
                    names=["user_key", "movie_key", "rating", "timestamp"],
                )
            )
            buffered += len(src)
            while buffered >= self.batch_edges:
                table = pa.Table.from_batches(pending)
                yield table.slice(0, self.batch_edges).combine_chunks().to_batches()[0]
                rest = table.slice(self.batch_edges)
                pending, buffered = rest.combine_chunks().to_batches(), rest.num_rows
        if buffered:
            yield pa.Table.from_batches(pending).combine_chunks().to_batches()[0]
