"""A given train/test split: two rating files, one shard set, a ``given_split`` column.

Published splits come as a training file and a test file of ``user item rating
[timestamp]`` rows, tab- or comma-separated without a header (MovieLens-100K ``u1.base``,
many benchmark dumps), or as MovieLens CSV with its header. Both files go through the same
path as every source (``write_rating_shards``: key mapping, range checks, one rating per
pair, skip report) into ONE shard set whose edges carry ``given_split`` (0 train, 1 test).
One shard set rather than two, because users and movies must share one index space
across the files (a test user is a training user), and because the trainer then reads
one graph: ``split_edges`` takes the test edges as given and carves validation from the
training edges with the split seed.

Movies come from a MovieLens ``movies.csv`` when one is given (titles and genres become
features as usual); otherwise from the items of both files, with a constant 1-d feature
(the model then learns from ids and the graph alone).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from scalable_rec.source.config import missing_rating_files
from scalable_rec.source.movielens import MovieLensSource, _parse, _skip_rows
from scalable_rec.source.report import SkipReport

COLUMNS = ["user", "item", "rating", "timestamp"]


def sniff(path: Path) -> tuple[str, bool, int]:
    """``(delimiter, has_header, columns)`` from the first line of a rating file."""
    with open(path, encoding="utf-8") as f:
        first = f.readline().strip()
    if not first:
        raise ValueError(f"Rating file '{path}' is empty")
    delimiter = "\t" if "\t" in first else ","
    fields = [x.strip() for x in first.split(delimiter)]
    if not 3 <= len(fields) <= 4:
        raise ValueError(
            f"Rating file '{path}' needs 3 or 4 tab- or comma-separated columns "
            f"(user item rating [timestamp]); its first line has {len(fields)}: {first[:80]!r}"
        )
    try:
        float(fields[2])
        header = False
    except ValueError:
        header = True
    return delimiter, header, len(fields)


@dataclass
class MoviesFile(MovieLensSource):
    """The ``movies.csv`` of a MovieLens folder on its own: a given split brings its own
    ratings, so the folder needs no ``ratings.csv``."""

    def __post_init__(self) -> None:
        root = Path(self.path)
        if not (root / "movies.csv").is_file():
            raise FileNotFoundError(f"MovieLens directory '{root}' lacks movies.csv")
        self.path = str(root.resolve())


@dataclass
class RatingFilesSource:
    """Ratings from a training and a test file; each edge records which one it came from.

    Args:
        train_file: Training ratings.
        test_file: Test ratings.
        movies_dir: Optional MovieLens folder whose ``movies.csv`` supplies movies.
        block_size: Bytes per CSV block (bounds memory while streaming).
    """

    train_file: str
    test_file: str
    movies_dir: str | None = None
    block_size: int = 16 << 20

    def __post_init__(self) -> None:
        problem = missing_rating_files(self.train_file, self.test_file)
        if problem:
            raise FileNotFoundError(problem)
        self.train_file, self.test_file = str(Path(self.train_file).resolve()), str(Path(self.test_file).resolve())
        self._movielens = None
        if self.movies_dir and (Path(self.movies_dir) / "movies.csv").is_file():
            self._movielens = MoviesFile(self.movies_dir, self.block_size)

    def config(self) -> dict[str, Any]:
        return {"source": "rating_files", **{k: v for k, v in asdict(self).items()}}

    def fingerprint(self) -> str:
        h = hashlib.sha256(
            json.dumps(
                {k: v for k, v in self.config().items() if not k.endswith(("file", "dir"))}, sort_keys=True
            ).encode()
        )
        files = [self.train_file, self.test_file] + (
            [str(Path(self.movies_dir) / "movies.csv")] if self._movielens else []
        )
        for name in files:
            with open(name, "rb") as f:
                while block := f.read(1 << 22):
                    h.update(block)
        return h.hexdigest()

    def _rows(self, path: str, report: SkipReport) -> Iterator[tuple[np.ndarray, ...]]:
        """Parsed ``(user, item, rating, timestamp, ok)`` per block; bad rows counted."""
        delimiter, header, ncols = sniff(Path(path))
        names = COLUMNS[:ncols]

        def on_invalid(row) -> str:
            report.skip(
                "malformed_row_ratings",
                f"{Path(path).name} line {row.number}: {row.text!r} "
                f"(expected {row.expected_columns} columns, got {row.actual_columns})",
            )
            return "skip"

        reader = pacsv.open_csv(
            path,
            read_options=pacsv.ReadOptions(block_size=self.block_size, column_names=names, skip_rows=int(header)),
            parse_options=pacsv.ParseOptions(delimiter=delimiter, invalid_row_handler=on_invalid),
            convert_options=pacsv.ConvertOptions(
                column_types={c: pa.string() for c in names}, strings_can_be_null=False
            ),
        )
        for batch in reader:
            user, ok_u = _parse(batch.column("user"), pa.int64())
            item, ok_i = _parse(batch.column("item"), pa.int64())
            rating, ok_r = _parse(batch.column("rating"), pa.float64())
            if ncols == 4:
                ts, ok_t = _parse(batch.column("timestamp"), pa.int64())
            else:
                ts, ok_t = np.zeros(batch.num_rows, dtype=np.int64), np.ones(batch.num_rows, dtype=bool)
            ok = ok_u & ok_i & ok_r & ok_t
            if not ok.all():
                _skip_rows(batch, ~ok, "unparseable_rating_row", report)
            yield user[ok], item[ok], rating[ok], (ts[ok] if ncols == 4 else None)

    def users(self, report: SkipReport) -> None:
        return None  # users exist through their ratings

    def movies(self, report: SkipReport) -> Iterator[pa.RecordBatch]:
        if self._movielens is not None:
            yield from self._movielens.movies(report)
            return
        items = np.unique(
            np.concatenate(
                [item for path in (self.train_file, self.test_file) for _, item, _, _ in self._rows(path, SkipReport())]
                or [np.empty(0, np.int64)]
            )
        )
        yield pa.record_batch(
            [pa.array(items), pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(len(items), np.float32)), 1)],
            names=["key", "features"],
        )

    def ratings(self, report: SkipReport) -> Iterator[pa.RecordBatch]:
        for given, path in enumerate((self.train_file, self.test_file)):
            for user, item, rating, ts in self._rows(path, report):
                yield pa.record_batch(
                    [
                        pa.array(user),
                        pa.array(item),
                        pa.array(rating),
                        pa.array(ts, pa.int64()) if ts is not None else pa.nulls(len(user), pa.int64()),
                        pa.array(np.full(len(user), given, np.int8)),
                    ],
                    names=["user_key", "movie_key", "rating", "timestamp", "given_split"],
                )
