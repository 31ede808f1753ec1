"""One copy of the row-wise tables per node: CPU ranks on a machine map the same pages.

Under DDP every rank holds a replica of the model. With row-wise tables
(``table_optimizer``) the replicas stay identical by construction: rank 0's initial rows
are broadcast, every rank averages the same sparse gradients (``all_reduce_sparse_grads_``)
and applies the same ``RowWiseAdagrad`` step. So on one machine the ranks' copies are the
same bytes, and one copy can serve them all: the first rank of each node (``LOCAL_RANK``
0) writes the tables into a file in shared memory, every rank of the node maps it
(``MAP_SHARED``), and only that first rank applies the optimiser step to it; a barrier
after each step keeps the others from reading a table it is still writing. Every node
steps its own copy with the same averaged gradients, so multi-node runs agree too.

This is for CPU ranks (on GPUs every rank's tables live in its own device memory). It is
how two ranks on one node come to cost less than two replicas: the tables are the
largest per-rank parameters as users grow (README "Graphs larger than memory").
"""
from __future__ import annotations

import logging
import os
import secrets
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from scalable_rec.dist import DistEnv

log = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")
SHM_HEADROOM = 1.1  # the shared-memory mount needs this many times the tables' bytes free


def local_world_size() -> int:
    """Ranks on this node, as torchrun (or the package's launcher) describes them."""
    return DistEnv().local_world_size


def _shm_room(nbytes: int, directory: Path) -> bool:
    try:
        st = os.statvfs(directory)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize >= nbytes * SHM_HEADROOM


def share_tables_on_node(tables: list[nn.Parameter], env: DistEnv, directory: Path = SHM_DIR) -> bool:
    """Replaces the storage of every parameter in ``tables`` (same shapes and values on
    every rank, e.g. right after a broadcast from rank 0) with one shared-memory copy per
    node. Returns whether the tables are now shared; every rank gets the same answer.

    A collective: every rank calls it with the same tables in the same order. Nothing is
    shared with a single rank on the node, or when the shared-memory mount lacks room for
    the tables on any node (a container's default ``/dev/shm`` is often 64 MiB): each rank
    then keeps its own replica, as without this function.
    """
    if not dist.is_initialized() or local_world_size() <= 1 or not tables:
        return False
    nbytes = sum(p.numel() * p.element_size() for p in tables)
    room = torch.tensor([int(env.local_rank != 0 or _shm_room(nbytes, directory))])
    dist.all_reduce(room, op=dist.ReduceOp.MIN)
    if not int(room):
        if env.is_main:
            log.warning("node-shared tables: %s lacks %.0f MiB free on some node; every rank keeps its own "
                        "copy of the tables", directory, nbytes * SHM_HEADROOM / 2**20)
        return False
    token = [secrets.token_hex(8) if env.is_main else None]
    dist.broadcast_object_list(token, src=0)
    # The node's rank in the name too: two "nodes" of one job on one host (a multi-node
    # launch tried out on one machine) must not open each other's files.
    node = os.environ.get("GROUP_RANK", "0")
    paths = [directory / f"scalable_rec-tables-{token[0]}-node{node}-{i}" for i in range(len(tables))]
    try:
        if env.local_rank == 0:
            for path, p in zip(paths, tables):
                with open(path, "wb") as f:
                    f.truncate(p.numel() * p.element_size())
                mapped = torch.from_file(str(path), shared=True, size=p.numel(), dtype=p.dtype)
                mapped.copy_(p.data.reshape(-1))
                p.data = mapped.view_as(p)
        dist.barrier()
        if env.local_rank != 0:
            for path, p in zip(paths, tables):
                p.data = torch.from_file(str(path), shared=True, size=p.numel(), dtype=p.dtype).view_as(p)
        dist.barrier()
    finally:
        if env.local_rank == 0:  # the mappings outlive the names: nothing is left in /dev/shm
            for path in paths:
                path.unlink(missing_ok=True)
    if env.is_main:
        log.info("node-shared tables: %d tables, %.0f MiB, one copy per node (%d ranks on this node)",
                 len(tables), nbytes / 2**20, local_world_size())
    return True
