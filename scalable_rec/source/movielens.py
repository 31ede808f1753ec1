"""MovieLens CSV source (ml-latest-small 2016/2018, ml-25m, ml-32m: same file format).

``ratings.csv`` is streamed block by block with pyarrow's CSV reader, so ml-25m/32m never
sit in memory whole. Values are read as strings and converted per column: the vectorised
cast handles clean blocks, and only a block that fails it is walked row by row to count
and report the bad rows. Ratings stay floats (4.5 stays 4.5).
"""
from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from scalable_rec.source.report import SkipReport

RATINGS_COLUMNS = ["userId", "movieId", "rating", "timestamp"]
MOVIES_COLUMNS = ["movieId", "title", "genres"]


@dataclass
class MovieLensSource:
    """Reads ``ratings.csv`` and ``movies.csv`` from a MovieLens directory.

    Args:
        path: Directory holding the two files.
        block_size: Bytes per CSV block (bounds memory while streaming; default 16 MiB).
    """

    path: str
    block_size: int = 16 << 20

    def __post_init__(self) -> None:
        root = Path(self.path)
        missing = [n for n in ("ratings.csv", "movies.csv") if not (root / n).is_file()]
        if missing:
            raise FileNotFoundError(f"MovieLens directory '{root}' lacks {missing}")
        self.path = str(root.resolve())

    def config(self) -> dict[str, Any]:
        return {"source": "movielens", **asdict(self)}

    def fingerprint(self) -> str:
        """sha256 over both files' bytes and the config: unchanged input gives the same value."""
        h = hashlib.sha256(json.dumps({k: v for k, v in self.config().items() if k != "path"},
                                      sort_keys=True).encode())
        for name in ("movies.csv", "ratings.csv"):
            with open(Path(self.path) / name, "rb") as f:
                while block := f.read(1 << 22):
                    h.update(block)
        return h.hexdigest()

    def _csv(self, name: str, columns: list[str], report: SkipReport) -> Iterator[pa.RecordBatch]:
        path = Path(self.path) / name

        def on_invalid(row) -> str:
            report.skip(f"malformed_row_{path.stem}", f"{path.name} line {row.number}: {row.text!r} "
                        f"(expected {row.expected_columns} columns, got {row.actual_columns})")
            return "skip"

        with open(path, newline="", encoding="utf-8") as f:
            header = next(csv.reader(f), [])
        missing = [c for c in columns if c not in header]
        if missing:
            raise ValueError(f"'{path}' has columns {header}, expected {columns} (missing {missing})")
        reader = pacsv.open_csv(
            path,
            read_options=pacsv.ReadOptions(block_size=self.block_size),
            parse_options=pacsv.ParseOptions(invalid_row_handler=on_invalid, newlines_in_values=False),
            convert_options=pacsv.ConvertOptions(
                column_types={c: pa.string() for c in columns}, include_columns=columns,
                strings_can_be_null=False),
        )
        yield from reader

    def movies(self, report: SkipReport) -> Iterator[pa.RecordBatch]:
        for batch in self._csv("movies.csv", MOVIES_COLUMNS, report):
            key, ok = _parse(batch.column("movieId"), pa.int64())
            if not ok.all():
                _skip_rows(batch, ~ok, "unparseable_movie_id", report)
            mask = pa.array(ok)
            yield pa.record_batch(
                [pa.array(key[ok]), batch.column("title").filter(mask), batch.column("genres").filter(mask)],
                names=["key", "title", "genres"],
            )

    def users(self, report: SkipReport) -> None:
        return None  # MovieLens users exist only through their ratings

    def ratings(self, report: SkipReport) -> Iterator[pa.RecordBatch]:
        for batch in self._csv("ratings.csv", RATINGS_COLUMNS, report):
            user, ok_u = _parse(batch.column("userId"), pa.int64())
            movie, ok_m = _parse(batch.column("movieId"), pa.int64())
            rating, ok_r = _parse(batch.column("rating"), pa.float64())
            ts, ok_t = _parse(batch.column("timestamp"), pa.int64())
            ok = ok_u & ok_m & ok_r & ok_t
            if not ok.all():  # each bad row is counted once, under its first bad column
                pending = ~ok
                for what, good in (("user_id", ok_u), ("movie_id", ok_m), ("rating", ok_r), ("timestamp", ok_t)):
                    _skip_rows(batch, pending & ~good, f"unparseable_{what}", report)
                    pending &= good
            yield pa.record_batch(
                [pa.array(user[ok]), pa.array(movie[ok]), pa.array(rating[ok]), pa.array(ts[ok])],
                names=["user_key", "movie_key", "rating", "timestamp"],
            )


def _parse(column: pa.Array, to: pa.DataType) -> tuple[np.ndarray, np.ndarray]:
    """Converts a string column; returns values and a mask of rows that parsed."""
    try:
        values = pc.cast(pc.utf8_trim_whitespace(column), to)
        return values.to_numpy(zero_copy_only=False), np.ones(len(column), dtype=bool)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        pass
    py = float if pa.types.is_floating(to) else int
    out = np.zeros(len(column), dtype=to.to_pandas_dtype())
    ok = np.zeros(len(column), dtype=bool)
    for i, text in enumerate(column.to_pylist()):
        try:
            out[i] = py(text.strip())
            ok[i] = True
        except (ValueError, AttributeError, OverflowError):
            pass
    return out, ok


def _skip_rows(batch: pa.RecordBatch, bad: np.ndarray, reason: str, report: SkipReport) -> None:
    idx = np.flatnonzero(bad)
    if len(idx):
        row = {n: batch.column(n)[int(idx[0])].as_py() for n in batch.schema.names}
        report.skip(reason, row, count=len(idx))
