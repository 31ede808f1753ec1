"""This process's place in a torchrun job (``DistEnv``), read from the environment.

Apart from ``scalable_rec.dist`` because it needs no torch: the command line sets up its
logging with it before torch is imported (docs/design.md, "Start-up").
"""

from __future__ import annotations

import os
from dataclasses import dataclass

# ``SCALABLE_REC_FORCE_DDP=1``: a single process (or a one-rank torchrun job) still creates
# the process group (NCCL on CUDA, gloo on CPU) and wraps the model in DDP, so every
# collective of the DDP code path runs with world size 1: a check of that path on one GPU.
FORCE_DDP_ENV = "SCALABLE_REC_FORCE_DDP"


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the job, as torchrun describes it."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    forced: bool = False
    """``SCALABLE_REC_FORCE_DDP``: the DDP code path even with one rank."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        """Whether this job runs the DDP code path: more than one rank, or forced."""
        return self.world_size > 1 or self.forced

    @property
    def local_world_size(self) -> int:
        """Ranks of this job on this node, as torchrun (or the package's launcher) describes them."""
        return int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)

    @property
    def restart_count(self) -> int:
        """How often torchrun has restarted this job's workers (``--max-restarts``)."""
        return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0) or 0)

    @classmethod
    def from_environ(cls) -> DistEnv:
        forced = os.environ.get(FORCE_DDP_ENV, "").strip().lower() in ("1", "true", "yes")
        if "WORLD_SIZE" not in os.environ:
            return cls(forced=forced)
        return cls(
            int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ["WORLD_SIZE"]), forced=forced
        )
