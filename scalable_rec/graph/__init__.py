"""Graph + features: shards become tensors, features and ``HeteroData`` for training."""

from scalable_rec.graph.features import FeatureConfig, movie_features
from scalable_rec.graph.hetero import (
    MOVIE,
    RATES,
    REV_RATES,
    USER,
    EdgeSplit,
    RatingGraph,
    SplitConfig,
    split_edges,
)

__all__ = [
    "MOVIE",
    "RATES",
    "REV_RATES",
    "USER",
    "EdgeSplit",
    "FeatureConfig",
    "RatingGraph",
    "SplitConfig",
    "movie_features",
    "split_edges",
]
