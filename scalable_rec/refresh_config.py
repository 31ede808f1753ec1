"""``scalable-rec refresh``'s settings (``RefreshConfig``).

A plain dataclass with no torch or Arrow import, so that the command line can parse and
validate its flags before those load (docs/design.md, "Start-up").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class RefreshConfig:
    """Incremental re-scoring settings (``scalable-rec refresh``).

    Args:
        new_ratings: New ratings to fold in: a MovieLens-format ratings.csv, a folder
            holding one, or a shard directory.
        mode: ``exact`` (every user whose recommendations can change; equals a full
            re-score) or ``bounded`` (only users with new ratings; drifts, cheaper).
        candidate_margin: Candidates kept per user beyond ``k`` (with exact scores), non-negative,
            so that a changed movie leaving a top-k list is replaced without a full re-score.
    """

    new_ratings: str | None = None
    mode: Literal["exact", "bounded"] = "exact"
    candidate_margin: int = 20

    def __post_init__(self) -> None:
        problems = []
        if self.mode not in ("exact", "bounded"):
            problems.append(f"'mode' needs to be 'exact' or 'bounded' (got {self.mode!r})")
        if self.candidate_margin < 0:
            problems.append(f"'candidate_margin' needs to be non-negative (got {self.candidate_margin})")
        if problems:
            raise ValueError("; ".join(problems))
