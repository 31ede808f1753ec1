"""Sinks: consume ranked ``(user_key, movie_key, score, rank)`` record batches."""
from scalable_rec.sink.parquet import write_parquet

__all__ = ["write_parquet"]
