"""Reading shard directories: verified against the manifest, memory-mapped."""

from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path

import pyarrow as pa

from scalable_rec.atomic import sha256_file
from scalable_rec.errors import ShardError
from scalable_rec.shards.manifest import Manifest, TableInfo, edge_type_name, schema_to_json


class GraphShards:
    """A finished shard directory, opened read-only.

    Opening checks that every file the manifest lists exists with the recorded size; with
    ``verify=True`` (default) each file's sha256 is also checked when it is first read, so
    a truncated, half-written or bit-flipped shard raises a ``ShardError`` naming the file.
    Tables are read memory-mapped: the OS pages them in, and they are not copied into the
    Python heap until a consumer converts them.

    Args:
        directory: The shard directory (holding ``manifest.json``).
        verify: Check checksums on read.
    """

    def __init__(self, directory: str | os.PathLike, verify: bool = True) -> None:
        self.directory = Path(directory)
        self.manifest = Manifest.load(self.directory)
        self.verify = verify
        for info in self._tables().values():
            for f in info.files:
                path = self.directory / f.path
                if not path.is_file():
                    raise ShardError(f"Shard file '{path}' listed in the manifest is missing")
                size = path.stat().st_size
                if size != f.num_bytes:
                    raise ShardError(
                        f"Shard file '{path}' has {size} bytes, the manifest records {f.num_bytes} "
                        "(truncated or half-written)"
                    )

    def verify_all(self) -> None:
        """Reads every file once, checking row counts, schema and (if ``verify``) sha256."""
        for name, info in self._tables().items():
            self._read(info, name)

    def _tables(self) -> dict[str, TableInfo]:
        return {
            **{f"nodes/{k}": v for k, v in self.manifest.node_types.items()},
            **{f"edges/{k}": v for k, v in self.manifest.edge_types.items()},
        }

    @property
    def node_types(self) -> list[str]:
        return list(self.manifest.node_types)

    @property
    def edge_types(self) -> list[tuple[str, str, str]]:
        return [(i.src, i.rel, i.dst) for i in self.manifest.edge_types.values()]

    def num_nodes(self, node_type: str) -> int:
        return self.manifest.node_types[node_type].num_rows

    def _read(self, info: TableInfo, what: str) -> pa.Table:
        tables = []
        for f in info.files:
            path = self.directory / f.path
            if self.verify and sha256_file(path) != f.sha256:
                raise ShardError(f"Shard file '{path}' does not match its manifest checksum (corrupted)")
            try:
                reader = pa.ipc.open_file(pa.memory_map(str(path), "r"))
                table = reader.read_all()
            except (pa.ArrowInvalid, OSError) as err:
                raise ShardError(f"Shard file '{path}' is not a readable Arrow IPC file: {err}") from err
            if table.num_rows != f.num_rows:
                raise ShardError(f"Shard file '{path}' has {table.num_rows} rows, the manifest records {f.num_rows}")
            if schema_to_json(table.schema) != info.schema:
                raise ShardError(f"Shard file '{path}' has schema {table.schema}, the manifest records {info.schema}")
            tables.append(table)
        if not tables:
            raise ShardError(f"Table '{what}' in '{self.directory}' has no files")
        return pa.concat_tables(tables) if len(tables) > 1 else tables[0]

    def nodes(self, node_type: str) -> pa.Table:
        try:
            info = self.manifest.node_types[node_type]
        except KeyError:
            raise ShardError(f"Node type '{node_type}' is not in '{self.directory}' (has {self.node_types})") from None
        return self._read(info, f"nodes/{node_type}")

    def edges(self, src: str, rel: str, dst: str) -> pa.Table:
        name = edge_type_name(src, rel, dst)
        try:
            info = self.manifest.edge_types[name]
        except KeyError:
            raise ShardError(
                f"Edge type '{name}' is not in '{self.directory}' (has {list(self.manifest.edge_types)})"
            ) from None
        return self._read(info, f"edges/{name}")

    @cached_property
    def rating_edge_type(self) -> tuple[str, str, str]:
        """The single user→movie edge type carrying ``rating`` (the recommender's target)."""
        for info in self.manifest.edge_types.values():
            if any(c["name"] == "rating" for c in info.schema):
                return info.src, info.rel, info.dst
        raise ShardError(f"No edge table with a 'rating' column in '{self.directory}'")
