"""Train: hetero GraphSAGE on LinkNeighborLoader mini-batches, AMP, torchrun DDP."""

from __future__ import annotations

from typing import TYPE_CHECKING

from scalable_rec.lazy import lazy_exports

if TYPE_CHECKING:
    from scalable_rec.model.config import ModelConfig
    from scalable_rec.model.recommender import Recommender
    from scalable_rec.train.config import TrainConfig
    from scalable_rec.train.loop import TrainResult, train

# Where each name lives, imported on first access (scalable_rec.lazy).
_EXPORTS = {
    "ModelConfig": "scalable_rec.model.config",
    "Recommender": "scalable_rec.model.recommender",
    "TrainConfig": "scalable_rec.train.config",
    "TrainResult": "scalable_rec.train.loop",
    "train": "scalable_rec.train.loop",
}

__all__ = [
    "ModelConfig",
    "Recommender",
    "TrainConfig",
    "TrainResult",
    "train",
]

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
