"""Arrow graph shards: the one on-disk format between every source and the trainer.

Layout of a shard directory::

    manifest.json                         # schema, row counts, bytes, sha256, config, report
    nodes/<type>/part-00000-of-00002.arrow
    edges/<src>__<rel>__<dst>/part-00000-of-00001.arrow

Node tables carry a ``key`` column (the source's original id); the row position is the
node index. Edge tables carry ``src``/``dst`` node indices plus edge attributes.
"""

from scalable_rec.shards.keys import KeyIndex
from scalable_rec.shards.manifest import FORMAT_VERSION, Manifest, ShardFile, TableInfo
from scalable_rec.shards.reader import GraphShards
from scalable_rec.shards.writer import GraphShardWriter, ShardWriter

__all__ = [
    "FORMAT_VERSION",
    "GraphShardWriter",
    "GraphShards",
    "KeyIndex",
    "Manifest",
    "ShardFile",
    "ShardWriter",
    "TableInfo",
]
