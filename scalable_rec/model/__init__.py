"""Model: the hetero GraphSAGE recommender and what training and scoring both do with it.

``config`` holds their settings (``ModelConfig``, ``ScoreConfig``); ``recommender`` the
encoder, decoders and retrieval head (``Recommender``); ``layerwise`` encodes every node
with full neighbourhoods over a graph store; ``topk`` ranks the full catalog per user in
chunks; ``evaluate``
computes RMSE, Recall@K and NDCG@K on held-out edges. Training validates with these and
scoring serves with them, so they sit below both ``scalable_rec.train`` and
``scalable_rec.score``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from scalable_rec.lazy import lazy_exports

if TYPE_CHECKING:
    from scalable_rec.model.config import ModelConfig, ScoreConfig
    from scalable_rec.model.evaluate import evaluate_edges, evaluate_split, ranking_metrics, rating_errors
    from scalable_rec.model.layerwise import encode_layerwise
    from scalable_rec.model.recommender import Recommender
    from scalable_rec.model.topk import RatedIndex, topk_chunks

# Where each name lives, imported on first access (scalable_rec.lazy).
_EXPORTS = {
    "ModelConfig": "scalable_rec.model.config",
    "ScoreConfig": "scalable_rec.model.config",
    "evaluate_edges": "scalable_rec.model.evaluate",
    "evaluate_split": "scalable_rec.model.evaluate",
    "ranking_metrics": "scalable_rec.model.evaluate",
    "rating_errors": "scalable_rec.model.evaluate",
    "encode_layerwise": "scalable_rec.model.layerwise",
    "Recommender": "scalable_rec.model.recommender",
    "RatedIndex": "scalable_rec.model.topk",
    "topk_chunks": "scalable_rec.model.topk",
}

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

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
