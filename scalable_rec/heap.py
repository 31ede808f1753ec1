"""How much freed memory the C heap keeps: glibc's mmap threshold, fixed for training.

torch's CPU tensors come from ``malloc``. glibc serves a request at or above its *mmap
threshold* with a fresh mapping that ``free`` returns to the kernel at once; smaller ones
come from the heap, whose freed chunks stay in the process (and in its RSS) for reuse.
The threshold is dynamic: every freed mapped chunk raises it to that chunk's size (up to
32 MiB), so after the first large tensor is freed, a training step's activations,
gathered features and gradients, tens of MiB each, come from the heap and are kept. At the
25M shape that kept memory was most of a store-backed rank's growth during the training
steps (``scripts/scale_curves.py --stages train-store-phases``, README "Graphs larger than
memory"). Fixing the threshold (``mallopt(M_MMAP_THRESHOLD)``, which also turns the dynamic
adjustment off) hands every large tensor back when it is freed. It is a process-wide
setting, so the training entry point applies it (``TrainConfig.heap_mmap_threshold_kb``).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import platform

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)


def fix_mmap_threshold(threshold_bytes: int) -> bool:
    """Serves allocations of ``threshold_bytes`` and more from their own mappings, returned
    to the kernel on ``free``; returns whether it was applied (glibc only, else a no-op).

    Args:
        threshold_bytes: The fixed threshold; glibc accepts up to 32 MiB on 64-bit.
    """
    if threshold_bytes <= 0 or threshold_bytes > 32 << 20:
        raise ValueError(f"'threshold_bytes' needs to be in (0, 32 MiB] (got {threshold_bytes})")
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    return bool(libc.mallopt(M_MMAP_THRESHOLD, int(threshold_bytes)))
