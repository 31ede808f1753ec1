"""A large, row-wise updated state on disk as a full *base* file plus one *delta* file.

A refresh changes a few hundred rows of tables that are hundreds of MB in all; rewriting
and fsyncing everything each time costs more than the refresh itself. So:

- ``<name>`` (the base) holds every field and a random ``base_id``;
- ``<name>.delta`` holds the rows of the large tensors that differ from the base
  (cumulative: always against the base, never against an earlier delta) and every
  small field, tagged with the base's ``base_id``.

Both are written through ``atomic_open`` (temporary name, fsync, rename), followed by
one fsync of the folder so the rename itself survives a crash. A save writes the delta
alone while it stays under ``compact_ratio`` of the base's bytes; past that (or when a
table changed shape beyond appending rows) it writes a new base with a new ``base_id``
and then removes the delta. A crash at any point leaves either the old (base, delta)
pair or the new one: a delta whose ``base_id`` is not the base's is ignored on load.
"""
from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from scalable_rec.atomic import atomic_open
from scalable_rec.errors import CheckpointError


def fsync_dir(path: Path) -> None:
    """Makes a rename inside ``path`` durable (no-op where folders cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def delta_path(path: Path) -> Path:
    return path.with_name(path.name + ".delta")


def flatten(obj: dict[str, Any], big: tuple[str, ...]) -> dict[str, Tensor]:
    """The tensors of the ``big`` fields (tensors, lists or dicts of tensors), by a path key."""
    flat: dict[str, Tensor] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, Tensor):
            flat[prefix] = value
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}/{k}", v)
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(f"{prefix}/{i}", v)
        else:
            raise TypeError(f"State field '{prefix}' needs tensors, lists or dicts of them (got {type(value)})")

    for name in big:
        walk(name, obj[name])
    return flat


def _rebuild(template: Any, prefix: str, flat: dict[str, Tensor]) -> Any:
    if isinstance(template, Tensor):
        return flat[prefix]
    if isinstance(template, dict):
        return {k: _rebuild(v, f"{prefix}/{k}", flat) for k, v in template.items()}
    return [_rebuild(v, f"{prefix}/{i}", flat) for i, v in enumerate(template)]


def row_delta(base: Tensor, cur: Tensor) -> dict[str, Any] | None:
    """Rows of ``cur`` that differ from ``base`` (rows past ``base``'s end all count), or
    None when ``cur`` is not ``base`` with rows changed or appended."""
    if cur.dtype != base.dtype or cur.dim() != base.dim() or cur.dim() == 0 or cur.shape[1:] != base.shape[1:] \
            or cur.size(0) < base.size(0):
        return None
    n = base.size(0)
    diff = (cur[:n] != base).reshape(n, -1).any(1) if n else torch.zeros(0, dtype=torch.bool)
    rows = torch.cat([torch.nonzero(diff).flatten(), torch.arange(n, cur.size(0))])
    return {"rows": rows, "values": cur[rows].clone(), "n": cur.size(0)}


def save(path: Path, obj: dict[str, Any], big: tuple[str, ...], base: dict[str, Tensor] | None,
         base_id: str | None, compact_ratio: float = 0.25) -> tuple[str, dict[str, Tensor] | None]:
    """Saves ``obj``: as a delta against ``base`` (the big tensors as they are in the base
    file ``base_id``) when possible, else as a new base. Returns ``(base_id, base)`` for
    the next save (``base`` None after a new base: it would alias ``obj``'s tensors)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    flat = flatten(obj, big)
    rows = _deltas(base, flat) if base is not None and base_id is not None else None
    if rows is not None:
        size = sum(t.numel() * t.element_size() for t in base.values())
        changed = sum(d["values"].numel() * d["values"].element_size() for d in rows.values())
        if changed <= compact_ratio * size:
            small = {k: v for k, v in obj.items() if k not in big}
            with atomic_open(delta_path(path)) as f:
                torch.save({"base_id": base_id, "small": small, "rows": rows}, f)
            fsync_dir(path.parent)
            return base_id, base
    new_id = uuid.uuid4().hex
    with atomic_open(path) as f:
        torch.save({**obj, "base_id": new_id}, f)
    delta_path(path).unlink(missing_ok=True)
    fsync_dir(path.parent)
    return new_id, None


def _deltas(base: dict[str, Tensor], flat: dict[str, Tensor]) -> dict[str, dict[str, Any]] | None:
    if base.keys() != flat.keys():
        return None
    rows = {}
    for key, cur in flat.items():
        d = row_delta(base[key], cur)
        if d is None:
            return None
        rows[key] = d
    return rows


def load(path: Path, big: tuple[str, ...]) -> tuple[dict[str, Any], str | None, dict[str, Tensor]] | None:
    """The saved object (base with its delta applied, big tensors freshly allocated so that
    in-place updates leave the base copy alone), its ``base_id`` and the base's big
    tensors. None when ``path`` does not exist."""
    if not path.is_file():
        return None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
        dpath = delta_path(path)
        delta = torch.load(dpath, map_location="cpu", weights_only=True) if dpath.is_file() else None
    except Exception as err:
        raise CheckpointError(f"Refresh state '{path}' cannot be read: {err}") from err
    base_id = obj.pop("base_id", None)
    base = flatten(obj, big)
    if delta is None or base_id is None or delta.get("base_id") != base_id:
        # no delta, or a stale one left by a crash while a new base was being written
        return {**obj, **{name: _rebuild(obj[name], name, {k: v.clone() for k, v in base.items()})
                          for name in big}}, base_id, base
    flat = {}
    for key, t in base.items():
        d = delta["rows"][key]
        cur = torch.empty((d["n"],) + tuple(t.shape[1:]), dtype=t.dtype)
        cur[:t.size(0)] = t
        cur[d["rows"]] = d["values"]
        flat[key] = cur
    return {**obj, **delta["small"], **{name: _rebuild(obj[name], name, flat) for name in big}}, base_id, base
