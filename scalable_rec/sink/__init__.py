"""Sinks: consume ranked ``(user_key, movie_key, score, rank)`` record batches."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from scalable_rec.sink.parquet import merge_parts, part_path, write_parquet

# Where each name lives: imported on first access (PEP 562), so that importing one light
# submodule (the stage's ``config``) does not import what the others need (docs/design.md,
# "Start-up").
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


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
