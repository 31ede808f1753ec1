"""Training objectives: the rating loss's class weights and the retrieval head's in-batch
sampled softmax (logQ-corrected, gathered across DDP ranks)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from scalable_rec.dist import DistEnv


def rating_classes(rating: torch.Tensor) -> torch.Tensor:
    """Half-star class of each rating: ``round(2r)``."""
    return torch.round(rating * 2).long().clamp(min=0)


def rating_class_table(counts: torch.Tensor) -> torch.Tensor:
    """Weight per half-star class from the classes' rating counts: inverse frequency,
    scaled so that the counted ratings' weights have mean 1 (absent classes weigh 0)."""
    counts = counts.float()
    weights = torch.where(counts > 0, counts.sum() / (counts.clamp(min=1) * (counts > 0).sum()), 0.0)
    return weights / ((weights * counts).sum() / counts.sum())


def rating_class_weights(rating: torch.Tensor) -> torch.Tensor:
    """Per-rating weights: inverse frequency of its half-star class (``round(2r)``), mean 1.

    The article's weighted MSE bucketed by ``int(rating)``, which merges 4.0 with 4.5 and
    0.5 with nothing (class 0); half stars are classes of their own here.
    """
    cls = rating_classes(rating)
    return rating_class_table(torch.bincount(cls))[cls]


def ranking_positives(rating: torch.Tensor, weight: torch.Tensor, relevant_min: float) -> torch.Tensor:
    """Row weights of the in-batch softmax: 1 for a relevant rating (``>= relevant_min``),
    0 for a dislike or a pad (``weight == 0``).

    The rating loss's weights (``weighted_mse`` class weights) only mark pads here: a
    rare 0.5-star class weighs most in the rating loss, and must weigh nothing as a
    positive of the ranking loss.
    """
    return ((weight > 0) & (rating >= relevant_min)).to(rating.dtype)


def in_batch_softmax_loss(
    ru: torch.Tensor,
    rm: torch.Tensor,
    row_movies: torch.Tensor,
    col_movies: torch.Tensor,
    log_q: torch.Tensor,
    weight: torch.Tensor,
    offset: int = 0,
    denominator: torch.Tensor | float | None = None,
    dislike: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sampled softmax of each labelled user over all labelled movies of the global batch.

    Row ``i`` (user ``ru[i]``, whose movie is ``row_movies[i]``) should pick column
    ``offset + i`` among ``rm`` (under DDP, every rank's movies, gathered). Negatives are
    drawn by popularity (they are other users' rated movies), so ``log q`` is subtracted
    (logQ correction) to keep the logits an estimate of the full-catalog softmax instead of
    a penalty on popular movies. Columns holding the row's own movie are not negatives, nor
    are pad columns (``col_movies < 0``: the zero-weight copies that even out DDP ranks),
    so padding never changes the objective. ``denominator`` (default: the number of
    weighted rows) lets DDP normalise by the global batch's count.

    ``dislike`` (row weights, 0 for a row that is not a dislike) adds ``-log(1 - p_i)`` per
    disliked row, ``p_i`` the softmax probability of the row's own movie: the user's
    disliked movie is pushed down among the same columns a positive is pulled up in.
    """
    logits = ru @ rm.T - log_q[col_movies.clamp(min=0)][None, :]
    target = torch.arange(ru.size(0), device=ru.device) + offset
    masked = (row_movies[:, None] == col_movies[None, :]) | (col_movies < 0)[None, :]
    masked[torch.arange(ru.size(0), device=ru.device), target] = False
    logits = logits.masked_fill(masked, float("-inf"))
    ce = F.cross_entropy(logits, target, reduction="none")
    if denominator is None:  # this batch's mean over weighted rows
        denominator = weight.bool().sum().clamp(min=1)
    loss = ce * weight
    if dislike is not None:
        # log(1 - p) = log(-expm1(log p)), log p = -ce: exact where p is near 1 (ce near 0)
        push = -torch.log(-torch.expm1(-ce.clamp(min=1e-6)))
        loss = loss + push * dislike
    return loss.sum() / denominator


def gather_columns(rm: torch.Tensor, movies: torch.Tensor, env: DistEnv) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Every rank's ranking movies (differentiable all-gather) so the softmax sees the global
    batch, which makes DDP compute the single-process objective; returns this rank's offset."""
    if not env.enabled:
        return rm, movies, 0
    import torch.distributed._functional_collectives as funcol

    # torch ≥ 2.13 renamed the differentiable all-gather; older releases have only the old name.
    all_gather = getattr(funcol, "all_gather_single_autograd", None) or funcol.all_gather_tensor_autograd
    ids = [torch.empty_like(movies) for _ in range(env.world_size)]
    torch.distributed.all_gather(ids, movies)
    # The backward of the autograd all-gather reduce-scatters (sums) each rank's gradient
    # share back to the rank that produced the rows.
    gathered = all_gather(rm, 0, torch.distributed.group.WORLD)
    return gathered, torch.cat(ids), env.rank * rm.size(0)
