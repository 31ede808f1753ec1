"""Imported by the forkserver of ``--nproc-per-node``'s ranks (``train.launch``), and only
there: importing this module imports what every rank needs and freezes it out of the
collector. It sits beside ``cli`` and ``pipeline``, above the layers it imports.

Python's forkserver runs no code of ours, it only imports the modules named by
``set_forkserver_preload``; so this module does its work on import. The forkserver then
forks each rank from a process that has imported torch, PyG and the package but runs no
thread besides its own: the ranks share those pages copy-on-write with it and with each
other, and ``gc.freeze`` keeps a collection in a rank from writing to them.
"""

from __future__ import annotations

import gc
import importlib

# What a rank imports on its way through train/score.
PRELOAD = (
    "torch",
    "torch_geometric",
    "torch_geometric.loader",
    "torch.distributed",
    "scalable_rec.pipeline",
    "scalable_rec.train.loop",
    "scalable_rec.graph.store",
    "scalable_rec.graph.index",
    "scalable_rec.model.layerwise",
    "scalable_rec.sink.parquet",
)

for _name in PRELOAD:
    importlib.import_module(_name)
gc.collect()
gc.freeze()
