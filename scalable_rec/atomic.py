"""Files that are either complete or absent (write under a temporary name, fsync, rename),
and the sha256 that later proves a file is the one that was written.

Every artifact the package writes (manifests, configs, metrics, checkpoints, feature
caches) goes through here, so a crash or a full disk never leaves a file that looks
finished, and the temporary file is removed when the write fails.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO


def temp_name(path: Path) -> Path:
    """The hidden sibling a write goes to first (per process, so writers never collide)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[BinaryIO]:
    """Opens a temporary sibling of ``path``; on a clean exit fsyncs and renames it onto
    ``path``, on an error deletes it."""
    path = Path(path)
    tmp = temp_name(path)
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def fsync_file(path: str | os.PathLike) -> None:
    """Flushes a file some other writer closed (a Parquet writer) to the disk, so that a
    rename after it never makes a name point at data a power loss can still take away."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def json_safe(obj: Any) -> Any:
    """``obj`` with NaN/Infinity floats replaced by ``None``: JSON has no such values, and
    ``json.dump`` would otherwise write ``NaN`` that strict parsers reject."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def dumps(obj: Any, indent: int | None = 2) -> str:
    """Strict JSON text (non-finite floats as ``null``), for files and printed summaries."""
    return json.dumps(json_safe(obj), indent=indent, sort_keys=False, default=str, allow_nan=False)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Writes strict JSON (``null`` for NaN/Infinity) so readers never see half a file."""
    text = dumps(obj)
    with atomic_open(path, "w") as f:
        f.write(text + "\n")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file's bytes, read in ``chunk``-byte blocks (memory stays flat)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def replace_marked_block(path: str | os.PathLike, start_mark: str, end_mark: str, text: str) -> None:
    """Replaces what lies between ``start_mark`` and ``end_mark`` in the text file ``path``
    with ``text`` (a newline after the start mark), atomically; the marks stay. A file
    without both marks in that order is a ``ValueError`` and stays untouched."""
    path = Path(path)
    old = path.read_text()
    start, end = old.find(start_mark), old.find(end_mark)
    if start < 0 or end < start:
        raise ValueError(f"{path} has no '{start_mark}' … '{end_mark}' block")
    with atomic_open(path, "w") as fh:
        fh.write(old[: start + len(start_mark)] + "\n" + text + old[end:])
