"""Memory-mapped graph index files beside the shards: edges, split, CSC per edge type.

Built once per (shard contents, split config), into ``<shards>/index/<key>/`` under a
temporary name and renamed when complete; ``meta.json`` records every array's dtype,
shape, byte size and sha256. Every process that opens the index maps the same files, so
the ranks of one node share one page-cached copy and a process's private (anonymous)
memory does not grow with the number of edges.

Per edge subset (``train``: message passing while training; ``seen``: train + validation,
for test evaluation; ``all``: scoring) there are two compressed indexes:

- ``<subset>/rates_colptr`` ``[movies + 1]`` and ``<subset>/rates_row`` ``[edges]``: the
  CSC of ``user -rates-> movie`` (each movie's users), and
- ``<subset>/rev_rates_colptr`` ``[users + 1]`` and ``<subset>/rev_rates_row``: the CSC of
  ``movie -rev_rates-> user`` (each user's movies, i.e. the CSR of ``rates``),

both sorted stably by destination, so neighbours keep edge order as in PyG's own
``sort_csc``, and beside each ``<subset>/<rel>_rating`` ``[edges]``: the rating of the edge at
each CSC position (sampled batches carry CSC positions as ``e_id``; rating-aware message
passing reads the rating there). ``edges/*`` hold all rating edges in shard order, ``split/*`` the edge ids
of each split, ``movie_x`` the movie feature matrix.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from filelock import FileLock

from scalable_rec.atomic import sha256_file, write_json_atomic
from scalable_rec.errors import ShardError
from scalable_rec.graph.features import FeatureConfig
from scalable_rec.graph.hetero import EdgeSplit, RatingGraph, SplitConfig, split_edges
from scalable_rec.shards import GraphShards

log = logging.getLogger(__name__)

INDEX_VERSION = 2  # bump when the layout of the index files changes
SUBSETS = ("train", "seen", "all")
META_NAME = "meta.json"


def index_key(shards: GraphShards, split: SplitConfig, features: FeatureConfig) -> str:
    """Hash of the shard files' checksums, the split config and the feature config."""
    m = shards.manifest
    files = sorted(f.sha256 for group in (m.node_types, m.edge_types) for t in group.values() for f in t.files)
    payload = json.dumps(
        {
            "version": INDEX_VERSION,
            "fingerprint": m.fingerprint,
            "files": files,
            "split": dataclasses.asdict(split),
            "text_model": features.text_model,
        },
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def _csc(
    src: np.ndarray, dst: np.ndarray, num_dst: int, out_row: np.ndarray, rating: np.ndarray, out_rating: np.ndarray
) -> np.ndarray:
    """Writes ``src`` and ``rating`` ordered stably by ``dst`` into ``out_row`` and
    ``out_rating``; returns ``colptr``."""
    order = np.argsort(dst, kind="stable")
    np.take(src, order, out=out_row)
    np.take(rating, order, out=out_rating)
    colptr = np.zeros(num_dst + 1, dtype=np.int64)
    np.cumsum(np.bincount(dst, minlength=num_dst), out=colptr[1:])
    return colptr


class _Writer:
    """Writes ``.npy`` arrays into a directory and records their metadata."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.files: dict[str, dict[str, Any]] = {}

    def empty(self, name: str, dtype, shape: tuple[int, ...]) -> np.ndarray:
        path = self.directory / f"{name}.npy"
        path.parent.mkdir(parents=True, exist_ok=True)
        self.files[name] = {"dtype": np.dtype(dtype).str, "shape": list(shape)}
        return np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)

    def put(self, name: str, value: np.ndarray) -> None:
        out = self.empty(name, value.dtype, value.shape)
        out[...] = value
        out.flush()
        del out

    def finish(self) -> None:
        for name, info in self.files.items():
            path = self.directory / f"{name}.npy"
            info["bytes"] = path.stat().st_size
            info["sha256"] = sha256_file(path)


def build_index(
    shards: GraphShards,
    split: SplitConfig,
    features: FeatureConfig = FeatureConfig(),
    root: str | os.PathLike | None = None,
) -> Path:
    """Writes the index of ``shards`` under ``root`` (default ``<shards>/index``); returns its path.

    Peak memory is that of ``RatingGraph.from_shards`` plus one subset's sort (``prepare``
    pays it once); an index that already exists is reused. Processes that ask for the
    same index at once (the ranks of a torchrun job) build it once: the first takes a
    file lock beside it (``.<key>.lock``, ``filelock``), the others wait on that lock and
    then open what it wrote. No collective is involved, so a rank waiting here holds no
    other rank at a collective timeout.
    """
    root = Path(root) if root is not None else shards.directory / "index"
    final = root / index_key(shards, split, features)
    if (final / META_NAME).is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f".{final.name}.lock")):
        if (final / META_NAME).is_file():  # another process built it while this one waited
            log.info("index: %s was built by another process", final)
            return final
        return _build(shards, split, features, root, final)


def _build(shards: GraphShards, split: SplitConfig, features: FeatureConfig, root: Path, final: Path) -> Path:
    t0 = time.perf_counter()
    tmp = root / f".{final.name}.incomplete-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        graph = RatingGraph.from_shards(shards, features)
        parts = split_edges(graph, split)
        w = _Writer(tmp)
        for name, value in (
            ("edges/src", graph.src),
            ("edges/dst", graph.dst),
            ("edges/rating", graph.rating),
            ("edges/timestamp", graph.timestamp),
            ("split/train", parts.train),
            ("split/val", parts.val),
            ("split/test", parts.test),
            ("movie_x", graph.movie_x),
        ):
            w.put(name, value.numpy())
        src, dst, rating = graph.src.numpy(), graph.dst.numpy(), graph.rating.numpy()
        subsets = {
            "train": parts.train.numpy(),
            "seen": np.sort(np.concatenate([parts.train.numpy(), parts.val.numpy()])),
            "all": None,
        }
        counts = {}
        for subset, ids in subsets.items():
            s, d, r = (src, dst, rating) if ids is None else (src[ids], dst[ids], rating[ids])
            counts[subset] = int(s.size)
            for rel, a, b, num_dst in (("rates", s, d, graph.num_movies), ("rev_rates", d, s, graph.num_users)):
                row = w.empty(f"{subset}/{rel}_row", np.int64, (s.size,))
                row_rating = w.empty(f"{subset}/{rel}_rating", np.float32, (s.size,))
                w.put(f"{subset}/{rel}_colptr", _csc(a, b, num_dst, row, r, row_rating))
                row.flush()
                row_rating.flush()
                del row, row_rating
            del s, d, r
        w.finish()
        write_json_atomic(
            tmp / META_NAME,
            {
                "version": INDEX_VERSION,
                "shards": str(shards.directory.resolve()),
                "fingerprint": shards.manifest.fingerprint,
                "split": dataclasses.asdict(split),
                "text_model": features.text_model,
                "num_users": graph.num_users,
                "num_movies": graph.num_movies,
                "num_edges": graph.num_edges,
                "subset_edges": counts,
                "files": w.files,
            },
        )
        try:
            tmp.rename(final)
        except OSError:  # another process finished the same index first: keep theirs
            if not (final / META_NAME).is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("index: wrote %s in %.1fs", final, time.perf_counter() - t0)
    return final


@dataclass
class GraphIndex:
    """An opened index: every array memory-mapped, checked against ``meta.json``.

    Args:
        directory: The index directory (holding ``meta.json``).
        verify: Also check every file's sha256 (reads each file once; the pages then sit in
            the shared page cache). Sizes are always checked.
    """

    directory: Path
    meta: dict[str, Any]

    @classmethod
    def open(cls, directory: str | os.PathLike, verify: bool = True) -> GraphIndex:
        directory = Path(directory)
        try:
            meta = json.loads((directory / META_NAME).read_text())
        except (OSError, ValueError) as err:
            raise ShardError(f"Graph index '{directory}' has no readable {META_NAME}: {err}") from err
        if meta.get("version") != INDEX_VERSION:
            raise ShardError(f"Graph index '{directory}' has version {meta.get('version')!r}, expected {INDEX_VERSION}")
        problems = []
        for name, info in meta["files"].items():
            path = directory / f"{name}.npy"
            if not path.is_file():
                problems.append(f"'{path}' is missing")
            elif path.stat().st_size != info["bytes"]:
                problems.append(f"'{path}' has {path.stat().st_size} bytes, expected {info['bytes']}")
            elif verify and (digest := sha256_file(path)) != info["sha256"]:
                problems.append(f"'{path}' has sha256 {digest[:12]}…, expected {info['sha256'][:12]}…")
        if problems:
            raise ShardError(f"Graph index '{directory}' is corrupted: " + "; ".join(problems))
        return cls(directory=directory, meta=meta)

    @classmethod
    def for_shards(
        cls,
        shards: GraphShards,
        split: SplitConfig,
        features: FeatureConfig = FeatureConfig(),
        root: str | os.PathLike | None = None,
        verify: bool = True,
    ) -> GraphIndex:
        """Opens the index of ``shards`` + ``split``, building it first if it does not exist."""
        return cls.open(build_index(shards, split, features, root), verify=verify)

    def tensor(self, name: str) -> torch.Tensor:
        """The array ``name`` as a tensor over a copy-on-write mapping of its file.

        Reads come from the shared page cache; a write (none of this package's code paths
        writes) would only copy that page into this process.
        """
        info = self.meta["files"][name]
        arr = np.load(self.directory / f"{name}.npy", mmap_mode="c")
        if arr.dtype.str != info["dtype"] or list(arr.shape) != info["shape"]:
            raise ShardError(
                f"Graph index file '{name}' holds {arr.dtype.str}{list(arr.shape)}, "
                f"meta.json records {info['dtype']}{info['shape']}"
            )
        return torch.from_numpy(arr)

    @property
    def num_users(self) -> int:
        return int(self.meta["num_users"])

    @property
    def num_movies(self) -> int:
        return int(self.meta["num_movies"])

    @property
    def num_edges(self) -> int:
        return int(self.meta["num_edges"])

    def csc(self, subset: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``{"rates": (row, colptr), "rev_rates": (row, colptr)}`` of one edge subset."""
        if subset not in SUBSETS:
            raise ValueError(f"'subset' needs to be one of {list(SUBSETS)} (got {subset!r})")
        return {
            rel: (self.tensor(f"{subset}/{rel}_row"), self.tensor(f"{subset}/{rel}_colptr"))
            for rel in ("rates", "rev_rates")
        }

    def csc_rating(self, subset: str) -> dict[str, torch.Tensor]:
        """``{"rates": rating, "rev_rates": rating}``: each edge's rating at its position in
        ``csc(subset)``."""
        if subset not in SUBSETS:
            raise ValueError(f"'subset' needs to be one of {list(SUBSETS)} (got {subset!r})")
        return {rel: self.tensor(f"{subset}/{rel}_rating") for rel in ("rates", "rev_rates")}

    def split(self) -> EdgeSplit:
        return EdgeSplit(train=self.tensor("split/train"), val=self.tensor("split/val"), test=self.tensor("split/test"))

    def rating_graph(self, shards: GraphShards) -> RatingGraph:
        """A ``RatingGraph`` whose edge tensors and features are the mapped files."""
        return RatingGraph(
            user_keys=shards.nodes("user").column("key").combine_chunks(),
            movie_keys=shards.nodes("movie").column("key").combine_chunks(),
            movie_x=self.tensor("movie_x"),
            src=self.tensor("edges/src"),
            dst=self.tensor("edges/dst"),
            rating=self.tensor("edges/rating"),
            timestamp=self.tensor("edges/timestamp"),
        )
