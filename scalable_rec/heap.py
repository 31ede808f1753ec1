"""How the C heap serves torch's CPU tensors: glibc's mmap threshold and transparent huge pages.

torch's CPU tensors come from ``malloc``. glibc serves a request at or above its *mmap
threshold* with a fresh mapping that ``free`` returns to the kernel at once; smaller ones
come from the heap, whose freed chunks stay in the process (and in its RSS) for reuse.
The threshold is dynamic: every freed mapped chunk raises it to that chunk's size (up to
32 MiB), so after the first large tensor is freed, a training step's activations,
gathered features and gradients, tens of MiB each, come from the heap and are kept. At the
25M shape that kept memory was most of a store-backed rank's growth during the training
steps (``experiments/scale_curves.py --stages train-store-phases``, docs/large-graphs.md
"What a rank holds privately"). Fixing the threshold (``mallopt(M_MMAP_THRESHOLD)``, which also turns the dynamic
adjustment off) hands every large tensor back when it is freed. It is a process-wide
setting, so the training entry point applies it (``TrainConfig.heap_mmap_threshold_kb``).

A fresh mapping costs a page fault per page touched: at 25M edges, 30 store-backed training
steps with the threshold at 1024 KiB took 6.8M minor faults and 14.4 s of system CPU
(``benchmarks/heap_threshold_cpu.py --store --steps 30 --no-hugepages``). glibc (2.35+) can ask
the kernel for 2 MiB transparent huge pages for its mappings (``glibc.malloc.hugetlb=1``;
1.2M faults and 7.4 s there). It reads that tunable only when a process starts, so the
``scalable-rec`` command restarts itself once with it (``restart_with_hugepages``) before
torch is imported.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)
HUGEPAGES_TUNABLE = "glibc.malloc.hugetlb=1"  # madvise(MADV_HUGEPAGE) on malloc's mappings and heap
RESTARTED_ENV = "SCALABLE_REC_HEAP_RESTARTED"  # set by the restart: never restart twice


def glibc() -> bool:
    """Whether this process runs on glibc (its mallopt and tunables exist)."""
    try:
        return os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")
    except (ValueError, OSError, AttributeError):  # not a glibc system (musl, macOS, Windows)
        return False


def hugepages_environ(environ: Mapping[str, str]) -> dict[str, str] | None:
    """``environ`` with glibc's malloc asked for transparent huge pages, or ``None`` when there
    is nothing to change: not glibc, ``glibc.malloc.hugetlb`` already set (by the user too:
    ``GLIBC_TUNABLES=glibc.malloc.hugetlb=0`` opts out), or this process was restarted."""
    tunables = environ.get("GLIBC_TUNABLES", "")
    if RESTARTED_ENV in environ or "glibc.malloc.hugetlb=" in tunables or not glibc():
        return None
    return {**environ, "GLIBC_TUNABLES": ":".join(t for t in (tunables, HUGEPAGES_TUNABLE) if t), RESTARTED_ENV: "1"}


def restart_with_hugepages() -> None:
    """Replaces this process (same pid, command line and environment, plus the tunable) so
    that glibc's malloc uses transparent huge pages; returns where there is nothing to change
    or the restart fails (the run goes on, only its page size differs). Call it before
    anything else: the restart discards the process's state."""
    env = hugepages_environ(os.environ)
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
    except OSError:
        return


def fix_mmap_threshold(threshold_bytes: int) -> bool:
    """Serves allocations of ``threshold_bytes`` and more from their own mappings, returned
    to the kernel on ``free``; returns whether it was applied (glibc only, else a no-op).

    Args:
        threshold_bytes: The fixed threshold; glibc accepts up to 32 MiB on 64-bit.
    """
    if threshold_bytes <= 0 or threshold_bytes > 32 << 20:
        raise ValueError(f"'threshold_bytes' needs to be in (0, 32 MiB] (got {threshold_bytes})")
    if not glibc():
        return False
    import ctypes  # here, not at the top: every command imports this module before it restarts
    import ctypes.util

    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    return bool(libc.mallopt(M_MMAP_THRESHOLD, int(threshold_bytes)))
