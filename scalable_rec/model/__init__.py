"""Model: the hetero GraphSAGE recommender and what training and scoring both do with it.

``recommender`` holds the encoder, decoders and retrieval head (``Recommender``,
``ModelConfig``); ``layerwise`` encodes every node with full neighbourhoods over a graph
store; ``topk`` ranks the full catalog per user in chunks (``ScoreConfig``); ``evaluate``
computes RMSE, Recall@K and NDCG@K on held-out edges. Training validates with these and
scoring serves with them, so they sit below both ``scalable_rec.train`` and
``scalable_rec.score``.
"""

from scalable_rec.model.evaluate import evaluate_edges, evaluate_split, ranking_metrics, rating_errors
from scalable_rec.model.layerwise import encode_layerwise
from scalable_rec.model.recommender import ModelConfig, Recommender
from scalable_rec.model.topk import RatedIndex, ScoreConfig, topk_chunks

__all__ = [
    "ModelConfig",
    "RatedIndex",
    "Recommender",
    "ScoreConfig",
    "encode_layerwise",
    "evaluate_edges",
    "evaluate_split",
    "ranking_metrics",
    "rating_errors",
    "topk_chunks",
]
