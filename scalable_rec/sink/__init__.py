"""Sinks: consume ranked ``(user_key, movie_key, score, rank)`` record batches."""

from __future__ import annotations

from typing import TYPE_CHECKING

from scalable_rec.lazy import lazy_exports

if TYPE_CHECKING:
    from scalable_rec.sink.parquet import merge_parts, part_path, write_parquet

# Where each name lives, imported on first access (scalable_rec.lazy).
_EXPORTS = {
    "merge_parts": "scalable_rec.sink.parquet",
    "part_path": "scalable_rec.sink.parquet",
    "write_parquet": "scalable_rec.sink.parquet",
}

__all__ = [
    "merge_parts",
    "part_path",
    "write_parquet",
]

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
