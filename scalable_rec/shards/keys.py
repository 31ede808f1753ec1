"""Incremental key → node-index maps, built while streaming edges."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pyarrow as pa


class KeyIndex:
    """Maps source keys (ints or strings) to dense node indices in first-seen order.

    Lookups are vectorised per batch: ``np.unique`` reduces a batch to its distinct keys,
    so the Python dict is touched once per distinct key in the batch, not once per row.
    This map is the only state whose memory grows with the graph (one entry per node).

    Args:
        keys: Optional initial keys, assigned indices ``0..len(keys)-1`` in order.
    """

    def __init__(self, keys: Iterable | None = None) -> None:
        self._index: dict = {}
        self._keys: list = []
        if keys is not None:
            keys = list(keys)
            index = dict(zip(keys, range(len(keys))))  # one C-level pass (a refresh maps every node)
            if len(index) == len(keys):
                self._index, self._keys = index, keys
            else:  # repeated keys: the first occurrence keeps its index
                for k in keys:
                    self.add(k)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key) -> bool:
        return key in self._index

    @property
    def keys(self) -> list:
        return self._keys

    def add(self, key) -> int:
        idx = self._index.get(key)
        if idx is None:
            idx = self._index[key] = len(self._keys)
            self._keys.append(key)
        return idx

    def lookup(self, keys: np.ndarray | pa.Array, insert: bool = False) -> np.ndarray:
        """Returns an int64 index per key; ``-1`` for unknown keys unless ``insert``."""
        if isinstance(keys, (pa.Array, pa.ChunkedArray)):
            keys = keys.to_numpy(zero_copy_only=False)
        if len(keys) == 0:
            return np.empty(0, dtype=np.int64)
        uniq, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
        if insert:
            mapped = np.empty(len(uniq), dtype=np.int64)
            for j in np.argsort(first, kind="stable"):  # new keys get indices in first-seen order
                k = uniq[j]
                mapped[j] = self.add(k.item() if hasattr(k, "item") else k)
        else:
            get = self._index.get
            mapped = np.fromiter(
                (get(k.item() if hasattr(k, "item") else k, -1) for k in uniq), dtype=np.int64, count=len(uniq)
            )
        return mapped[inverse.reshape(-1)]
