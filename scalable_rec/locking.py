"""Exclusive use of a shard or run directory: one writer at a time, and who holds it.

Two ``prepare``/``run`` commands aimed at the same directory would otherwise interleave
their files. ``hold(directory)`` takes an advisory lock (the ``filelock`` package:
``fcntl.flock`` on POSIX, released by the kernel when the holder dies, so a ``kill -9``
leaves no stale lock) on ``.<name>.lock`` beside the directory and records the holder's pid, host and
command in ``.<name>.owner`` beside it so that the refusal can name it.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

from filelock import FileLock, Timeout

from scalable_rec.atomic import write_json_atomic
from scalable_rec.errors import LockedError

# Directories this process holds, so a stage called inside another (``run`` → ``train``)
# does not try to take its own lock a second time (flock would refuse it).
_held: set[Path] = set()


def lock_path(directory: str | os.PathLike) -> Path:
    directory = Path(directory).resolve()
    return directory.with_name(f".{directory.name}.lock")


def owner(directory: str | os.PathLike) -> dict | None:
    """Who holds (or last held) the lock of ``directory``, from its sidecar file."""
    try:
        return json.loads(lock_path(directory).with_suffix(".owner").read_text())
    except (OSError, json.JSONDecodeError):
        return None


@contextlib.contextmanager
def hold(directory: str | os.PathLike, what: str = "directory") -> Iterator[None]:
    """Holds the lock of ``directory`` for the block, or raises ``LockedError`` at once.

    Args:
        directory: The shard or run directory (it need not exist yet; the lock file sits
            beside it as ``.<name>.lock``).
        what: How the refusal names the directory (``shard directory``, ``run directory``).
    """
    key = Path(directory).resolve()
    if key in _held:
        yield
        return
    path = lock_path(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        who = owner(key) or {}
        raise LockedError(
            f"The {what} '{directory}' is in use by pid {who.get('pid', '?')} on host {who.get('host', '?')} "
            f"(since {who.get('since', '?')}: {who.get('command', '?')}); wait for it to finish or stop it"
        ) from None
    _held.add(key)
    try:
        write_json_atomic(
            path.with_suffix(".owner"),
            {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "command": " ".join(sys.argv)[:300],
                "since": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            },
        )
        yield
    finally:
        _held.discard(key)
        lock.release()
