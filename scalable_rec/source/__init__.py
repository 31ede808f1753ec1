"""Graph sources: each yields Arrow record batches keyed by the source's own ids."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from scalable_rec.source.base import RATING_EDGE, RatingBounds, RatingGraphSource, write_rating_shards
    from scalable_rec.source.movielens import MovieLensSource
    from scalable_rec.source.report import SkipReport

# Where each name lives: imported on first access (PEP 562), so that importing one light
# submodule (the stage's ``config``) does not import what the others need (docs/design.md,
# "Start-up").
_EXPORTS = {
    "RATING_EDGE": "scalable_rec.source.base",
    "RatingBounds": "scalable_rec.source.base",
    "RatingGraphSource": "scalable_rec.source.base",
    "write_rating_shards": "scalable_rec.source.base",
    "MovieLensSource": "scalable_rec.source.movielens",
    "SkipReport": "scalable_rec.source.report",
}

__all__ = [
    "MovieLensSource",
    "RATING_EDGE",
    "RatingBounds",
    "RatingGraphSource",
    "SkipReport",
    "write_rating_shards",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
