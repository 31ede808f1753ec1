"""Sampling worker processes of a rank's loader: how many, and room for what they share.

On a GPU the model waits for neighbour sampling when it runs on the CPU, so a rank's
loader takes every core the rank has but one (its own process feeds the device). The
cores are those this process may run on (``os.sched_getaffinity``: a container's or
``taskset``'s limit, not the host's count) split between the ranks of the node
(``LOCAL_WORLD_SIZE``). Workers map what they read of the in-memory message graph (the
sampler's CSC; features and ratings too where they build whole batches,
``batches.worker_tensors``) from ``/dev/shm`` (``share_memory_``) rather than each holding
a copy; a container's default mount there is 64 MiB, so the room is checked before
anything is moved there.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from scalable_rec.dist import DistEnv
from scalable_rec.errors import ConfigError

SHM_DIR = Path("/dev/shm")
SHM_HEADROOM = 1.1  # free room needed in /dev/shm, as a multiple of the bytes moved there


def cores_per_rank(env: DistEnv) -> int:
    """The cores this process may use, divided among the ranks on this node (at least 1)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, env.local_world_size))


def loader_workers(num_workers: int, device: torch.device, env: DistEnv) -> int:
    """Sampling workers per rank: ``num_workers`` when set (>= 0); ``-1`` picks 0 on CPU
    (the sampler would compete with the model for the same cores) and, on CUDA, the
    rank's cores but one (``cores_per_rank``), at least 1."""
    if num_workers >= 0:
        return num_workers
    return 0 if device.type == "cpu" else max(1, cores_per_rank(env) - 1)


def shared_bytes(tensors) -> int:
    """Bytes of the tensors among ``tensors`` not in shared memory yet (what
    ``share_memory_`` would copy to ``/dev/shm``)."""
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor) and not t.is_shared())


def check_shm_room(nbytes: int, directory: Path = SHM_DIR) -> None:
    """Raises a one-line ``ConfigError`` unless ``directory`` has room for ``nbytes`` (times
    ``SHM_HEADROOM``) before the loader's workers are given the graph through it."""
    if nbytes == 0:
        return
    try:
        st = os.statvfs(directory)
    except OSError as err:
        raise ConfigError(
            f"sampling workers share the message graph through {directory}, which cannot be "
            f"read ({err.strerror}); pass --num-workers 0"
        ) from err
    free = st.f_bavail * st.f_frsize
    need = int(nbytes * SHM_HEADROOM)
    if free < need:
        raise ConfigError(
            f"sampling workers share the message graph through {directory}: it needs "
            f"{need / 2**20:,.0f} MiB free there (got {free / 2**20:,.0f} MiB); enlarge it "
            "(docker run --shm-size), pass --num-workers 0, or use --graph-backend store"
        )
