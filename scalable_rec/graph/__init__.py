"""Graph + features: shards become tensors, features and ``HeteroData`` for training."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from scalable_rec.graph.config import FeatureConfig, SplitConfig
    from scalable_rec.graph.features import movie_features
    from scalable_rec.graph.hetero import MOVIE, RATES, REV_RATES, USER, EdgeSplit, RatingGraph, split_edges

# Where each name lives: imported on first access (PEP 562), so that importing one light
# submodule (the stage's ``config``) does not import what the others need (docs/design.md,
# "Start-up").
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


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
