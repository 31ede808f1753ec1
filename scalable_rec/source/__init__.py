"""Graph sources: each yields Arrow record batches keyed by the source's own ids."""

from scalable_rec.source.base import RATING_EDGE, RatingBounds, RatingGraphSource, write_rating_shards
from scalable_rec.source.movielens import MovieLensSource
from scalable_rec.source.report import SkipReport

__all__ = ["RATING_EDGE", "MovieLensSource", "RatingBounds", "RatingGraphSource", "SkipReport", "write_rating_shards"]
