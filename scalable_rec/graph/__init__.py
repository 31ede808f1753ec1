"""Graph + features: shards become tensors, features and ``HeteroData`` for training."""

from __future__ import annotations

from typing import TYPE_CHECKING

from scalable_rec.lazy import lazy_exports

if TYPE_CHECKING:
    from scalable_rec.graph.config import FeatureConfig, SplitConfig
    from scalable_rec.graph.features import movie_features
    from scalable_rec.graph.hetero import MOVIE, RATES, REV_RATES, USER, EdgeSplit, RatingGraph, split_edges

# Where each name lives, imported on first access (scalable_rec.lazy).
_EXPORTS = {
    "FeatureConfig": "scalable_rec.graph.config",
    "SplitConfig": "scalable_rec.graph.config",
    "movie_features": "scalable_rec.graph.features",
    "MOVIE": "scalable_rec.graph.hetero",
    "RATES": "scalable_rec.graph.hetero",
    "REV_RATES": "scalable_rec.graph.hetero",
    "USER": "scalable_rec.graph.hetero",
    "EdgeSplit": "scalable_rec.graph.hetero",
    "RatingGraph": "scalable_rec.graph.hetero",
    "split_edges": "scalable_rec.graph.hetero",
}

__all__ = [
    "EdgeSplit",
    "FeatureConfig",
    "MOVIE",
    "RATES",
    "REV_RATES",
    "RatingGraph",
    "SplitConfig",
    "USER",
    "movie_features",
    "split_edges",
]

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
