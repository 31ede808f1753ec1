"""Reference recommenders on the package's own split and metrics.

Each top-K baseline returns a ``ScoreFn`` (user ids → ``[users, movies]`` scores) for
``ranking_metrics``, so a baseline is ranked, masked and measured exactly like the
package's model. They fit on a binary user × movie matrix of the ratings they are given:
every rating, or (``relevant_edges``) only those the metrics call relevant, which makes
EASE and item-kNN stronger on MovieLens (a 1-star rating is no vote for the movie). All
seen ratings stay masked from the ranking either way. ``tune_on_validation`` picks a
hyper-parameter by validation Recall@k, after which the caller refits on train +
validation and tests.

- ``ease``: EASE (Steck 2019), ``B = I - P / diag(P)`` with ``P = (XᵀX + λI)⁻¹``.
- ``implicit_als``: the ``implicit`` package's ALS (Hu, Koren, Volinsky 2008).
- ``item_knn``: cosine item–item similarity, ``scores = X S``.
- ``popularity``: number of ratings per movie (``popularity_score_fn``).
- ``biased_mf_rmse``: scikit-surprise's biased SVD (Funk MF with biases) for RMSE.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor

from scalable_rec.model.evaluate import ranking_metrics
from scalable_rec.model.topk import RatedIndex, ScoreFn

Fit = Callable[[sp.csr_matrix, Any], ScoreFn]


def interaction_matrix(src: Tensor, dst: Tensor, num_users: int, num_movies: int) -> sp.csr_matrix:
    """Binary ``[users, movies]`` float32 CSR of the given edges."""
    ones = np.ones(src.numel(), dtype=np.float32)
    x = sp.csr_matrix((ones, (src.numpy(), dst.numpy())), shape=(num_users, num_movies))
    x.data[:] = 1.0  # a pair rated twice is still one interaction
    return x


def relevant_edges(src: Tensor, dst: Tensor, rating: Tensor, relevant_min: float) -> tuple[Tensor, Tensor]:
    """The ``(src, dst)`` pairs whose rating is at least ``relevant_min``."""
    keep = rating >= relevant_min
    return src[keep], dst[keep]


def _rows_fn(scores_of: Callable[[np.ndarray], np.ndarray]) -> ScoreFn:
    return lambda users: torch.from_numpy(np.ascontiguousarray(scores_of(users.cpu().numpy()), dtype=np.float32))


def ease(x: sp.csr_matrix, lam: float) -> ScoreFn:
    """EASE: closed-form item–item weights with a zero diagonal, L2 strength ``lam``.

    ``B = I - P / diag(P)``, ``P = (XᵀX + λI)⁻¹``. With fewer users than items (671 × 9k on
    ml-latest-small) ``P`` comes from the users' side by the Woodbury identity,
    ``P = (I - Xᵀ(λI + XXᵀ)⁻¹X) / λ``: a ``users × users`` inverse instead of an
    ``items × items`` one, the same scores ``X B`` (``tests/test_baselines.py``).
    """
    active = np.flatnonzero(np.asarray(x.sum(0)).ravel() > 0)
    xa = x[:, active].astype(np.float64)
    if xa.shape[0] < xa.shape[1]:
        dense = xa.toarray()
        k = np.linalg.inv(dense @ dense.T + lam * np.eye(dense.shape[0]))
        kx = k @ dense  # (λI + XXᵀ)⁻¹ X
        diag_p = (1.0 - np.einsum("ui,ui->i", dense, kx)) / lam
        xp = (dense - (dense @ dense.T) @ kx) / lam  # X P
        scores = (dense - xp / diag_p).astype(np.float32)  # X B = X - X P diag(P)⁻¹

        def scores_of(users: np.ndarray) -> np.ndarray:
            out = np.full((users.size, x.shape[1]), -1e9, dtype=np.float32)
            out[:, active] = scores[users]
            return out

        return _rows_fn(scores_of)
    gram = (xa.T @ xa).toarray()
    gram[np.diag_indices_from(gram)] += lam
    p = np.linalg.inv(gram)
    b = (-p / np.diag(p)).astype(np.float32)
    b[np.diag_indices_from(b)] = 0.0
    xa32 = xa.astype(np.float32)

    def scores_of(users: np.ndarray) -> np.ndarray:
        out = np.full((users.size, x.shape[1]), -1e9, dtype=np.float32)
        out[:, active] = xa32[users] @ b
        return out

    return _rows_fn(scores_of)


def item_knn(x: sp.csr_matrix, neighbours: int) -> ScoreFn:
    """Cosine item–item similarity (each item keeps its ``neighbours`` most similar), ``X S``."""
    norms = np.sqrt(np.asarray(x.multiply(x).sum(0)).ravel())
    xn = x @ sp.diags(1.0 / np.maximum(norms, 1e-12))
    sim = (xn.T @ xn).toarray().astype(np.float32)
    np.fill_diagonal(sim, 0.0)
    if neighbours < sim.shape[0]:
        cut = np.argpartition(-sim, neighbours, axis=0)[neighbours:]
        np.put_along_axis(sim, cut, 0.0, axis=0)
    return _rows_fn(lambda users: np.asarray(x[users] @ sim))


def implicit_als(
    x: sp.csr_matrix, factors: int, reg: float = 0.05, alpha: float = 10.0, iterations: int = 15, seed: int = 0
) -> ScoreFn:
    """The ``implicit`` package's ALS on confidence ``1 + alpha·x``."""
    from implicit.als import AlternatingLeastSquares
    from threadpoolctl import threadpool_limits

    model = AlternatingLeastSquares(
        factors=factors, regularization=reg, alpha=alpha, iterations=iterations, random_state=seed, use_gpu=False
    )
    with threadpool_limits(1, "blas"):
        model.fit(x.tocsr(), show_progress=False)
    users_f, items_f = np.asarray(model.user_factors), np.asarray(model.item_factors)
    return _rows_fn(lambda users: users_f[users] @ items_f.T)


def popularity(x: sp.csr_matrix, _: Any = None) -> ScoreFn:
    """Every user gets the movies with the most interactions."""
    counts = np.asarray(x.sum(0), dtype=np.float32)
    return _rows_fn(lambda users: np.repeat(counts, users.size, axis=0))


def evaluate_fn(
    score_fn: ScoreFn,
    seen_src: Tensor,
    seen_dst: Tensor,
    rel_src: Tensor,
    rel_dst: Tensor,
    num_users: int,
    num_movies: int,
    k: int = 10,
) -> dict[str, float]:
    """``ranking_metrics`` with ``seen`` masked and ``rel`` the relevant held-out pairs."""
    seen = RatedIndex.from_edges(seen_src, seen_dst, num_users)
    return ranking_metrics(score_fn, num_users, num_movies, seen, rel_src, rel_dst, k)


def tune_on_validation(
    fit: Fit,
    grid: list[Any],
    train: tuple[Tensor, Tensor],
    val_rel: tuple[Tensor, Tensor],
    num_users: int,
    num_movies: int,
    k: int = 10,
    fit_on: tuple[Tensor, Tensor] | None = None,
) -> tuple[Any, dict[Any, float]]:
    """The grid value with the best validation Recall@k (fit on training edges only:
    ``fit_on``, a subset of ``train`` such as ``relevant_edges``, default all of ``train``;
    all of ``train`` is masked)."""
    x = interaction_matrix(*(train if fit_on is None else fit_on), num_users, num_movies)
    recalls = {}
    for value in grid:
        metrics = evaluate_fn(fit(x, value), *train, *val_rel, num_users, num_movies, k)
        recalls[value] = metrics[f"recall@{k}"]
    return max(recalls, key=recalls.get), recalls


def biased_mf_rmse(
    train: tuple[np.ndarray, np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray, np.ndarray],
    rating_min: float,
    rating_max: float,
    factors: int = 100,
    epochs: int = 20,
    seed: int = 0,
) -> dict[str, float]:
    """scikit-surprise's biased SVD (its defaults: lr 0.005, reg 0.02) fit on ``train``
    ``(users, movies, ratings)`` and measured on ``test``; predictions clamped to the range."""
    import tempfile
    from pathlib import Path

    from surprise import SVD, Dataset, Reader

    with tempfile.TemporaryDirectory() as tmp:  # surprise reads files (or pandas frames; no pandas here)
        path = Path(tmp) / "train.csv"
        np.savetxt(path, np.column_stack([train[0], train[1], train[2]]), fmt=["%d", "%d", "%.1f"], delimiter=",")
        reader = Reader(line_format="user item rating", sep=",", rating_scale=(rating_min, rating_max))
        trainset = Dataset.load_from_file(str(path), reader).build_full_trainset()
    algo = SVD(n_factors=factors, n_epochs=epochs, random_state=seed)
    algo.fit(trainset)
    pred = np.array([algo.predict(str(u), str(m)).est for u, m in zip(test[0].tolist(), test[1].tolist())])
    err = np.clip(pred, rating_min, rating_max) - test[2]
    return {"rmse": math.sqrt(float(np.mean(err**2))), "mae": float(np.mean(np.abs(err)))}
