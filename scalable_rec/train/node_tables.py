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

The files in shared memory are RAM that nothing else accounts for, so they are handled
with care: each is created private (mode 0600, ``O_EXCL``) and its whole size is reserved
(``posix_fallocate``) before anything is written, so a mount that another job filled in
the meantime is a "no space" fallback at start rather than a ``SIGBUS`` in the middle of
a copy; the names are unlinked as soon as every rank has mapped them; and a job killed
before that leaves files whose names carry its host and pid, which the next job on that
host removes when the pid is gone.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import secrets
import socket
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


PREFIX = "scalable_rec-tables-"
_LEFTOVER = re.compile(re.escape(PREFIX) + r"(?P<host>.+)-pid(?P<pid>\d+)-")


def table_name(host: str, pid: int, token: str, node: str, i: int) -> str:
    """The shared-memory file of table ``i``: the creating host and pid first, so that a
    later job can tell a dead job's leftover (``remove_leftovers``)."""
    return f"{PREFIX}{host}-pid{pid}-{token}-node{node}-{i}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def remove_leftovers(directory: Path = SHM_DIR) -> list[Path]:
    """Removes the table files that jobs on this host left when they died before unlinking
    them (their creating pid is gone); returns them. Files of live processes, of other
    hosts (a mount shared between containers) and of other users are left alone."""
    host, removed = socket.gethostname(), []
    for path in directory.glob(PREFIX + "*"):
        m = _LEFTOVER.match(path.name)
        if m is None or m["host"] != host or _alive(int(m["pid"])):
            continue
        try:
            if path.stat().st_uid != os.geteuid():
                continue
            path.unlink()
        except OSError:  # gone meanwhile, or not ours to remove
            continue
        removed.append(path)
    return removed


def _shm_room(nbytes: int, directory: Path) -> bool:
    try:
        st = os.statvfs(directory)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize >= nbytes * SHM_HEADROOM


def _reserve(paths: list[Path], sizes: list[int], directory: Path) -> str | None:
    """Creates each file private and reserves its whole size up front; returns ``None``, or
    why not (then nothing is left behind). Reserved pages cannot be taken by another job:
    a sparse file on a full tmpfs would instead fail with ``SIGBUS`` when first written."""
    if not _shm_room(sum(sizes), directory):
        return f"{directory} lacks {sum(sizes) * SHM_HEADROOM / 2**20:.0f} MiB free"
    created = []
    try:
        for path, size in zip(paths, sizes):
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            created.append(path)
            try:
                os.posix_fallocate(fd, 0, size)
            finally:
                os.close(fd)
    except OSError as err:
        for path in created:
            path.unlink(missing_ok=True)
        what = "no space left" if err.errno in (errno.ENOSPC, errno.EDQUOT) else err.strerror
        return f"reserving {sum(sizes) / 2**20:.1f} MiB in {directory} failed: {what} ({type(err).__name__})"
    return None


def share_tables_on_node(tables: list[nn.Parameter], env: DistEnv, directory: Path = SHM_DIR) -> bool:
    """Replaces the storage of every parameter in ``tables`` (same shapes and values on
    every rank, e.g. right after a broadcast from rank 0) with one shared-memory copy per
    node. Returns whether the tables are now shared; every rank gets the same answer.

    A collective: every rank calls it with the same tables in the same order. Nothing is
    shared with a single rank on the node, or when the shared-memory mount lacks room for
    the tables on any node (a container's default ``/dev/shm`` is often 64 MiB; the room
    is reserved, not only checked): each rank then keeps its own replica, as without this
    function.
    """
    if not dist.is_initialized() or local_world_size() <= 1 or not tables:
        return False
    nbytes = sum(p.numel() * p.element_size() for p in tables)
    # The node's rank in the name too: two "nodes" of one job on one host (a multi-node
    # launch tried out on one machine) must not open each other's files.
    node = os.environ.get("GROUP_RANK", "0")
    creator = (node, os.getpid()) if env.local_rank == 0 else None  # each node's first rank creates the files
    creators: list = [None] * dist.get_world_size()
    dist.all_gather_object(creators, (secrets.token_hex(8) if env.is_main else None, creator))
    token, pid = creators[0][0], dict(c for _, c in creators if c is not None)[node]
    paths = [directory / table_name(socket.gethostname(), pid, token, node, i) for i in range(len(tables))]
    problem = None
    try:
        if env.local_rank == 0:
            removed = remove_leftovers(directory)
            if removed:
                log.warning(
                    "node-shared tables: removed %d file(s) that dead jobs left in %s: %s",
                    len(removed),
                    directory,
                    ", ".join(p.name for p in removed),
                )
            problem = _reserve(paths, [p.numel() * p.element_size() for p in tables], directory)
        room = torch.tensor([int(problem is None)])
        dist.all_reduce(room, op=dist.ReduceOp.MIN)
        if not int(room):
            if problem:
                log.warning("node-shared tables: %s; every rank keeps its own copy of the tables", problem)
            elif env.is_main:
                log.warning(
                    "node-shared tables: no room in %s on another node; every rank keeps its own copy of the tables",
                    directory,
                )
            return False
        if env.local_rank == 0:
            for path, p in zip(paths, tables):
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
        log.info(
            "node-shared tables: %d tables, %.0f MiB, one copy per node (%d ranks on this node)",
            len(tables),
            nbytes / 2**20,
            local_world_size(),
        )
    return True
