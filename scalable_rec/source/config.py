"""The source stage's settings: how the graph is read out of ArangoDB (``ExportConfig``) and
the synthetic graph's size presets.

No Arrow, numpy or python-arango import, so that the command line can parse and validate
its flags before those load (docs/design.md, "Start-up").
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

PRESETS: dict[str, tuple[int, int, int]] = {
    # name: (users, movies, edges)
    "tiny": (50, 50, 500),
    "small": (1_000, 2_000, 100_000),
    "medium": (10_000, 10_000, 1_000_000),
    "large": (70_000, 30_000, 10_000_000),
    "ml-25m": (162_000, 59_000, 25_000_000),
}


MOVIELENS_FILES = ("ratings.csv", "movies.csv")


def missing_movielens_files(root: str | Path, names: tuple[str, ...] = MOVIELENS_FILES) -> list[str]:
    """Which of a MovieLens folder's files ``root`` lacks (checked by the source and, before
    torch loads, by the command line)."""
    return [n for n in names if not (Path(root) / n).is_file()]


def missing_rating_files(train_file: str, test_file: str | None) -> str | None:
    """Why a given split cannot be read (``Rating file(s) not found: [...]``), or ``None``."""
    missing = [p for p in (train_file, test_file) if p and not Path(p).is_file()]
    return f"Rating file(s) not found: {missing}" if missing else None


def missing_input(data: str | None, train_file: str | None, test_file: str | None) -> str | None:
    """Why ``prepare`` could not read its local input, or ``None``: the same refusal its
    source gives (``'data' ...`` or ``'train_file'/'test_file': ...``), answered before torch
    loads. ``data`` ``None`` without a given split means the download (not checked here)."""
    if train_file:
        problem = missing_rating_files(train_file, test_file)
        return f"'train_file'/'test_file': {problem}" if problem else None
    if data and (missing := missing_movielens_files(data)):
        return f"'data' {data!r}: MovieLens directory '{Path(data)}' lacks {missing}"
    return None


@dataclass
class ExportConfig:
    """How the graph is read out of ArangoDB.

    Args:
        export_batch_size: Rows per cursor batch (AQL batchSize), positive.
        export_ttl: Seconds a server-side cursor may sit idle between batches, positive.
        export_prefetch: Cursor batches fetched ahead while the current one is converted (1-8).
        export_resume: Continue an interrupted export from '<shards>.incomplete' after its last
            finished partition.
        parallelism: Partitions read at once, one cursor and one thread each (1-64).
        export_partition_rows: Target rows per partition: a collection is read in at least
            count/export_partition_rows hash partitions (the re-read after a failure, a worker's
            spill file and the keys it holds for the repeat check are bounded by one partition).
        per_shard_reads: On a coordinator, read each shard on its own (cursor option shardIds):
            one server-side scan of a collection in all instead of one per hash partition.
        pause_gc: Pause Python's cyclic garbage collector during the export (restored after);
            the decoded rows hold no reference cycles.
        rating_attribute: Attribute of a rating edge holding the rating.
        timestamp_attribute: Attribute of a rating edge holding the Unix time (may be missing).
        title_attribute: Attribute of a movie holding its title.
        genres_attribute: Attribute of a movie holding its genres (a list or a pipe-joined string).
    """

    export_batch_size: int = 10_000
    export_ttl: float = 120.0
    export_prefetch: int = 2
    export_resume: bool = False
    parallelism: int = 1
    export_partition_rows: int = 2_000_000
    per_shard_reads: bool = True
    pause_gc: bool = True
    rating_attribute: str = "rating"
    timestamp_attribute: str = "timestamp"
    title_attribute: str = "title"
    genres_attribute: str = "genres"

    def __post_init__(self) -> None:
        problems = []
        if self.export_batch_size <= 0:
            problems.append(f"'export_batch_size' needs to be positive (got {self.export_batch_size})")
        if self.export_ttl <= 0:
            problems.append(f"'export_ttl' needs to be positive (got {self.export_ttl})")
        if not 1 <= self.export_prefetch <= 8:
            problems.append(f"'export_prefetch' needs to be between 1 and 8 (got {self.export_prefetch})")
        if not 1 <= self.parallelism <= 64:
            problems.append(f"'parallelism' needs to be between 1 and 64 (got {self.parallelism})")
        if self.export_partition_rows <= 0:
            problems.append(f"'export_partition_rows' needs to be positive (got {self.export_partition_rows})")
        if problems:
            raise ValueError("; ".join(problems))
