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
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from scalable_rec.source.config import missing_movielens_files
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
        missing = missing_movielens_files(root)
        if missing:
            raise FileNotFoundError(f"MovieLens directory '{root}' lacks {missing}")
        self.path = str(root.resolve())

    def config(self) -> dict[str, Any]:
        return {"source": "movielens", **asdict(self)}

    def fingerprint(self) -> str:
        """sha256 over both files' bytes and the config: unchanged input gives the same value."""
        h = hashlib.sha256(json.dumps({k: v for k, v in self.config().items() if k != "path"}, sort_keys=True).encode())
        for name in ("movies.csv", "ratings.csv"):
            with open(Path(self.path) / name, "rb") as f:
                while block := f.read(1 << 22):
                    h.update(block)
        return h.hexdigest()

    def _csv(self, name: str, columns: list[str], report: SkipReport) -> Iterator[tuple[pa.RecordBatch, LineOf]]:
        """Streams ``columns`` as string batches, each with its rows' line numbers. A UTF-8
        BOM is accepted; a row with bytes that are not UTF-8 is counted (``undecodable_row``)
        and skipped, or under ``--strict`` raises naming the file and line."""
        path = Path(self.path) / name
        invalid: list[int] = []

        def on_invalid(row) -> str:
            invalid.append(row.number)
            report.skip(
                f"malformed_row_{path.stem}",
                f"{path.name} line {row.number}: {row.text!r} "
                f"(expected {row.expected_columns} columns, got {row.actual_columns})",
            )
            return "skip"

        with open(path, newline="", encoding="utf-8-sig", errors="replace") as f:
            header = next(csv.reader(f), [])
        missing = [c for c in columns if c not in header]
        if missing:
            raise ValueError(f"'{path}' has columns {header}, expected {columns} (missing {missing})")
        reader = pacsv.open_csv(
            path,
            # One thread: pyarrow then knows each invalid row's line number (else "line None").
            read_options=pacsv.ReadOptions(block_size=self.block_size, use_threads=False),
            # Empty lines are malformed rows too, so every line is a row or a reported skip
            # and the line numbers of skipped values stay exact.
            parse_options=pacsv.ParseOptions(
                invalid_row_handler=on_invalid, newlines_in_values=False, ignore_empty_lines=False
            ),
            # Bytes first: a stray latin-1 byte must cost one row, not abort the whole file.
            convert_options=pacsv.ConvertOptions(
                column_types={c: pa.binary() for c in columns}, include_columns=columns, strings_can_be_null=False
            ),
        )
        next_line = 2  # line 1 is the header
        for batch in reader:
            line_of = LineOf(path.name, next_line, sorted(n for n in invalid if n is not None and n >= next_line))
            next_line = line_of.end(batch.num_rows)
            yield _decode(batch, line_of, report), line_of

    def movies(self, report: SkipReport) -> Iterator[pa.RecordBatch]:
        for batch, line_of in self._csv("movies.csv", MOVIES_COLUMNS, report):
            key, ok = _parse(batch.column("movieId"), pa.int64())
            if not ok.all():
                _skip_rows(batch, ~ok, "unparseable_movie_id", report, line_of)
            mask = pa.array(ok)
            yield pa.record_batch(
                [pa.array(key[ok]), batch.column("title").filter(mask), batch.column("genres").filter(mask)],
                names=["key", "title", "genres"],
            )

    def users(self, report: SkipReport) -> None:
        return None  # MovieLens users exist only through their ratings

    def ratings(self, report: SkipReport) -> Iterator[pa.RecordBatch]:
        for batch, line_of in self._csv("ratings.csv", RATINGS_COLUMNS, report):
            user, ok_u = _parse(batch.column("userId"), pa.int64())
            movie, ok_m = _parse(batch.column("movieId"), pa.int64())
            rating, ok_r = _parse(batch.column("rating"), pa.float64())
            ts, ok_t = _parse(batch.column("timestamp"), pa.int64())
            ok = ok_u & ok_m & ok_r & ok_t
            if not ok.all():  # each bad row is counted once, under its first bad column
                pending = ~ok
                for what, good in (("user_id", ok_u), ("movie_id", ok_m), ("rating", ok_r), ("timestamp", ok_t)):
                    _skip_rows(batch, pending & ~good, f"unparseable_{what}", report, line_of)
                    pending &= good
            yield pa.record_batch(
                [pa.array(user[ok]), pa.array(movie[ok]), pa.array(rating[ok]), pa.array(ts[ok])],
                names=["user_key", "movie_key", "rating", "timestamp"],
            )


class LineOf:
    """Line numbers of one batch's rows: consecutive from ``first``, skipping the lines
    pyarrow reported as malformed (``invalid``, sorted)."""

    def __init__(self, file: str, first: int, invalid: list[int]) -> None:
        self.file, self.first, self.invalid = file, first, invalid
        self.kept: list[int] = []  # rows removed by ``_decode``, so later lookups skip them

    def end(self, rows: int) -> int:
        """The first line after this batch's ``rows`` rows and the malformed lines among them."""
        end = self.first + rows
        for n in self.invalid:
            if n < end:
                end += 1
        return end

    def __call__(self, i: int) -> int:
        if self.kept:
            i = self.kept[i]
        line = self.first + i
        for n in self.invalid:
            if n <= line:
                line += 1
        return line

    def where(self, i: int) -> str:
        return f"{self.file} line {self(i)}"


def _decode(batch: pa.RecordBatch, line_of: LineOf, report: SkipReport) -> pa.RecordBatch:
    """Binary columns → UTF-8 strings; rows with bytes that do not decode are skipped."""
    try:
        return pa.record_batch([c.cast(pa.string()) for c in batch.columns], names=batch.schema.names)
    except pa.ArrowInvalid:
        pass
    ok = np.ones(batch.num_rows, dtype=bool)
    for column in batch.columns:
        for i, value in enumerate(column.to_pylist()):
            try:
                value.decode("utf-8")
            except UnicodeDecodeError:
                ok[i] = False
    for i in np.flatnonzero(~ok):
        row = {n: batch.column(n)[int(i)].as_py() for n in batch.schema.names}
        report.skip("undecodable_row", f"{line_of.where(int(i))}: {row} (not UTF-8)")
    line_of.kept = np.flatnonzero(ok).tolist()
    kept = batch.filter(pa.array(ok))
    return pa.record_batch([c.cast(pa.string()) for c in kept.columns], names=kept.schema.names)


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


def _skip_rows(
    batch: pa.RecordBatch, bad: np.ndarray, reason: str, report: SkipReport, line_of: LineOf | None = None
) -> None:
    idx = np.flatnonzero(bad)
    if len(idx):
        row = {n: batch.column(n)[int(idx[0])].as_py() for n in batch.schema.names}
        report.skip(reason, f"{line_of.where(int(idx[0]))}: {row}" if line_of else row, count=len(idx))
