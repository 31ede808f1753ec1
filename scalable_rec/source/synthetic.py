"""Synthetic rating graphs with real signal, streamed in bounded batches.

Users and movies follow power-law (Zipf-like) activity and popularity; a rating is a
latent-factor model plus noise (``μ + b_u + b_m + ⟨p_u, q_m⟩ + ε``, rounded to half
stars), so there is something to learn. Movie features are a noisy linear image of the
movies' latent factors, as wide as the MovieLens features (384-d title embedding + 19
genres), so the model's movie tower sees informative inputs of the real shape.

Memory is O(users + movies) (factors, sampling tables) plus one batch of edges, whatever
``edges`` is; the same seed gives the same graph.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Iterator

import numpy as np
import pyarrow as pa

from scalable_rec.source.report import SkipReport

MOVIELENS_FEATURE_DIM = 384 + 19

PRESETS: dict[str, tuple[int, int, int]] = {
    # name: (users, movies, edges)
    "tiny": (50, 50, 500),
    "small": (1_000, 2_000, 100_000),
    "medium": (10_000, 10_000, 1_000_000),
    "large": (70_000, 30_000, 10_000_000),
    "ml-25m": (162_000, 59_000, 25_000_000),
}


@dataclass
class SyntheticSource:
    """A deterministic synthetic user–movie rating graph.

    Args:
        num_users: Number of users.
        num_movies: Number of movies.
        num_edges: Number of rating edges (sampled with replacement; at MovieLens-like
            densities repeated pairs are rare, and they are kept as separate ratings).
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
        problems = [f"'{n}' needs to be positive (got {getattr(self, n)})"
                    for n in ("num_users", "num_movies", "num_edges", "feature_dim", "latent_dim", "batch_edges")
                    if getattr(self, n) <= 0]
        if problems:
            raise ValueError("; ".join(problems))

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "SyntheticSource":
        if name not in PRESETS:
            raise ValueError(f"Unknown synthetic preset {name!r} (choose from {list(PRESETS)})")
        users, movies, edges = PRESETS[name]
        return cls(**{"num_users": users, "num_movies": movies, "num_edges": edges, **overrides})

    def config(self) -> dict[str, Any]:
        return {"source": "synthetic", **asdict(self)}

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
                [pa.array(np.arange(start, stop, dtype=np.int64)),
                 pa.FixedSizeListArray.from_arrays(pa.array(x.astype(np.float32).ravel()), self.feature_dim)],
                names=["key", "features"],
            )

    def ratings(self, report: SkipReport) -> Iterator[pa.RecordBatch]:
        f = self._factors()
        table_rng = np.random.default_rng([self.seed, 2])
        pu = np.cumsum(self._zipf_probs(self.num_users, self.user_zipf, table_rng))
        pm = np.cumsum(self._zipf_probs(self.num_movies, self.movie_zipf, table_rng))
        mu = 3.5
        for i, start in enumerate(range(0, self.num_edges, self.batch_edges)):
            n = min(self.batch_edges, self.num_edges - start)
            rng = np.random.default_rng([self.seed, 3, i])
            src = np.minimum(np.searchsorted(pu, rng.random(n)), self.num_users - 1)
            dst = np.minimum(np.searchsorted(pm, rng.random(n)), self.num_movies - 1)
            raw = (mu + f["bu"][src] + f["bm"][dst] + 3.0 * np.einsum("ij,ij->i", f["p"][src], f["q"][dst])
                   + rng.normal(0, self.noise, n))
            rating = np.clip(np.round(raw * 2) / 2, 0.5, 5.0)
            ts = 1_000_000_000 + start + np.arange(n, dtype=np.int64)
            yield pa.record_batch(
                [pa.array(src.astype(np.int64)), pa.array(dst.astype(np.int64)), pa.array(rating),
                 pa.array(ts)],
                names=["user_key", "movie_key", "rating", "timestamp"],
            )
