"""Test-split evaluation: rating error and top-K ranking quality, beside a popularity baseline."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from torch_geometric.metrics import LinkPredNDCG, LinkPredRecall

from scalable_rec.dist import DistEnv, all_reduce_sum
from scalable_rec.model.topk import RatedIndex, ScoreConfig, ScoreFn, topk_chunks


def rating_errors(pred: Tensor, target: Tensor, low: float = 0.5, high: float = 5.0) -> dict[str, float]:
    """RMSE and MAE with predictions clamped to the valid rating range."""
    err = pred.float().clamp(low, high) - target.float()
    return {"rmse": float(err.pow(2).mean().sqrt()), "mae": float(err.abs().mean())}


def ranking_metrics(
    score_fn: ScoreFn,
    num_users: int,
    num_movies: int,
    seen: RatedIndex,
    test_src: Tensor,
    test_dst: Tensor,
    k: int = 10,
    memory_mb: int = 256,
    env: DistEnv = DistEnv(),
    device: torch.device = torch.device("cpu"),
) -> dict[str, float]:
    """Recall@k and NDCG@k over users with held-out relevant movies.

    Only the training and validation edges (``seen``) are masked, so the held-out movies
    stay rankable. Users without a relevant test movie are not counted. Under torchrun
    each rank ranks every ``world_size``-th user and the sums are reduced. ``device`` is
    where ``score_fn`` puts its blocks (CUDA: chunks sized by its free memory, not by
    ``memory_mb``) and holds the reduction (CUDA under NCCL).
    """
    users = torch.unique(test_src)
    total_users = users.numel()
    if total_users == 0:
        return {f"recall@{k}": float("nan"), f"ndcg@{k}": float("nan"), "eval_users": 0}
    users = users[env.rank :: env.world_size]
    row_of = torch.full((num_users,), -1, dtype=torch.long)
    row_of[users] = torch.arange(users.numel())
    recall, ndcg = LinkPredRecall(k), LinkPredNDCG(k)
    mine = row_of[test_src] >= 0
    gt = torch.stack([row_of[test_src][mine], test_dst[mine]])
    preds = [
        movies
        for _, movies, _ in topk_chunks(
            score_fn, num_users, num_movies, ScoreConfig(k=k, score_memory_mb=memory_mb), seen, users, device=device
        )
    ]
    if preds:
        pred_index = torch.cat(preds)
        recall.update(pred_index, gt)
        ndcg.update(pred_index, gt)
    sums = all_reduce_sum([float(recall.accum), float(recall.total), float(ndcg.accum), float(ndcg.total)], device)
    return {
        f"recall@{k}": sums[0] / max(sums[1], 1),
        f"ndcg@{k}": sums[2] / max(sums[3], 1),
        "eval_users": int(total_users),
    }


def popularity_score_fn(train_dst: Tensor, num_movies: int, device: torch.device | str = "cpu") -> ScoreFn:
    """Scores every movie by its number of training ratings, the same for every user
    (blocks on ``device``)."""
    popularity = torch.bincount(train_dst, minlength=num_movies).float().to(device)
    return lambda users: popularity.expand(users.numel(), -1).clone()


@torch.no_grad()
def evaluate_edges(
    model,
    graph,
    message_ids: Tensor,
    eval_ids: Tensor,
    k: int = 10,
    memory_mb: int = 256,
    rating_min: float = 0.5,
    rating_max: float = 5.0,
    relevant_min: float = 4.0,
    baseline_ids: Tensor | None = None,
    z: dict[str, Tensor] | None = None,
    seen: RatedIndex | None = None,
    env: DistEnv = DistEnv(),
) -> dict[str, Any]:
    """Full-neighbourhood evaluation of ``eval_ids``: RMSE/MAE on every edge, Recall/NDCG@k
    on edges rated ``>= relevant_min``.

    Message passing runs over all of ``message_ids`` (no sampling), and those edges are
    also the ones masked from the ranking. Validation (``message_ids`` = train) and test
    (train + val) therefore run the same inference. Under torchrun every rank takes every
    ``world_size``-th edge and user, and the sums are reduced, so all ranks return the
    same metrics (every rank must call this).

    Args:
        baseline_ids: Also rank by popularity counted over these edges (``popularity``).
        z: Embeddings over ``message_ids`` computed elsewhere (layer-wise over the graph
            index); default: ``encode_all``.
        seen: Each user's ``message_ids`` movies; default: built from ``graph``.
        env: This process's place in a torchrun job (default: one process).
    """
    model.eval()
    device = model.rating_mean.device
    z = model.encode_all(graph.hetero_data(message_ids)) if z is None else model.movies_here(z)
    mine = eval_ids[env.rank :: env.world_size]
    src, dst = graph.src[mine], graph.dst[mine]
    pred = torch.cat(
        [model.predict_pairs(z, s.to(device), d.to(device)) for s, d in zip(src.split(65536), dst.split(65536))]
        + [torch.empty(0, device=device)]
    )
    err = pred.float().cpu().clamp(rating_min, rating_max) - graph.rating[mine].float()
    sse, sae, n = all_reduce_sum([float(err.pow(2).sum()), float(err.abs().sum()), float(err.numel())], device)
    out: dict[str, Any] = {"rmse": math.sqrt(sse / max(n, 1)), "mae": sae / max(n, 1)}
    out["edges"] = int(eval_ids.numel())
    relevant = graph.rating[eval_ids] >= relevant_min
    if seen is None:
        seen = RatedIndex.from_edges(graph.src[message_ids], graph.dst[message_ids], graph.num_users)
    args = (
        graph.num_users,
        graph.num_movies,
        seen,
        graph.src[eval_ids][relevant],
        graph.dst[eval_ids][relevant],
        k,
        memory_mb,
        env,
        device,
    )
    all_movies = torch.arange(graph.num_movies, device=device)
    out["model"] = ranking_metrics(lambda u: model.rank_block(z, u.to(device), all_movies), *args)
    if baseline_ids is not None:
        out["popularity"] = ranking_metrics(
            popularity_score_fn(graph.dst[baseline_ids], graph.num_movies, device), *args
        )
    return out


def evaluate_split(
    model,
    graph,
    split,
    k: int = 10,
    memory_mb: int = 256,
    rating_min: float = 0.5,
    rating_max: float = 5.0,
    relevant_min: float = 4.0,
    z: dict[str, Tensor] | None = None,
    seen: RatedIndex | None = None,
    env: DistEnv = DistEnv(),
) -> dict[str, Any]:
    """Test RMSE/MAE on every test edge and Recall/NDCG@k on test edges rated ≥ ``relevant_min``.

    Message passing uses training and validation edges; those are also the ones masked
    from the ranking, so held-out test movies stay rankable. The popularity baseline is
    scored on the same users and masks. ``z``: embeddings over those edges computed
    elsewhere (layer-wise over the graph index's ``seen`` subset); default: ``encode_all``.
    ``seen``: each user's training and validation movies (the index's ``seen`` CSC);
    default: built from ``graph``. Under torchrun the work is split over ranks and reduced.
    """
    out = evaluate_edges(
        model,
        graph,
        torch.cat([split.train, split.val]),
        split.test,
        k,
        memory_mb,
        rating_min,
        rating_max,
        relevant_min,
        baseline_ids=split.train,
        z=z,
        seen=seen,
        env=env,
    )
    out["test_edges"] = out.pop("edges")
    return out
