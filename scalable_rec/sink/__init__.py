"""Sinks: consume ranked ``(user_key, movie_key, score, rank)`` record batches."""

from scalable_rec.sink.parquet import merge_parts, part_path, write_parquet

__all__ = ["merge_parts", "part_path", "write_parquet"]
