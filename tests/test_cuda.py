"""CUDA paths: fp16 with GradScaler, bf16, pinned-memory loading and NCCL DDP.

Skipped with a reason on machines without a CUDA device (the marker is handled in
conftest.py); run them where a GPU is present.
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from scalable_rec.graph import RatingGraph, SplitConfig, split_edges
from scalable_rec.train import ModelConfig, TrainConfig, train

pytestmark = pytest.mark.cuda


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_training_on_cuda(small_shards, tmp_path, precision):
    g = RatingGraph.from_shards(small_shards)
    split = split_edges(g, SplitConfig())
    result = train(g, split, ModelConfig(), TrainConfig(epochs=2, device="cuda", precision=precision,
                                                        progress=False), tmp_path)
    assert math.isfinite(result.best_val_rmse) and result.best_val_rmse < 1.2
    assert next(result.model.parameters()).is_cuda


def test_fp16_aggregation_does_not_overflow(tmp_path):
    """A movie with 100k raters: a fp16 scatter-sum would pass 65504 and become inf."""
    from torch_geometric.data import HeteroData

    from scalable_rec.graph.hetero import MOVIE, RATES, REV_RATES, USER
    from scalable_rec.train.model import Recommender

    n = 100_000
    model = Recommender(n, 1, 4, ModelConfig(hidden=16, aggr="sum")).cuda()
    with torch.no_grad():
        model.encoder.user_emb.weight.fill_(1.0)
    data = HeteroData()
    data[USER].num_nodes, data[MOVIE].num_nodes = n, 1
    data[MOVIE].x = torch.ones(1, 4)
    data[RATES].edge_index = torch.stack([torch.arange(n), torch.zeros(n, dtype=torch.long)])
    data[REV_RATES].edge_index = data[RATES].edge_index.flip(0)
    with torch.autocast("cuda", dtype=torch.float16):
        z = model.encode_all(data)
    assert torch.isfinite(z[MOVIE]).all()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL DDP needs at least 2 CUDA devices")
def test_torchrun_nccl_two_gpus(tiny_shards, tmp_path):
    worker = Path(__file__).with_name("ddp_worker.py")
    cfg = {"epochs": 1, "batch_size": 20, "num_neighbors": [-1, -1], "progress": False, "device": "cuda"}
    env = {**os.environ}
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(worker),
           str(tiny_shards.directory), str(tmp_path / "run"), str(tmp_path / "out"), json.dumps(cfg)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = torch.load(tmp_path / "out-rank0.pt"), torch.load(tmp_path / "out-rank1.pt")
    assert all(torch.equal(r0[k], r1[k]) for k in r0)
