"""Score: encode once, rank the full catalog per user in chunks, evaluate."""
from scalable_rec.score.evaluate import popularity_score_fn, ranking_metrics, rating_errors
from scalable_rec.score.topk import RatedIndex, ScoreConfig, to_record_batch, topk_chunks

__all__ = ["RatedIndex", "ScoreConfig", "popularity_score_fn", "ranking_metrics", "rating_errors",
           "to_record_batch", "topk_chunks"]
