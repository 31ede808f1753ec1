"""Files that are either complete or absent: write under a temporary name, fsync, rename.

Every artifact the package writes (manifests, configs, metrics, checkpoints, feature
caches) goes through here, so a crash or a full disk never leaves a file that looks
finished, and the temporary file is removed when the write fails.
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, BinaryIO, Iterator


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


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Writes JSON so readers never see half a file."""
    with atomic_open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False, default=str)
        f.write("\n")
