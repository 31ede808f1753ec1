"""DDP under torchrun (gloo, 2 CPU processes), per-rank edge slices and exact resume."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from scalable_rec.errors import CheckpointError
from scalable_rec.graph import RATES, RatingGraph, SplitConfig, split_edges
from scalable_rec.train import ModelConfig, TrainConfig, train
from scalable_rec.train.distributed import DistEnv, EdgeEpochSampler
from scalable_rec.train.loop import make_loader

WORKER = Path(__file__).with_name("ddp_worker.py")


@pytest.mark.parametrize("n,world", [(10, 2), (11, 2), (101, 4), (5, 8)])
def test_sampler_slices_are_disjoint_equal_and_cover_every_edge_once(n, world):
    slices = []
    for rank in range(world):
        s = EdgeEpochSampler(n, rank, world, seed=1)
        s.set_epoch(3)
        slices.append(list(s))
    assert len({len(x) for x in slices}) == 1  # equal sizes: no rank waits on the others
    flat = [i for x in slices for i in x]
    assert sorted(i for i in flat if i < n) == list(range(n))  # every real edge exactly once
    assert all(i < n + world - 1 for i in flat)  # pads index the appended zero-weight copies


def test_sampler_reshuffles_per_epoch_and_is_seeded():
    a = EdgeEpochSampler(100, seed=0)
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first
    b = EdgeEpochSampler(100, seed=0)
    assert list(b) == first
    b.set_epoch(0, skip=30)
    assert list(b) == first[30:]


def test_union_of_rank_batches_is_the_single_process_batch():
    world, b = 2, 4
    ranks = [list(EdgeEpochSampler(16, r, world, seed=5)) for r in range(world)]
    single = list(EdgeEpochSampler(16, 0, 1, seed=5))
    for step in range(16 // (world * b)):
        union = sorted(i for r in ranks for i in r[step * b:(step + 1) * b])
        assert union == sorted(single[step * world * b:(step + 1) * world * b])


def test_real_loader_rank_slices_see_every_training_edge_once(tiny_shards):
    g = RatingGraph.from_shards(tiny_shards)
    split = split_edges(g, SplitConfig(val_ratio=0.1, test_ratio=0.11))  # 395 training edges: odd
    cfg = TrainConfig(num_neighbors=[2, 2], progress=False)
    label = torch.stack([g.rating[split.train], torch.ones(split.train.numel())], 1)
    seen, real = [], 0
    for rank in range(2):
        loader, sampler = make_loader(g.hetero_data(split.train), g.src[split.train], g.dst[split.train], label,
                                      cfg, 16, DistEnv(rank, rank, 2), shuffle=True, device=torch.device("cpu"))
        sampler.set_epoch(2)
        for batch in loader:
            weight = batch[RATES].edge_label[:, 1]
            seen += batch[RATES].input_id[weight > 0].tolist()
            real += int((weight > 0).sum())
    assert sorted(seen) == list(range(split.train.numel())) and real == 395


def _torchrun(tmp_path, shards, cfg: dict, nproc: int, options: dict | None = None) -> Path:
    prefix = tmp_path / f"out-{nproc}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(WORKER), str(shards.directory), str(tmp_path / f"run-{nproc}"), str(prefix), json.dumps(cfg),
           json.dumps(options or {})]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return prefix


def test_torchrun_two_ranks_match_single_process_on_same_global_batches(tiny_shards, tmp_path):
    # All neighbours (-1): sampling is deterministic, so DDP with per-rank batch b and one
    # process with batch 2b see identical subgraphs and must reach the same parameters.
    # 399 training edges: rank 1 gets a zero-weight pad, which must change nothing (the
    # rating loss, the softmax rows and its columns all ignore it). Supervision "none":
    # with exclude_targets each rank drops only its own targets from its subgraph, a
    # legitimately different subgraph from the single process's.
    common = dict(epochs=1, num_neighbors=[-1, -1], seed=7, progress=False, device="cpu", lr=0.01,
                  weight_decay=0.0, supervision="none")
    options = {"train_edges": 399, "model": {"hidden": 16, "dropout": 0.0}}
    assert EdgeEpochSampler.num_pad(399, 2) == 1
    ddp = _torchrun(tmp_path, tiny_shards, {**common, "batch_size": 20}, nproc=2, options=options)
    single = _torchrun(tmp_path, tiny_shards, {**common, "batch_size": 40}, nproc=1, options=options)
    r0 = torch.load(f"{ddp}-rank0.pt")
    r1 = torch.load(f"{ddp}-rank1.pt")
    one = torch.load(f"{single}-rank0.pt")
    meta = json.loads(Path(f"{ddp}-rank0.json").read_text())
    assert meta["world"] == 2 and meta["steps"] == 10  # (399 + 1 pad) training edges / (2 × 20)
    for name in r0:
        assert torch.equal(r0[name], r1[name]), f"{name} differs between ranks"
        torch.testing.assert_close(r0[name], one[name], rtol=1e-4, atol=1e-5, msg=f"{name} differs from 1 process")
    start = torch.load(f"{tmp_path}/run-2/best.pt", weights_only=False)  # only rank 0 wrote the run dir
    assert start["config"]["train"]["batch_size"] == 20


@pytest.mark.parametrize("stop_at", [5, 17])
def test_resume_mid_epoch_matches_uninterrupted_run(tiny_shards, tmp_path, stop_at):
    g = RatingGraph.from_shards(tiny_shards)
    split = split_edges(g, SplitConfig())
    model_cfg = ModelConfig(hidden=16, dropout=0.3)  # dropout: the RNG state must be restored too
    cfg = dict(epochs=3, batch_size=32, num_neighbors=[3, 2], progress=False, patience=10, seed=3)
    full = train(g, split, model_cfg, TrainConfig(**cfg), tmp_path / "full")
    first = train(g, split, model_cfg, TrainConfig(**cfg, max_steps=stop_at), tmp_path / "resumed")
    assert first.interrupted and first.global_step == stop_at
    resumed = train(g, split, model_cfg, TrainConfig(**cfg, resume=True), tmp_path / "resumed")
    assert resumed.global_step == full.global_step
    a = torch.load(tmp_path / "full" / "last.pt", weights_only=False)
    b = torch.load(tmp_path / "resumed" / "last.pt", weights_only=False)
    for name in a["model"]:
        torch.testing.assert_close(a["model"][name], b["model"][name], rtol=0, atol=1e-6)
    assert [h["val_rmse"] for h in a["history"]] == pytest.approx([h["val_rmse"] for h in b["history"]])


def test_resume_refuses_changed_config(tiny_shards, tmp_path):
    g = RatingGraph.from_shards(tiny_shards)
    split = split_edges(g, SplitConfig())
    cfg = dict(epochs=1, batch_size=64, progress=False)
    train(g, split, ModelConfig(hidden=16), TrainConfig(**cfg, max_steps=2), tmp_path)
    with pytest.raises(CheckpointError, match="model.hidden: checkpoint 16 vs now 8"):
        train(g, split, ModelConfig(hidden=8), TrainConfig(**cfg, resume=True), tmp_path)


@pytest.mark.slow
def test_bf16_reaches_fp32_validation_rmse_on_movielens(movielens_run_config, tmp_path):
    from scalable_rec.shards import GraphShards

    cfg = movielens_run_config
    g = RatingGraph.from_shards(GraphShards(cfg.data.shards_dir()), cfg.features)
    split = split_edges(g, SplitConfig())
    schedule = dict(epochs=4, progress=False, patience=10)
    fp32 = train(g, split, ModelConfig(), TrainConfig(**schedule), tmp_path / "fp32")
    bf16 = train(g, split, ModelConfig(), TrainConfig(**schedule, precision="bf16"), tmp_path / "bf16")
    assert abs(bf16.best_val_rmse - fp32.best_val_rmse) < 0.02, (fp32.best_val_rmse, bf16.best_val_rmse)


def test_epoch_sampler_does_not_hold_the_epoch_as_python_ints():
    """A list of 10M ids would take ~360 MB of Python objects in every rank."""
    import tracemalloc

    from scalable_rec.train.distributed import EdgeEpochSampler

    sampler = EdgeEpochSampler(10_000_000, rank=1, world_size=2, seed=3)
    tracemalloc.start()
    try:
        it = iter(sampler)
        first = [next(it) for _ in range(5)]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 20 * 2**20, f"iterating allocated {peak / 2**20:.0f} MiB of Python objects"
    g = torch.Generator().manual_seed(3 * 100_003)
    assert first == torch.randperm(10_000_000, generator=g)[1::2][:5].tolist()
