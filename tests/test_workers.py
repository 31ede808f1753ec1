"""Sampling workers per rank and the /dev/shm room check (scalable_rec.train.workers)."""

import os
from types import SimpleNamespace

import pytest
import torch

from scalable_rec.dist import DistEnv
from scalable_rec.errors import ConfigError
from scalable_rec.train.workers import check_shm_room, cores_per_rank, loader_workers, shared_bytes

CUDA = torch.device("cuda")  # a device object only: nothing here touches a GPU


@pytest.mark.parametrize("cores,local_ranks,expected", [(16, 1, 15), (16, 2, 7), (16, 8, 1), (2, 4, 1), (64, 1, 63)])
def test_workers_follow_the_cores_of_this_rank_on_cuda(monkeypatch, cores, local_ranks, expected):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local_ranks))
    env = DistEnv(rank=0, local_rank=0, world_size=local_ranks)
    assert cores_per_rank(env) == max(1, cores // local_ranks)
    assert loader_workers(-1, CUDA, env) == expected
    assert loader_workers(-1, torch.device("cpu"), env) == 0  # the CPU's cores train the model
    assert loader_workers(3, CUDA, env) == 3  # an explicit count is kept


def test_shm_room_is_checked_with_one_line(monkeypatch, tmp_path):
    free_mib = 64
    monkeypatch.setattr(os, "statvfs", lambda path: SimpleNamespace(f_bavail=free_mib, f_frsize=1 << 20))
    check_shm_room(50 << 20, tmp_path)  # 55 MiB with headroom: fits
    with pytest.raises(ConfigError, match=r"needs 704 MiB free there \(got 64 MiB\).*--num-workers 0") as err:
        check_shm_room(640 << 20, tmp_path)
    assert "\n" not in str(err.value)
    check_shm_room(0, tmp_path)  # nothing to share: nothing checked


def test_only_tensors_not_yet_shared_count():
    a, b = torch.zeros(1000), torch.zeros(10, dtype=torch.long)
    assert shared_bytes([a, b, "not a tensor"]) == 4000 + 80
    a.share_memory_()
    assert shared_bytes([a, b]) == 80


def test_loader_refuses_workers_without_room_before_moving_the_graph(small, monkeypatch):
    """``make_loader`` checks /dev/shm before ``share_memory_`` moves the graph there."""
    from scalable_rec.train import TrainConfig
    from scalable_rec.train.batches import SupervisionEdges, make_loader

    g, split = small
    data = g.hetero_data(split.train)
    monkeypatch.setattr(os, "statvfs", lambda path: SimpleNamespace(f_bavail=0, f_frsize=4096))
    edges = SupervisionEdges(g.src, g.dst, g.rating, split.train)
    with pytest.raises(ConfigError, match="sampling workers share the message graph"):
        make_loader(
            data,
            edges,
            TrainConfig(num_workers=2, progress=False),
            64,
            DistEnv(),
            shuffle=True,
            device=torch.device("cpu"),
        )
    assert not data["movie"].x.is_shared()  # nothing was moved
