"""torchrun plumbing: process group from the environment, per-rank edge slices, reductions.

Without torchrun (no ``WORLD_SIZE`` in the environment) everything here degrades to a
single process, so one command runs unchanged either way.
"""

from __future__ import annotations

import datetime
import logging
import os
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from scalable_rec.dist_env import FORCE_DDP_ENV, DistEnv  # noqa: F401 - FORCE_DDP_ENV re-exported
from scalable_rec.errors import ScalableRecError

log = logging.getLogger(__name__)
T = TypeVar("T")

# Test-only fault injection (documented in README "Training at scale"):
#   SCALABLE_REC_FAULT=RANK:STEP:ACTION, ACTION one of TERM (SIGTERM to itself), KILL
#   (SIGKILL to itself) or HANG (sleeps forever), once the rank has finished global step
#   STEP. Only on the first attempt of a torchrun job (TORCHELASTIC_RESTART_COUNT unset/0),
#   so an elastic restart runs clean.
FAULT_ENV = "SCALABLE_REC_FAULT"

# The CPU (gloo) group of the loop's control flags, beside an NCCL group: agreeing on a
# stop over it reads no GPU tensor, so the step never waits for the device.
_control_group: Any = None


def init_distributed(env: DistEnv, device: torch.device, timeout_s: float | None = None) -> None:
    """Joins the process group torchrun set up: NCCL on CUDA, gloo on CPU.

    ``timeout_s`` bounds every collective: one that another rank never joins (a hung or
    dead rank) raises after that long instead of waiting forever (NCCL aborts the
    communicator; torch's default error handling then ends the process).
    """
    global _control_group
    if not env.enabled or dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    timeout = datetime.timedelta(seconds=timeout_s or 1800)
    store = None
    if "MASTER_ADDR" not in os.environ and env.world_size == 1:
        store = dist.HashStore()  # forced DDP outside torchrun: one rank needs no rendezvous
    elif os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # Workers share the launcher's store across torchrun restarts; without a key prefix
        # per attempt a restarted group reads the dead group's addresses and cannot connect
        # (pytorch/pytorch#135712).
        base = dist.TCPStore(
            os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), env.world_size, is_master=False, timeout=timeout
        )
        store = dist.PrefixStore(f"scalable_rec/attempt-{env.restart_count}", base)
    dist.init_process_group(
        backend=backend,
        store=store,
        rank=env.rank,
        world_size=env.world_size,
        timeout=timeout,
        device_id=device if device.type == "cuda" else None,
    )
    _control_group = dist.new_group(backend="gloo", timeout=timeout) if backend == "nccl" else None


def is_collective_timeout(err: BaseException) -> bool:
    """Whether ``err`` is a collective that gave up waiting (gloo/NCCL word it differently)."""
    text = str(err).lower()
    return isinstance(err, RuntimeError) and (
        "timed out" in text
        or "timeout" in text
        or "connection closed by peer" in text
        or "connection reset by peer" in text
    )


def agree_stop(local_signal: int) -> int:
    """The largest signal number any rank received (0: none), the same on every rank (one
    all-reduce of one number).

    Each rank's signal handler only sets its own flag; agreeing on it at the same step
    makes every rank leave the loop together, so all of them reach the checkpoint's
    collectives (a rank stopping alone would leave the others blocked in the next
    gradient all-reduce). A CPU tensor over gloo (the control group beside NCCL): the
    ranks' CPU threads meet, the GPU's queue is never waited for.
    """
    if not dist.is_initialized():
        return local_signal
    flag = torch.tensor([local_signal], dtype=torch.int32)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=_control_group)
    return int(flag[0])


def from_rank0(fn: Callable[[], T], env: DistEnv, what: str) -> T:
    """Runs ``fn`` on rank 0 only and hands its result (or its error) to every rank.

    Nothing but rank 0 touches the file system, so a run directory or cache that only
    rank 0 can see works, and no rank waits at a collective for a rank that failed.
    """
    if not env.enabled:
        return fn()
    assert dist.is_initialized(), "from_rank0 needs the process group (init_distributed first)"
    result, error = None, None
    if env.is_main:
        try:
            result = fn()
        except Exception as err:  # handed to every rank below
            error = err
    result, message = broadcast_object((result, None if error is None else f"{type(error).__name__}: {error}"), env)
    if error is not None:
        raise error
    if message is not None:
        raise ScalableRecError(f"rank 0 failed to {what}: {message}")
    return result  # type: ignore[return-value]


def broadcast_tensors_(tensors: list[torch.Tensor]) -> None:
    """Copies rank 0's values into every rank's ``tensors`` (in place, same shapes)."""
    if not dist.is_initialized():
        return
    for t in tensors:
        dist.broadcast(t.data, src=0)


def inject_fault(env: DistEnv, global_step: int) -> None:
    """Test hook: the fault ``SCALABLE_REC_FAULT`` asks for at this rank and step, if any."""
    spec = os.environ.get(FAULT_ENV)
    if not spec or env.restart_count > 0:
        return
    try:
        rank, step, action = spec.split(":")
        rank_i, step_i = int(rank), int(step)
    except ValueError:
        raise ScalableRecError(f"'{FAULT_ENV}' needs RANK:STEP:TERM|KILL|HANG (got {spec!r})") from None
    if rank_i != env.rank or step_i != global_step:
        return
    log.warning("fault injection: %s at step %d on rank %d", action, global_step, env.rank)
    if action == "HANG":
        while True:
            time.sleep(60)
    os.kill(os.getpid(), {"TERM": signal.SIGTERM, "KILL": signal.SIGKILL}[action])


def shutdown_distributed() -> None:
    global _control_group
    if dist.is_initialized():
        dist.destroy_process_group()
    _control_group = None


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sums a few scalars over ranks (one collective). A CPU↔GPU sync point."""
    if not dist.is_initialized():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def broadcast_object(obj: Any, env: DistEnv) -> Any:
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class EdgeEpochSampler(Sampler[int]):
    """Yields this rank's slice of the supervision edges for one epoch.

    Each epoch the ``num_edges`` ids are shuffled with a generator seeded by
    ``(seed, epoch)`` into one global order. The part of it not yet consumed (from
    ``position`` on) is padded to a multiple of ``world_size`` with ids from
    ``num_edges .. num_edges + world_size - 2`` (the caller appends that many zero-weight
    copies of real edges), and dealt round-robin: rank ``r`` takes positions
    ``r, r + W, r + 2W, ...``. Ranks therefore get disjoint, equal-sized slices (no rank
    waits on a collective another has left) and every real edge is seen exactly once per
    epoch across ranks. Round-robin dealing also means that the union of the ranks'
    ``k``-th batches of size ``b`` is exactly the ``k``-th batch of size ``W·b`` of a
    single process with the same seed, which is what makes DDP and single-process runs
    comparable, and that after ``s`` full steps the ranks together have consumed exactly
    the first ``s·b·W`` positions of the global order.

    ``position`` (``set_epoch``) is that consumed prefix: a mid-epoch resume continues
    with the rest of the same order, dealt over the current world size, which may differ
    from the one that consumed the prefix (the remaining edges are re-dealt; each is still
    seen exactly once in the epoch). With an unchanged world size this is exactly the
    uninterrupted run's slice.
    """

    def __init__(self, num_edges: int, rank: int = 0, world_size: int = 1, seed: int = 0, shuffle: bool = True) -> None:
        if num_edges <= 0:
            raise ValueError(f"'num_edges' needs to be positive (got {num_edges})")
        self.num_edges, self.rank, self.world_size = num_edges, rank, world_size
        self.seed, self.shuffle = seed, shuffle
        self.epoch = 0
        self.position = 0

    @staticmethod
    def num_pad(num_edges: int, world_size: int) -> int:
        return -num_edges % world_size

    def set_epoch(self, epoch: int, position: int = 0) -> None:
        if position < 0:
            raise ValueError(f"'position' needs to be non-negative (got {position})")
        self.epoch, self.position = epoch, position

    def _remaining(self) -> int:
        return max(0, self.num_edges - self.position)

    def __len__(self) -> int:
        r = self._remaining()
        return (r + self.num_pad(r, self.world_size)) // self.world_size

    def __iter__(self) -> Iterator[int]:
        # int32 ids (the same permutation as int64's) and only this rank's share kept: the
        # global order is a private array in every rank, 4 instead of 8 bytes per edge, and
        # freed before the epoch starts instead of held by a strided view of it.
        dtype = torch.int32 if self.num_edges + self.world_size < 2**31 else torch.long
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.num_edges, generator=g, dtype=dtype)
        else:
            order = torch.arange(self.num_edges, dtype=dtype)
        rest = self._remaining()
        # This rank's slots are ``rank, rank + W, ...`` below ``rest + pad``; slot i < rest is
        # position ``position + i`` of the order (one strided slice, no slot-sized
        # temporaries: at 20M edges those peaked at six order-sized arrays), the slots
        # after it are pads ``num_edges + i - rest``.
        real = order[self.position + self.rank : self.num_edges : self.world_size]
        first_pad = rest + (self.rank - rest) % self.world_size
        pads = torch.tensor(
            [
                self.num_edges + i - rest
                for i in range(first_pad, rest + self.num_pad(rest, self.world_size), self.world_size)
            ],
            dtype=dtype,
        )
        mine = torch.cat([real, pads]) if pads.numel() or self.world_size > 1 else real
        # Converted to Python ints a chunk at a time: a list of the whole slice costs
        # ~36 bytes per edge (720 MiB for 20M training edges) in every rank.
        return (i for chunk in mine.split(1 << 16) for i in chunk.tolist())
