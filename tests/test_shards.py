import json
import os

import pyarrow as pa
import pytest

from scalable_rec.errors import ShardError
from scalable_rec.shards import GraphShards, GraphShardWriter, KeyIndex, ShardWriter

SCHEMA = pa.schema([("src", pa.int64()), ("dst", pa.int64()), ("rating", pa.float32())])


def _batch(n, start=0):
    return pa.record_batch(
        [pa.array(range(start, start + n)), pa.array(range(n)), pa.array([4.5] * n, pa.float32())], schema=SCHEMA
    )


def _write(out, rows=250, per_shard=100):
    with GraphShardWriter(out, {"source": "test"}, max_rows_per_shard=per_shard) as w:
        w.node_writer("user", pa.schema([("key", pa.int64())])).write(
            pa.record_batch([pa.array(range(rows))], names=["key"])
        )
        w.node_writer("movie", pa.schema([("key", pa.string())])).write(
            pa.record_batch([pa.array([f"m{i}" for i in range(rows)])], names=["key"])
        )
        e = w.edge_writer("user", "rates", "movie", SCHEMA)
        for start in range(0, rows, 60):
            e.write(_batch(min(60, rows - start), start))
        return w.commit(report={"skipped": {}}, fingerprint="abc")


@pytest.mark.parametrize("rows,per_shard,files", [(250, 100, 3), (100, 100, 1), (0, 100, 1)])
def test_round_trip_and_layout(tmp_path, rows, per_shard, files):
    out = tmp_path / "shards"
    manifest = _write(out, rows, per_shard)
    assert not (tmp_path / "shards.incomplete").exists()
    info = manifest.edge_types["user__rates__movie"]
    assert len(info.files) == files
    assert [f.path.rsplit("/", 1)[1] for f in info.files] == [
        f"part-{i:05d}-of-{files:05d}.arrow" for i in range(files)
    ]
    assert all(f.num_rows <= per_shard for f in info.files)
    saved = json.loads((out / "manifest.json").read_text())
    assert saved["format_version"] == 1 and saved["config"] == {"source": "test"}
    assert saved["edge_types"]["user__rates__movie"]["num_rows"] == rows
    assert saved["edge_types"]["user__rates__movie"]["src"] == "user"
    shards = GraphShards(out)
    table = shards.edges("user", "rates", "movie")
    assert table.num_rows == rows
    assert table.column("src").to_pylist() == list(range(rows))
    assert table.column("rating").to_pylist() == [4.5] * rows  # float stays float
    assert shards.rating_edge_type == ("user", "rates", "movie")


def test_crash_before_commit_leaves_no_finished_directory(tmp_path):
    out = tmp_path / "shards"
    w = GraphShardWriter(out, {})
    e = w.edge_writer("user", "rates", "movie", SCHEMA)
    e.write(_batch(10))
    e.flush()
    # no commit: the process "crashed"
    assert not out.exists()
    with pytest.raises(ShardError, match="incomplete"):
        GraphShards(out)


def test_truncated_shard_is_detected_by_name(tmp_path):
    out = tmp_path / "shards"
    _write(out)
    victim = out / "edges/user__rates__movie/part-00001-of-00003.arrow"
    with open(victim, "r+b") as f:
        f.truncate(victim.stat().st_size // 2)
    with pytest.raises(ShardError, match="part-00001-of-00003.arrow.*truncated"):
        GraphShards(out)


def test_corrupted_shard_is_detected_by_checksum(tmp_path):
    out = tmp_path / "shards"
    _write(out)
    victim = out / "edges/user__rates__movie/part-00002-of-00003.arrow"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    shards = GraphShards(out)  # same size: only the checksum can tell
    with pytest.raises(ShardError, match="part-00002-of-00003.arrow.*checksum"):
        shards.edges("user", "rates", "movie")


def test_missing_shard_file(tmp_path):
    out = tmp_path / "shards"
    _write(out)
    os.remove(out / "nodes/user/part-00000-of-00003.arrow")
    with pytest.raises(ShardError, match="nodes/user/part-00000-of-00003.arrow.*missing"):
        GraphShards(out)


def test_schema_mismatch_is_refused(tmp_path):
    w = ShardWriter(tmp_path / "t", SCHEMA)
    bad = pa.record_batch([pa.array(["x"])], names=["src"])
    with pytest.raises(ShardError, match="expected"):
        w.write(bad)


def test_existing_output_is_not_overwritten_by_default(tmp_path):
    out = tmp_path / "shards"
    _write(out)
    with pytest.raises(ShardError, match="exists"):
        GraphShardWriter(out, {})


def test_resume_keeps_finished_parts_and_state(tmp_path):
    d = tmp_path / "t"
    w = ShardWriter(d, SCHEMA, max_rows_per_shard=10)
    w.write(_batch(10))  # flushes part 0 automatically
    w.write(_batch(5, 10))
    w.flush(state="key-15")  # part 1 with a resume token
    w.write(_batch(3, 15))  # buffered only: lost in the "crash"
    (d / ".part-00002.arrow.tmp").write_bytes(b"half")
    resumed = ShardWriter(d, SCHEMA, max_rows_per_shard=10, resume=True)
    assert resumed.state == "key-15"
    assert resumed.num_rows == 15
    assert not (d / ".part-00002.arrow.tmp").exists()
    resumed.write(_batch(3, 15))
    info = resumed.close("edges/x")
    assert [f.num_rows for f in info.files] == [10, 5, 3]


def test_key_index_incremental_lookup():
    idx = KeyIndex(["a", "b"])
    assert idx.lookup(pa.array(["b", "z", "a", "b"])).tolist() == [1, -1, 0, 1]
    assert idx.lookup(pa.array(["z", "y", "z"]), insert=True).tolist() == [2, 3, 2]
    assert idx.keys == ["a", "b", "z", "y"]
    assert idx.lookup(pa.array([], pa.string())).tolist() == []


def test_key_index_initial_keys_repeated_keep_their_first_index():
    idx = KeyIndex(x for x in ["a", "b", "a", "c"])  # any iterable, read once
    assert idx.keys == ["a", "b", "c"] and idx.lookup(pa.array(["a", "c", "b"])).tolist() == [0, 2, 1]
    assert len(idx) == 3 and idx.add("d") == 3


def test_filter_rows_rewrites_parts_and_a_crash_keeps_the_old_table(tmp_path):
    import numpy as np

    d = tmp_path / "t"
    w = ShardWriter(d, SCHEMA, max_rows_per_shard=4)
    w.write(_batch(10))
    w.flush(state="done")
    keep = np.arange(10) % 3 != 0
    assert w.filter_rows(keep) == 4
    assert w.state == "done" and w.num_rows == 6
    assert [t.column("src").to_pylist() for t in w.read_finished()] == [[1, 2, 4, 5], [7, 8]]
    # parts on disk are exactly the recorded ones (old parts removed)
    assert sorted(p.name for p in d.glob("part-*")) == sorted(f.path for f in w.files)
    # a resumed writer sees the rewritten table
    assert ShardWriter(d, SCHEMA, max_rows_per_shard=4, resume=True).num_rows == 6
    with pytest.raises(ValueError, match="one flag per row"):
        w.filter_rows(np.ones(3, dtype=bool))
