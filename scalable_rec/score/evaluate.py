"""Test-split evaluation: rating error and top-K ranking quality, beside a popularity baseline."""
from __future__ import annotations

import torch
from torch import Tensor
from torch_geometric.metrics import LinkPredNDCG, LinkPredRecall

from scalable_rec.score.topk import RatedIndex, ScoreConfig, ScoreFn, topk_chunks


def rating_errors(pred: Tensor, target: Tensor, low: float = 0.5, high: float = 5.0) -> dict[str, float]:
    """RMSE and MAE with predictions clamped to the valid rating range."""
    err = pred.float().clamp(low, high) - target.float()
    return {"rmse": float(err.pow(2).mean().sqrt()), "mae": float(err.abs().mean())}


def ranking_metrics(score_fn: ScoreFn, num_users: int, num_movies: int, seen: RatedIndex,
                    test_src: Tensor, test_dst: Tensor, k: int = 10,
                    memory_mb: int = 256) -> dict[str, float]:
    """Recall@k and NDCG@k over users with held-out relevant movies.

    Only the training and validation edges (``seen``) are masked, so the held-out movies
    stay rankable. Users without a relevant test movie are not counted.
    """
    users = torch.unique(test_src)
    if users.numel() == 0:
        return {f"recall@{k}": float("nan"), f"ndcg@{k}": float("nan"), "eval_users": 0}
    row_of = torch.full((num_users,), -1, dtype=torch.long)
    row_of[users] = torch.arange(users.numel())
    recall, ndcg = LinkPredRecall(k), LinkPredNDCG(k)
    gt = torch.stack([row_of[test_src], test_dst])
    preds = [movies for _, movies, _ in topk_chunks(score_fn, num_users, num_movies,
                                                     ScoreConfig(k=k, score_memory_mb=memory_mb), seen, users)]
    pred_index = torch.cat(preds)
    recall.update(pred_index, gt)
    ndcg.update(pred_index, gt)
    return {f"recall@{k}": float(recall.compute()), f"ndcg@{k}": float(ndcg.compute()),
            "eval_users": int(users.numel())}


def popularity_score_fn(train_dst: Tensor, num_movies: int) -> ScoreFn:
    """Scores every movie by its number of training ratings, the same for every user."""
    popularity = torch.bincount(train_dst, minlength=num_movies).float()
    return lambda users: popularity.expand(users.numel(), -1).clone()
