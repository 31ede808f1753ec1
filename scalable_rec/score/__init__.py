"""Score: encode once, rank the full catalog per user in chunks, evaluate, plot."""

from scalable_rec.model.evaluate import (
    evaluate_edges,
    evaluate_split,
    popularity_score_fn,
    ranking_metrics,
    rating_errors,
)
from scalable_rec.model.topk import RatedIndex, ScoreConfig, to_record_batch, topk_chunks
from scalable_rec.score.plot import plot_curves
from scalable_rec.score.recommend import recommend

__all__ = [
    "RatedIndex",
    "ScoreConfig",
    "evaluate_edges",
    "evaluate_split",
    "plot_curves",
    "popularity_score_fn",
    "ranking_metrics",
    "rating_errors",
    "recommend",
    "to_record_batch",
    "topk_chunks",
]
