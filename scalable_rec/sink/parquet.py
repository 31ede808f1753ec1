"""Parquet sink for ranked recommendations, written atomically."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq


def write_parquet(batches: Iterable[pa.RecordBatch], path: str | os.PathLike,
                  metadata: dict[str, str] | None = None) -> int:
    """Streams record batches into ``path`` (temporary name, renamed when complete).

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
        os.replace(tmp, path)
    finally:
        if writer is not None:
            writer.close()
        tmp.unlink(missing_ok=True)
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
