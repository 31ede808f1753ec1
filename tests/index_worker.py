"""Worker for tests/test_index.py, launched by torchrun (not collected by pytest).

    torchrun --standalone --nproc_per_node=2 tests/index_worker.py SHARDS INDEX_ROOT OUT_PREFIX

Every rank asks for the same, not yet built graph index right after a barrier (as the
ranks of ``scalable-rec train --graph-backend store`` do), and writes what the index
module logged and which directory it opened to ``OUT_PREFIX-rank<r>.json``.
"""

import json
import logging
import sys

import torch.distributed as dist

from scalable_rec.graph import SplitConfig
from scalable_rec.graph.index import GraphIndex
from scalable_rec.shards import GraphShards

shards, root, out_prefix = sys.argv[1:4]
dist.init_process_group("gloo")
messages: list[str] = []


class _Keep(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        messages.append(record.getMessage())


logger = logging.getLogger("scalable_rec.graph.index")
logger.setLevel(logging.INFO)
logger.addHandler(_Keep())
dist.barrier()  # both ranks ask at the same moment
index = GraphIndex.for_shards(GraphShards(shards), SplitConfig(), root=root)
json.dump(
    {"messages": messages, "directory": str(index.directory), "edges": index.num_edges},
    open(f"{out_prefix}-rank{dist.get_rank()}.json", "w"),
)
dist.barrier()
dist.destroy_process_group()
