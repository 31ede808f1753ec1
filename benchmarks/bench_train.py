"""Training throughput: labelled edges/s per precision, 1 and 2 CPU processes, CUDA.

    scripts/bench.sh -k train

Each case trains ``STEPS`` optimiser steps through ``scalable_rec.train.train`` (the real
loop, loader included) and reports labelled edges/s and the loader's share of step time
from the run's own epoch record.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from scalable_rec.graph import RatingGraph, SplitConfig, split_edges
from scalable_rec.train import ModelConfig, TrainConfig, train

STEPS = int(os.environ.get("SCALABLE_REC_BENCH_TRAIN_STEPS", 60))
WORKER = Path(__file__).resolve().parents[1] / "tests" / "ddp_worker.py"


@pytest.fixture(scope="module")
def graph(synthetic_shards):
    g = RatingGraph.from_shards(synthetic_shards)
    return g, split_edges(g, SplitConfig())


def _train_once(g, split, tmp_path, **kw):
    # One epoch capped at STEPS steps over the full training graph; validation on a slice.
    cfg = TrainConfig(epochs=1, steps_per_epoch=STEPS, progress=False, **kw)
    return train(
        g, type(split)(train=split.train, val=split.val[:20_000], test=split.test), ModelConfig(), cfg, tmp_path
    )


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_train_cpu_single_process(benchmark, graph, tmp_path, precision, threads):
    g, split = graph
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        result = benchmark.pedantic(
            _train_once, args=(g, split, tmp_path), kwargs={"precision": precision, "device": "cpu"}, rounds=1
        )
    finally:
        torch.set_num_threads(before)
    rec = result.history[-1]
    benchmark.extra_info.update(
        precision=precision,
        processes=1,
        threads=threads,
        steps=rec["steps"],
        labelled_edges_per_s=rec["edges_per_s"],
        loader_share=rec["loader_share"],
    )


@pytest.mark.parametrize("stop_check_every", [1, 1_000_000_000])
def test_train_cpu_two_processes(benchmark, synthetic_shards, tmp_path, stop_check_every):
    """torchrun, 2 gloo ranks with one intra-op thread each, the same edges as 1 process;
    with the stop agreement every step (the default) and, for its cost, never."""
    cfg = {
        "epochs": 1,
        "steps_per_epoch": STEPS // 2,
        "progress": False,
        "device": "cpu",
        "stop_check_every": stop_check_every,
    }
    options = {"val_edges": 20_000, "model": {}}  # default ModelConfig

    def run():
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        env.pop("WORLD_SIZE", None)
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(WORKER),
            str(synthetic_shards.directory),
            str(tmp_path / "run"),
            str(tmp_path / "out"),
            json.dumps(cfg),
            json.dumps(options),
        ]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
        assert proc.returncode == 0, proc.stderr[-3000:]

    benchmark.pedantic(run, rounds=1)
    rec = json.loads((tmp_path / "out-rank0.json").read_text())["history"][-1]
    benchmark.extra_info.update(
        processes=2,
        threads_per_process=1,
        stop_check_every=stop_check_every,
        steps_per_rank=rec["steps"],
        labelled_edges_per_s=rec["edges_per_s"],
        loader_share=rec["loader_share"],
    )


def test_stop_agreement_latency_two_gloo_ranks(benchmark, tmp_path):
    """One ``agree_stop`` (an all-reduce of one number) on 2 gloo ranks, in microseconds:
    the per-step price of stopping all ranks together on a signal."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    out = tmp_path / "agree.json"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(Path(__file__).with_name("stop_agreement_worker.py")),
        str(out),
        "2000",
    ]
    benchmark.pedantic(lambda: subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=300), rounds=1)
    benchmark.extra_info.update(json.loads(out.read_text()), threads_per_process=1)


@pytest.mark.cuda
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_train_cuda(benchmark, graph, tmp_path, precision):
    g, split = graph
    result = benchmark.pedantic(
        _train_once, args=(g, split, tmp_path), kwargs={"precision": precision, "device": "cuda"}, rounds=1
    )
    rec = result.history[-1]
    benchmark.extra_info.update(
        precision=precision,
        device=torch.cuda.get_device_name(),
        labelled_edges_per_s=rec["edges_per_s"],
        loader_share=rec["loader_share"],
    )
