"""Writing shard directories: bounded Arrow IPC files, atomic renames, resumable progress.

A ``GraphShardWriter`` writes into ``<out>.incomplete/``. Each table's rows are buffered up
to ``max_rows_per_shard`` and then written as one Arrow IPC file under a temporary name,
fsynced and renamed to ``part-NNNNN.arrow``; a per-table ``_progress.json`` records the
finished parts (and an opaque resume token such as the last exported ``_key``). ``commit``
renames the parts to ``part-NNNNN-of-MMMMM.arrow``, writes ``manifest.json`` and renames the
directory to ``<out>``. A crash at any point therefore leaves either no ``<out>`` at all or a
complete one, and ``resume=True`` continues from the last finished part.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from scalable_rec.atomic import sha256_file, write_json_atomic
from scalable_rec.errors import ShardError
from scalable_rec.shards.manifest import (
    MANIFEST_NAME,
    Manifest,
    ShardFile,
    TableInfo,
    edge_type_name,
    schema_to_json,
)

PROGRESS_NAME = "_progress.json"


class ShardWriter:
    """Writes the rows of one node or edge table as bounded Arrow IPC shards.

    Memory is bounded by one shard: rows are buffered until ``max_rows_per_shard`` and
    then flushed to disk.

    Args:
        directory: The table's folder inside the ``.incomplete`` shard directory.
        schema: Arrow schema every batch must have.
        max_rows_per_shard: Rows per file (default 1,000,000).
        resume: Keep the parts a previous, interrupted writer finished (per ``_progress.json``)
            and continue after them. Otherwise the folder is cleared.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        schema: pa.Schema,
        max_rows_per_shard: int = 1_000_000,
        resume: bool = False,
    ) -> None:
        if max_rows_per_shard <= 0:
            raise ValueError(f"'max_rows_per_shard' needs to be positive (got {max_rows_per_shard})")
        self.directory = Path(directory)
        self.schema = schema
        self.max_rows_per_shard = max_rows_per_shard
        self.files: list[ShardFile] = []
        self.state: Any = None
        self._pending: list[pa.RecordBatch] = []
        self._pending_rows = 0
        self._closed = False
        self._hold_progress = False
        progress = self.directory / PROGRESS_NAME
        if resume and progress.is_file():
            saved = json.loads(progress.read_text())
            if saved["schema"] != schema_to_json(schema):
                raise ShardError(
                    f"Cannot resume '{self.directory}': its schema {saved['schema']} differs from "
                    f"{schema_to_json(schema)}"
                )
            self.files = [ShardFile(**f) for f in saved["files"]]
            self.state = saved.get("state")
            keep = {Path(f.path).name for f in self.files} | {PROGRESS_NAME}
            for p in self.directory.iterdir():  # parts renamed but not recorded, temp files
                if p.name not in keep:
                    p.unlink()
        else:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory.mkdir(parents=True)
        # Part names only need to be unique: ``close`` renames them in list order.
        self._next_part = 1 + max((int(Path(f.path).stem.split("-")[1]) for f in self.files), default=-1)

    @property
    def num_rows(self) -> int:
        """Rows written to finished parts plus rows still buffered."""
        return sum(f.num_rows for f in self.files) + self._pending_rows

    def write(self, batch: pa.RecordBatch | pa.Table, state: Any = None) -> None:
        """Buffers rows, writing a part whenever ``max_rows_per_shard`` are buffered.

        Args:
            batch: Rows with the writer's schema (cast when compatible).
            state: Resume token that holds once all of ``batch`` is on disk. It is recorded
                with the part that this batch's last row completes, if any (see ``flush``);
                a part completed in the middle of the batch keeps the previous token.
        """
        assert not self._closed, "write() after close()"
        if isinstance(batch, pa.Table):
            batches = batch.to_batches()
            for i, b in enumerate(batches):
                self.write(b, state if i == len(batches) - 1 else None)
            return
        if not batch.schema.equals(self.schema):
            try:
                batch = batch.select(self.schema.names).cast(self.schema)
            except (KeyError, ValueError, pa.ArrowInvalid) as err:
                raise ShardError(
                    f"Batch for '{self.directory.name}' has schema {batch.schema}, expected {self.schema}"
                ) from err
        while batch.num_rows:
            take = min(batch.num_rows, self.max_rows_per_shard - self._pending_rows)
            self._pending.append(batch.slice(0, take))
            self._pending_rows += take
            batch = batch.slice(take)
            if self._pending_rows == self.max_rows_per_shard:
                self.flush(state if not batch.num_rows else None)

    def flush(self, state: Any = None) -> None:
        """Writes buffered rows as one finished part and records ``state`` as the resume token.

        Callers that resume a stream (the ArangoDB export) pass the last key written, so
        the progress file never claims rows that are not on disk.
        """
        if state is not None:
            self.state = state
        if not self._pending_rows:
            if state is not None:
                self._save_progress()
            return
        index = self._next_part
        self._next_part += 1
        final = self.directory / f"part-{index:05d}.arrow"
        tmp = self.directory / f".part-{index:05d}.arrow.tmp"
        table = pa.Table.from_batches(self._pending, schema=self.schema)
        try:
            with pa.OSFile(str(tmp), "wb") as sink:
                with pa.ipc.new_file(sink, self.schema) as writer:
                    writer.write_table(table)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, final)
        finally:  # a full disk must not leave a half-written temporary part behind
            tmp.unlink(missing_ok=True)
        self.files.append(
            ShardFile(
                path=final.name, num_rows=table.num_rows, num_bytes=final.stat().st_size, sha256=sha256_file(final)
            )
        )
        self._pending, self._pending_rows = [], 0
        self._save_progress()

    def filter_rows(self, keep: np.ndarray) -> int:
        """Rewrites the finished parts keeping only rows where ``keep`` (one flag per row,
        in write order) is true; returns the number of rows dropped.

        The new parts get fresh names and one old part is in memory at a time. The progress
        file keeps listing the old parts until every new part is on disk, then one atomic
        write switches to the new ones: a crash mid-way leaves the old, complete table.
        """
        self.flush()
        if len(keep) != self.num_rows:
            raise ValueError(f"'keep' needs one flag per row ({self.num_rows}), got {len(keep)}")
        old, state = self.files, self.state
        self.files, self._hold_progress = [], True
        try:
            offset = 0
            for f in old:
                table = pa.ipc.open_file(pa.memory_map(str(self.directory / Path(f.path).name), "r")).read_all()
                self.write(table.filter(pa.array(keep[offset : offset + f.num_rows])))
                offset += f.num_rows
            self.flush()
        finally:
            self._hold_progress = False
        self.state = state
        self._save_progress()
        for f in old:
            (self.directory / Path(f.path).name).unlink()
        return int(len(keep) - np.count_nonzero(keep))

    def read_finished(self) -> Iterator[pa.Table]:
        """Reads back the finished parts in order, e.g. to rebuild key maps when resuming."""
        for f in self.files:
            yield pa.ipc.open_file(pa.memory_map(str(self.directory / Path(f.path).name), "r")).read_all()

    def _save_progress(self) -> None:
        if self._hold_progress:
            return
        write_json_atomic(
            self.directory / PROGRESS_NAME,
            {"schema": schema_to_json(self.schema), "files": [f.__dict__ for f in self.files], "state": self.state},
        )

    def close(self, prefix: str) -> TableInfo:
        """Flushes, renames parts to ``part-i-of-n`` and returns the table's manifest entry.

        Args:
            prefix: The table's path relative to the shard directory (``nodes/user``).
        """
        self.flush()
        self._closed = True
        if not self.files:  # an empty table still gets one (empty) file with its schema
            self._write_empty()
        n = len(self.files)
        finished = []
        for i, f in enumerate(self.files):
            name = f"part-{i:05d}-of-{n:05d}.arrow"
            os.replace(self.directory / Path(f.path).name, self.directory / name)
            finished.append(ShardFile(f"{prefix}/{name}", f.num_rows, f.num_bytes, f.sha256))
        (self.directory / PROGRESS_NAME).unlink(missing_ok=True)
        return TableInfo(schema=schema_to_json(self.schema), files=finished)

    def _write_empty(self) -> None:
        final = self.directory / "part-00000.arrow"
        with pa.OSFile(str(final), "wb") as sink:
            with pa.ipc.new_file(sink, self.schema):
                pass
        self.files.append(ShardFile(final.name, 0, final.stat().st_size, sha256_file(final)))


class GraphShardWriter:
    """Writes a whole shard directory (node and edge tables plus manifest) atomically.

    Use as a context manager; ``commit`` publishes the directory. Leaving the block
    without ``commit`` (an exception) keeps ``<out>.incomplete`` for ``resume=True``.

    Args:
        out: Final directory. Must not exist unless ``overwrite``.
        config: Resolved config of the producer, stored in the manifest.
        max_rows_per_shard: Rows per Arrow file.
        resume: Continue an interrupted write found in ``<out>.incomplete``.
        overwrite: Replace an existing ``<out>`` on commit.
    """

    def __init__(
        self,
        out: str | os.PathLike,
        config: dict[str, Any],
        max_rows_per_shard: int = 1_000_000,
        resume: bool = False,
        overwrite: bool = False,
    ) -> None:
        self.out = Path(out)
        self.tmp = Path(f"{self.out}.incomplete")
        self.config = config
        self.max_rows_per_shard = max_rows_per_shard
        self.resume = resume
        if self.out.exists() and not overwrite:
            raise ShardError(f"Shard directory '{self.out}' exists; pass --overwrite to replace it")
        if not resume:
            shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True, exist_ok=True)
        self._nodes: dict[str, ShardWriter] = {}
        self._edges: dict[str, tuple[tuple[str, str, str], ShardWriter]] = {}

    def __enter__(self) -> GraphShardWriter:
        return self

    def __exit__(self, *exc) -> None:
        return None

    def node_writer(self, node_type: str, schema: pa.Schema, resume: bool | None = None) -> ShardWriter:
        if "key" not in schema.names:
            raise ValueError(f"Node table '{node_type}' needs a 'key' column (got {schema.names})")
        w = ShardWriter(
            self.tmp / "nodes" / node_type, schema, self.max_rows_per_shard, self.resume if resume is None else resume
        )
        self._nodes[node_type] = w
        return w

    def edge_writer(self, src: str, rel: str, dst: str, schema: pa.Schema, resume: bool | None = None) -> ShardWriter:
        missing = {"src", "dst"} - set(schema.names)
        if missing:
            raise ValueError(f"Edge table '{src}__{rel}__{dst}' needs columns {sorted(missing)}")
        name = edge_type_name(src, rel, dst)
        w = ShardWriter(
            self.tmp / "edges" / name, schema, self.max_rows_per_shard, self.resume if resume is None else resume
        )
        self._edges[name] = ((src, rel, dst), w)
        return w

    def commit(self, report: dict[str, Any] | None = None, fingerprint: str = "") -> Manifest:
        """Finishes every table, validates edge indices against node counts, publishes."""
        nodes = {t: w.close(f"nodes/{t}") for t, w in self._nodes.items()}
        edges = {}
        for name, ((src, rel, dst), w) in self._edges.items():
            for end in (src, dst):
                if end not in nodes:
                    raise ShardError(f"Edge type '{name}' refers to node type '{end}', which was not written")
            info = w.close(f"edges/{name}")
            info.src, info.rel, info.dst = src, rel, dst
            edges[name] = info
        manifest = Manifest(
            node_types=nodes,
            edge_types=edges,
            config=self.config,
            report=report or {},
            fingerprint=fingerprint,
            created_at=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        )
        write_json_atomic(self.tmp / MANIFEST_NAME, manifest.to_json())
        if self.out.exists():
            # Move the old directory aside first so the swap never leaves no valid copy
            # under an existing name for longer than two renames.
            old = Path(f"{self.out}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(self.out, old)
            os.replace(self.tmp, self.out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.tmp, self.out)
        return manifest
