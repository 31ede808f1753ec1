import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from scalable_rec.score import baselines as B


def _blocks(num_users=40, seed=0):
    """Two taste groups: users 0..19 watch movies 0..5, users 20..39 watch movies 6..11;
    each user misses one movie of their group (held out)."""
    rng = np.random.default_rng(seed)
    src, dst, held = [], [], []
    for u in range(num_users):
        group = range(0, 6) if u < num_users // 2 else range(6, 12)
        miss = int(rng.choice(list(group)))
        held.append((u, miss))
        for m in group:
            if m != miss:
                src.append(u)
                dst.append(m)
    return torch.tensor(src), torch.tensor(dst), torch.tensor(held).T


@pytest.mark.parametrize("fit", [lambda x: B.ease(x, 1.0), lambda x: B.item_knn(x, 5)], ids=["ease", "item_knn"])
def test_item_models_recover_the_held_out_movie_of_the_group(fit):
    src, dst, held = _blocks()
    x = B.interaction_matrix(src, dst, 40, 14)
    metrics = B.evaluate_fn(fit(x), src, dst, held[0], held[1], 40, 14, k=1)
    assert metrics["recall@1"] == 1.0
    assert B.evaluate_fn(B.popularity(x), src, dst, held[0], held[1], 40, 14, k=1)["recall@1"] < 0.5


@pytest.mark.parametrize("users,items", [(30, 8), (8, 30)], ids=["items-side", "users-side-woodbury"])
def test_ease_matches_the_closed_form_with_zero_diagonal(users, items):
    rng = np.random.default_rng(1)
    dense = (rng.random((users, items)) < 0.4).astype(np.float64)
    dense[0, :] = 1.0  # every item has an interaction
    x = sp.csr_matrix(dense)
    lam = 3.0
    p = np.linalg.inv(dense.T @ dense + lam * np.eye(items))
    b = -p / np.diag(p)
    np.fill_diagonal(b, 0.0)
    got = B.ease(x, lam)(torch.arange(users)).numpy()
    np.testing.assert_allclose(got, dense @ b, rtol=1e-4, atol=1e-4)


def test_ease_never_ranks_movies_without_interactions_first():
    x = B.interaction_matrix(torch.tensor([0, 1]), torch.tensor([0, 1]), 2, 5)
    scores = B.ease(x, 1.0)(torch.tensor([0, 1]))
    assert (scores[:, 2:] < scores[:, :2].min()).all()


def test_item_knn_keeps_only_the_nearest_neighbours():
    src, dst, _ = _blocks()
    x = B.interaction_matrix(src, dst, 40, 14)
    one = B.item_knn(x, 1)(torch.arange(40)).numpy()
    full = B.item_knn(x, 13)(torch.arange(40)).numpy()
    assert not np.allclose(one, full)  # truncation changed the scores


def test_interaction_matrix_is_binary():
    x = B.interaction_matrix(torch.tensor([0, 0, 1]), torch.tensor([2, 2, 0]), 2, 3)
    assert x.toarray().tolist() == [[0, 0, 1], [1, 0, 0]]


def test_tune_on_validation_picks_the_best_value():
    src, dst, held = _blocks()

    def fit(x, value):
        return B.ease(x, 1.0) if value == "good" else B.popularity(x)

    best, recalls = B.tune_on_validation(fit, ["bad", "good"], (src, dst), (held[0], held[1]), 40, 14, k=1)
    assert best == "good" and recalls["good"] > recalls["bad"]


def test_implicit_als_learns_the_groups():
    pytest.importorskip("implicit")
    src, dst, held = _blocks()
    x = B.interaction_matrix(src, dst, 40, 14)
    # two taste groups: two factors are the true rank (with 4, some random starts sit at 0.8)
    metrics = B.evaluate_fn(B.implicit_als(x, 2, reg=0.01, alpha=5.0), src, dst, held[0], held[1], 40, 14, k=2)
    assert metrics["recall@2"] > 0.8  # popularity: 0.05


def test_biased_mf_beats_the_global_mean():
    pytest.importorskip("surprise")
    rng = np.random.default_rng(0)
    users, movies = rng.integers(0, 50, 3000), rng.integers(0, 40, 3000)
    user_bias, movie_bias = rng.normal(0, 0.7, 50), rng.normal(0, 0.7, 40)
    rating = np.clip(
        np.round(2 * (3.5 + user_bias[users] + movie_bias[movies] + rng.normal(0, 0.3, 3000))) / 2, 0.5, 5.0
    )
    train, test = slice(0, 2500), slice(2500, None)
    out = B.biased_mf_rmse(
        (users[train], movies[train], rating[train]),
        (users[test], movies[test], rating[test]),
        0.5,
        5.0,
        factors=4,
        epochs=30,
    )
    mean_rmse = math.sqrt(float(np.mean((rating[test] - rating[train].mean()) ** 2)))
    assert out["rmse"] < 0.8 * mean_rmse


def test_relevant_only_variants_fit_on_the_relevant_ratings_and_mask_every_seen_one():
    """``relevant_edges`` keeps ratings ≥ the threshold; tuning fits on them (``fit_on``)
    while every training pair, a low rating included, stays masked from the ranking."""
    src, dst = torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 1, 2])
    rating = torch.tensor([4.0, 1.0, 4.5, 3.5])
    fit_src, fit_dst = B.relevant_edges(src, dst, rating, 4.0)
    assert fit_src.tolist() == [0, 1] and fit_dst.tolist() == [0, 1]
    fitted = []

    def fit(x, _):
        fitted.append(x.toarray().tolist())
        return B.popularity(B.interaction_matrix(torch.tensor([0, 0, 0]), torch.tensor([1, 1, 2]), 2, 3))

    # user 0's held-out movie 2: movie 1 (rated 1.0) is more popular but seen, so masked
    _, recalls = B.tune_on_validation(
        fit, ["a", "b"], (src, dst), (torch.tensor([0]), torch.tensor([2])), 2, 3, k=1, fit_on=(fit_src, fit_dst)
    )
    assert fitted[0] == [[1, 0, 0], [0, 1, 0]]
    assert recalls["a"] == 1.0
