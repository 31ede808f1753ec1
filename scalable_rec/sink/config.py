"""The sink stage's settings: where recommendations go (``WritebackConfig``) and how
``arango load`` writes (``LoadConfig``).

Plain dataclasses with no Arrow or python-arango import, so that the command line can parse
and validate its flags before those load (docs/design.md, "Start-up").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class WritebackConfig:
    """Where ranked recommendations go.

    Args:
        sink: ``parquet`` (<run-dir>/recommendations.parquet) or ``arango`` (edges
            Users/<key> → Movie/<key> with score, rank, run_id, write_id, created_at).
        inference_collection: Edge collection for ``--sink arango`` (created if missing).
        replace_previous: Also remove the written users' edges of other run ids, in the same
            transaction as the new edges, so no user is ever left without recommendations.
        writeback_batch_docs: Edges per transaction, positive; a transaction ends only between
            users, so it may exceed this by one user's edges.
        writeback_batch_mb: (Estimated) MiB of edges per transaction, positive; ended between users.
    """

    sink: Literal["parquet", "arango"] = "parquet"
    inference_collection: str = "Recommendation_Inferences"
    replace_previous: bool = False
    writeback_batch_docs: int = 10_000
    writeback_batch_mb: float = 8.0

    def __post_init__(self) -> None:
        problems = []
        if self.sink not in ("parquet", "arango"):
            problems.append(f"'sink' needs to be 'parquet' or 'arango' (got {self.sink!r})")
        if self.writeback_batch_docs <= 0:
            problems.append(f"'writeback_batch_docs' needs to be positive (got {self.writeback_batch_docs})")
        if self.writeback_batch_mb <= 0:
            problems.append(f"'writeback_batch_mb' needs to be positive (got {self.writeback_batch_mb})")
        if problems:
            raise ValueError("; ".join(problems))


@dataclass
class LoadConfig:
    """How ``arango load`` writes.

    Args:
        load_batch_size: Documents per import_bulk request, positive.
    """

    load_batch_size: int = 10_000

    def __post_init__(self) -> None:
        if self.load_batch_size <= 0:
            raise ValueError(f"'load_batch_size' needs to be positive (got {self.load_batch_size})")
