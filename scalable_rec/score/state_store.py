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
from dataclasses import dataclass
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


@dataclass
class Base:
    """What a delta is written against: the base file's id, each big tensor's row count
    in it, and the rows the current delta already carries (kept: deltas are cumulative)."""

    base_id: str
    rows_in_base: dict[str, int]
    delta_rows: dict[str, Tensor]


def save(
    path: Path,
    obj: dict[str, Any],
    big: tuple[str, ...],
    base: Base | None,
    dirty: dict[str, Tensor] | None,
    compact_ratio: float = 0.25,
) -> Base | None:
    """Saves ``obj``. With ``base`` (what ``load`` returned) and ``dirty`` (for each big
    tensor's path key, the rows changed since the load; rows appended since the base count
    without being listed), only those rows go to a delta file, unless it would exceed
    ``compact_ratio`` of the base's bytes. Otherwise (``dirty`` None: unknown changes) a
    new base is written and the delta removed. Returns the ``Base`` for the next save."""
    path.parent.mkdir(parents=True, exist_ok=True)
    flat = flatten(obj, big)
    if base is not None and dirty is not None and flat.keys() == base.rows_in_base.keys():
        rows = {}
        for key, cur in flat.items():
            n = base.rows_in_base[key]
            parts = [
                base.delta_rows.get(key, torch.empty(0, dtype=torch.long)),
                dirty.get(key, torch.empty(0, dtype=torch.long)),
                torch.arange(n, max(n, cur.size(0))),
            ]
            r = torch.unique(torch.cat([p.long() for p in parts]))
            rows[key] = {"rows": r, "values": cur[r].clone(), "n": cur.size(0)}
        size = sum(t.numel() * t.element_size() for t in flat.values())
        changed = sum(d["values"].numel() * d["values"].element_size() for d in rows.values())
        if changed <= compact_ratio * size and all(flat[k].size(0) >= base.rows_in_base[k] for k in flat):
            small = {k: v for k, v in obj.items() if k not in big}
            with atomic_open(delta_path(path)) as f:
                torch.save({"base_id": base.base_id, "small": small, "rows": rows}, f)
            fsync_dir(path.parent)
            return Base(base.base_id, base.rows_in_base, {k: d["rows"] for k, d in rows.items()})
    new_id = uuid.uuid4().hex
    with atomic_open(path) as f:
        torch.save({**obj, "base_id": new_id}, f)
    delta_path(path).unlink(missing_ok=True)
    fsync_dir(path.parent)
    return Base(new_id, {k: t.size(0) for k, t in flat.items()}, {})


def load(path: Path, big: tuple[str, ...]) -> tuple[dict[str, Any], Base | None] | None:
    """The saved object (base with its delta applied) and its ``Base`` (None for a file
    written before deltas existed). None when ``path`` does not exist."""
    if not path.is_file():
        return None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
        dpath = delta_path(path)
        delta = torch.load(dpath, map_location="cpu", weights_only=True) if dpath.is_file() else None
    except Exception as err:
        raise CheckpointError(f"Refresh state '{path}' cannot be read: {err}") from err
    base_id = obj.pop("base_id", None)
    if base_id is None:
        return obj, None
    flat = flatten(obj, big)
    base = Base(base_id, {k: t.size(0) for k, t in flat.items()}, {})
    if delta is None or delta.get("base_id") != base_id:
        # no delta, or a stale one left by a crash while a new base was being written
        return obj, base
    for key, t in flat.items():
        d = delta["rows"][key]
        if d["n"] != t.size(0):
            grown = torch.empty((d["n"],) + tuple(t.shape[1:]), dtype=t.dtype)
            grown[: t.size(0)] = t
            flat[key] = grown
        flat[key][d["rows"]] = d["values"]
        base.delta_rows[key] = d["rows"]
    return {**obj, **delta["small"], **{name: _rebuild(obj[name], name, flat) for name in big}}, base
