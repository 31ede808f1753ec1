"""The shard manifest: what a finished shard directory contains and how it was made."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from scalable_rec.errors import ShardError

FORMAT = "scalable_rec.graph_shards"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"


def edge_type_name(src: str, rel: str, dst: str) -> str:
    return f"{src}__{rel}__{dst}"


def schema_to_json(schema: pa.Schema) -> list[dict[str, str]]:
    return [{"name": f.name, "type": str(f.type)} for f in schema]


@dataclass
class ShardFile:
    """One finished ``part-NNNNN-of-MMMMM`` file."""

    path: str
    """Path relative to the shard directory."""
    num_rows: int
    num_bytes: int
    sha256: str


@dataclass
class TableInfo:
    """A node or edge table: its schema and its shard files in order."""

    schema: list[dict[str, str]]
    files: list[ShardFile] = field(default_factory=list)
    src: str | None = None
    """Source node type (edge tables only)."""
    rel: str | None = None
    dst: str | None = None

    @property
    def num_rows(self) -> int:
        return sum(f.num_rows for f in self.files)

    @property
    def num_bytes(self) -> int:
        return sum(f.num_bytes for f in self.files)


@dataclass
class Manifest:
    """Contents of ``manifest.json``."""

    node_types: dict[str, TableInfo]
    edge_types: dict[str, TableInfo]
    config: dict[str, Any]
    """The resolved config of the source that produced the shards."""
    report: dict[str, Any] = field(default_factory=dict)
    """Counted skips and other facts about the input (see ``SkipReport``)."""
    fingerprint: str = ""
    """Hash of the inputs and source config; a rerun with the same one reuses the shards."""
    created_at: str = ""
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    def identity(self) -> dict[str, str]:
        """What the shards hold, for checkpoints: ``content_sha256`` hashes every file's path
        and sha256 (the same ratings in another row order give another value), and
        ``fingerprint`` is the input hash that produced them."""
        h = hashlib.sha256()
        for group in (self.node_types, self.edge_types):
            for name in sorted(group):
                for f in group[name].files:
                    h.update(f"{f.path}\0{f.sha256}\n".encode())
        return {"content_sha256": h.hexdigest(), "fingerprint": self.fingerprint}

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        for group in ("node_types", "edge_types"):
            for info in out[group].values():
                info["num_rows"] = sum(f["num_rows"] for f in info["files"])
                info["num_bytes"] = sum(f["num_bytes"] for f in info["files"])
        return out

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Manifest:
        def table(d: dict[str, Any]) -> TableInfo:
            return TableInfo(
                schema=d["schema"],
                files=[ShardFile(**f) for f in d["files"]],
                src=d.get("src"),
                rel=d.get("rel"),
                dst=d.get("dst"),
            )

        return cls(
            node_types={k: table(v) for k, v in obj["node_types"].items()},
            edge_types={k: table(v) for k, v in obj["edge_types"].items()},
            config=obj.get("config", {}),
            report=obj.get("report", {}),
            fingerprint=obj.get("fingerprint", ""),
            created_at=obj.get("created_at", ""),
            format=obj["format"],
            format_version=obj["format_version"],
        )

    @classmethod
    def load(cls, directory: str | os.PathLike) -> Manifest:
        path = Path(directory) / MANIFEST_NAME
        if not path.is_file():
            hint = ""
            if Path(f"{directory}.incomplete").exists():
                hint = f" ('{directory}.incomplete' exists: a run writing it did not finish)"
            raise ShardError(f"No shard manifest at '{path}'{hint}")
        try:
            obj = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ShardError(f"Shard manifest '{path}' is not valid JSON: {err}") from err
        if obj.get("format") != FORMAT:
            raise ShardError(f"'{path}' is not a scalable_rec shard manifest (format={obj.get('format')!r})")
        if obj.get("format_version") != FORMAT_VERSION:
            raise ShardError(
                f"Shard format version {obj.get('format_version')} in '{path}' is not supported "
                f"(expected {FORMAT_VERSION}); re-run 'scalable-rec prepare'"
            )
        try:
            manifest = cls.from_json(obj)
        except (KeyError, TypeError) as err:
            raise ShardError(f"Shard manifest '{path}' is missing a field: {err}") from err
        manifest.check_paths(directory)
        return manifest

    def check_paths(self, directory: str | os.PathLike) -> None:
        """Refuses a manifest naming a file outside its directory (``../x``, ``/etc/...``, a
        symlink leading out): readers must never be pointed at arbitrary files."""
        root = Path(directory).resolve()
        for group in (self.node_types, self.edge_types):
            for name, info in group.items():
                for f in info.files:
                    rel = Path(f.path)
                    target = (root / rel).resolve()
                    if rel.is_absolute() or ".." in rel.parts or not target.is_relative_to(root):
                        raise ShardError(
                            f"Shard manifest '{Path(directory) / MANIFEST_NAME}' lists '{f.path}' for table "
                            f"'{name}', which is outside the shard directory; expected a relative path "
                            "inside it (manifest rejected)"
                        )
