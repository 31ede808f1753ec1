"""Node-shared tables (``scalable_rec.train.node_tables``) in a one-process gloo group that
pretends to have a second rank on its node; the two-rank runs are in test_distributed."""

import pytest
import torch
import torch.distributed as dist

from scalable_rec.dist import DistEnv
from scalable_rec.train import node_tables


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


@pytest.fixture
def shm(tmp_path):
    out = tmp_path / "shm"
    out.mkdir()
    return out


def test_files_are_private_and_reserved_before_anything_is_written(group, shm, monkeypatch):
    """Each file is created 0600 (whatever the umask) and its whole size reserved up front:
    a sparse file on a full tmpfs would die of SIGBUS in the copy instead."""
    import os

    reserved, real = [], os.posix_fallocate

    def fallocate(fd, offset, length):
        st = os.fstat(fd)
        reserved.append((st.st_mode & 0o777, st.st_size, offset, length))
        return real(fd, offset, length)

    monkeypatch.setattr(os, "posix_fallocate", fallocate)
    old_umask = os.umask(0)
    try:
        tables = [torch.nn.Parameter(torch.randn(50, 4)), torch.nn.Parameter(torch.randn(30, 1))]
        assert node_tables.share_tables_on_node(tables, DistEnv(0, 0, 2), directory=shm)
    finally:
        os.umask(old_umask)
    assert reserved == [(0o600, 0, 0, 50 * 4 * 4), (0o600, 0, 0, 30 * 4)]  # before the copy wrote a byte


def test_no_space_in_shared_memory_is_a_fallback_not_a_crash(group, shm, monkeypatch, caplog):
    import errno
    import os

    calls = []

    def full(fd, offset, length):
        calls.append(length)
        if len(calls) == 2:  # the second table no longer fits: another job took the room
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    tables = [torch.nn.Parameter(torch.randn(50, 4)), torch.nn.Parameter(torch.randn(30, 1))]
    ptrs = [t.data_ptr() for t in tables]
    assert not node_tables.share_tables_on_node(tables, DistEnv(0, 0, 2), directory=shm)
    assert [t.data_ptr() for t in tables] == ptrs and list(shm.iterdir()) == []
    assert "no space left" in caplog.text and "keeps its own copy" in caplog.text


def test_leftovers_of_dead_jobs_are_removed_at_start(group, shm):
    import os
    import socket
    import subprocess
    import sys

    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True
    )
    dead_pid = int(gone.stdout)  # exited and reaped: its pid names no process now
    host = socket.gethostname()
    dead = shm / node_tables.table_name(host, dead_pid, "abc", "0", 0)
    alive = shm / node_tables.table_name(host, os.getppid(), "def", "0", 0)
    elsewhere = shm / node_tables.table_name(host + "-other", dead_pid, "ghi", "0", 0)
    for path in (dead, alive, elsewhere):
        path.write_bytes(b"x" * 64)
    assert node_tables.share_tables_on_node([torch.nn.Parameter(torch.randn(5, 4))], DistEnv(0, 0, 2), directory=shm)
    assert sorted(shm.iterdir()) == sorted([alive, elsewhere])
