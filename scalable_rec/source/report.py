"""Counting and reporting input rows that were skipped, with examples."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from scalable_rec.errors import MalformedInputError


@dataclass
class SkipReport:
    """Counts skipped input by reason and keeps a few examples of each.

    In strict mode the first problem raises ``MalformedInputError`` instead.

    Args:
        strict: Raise on the first problem instead of counting it.
        max_examples: Examples kept per reason.
    """

    strict: bool = False
    max_examples: int = 5
    counts: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)
    accepted: dict[str, int] = field(default_factory=dict)

    def skip(self, reason: str, example: Any, count: int = 1) -> None:
        if count <= 0:
            return
        if self.strict:
            raise MalformedInputError(f"{reason}: {example} (strict mode; drop --strict to count and skip these)")
        self.counts[reason] = self.counts.get(reason, 0) + count
        ex = self.examples.setdefault(reason, [])
        if len(ex) < self.max_examples:
            ex.append(str(example)[:300])

    def accept(self, what: str, count: int) -> None:
        self.accepted[what] = self.accepted.get(what, 0) + count

    @property
    def total_skipped(self) -> int:
        return sum(self.counts.values())

    def check_usable(self, max_skipped_share: float = 1.0) -> None:
        """Refuses input that yielded no ratings, or of which more than ``max_skipped_share``
        of the rows read (skipped + accepted ratings and movies) had to be skipped."""
        ratings = self.accepted.get("ratings", 0)
        if ratings == 0:
            raise MalformedInputError(f"The input has no usable ratings (expected at least one; {self.summary()})")
        read = self.total_skipped + ratings + self.accepted.get("movies", 0)
        share = self.total_skipped / read
        if share > max_skipped_share:
            raise MalformedInputError(
                f"{share:.1%} of the {read} input rows were skipped, more than --max-skipped-share "
                f"{max_skipped_share:.1%} allows ({self.summary()})"
            )

    def to_json(self) -> dict[str, Any]:
        return {"accepted": self.accepted, "skipped": self.counts, "examples": self.examples}

    def summary(self) -> str:
        if not self.counts:
            return "no input rows skipped"
        parts = [f"{n} {reason}" for reason, n in sorted(self.counts.items())]
        lines = [f"skipped {self.total_skipped} input rows: " + ", ".join(parts)]
        for reason, ex in sorted(self.examples.items()):
            lines.append(f"  e.g. {reason}: {ex[0]}")
        return "\n".join(lines)
