import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from scalable_rec.errors import ShardError
from scalable_rec.graph import RatingGraph, SplitConfig, split_edges
from scalable_rec.graph.index import GraphIndex, build_index


@pytest.fixture()
def index_dir(tiny_shards, tmp_path):
    return build_index(tiny_shards, SplitConfig(), root=tmp_path / "index")


def _pairs(row: torch.Tensor, colptr: torch.Tensor) -> list[tuple[int, int]]:
    dst = torch.repeat_interleave(torch.arange(colptr.numel() - 1), colptr.diff())
    return sorted(zip(row.tolist(), dst.tolist()))


def test_index_holds_edges_split_features_and_csc_of_each_subset(tiny_shards, index_dir):
    g = RatingGraph.from_shards(tiny_shards)
    split = split_edges(g, SplitConfig())
    index = GraphIndex.open(index_dir)
    mg = index.rating_graph(tiny_shards)
    for name in ("src", "dst", "rating", "timestamp", "movie_x"):
        assert torch.equal(getattr(mg, name), getattr(g, name)), name
    got = index.split()
    for part in ("train", "val", "test"):
        assert torch.equal(getattr(got, part), getattr(split, part))
    subsets = {
        "train": split.train,
        "seen": torch.cat([split.train, split.val]).sort().values,
        "all": torch.arange(g.num_edges),
    }
    for subset, ids in subsets.items():
        csc = index.csc(subset)
        user_movie = sorted(zip(g.src[ids].tolist(), g.dst[ids].tolist()))
        assert _pairs(*csc["rates"]) == user_movie
        assert sorted((u, m) for m, u in _pairs(*csc["rev_rates"])) == user_movie
        # neighbours keep edge order within a destination (a stable sort, like PyG's sort_csc)
        row, colptr = csc["rates"]
        first = int(g.dst[ids][0])
        assert row[colptr[first] : colptr[first + 1]].tolist() == g.src[ids][g.dst[ids] == first].tolist()


def test_index_is_reused_and_leaves_no_temporary_directory(tiny_shards, index_dir):
    mtime = (index_dir / "meta.json").stat().st_mtime_ns
    assert build_index(tiny_shards, SplitConfig(), root=index_dir.parent) == index_dir
    assert (index_dir / "meta.json").stat().st_mtime_ns == mtime
    # the index and the lock file its builders take (``.<key>.lock``), nothing else
    assert sorted(p.name for p in index_dir.parent.iterdir()) == [f".{index_dir.name}.lock", index_dir.name]
    # another split is another index
    other = build_index(tiny_shards, SplitConfig(split_seed=1), root=index_dir.parent)
    assert other != index_dir and not torch.equal(
        GraphIndex.open(other).split().test, GraphIndex.open(index_dir).split().test
    )


def test_bit_flip_in_an_index_file_is_detected(index_dir):
    path = index_dir / "train" / "rates_row.npy"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=r"corrupted: .*rates_row.npy' has sha256"):
        GraphIndex.open(index_dir)
    GraphIndex.open(index_dir, verify=False)  # sizes still agree: only the checksum sees it


def test_truncated_or_missing_index_file_is_detected_without_checksums(index_dir):
    path = index_dir / "movie_x.npy"
    os.truncate(path, path.stat().st_size - 8)
    with pytest.raises(ShardError, match="movie_x.npy' has .* bytes, expected"):
        GraphIndex.open(index_dir, verify=False)
    path.unlink()
    with pytest.raises(ShardError, match="movie_x.npy' is missing"):
        GraphIndex.open(index_dir, verify=False)


def test_missing_meta_and_wrong_subset_are_named(index_dir, tmp_path):
    with pytest.raises(ShardError, match="no readable meta.json"):
        GraphIndex.open(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="'subset' needs to be one of .* \\(got 'val'\\)"):
        GraphIndex.open(index_dir).csc("val")


def test_mapped_tensors_are_file_backed(index_dir):
    row = GraphIndex.open(index_dir).tensor("all/rates_row")
    maps = open(f"/proc/{os.getpid()}/maps").read()
    assert str(index_dir / "all" / "rates_row.npy") in maps
    assert row.numel() > 0


def test_two_torchrun_ranks_build_the_index_once(tiny_shards, tmp_path):
    """Both ranks ask for the same missing index at once (after a barrier): one builds it,
    the other waits on the lock and opens the same directory; no temporary one is left."""
    root, prefix = tmp_path / "index", tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(Path(__file__).with_name("index_worker.py")),
        str(tiny_shards.directory),
        str(root),
        str(prefix),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads(Path(f"{prefix}-rank{r}.json").read_text()) for r in range(2)]
    wrote = [m for r in ranks for m in r["messages"] if m.startswith("index: wrote")]
    waited = [m for r in ranks for m in r["messages"] if "was built by another process" in m]
    assert len(wrote) == 1 and len(waited) == 1, [r["messages"] for r in ranks]
    assert ranks[0]["directory"] == ranks[1]["directory"] and ranks[0]["edges"] == ranks[1]["edges"] == 500
    assert sorted(p.name for p in root.iterdir() if not p.name.endswith(".lock")) == [Path(ranks[0]["directory"]).name]
