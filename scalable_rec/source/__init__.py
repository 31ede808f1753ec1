"""Graph sources: each yields Arrow record batches keyed by the source's own ids."""

from __future__ import annotations

from typing import TYPE_CHECKING

from scalable_rec.lazy import lazy_exports

if TYPE_CHECKING:
    from scalable_rec.source.base import RATING_EDGE, RatingBounds, RatingGraphSource, write_rating_shards
    from scalable_rec.source.movielens import MovieLensSource
    from scalable_rec.source.report import SkipReport

# Where each name lives, imported on first access (scalable_rec.lazy).
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

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
