"""Train: hetero GraphSAGE on LinkNeighborLoader mini-batches, AMP, torchrun DDP."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from scalable_rec.model.config import ModelConfig
    from scalable_rec.model.recommender import Recommender
    from scalable_rec.train.config import TrainConfig
    from scalable_rec.train.loop import TrainResult, train

# Where each name lives: imported on first access (PEP 562), so that importing one light
# submodule (the stage's ``config``) does not import what the others need (docs/design.md,
# "Start-up").
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


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
