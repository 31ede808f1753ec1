"""Node-shared tables (``scalable_rec.train.node_tables``) in a one-process gloo group that
pretends to have a second rank on its node; the two-rank runs are in test_distributed."""
import torch
import torch.distributed as dist
import pytest

from scalable_rec.train import node_tables
from scalable_rec.dist import DistEnv


@pytest.fixture
def group(tmp_path, monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _mapped(path_part: str) -> list[str]:
    return [line for line in open("/proc/self/maps") if path_part in line]


def test_tables_move_into_one_mapped_file_each_and_leave_no_names(group, tmp_path):
    shm = tmp_path / "shm"
    shm.mkdir()
    tables = [torch.nn.Parameter(torch.randn(50, 4)), torch.nn.Parameter(torch.randn(30, 1))]
    before = [t.detach().clone() for t in tables]
    assert node_tables.share_tables_on_node(tables, DistEnv(0, 0, 2), directory=shm)
    for t, b in zip(tables, before):
        assert torch.equal(t.detach(), b) and t.shape == b.shape
    maps = _mapped(str(shm))
    assert len(maps) == 2 and all("(deleted)" in line for line in maps)  # mapped, names unlinked
    assert list(shm.iterdir()) == []
    tables[0].data[3] += 1  # writes land in the mapping
    assert torch.equal(tables[0].detach()[3], before[0][3] + 1)


def test_without_room_in_shared_memory_each_rank_keeps_its_own_copy(group, tmp_path, monkeypatch):
    monkeypatch.setattr(node_tables, "SHM_HEADROOM", 1e30)
    table = torch.nn.Parameter(torch.randn(50, 4))
    ptr = table.data_ptr()
    assert not node_tables.share_tables_on_node([table], DistEnv(0, 0, 2), directory=tmp_path)
    assert table.data_ptr() == ptr and list(tmp_path.glob("scalable_rec-tables-*")) == []


def test_one_rank_on_the_node_shares_nothing(group, tmp_path, monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    table = torch.nn.Parameter(torch.randn(5, 4))
    assert not node_tables.share_tables_on_node([table], DistEnv(0, 0, 2), directory=tmp_path)
