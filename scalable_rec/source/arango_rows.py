"""Cursor rows of the ArangoDB export → Arrow record batches (movies, users, rating edges).

Rows are the compact arrays the export's queries return (``[key, title, genres]``,
``[key]``, ``[key, _from, _to, rating, timestamp]``); conversion is vectorised in Arrow and
NumPy where the values allow it, and every dropped row is counted in a ``SkipReport``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from scalable_rec.connection import ArangoConfig
from scalable_rec.source.report import SkipReport

MOVIE_SCHEMA = pa.schema([("key", pa.string()), ("title", pa.string()), ("genres", pa.string())])
USER_SCHEMA = pa.schema([("key", pa.string())])
RATING_SCHEMA = pa.schema(
    [("user_key", pa.string()), ("movie_key", pa.string()), ("rating", pa.float64()), ("timestamp", pa.int64())]
)


def movie_batch(rows: list[list[Any]]) -> pa.RecordBatch:
    """``[key, title, genres]`` rows → ``key, title, genres`` strings (genre lists pipe-joined)."""
    keys, titles, genres = zip(*rows)
    genres = ["|".join(str(g) for g in v) if isinstance(v, list) else ("" if v is None else str(v)) for v in genres]
    titles = ["" if t is None else str(t) for t in titles]
    return pa.record_batch(
        [pa.array(keys, pa.string()), pa.array(titles, pa.string()), pa.array(genres, pa.string())], schema=MOVIE_SCHEMA
    )


def user_batch(rows: list[list[Any]]) -> pa.RecordBatch:
    return pa.record_batch([pa.array([r[0] for r in rows], pa.string())], schema=USER_SCHEMA)


def _strings(values: tuple[Any, ...]) -> pa.Array:
    try:
        return pa.array(values, pa.string())
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return pa.array([v if isinstance(v, str) else None for v in values], pa.string())


def _strip_prefix(values: tuple[Any, ...], prefix: str) -> tuple[pa.Array, np.ndarray]:
    """Keys after ``prefix`` (``Users/``) and a mask of the values that carry it."""
    arr = _strings(values)
    ok = pc.fill_null(pc.starts_with(arr, prefix), False).to_numpy(zero_copy_only=False)
    return pc.utf8_slice_codeunits(arr, len(prefix)), ok


def _ratings(values: tuple[Any, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """float64 ratings plus masks of missing (null/absent) and non-numeric values."""
    if set(map(type, values)) <= {int, float, type(None)}:  # not bool: pyarrow would make True 1.0
        arr = pa.array(values, pa.float64())
        missing = arr.is_null().to_numpy(zero_copy_only=False)
        return pc.fill_null(arr, np.nan).to_numpy(zero_copy_only=False), missing, np.zeros(len(values), bool)
    out = np.full(len(values), np.nan)
    missing = np.zeros(len(values), bool)
    wrong = np.zeros(len(values), bool)
    for i, v in enumerate(values):
        if v is None:
            missing[i] = True
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[i] = v
        else:
            wrong[i] = True
    return out, missing, wrong


def _timestamps(values: tuple[Any, ...]) -> pa.Array:
    """int64 Unix times; values that are not whole numbers become null (the edge is kept)."""
    try:
        return pa.array(values, pa.int64())
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return pa.array(
            [
                int(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and float(v).is_integer() else None
                for v in values
            ],
            pa.int64(),
        )


def rating_batch(rows: list[list[Any]], layout: ArangoConfig, report: SkipReport) -> pa.RecordBatch:
    """``[key, _from, _to, rating, timestamp]`` rows → ``RATING_SCHEMA`` rows a shard can use.

    Edges whose ``_from``/``_to`` name another collection, and ratings that are missing or not
    numbers, are counted in ``report`` (each row once, under its first problem) and dropped.
    Unknown vertices and out-of-range ratings are left to ``validate_ratings``.
    """
    keys, froms, tos, ratings, stamps = zip(*rows)
    user_key, ok_from = _strip_prefix(froms, f"{layout.users_collection}/")
    movie_key, ok_to = _strip_prefix(tos, f"{layout.movies_collection}/")
    rating, missing, wrong = _ratings(ratings)
    pending = np.ones(len(keys), bool)
    for reason, bad, expected in (
        ("wrong_from_collection", ~ok_from, f"_from in '{layout.users_collection}'"),
        ("wrong_to_collection", ~ok_to, f"_to in '{layout.movies_collection}'"),
        ("missing_rating", missing, "a rating"),
        ("non_numeric_rating", wrong, "a numeric rating"),
    ):
        hit = np.flatnonzero(pending & bad)
        if len(hit):
            i = int(hit[0])
            report.skip(
                reason,
                f"{layout.ratings_collection}/{keys[i]}: expected {expected}, got _from="
                f"{froms[i]!r}, _to={tos[i]!r}, rating={ratings[i]!r}",
                count=len(hit),
            )
            pending[hit] = False
    keep = pa.array(pending)
    return pa.record_batch(
        [user_key.filter(keep), movie_key.filter(keep), pa.array(rating[pending]), _timestamps(stamps).filter(keep)],
        schema=RATING_SCHEMA,
    )
