"""Parquet sink for ranked recommendations, written atomically."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from scalable_rec.atomic import fsync_file


def write_parquet(
    batches: Iterable[pa.RecordBatch], path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> int:
    """Streams record batches into ``path`` (temporary name, fsynced, renamed when complete).

    Returns the number of rows written. ``metadata`` (e.g. the run id and config hash)
    goes into the file's key-value metadata.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    writer, rows = None, 0
    try:
        for batch in batches:
            if writer is None:
                schema = batch.schema.with_metadata({**(batch.schema.metadata or {}), **(metadata or {})})
                writer = pq.ParquetWriter(tmp, schema, compression="zstd")
            writer.write_batch(batch)
            rows += batch.num_rows
        if writer is None:
            raise ValueError(f"No rows to write to '{path}'")
        writer.close()
        writer = None
        # on the disk before the name points at it: the refresh state (fsynced after this)
        # must never say "folded" over recommendations a power loss took back
        fsync_file(tmp)
        os.replace(tmp, path)
    finally:
        if writer is not None:
            writer.close()
        tmp.unlink(missing_ok=True)
    return rows


def part_path(path: str | os.PathLike, rank: int, world_size: int) -> Path:
    """Where rank ``rank`` writes its share of ``path`` before rank 0 merges the parts."""
    path = Path(path)
    return path.with_name(f".{path.name}.part-{rank:05d}-of-{world_size:05d}")


def merge_parts(
    parts: Iterable[str | os.PathLike], path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> int:
    """Streams the parts' rows, in the order given, into ``path`` (atomically, as
    ``write_parquet``), then removes the parts. Returns the number of rows."""
    parts = [Path(p) for p in parts]

    def batches():
        for part in parts:
            yield from pq.ParquetFile(part).iter_batches()

    rows = write_parquet(batches(), path, metadata)
    for part in parts:
        part.unlink()
    return rows


def replace_user_rows(path: str | os.PathLike, batch: pa.RecordBatch, users: pa.Array) -> int:
    """Replaces every row of ``users`` in the Parquet file ``path`` by ``batch``'s rows
    (atomically: the whole file is rewritten under a temporary name and renamed).

    Rows of other users keep their order; the new rows come last. Returns the rows written.
    """
    old = pq.read_table(path)
    keep = pc.invert(pc.is_in(old.column("user_key"), value_set=users.cast(old.schema.field("user_key").type)))
    new = pa.Table.from_batches([batch]).select(old.column_names).cast(old.schema)
    table = pa.concat_tables([old.filter(keep), new])
    return write_parquet(table.to_batches(max_chunksize=1 << 16), path, metadata=None)
