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
from rating_fixtures import vary_scale_scalars

from scalable_rec.graph import RatingGraph, SplitConfig, split_edges
from scalable_rec.train import ModelConfig, TrainConfig, train

pytestmark = pytest.mark.cuda


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_training_on_cuda(small_shards, tmp_path, precision):
    g = RatingGraph.from_shards(small_shards)
    split = split_edges(g, SplitConfig())
    result = train(
        g, split, ModelConfig(), TrainConfig(epochs=2, device="cuda", precision=precision, progress=False), tmp_path
    )
    assert math.isfinite(result.best_val_rmse) and result.best_val_rmse < 1.2
    assert next(result.model.parameters()).is_cuda


def test_fp16_aggregation_does_not_overflow(tmp_path):
    """A movie with 100k raters: a fp16 scatter-sum would pass 65504 and become inf."""
    from torch_geometric.data import HeteroData

    from scalable_rec.graph.hetero import MOVIE, RATES, REV_RATES, USER
    from scalable_rec.model.recommender import Recommender

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
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(worker),
        str(tiny_shards.directory),
        str(tmp_path / "run"),
        str(tmp_path / "out"),
        json.dumps(cfg),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = torch.load(tmp_path / "out-rank0.pt"), torch.load(tmp_path / "out-rank1.pt")
    assert all(torch.equal(r0[k], r1[k]) for k in r0)


def _cli(
    args: list[str], nproc: int | None = None, extra_env: dict | None = None, timeout: int = 600
) -> subprocess.CompletedProcess:
    """``python -m scalable_rec ARGS``, under ``torchrun --nproc_per_node=NPROC`` if given."""
    env = {**os.environ, **(extra_env or {})}
    env.pop("WORLD_SIZE", None)
    launch = (
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        if nproc
        else [sys.executable]
    )
    return subprocess.run(
        [*launch, "-m", "scalable_rec", *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def test_torchrun_nccl_run_on_gpu_then_score_on_cpu(small_shards, tmp_path):
    """train and score under torchrun (NCCL process group, bf16 autocast, store-backed
    layer-wise scoring on the GPU); the same best.pt scored on the CPU (`--score-device
    cpu`, in-memory encode) gives the same top-10s and scores."""
    import pyarrow.parquet as pq

    run = tmp_path / "run"
    proc = _cli(
        [
            "train",
            "--shards",
            str(small_shards.directory),
            "--run-dir",
            str(run),
            "--epochs",
            "2",
            "--device",
            "cuda",
            "--precision",
            "bf16",
            "--graph-backend",
            "store",
            "--no-progress",
        ],
        nproc=1,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    proc = _cli(["score", "--run-dir", str(run), "--graph-backend", "store"], nproc=1)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert not json.loads((run / "metrics.json").read_text())["interrupted"]
    gpu = pq.read_table(run / "recommendations.parquet").to_pylist()
    (run / "recommendations.parquet").rename(tmp_path / "gpu.parquet")
    proc = _cli(["score", "--run-dir", str(run), "--score-device", "cpu", "--graph-backend", "memory"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    cpu = pq.read_table(run / "recommendations.parquet").to_pylist()
    assert len(gpu) == len(cpu) > 0

    def by_user(rows):
        out: dict = {}
        for r in rows:
            out.setdefault(r["user_key"], {})[r["movie_key"]] = r["score"]
        return out

    g, c = by_user(gpu), by_user(cpu)
    assert g.keys() == c.keys()
    overlap = sum(len(g[u].keys() & c[u].keys()) / len(c[u]) for u in c) / len(c)
    assert overlap >= 0.95, overlap
    diffs = [abs(g[u][m] - c[u][m]) / (1 + abs(c[u][m])) for u in c for m in g[u].keys() & c[u].keys()]
    assert max(diffs) < 1e-3, max(diffs)


def test_sigterm_under_nccl_stops_cleanly_and_resumes(tiny_shards, tmp_path):
    """SIGTERM at step 5 under torchrun on NCCL (the stop agreement all-reduces a CUDA
    tensor): the rank writes last.pt at step 5 and exits 143; --resume finishes the run."""
    from scalable_rec.dist import FAULT_ENV

    run = tmp_path / "run"
    args = [
        "train",
        "--shards",
        str(tiny_shards.directory),
        "--run-dir",
        str(run),
        "--epochs",
        "2",
        "--batch-size",
        "20",
        "--device",
        "cuda",
        "--precision",
        "fp16",
        "--no-progress",
    ]
    proc = _cli(args, nproc=1, extra_env={FAULT_ENV: "0:5:TERM"}, timeout=300)
    assert proc.returncode != 0 and "SIGTERM" in proc.stderr, (proc.returncode, proc.stderr[-3000:])
    state = torch.load(run / "last.pt", weights_only=False, map_location="cpu")
    assert state["global_step"] == 5
    proc = _cli([*args, "--resume"], nproc=1, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert not metrics["interrupted"] and math.isfinite(metrics["best_val_rmse"])


def test_fp16_training_step_with_sum_aggregation_is_finite():
    """fp16 autocast + GradScaler on CUDA, a movie with 100k raters (aggr=sum): finite
    predictions, loss and gradients after unscaling (tests/test_model.py does this on CPU)."""
    import pyarrow as pa

    from scalable_rec.graph import MOVIE, RATES, USER
    from scalable_rec.model.recommender import Recommender

    n = 100_000
    g = RatingGraph(
        user_keys=pa.array(range(n)),
        movie_keys=pa.array([0, 1]),
        movie_x=torch.ones(2, 4),
        src=torch.cat([torch.arange(n), torch.tensor([0])]),
        dst=torch.cat([torch.zeros(n, dtype=torch.long), torch.tensor([1])]),
        rating=torch.full((n + 1,), 4.0),
        timestamp=torch.zeros(n + 1, dtype=torch.long),
    )
    torch.manual_seed(0)
    model = Recommender(n, 2, 4, ModelConfig(hidden=8, aggr="sum", dropout=0.0), rating_mean=3.5).cuda()
    with torch.no_grad():
        model.encoder.user_emb.weight.fill_(1.0)
    data = g.hetero_data()
    data[USER].n_id, data[MOVIE].n_id = torch.arange(n), torch.arange(2)
    data[RATES].edge_label_index = torch.tensor([[0, 1, 2, 0], [0, 0, 0, 1]])
    data = data.to("cuda")
    opt = torch.optim.SGD(model.parameters(), lr=1e-9)
    scaler = torch.amp.GradScaler("cuda")
    with torch.autocast("cuda", dtype=torch.float16):
        pred, (ru, rm, *_) = model(data)
    loss = (pred.float() - 4.0).pow(2).mean() + (ru.float() @ rm.float().T).logsumexp(1).mean()
    assert torch.isfinite(pred).all() and torch.isfinite(loss)
    scaler.scale(loss).backward()
    scaler.unscale_(opt)
    bad = [name for name, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    assert not bad, f"non-finite gradients under fp16 autocast: {bad}"
    scaler.step(opt)
    scaler.update()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_forced_one_rank_nccl_ddp_with_fp16_and_sparse_tables(tiny_shards, tmp_path):
    """``SCALABLE_REC_FORCE_DDP=1`` in one process on one GPU: an NCCL group, DDP, the
    all-gathers and all-reduces (the row-wise tables' sparse all-reduce included) and the
    object collectives, with fp16's scaler over sparse tables on CUDA."""
    from scalable_rec.dist import FORCE_DDP_ENV

    run = tmp_path / "run"
    proc = _cli(
        [
            "train",
            "--shards",
            str(tiny_shards.directory),
            "--run-dir",
            str(run),
            "--epochs",
            "1",
            "--batch-size",
            "50",
            "--device",
            "cuda",
            "--precision",
            "fp16",
            "--table-optimizer",
            "rowwise_adagrad",
            "--no-progress",
        ],
        extra_env={FORCE_DDP_ENV: "1"},
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[rank 0]" in proc.stderr  # the DDP path's log format: the process group was created
    metrics = json.loads((run / "metrics.json").read_text())
    assert math.isfinite(metrics["best_val_rmse"]) and metrics["history"][-1]["train_rmse"] < 2


def test_forked_rank_on_cuda_trains_or_is_refused_with_one_line(tiny_shards, tmp_path):
    """The ``--nproc-per-node`` launcher's fork path with one rank on one GPU."""
    run = tmp_path / "run"
    code = "import sys; from scalable_rec.train.launch import launch; sys.exit(launch(sys.argv[1:], 1))"
    env = {**os.environ}
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            "train",
            "--shards",
            str(tiny_shards.directory),
            "--run-dir",
            str(run),
            "--epochs",
            "1",
            "--device",
            "cuda",
            "--no-progress",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if proc.returncode == 2:  # refused: one line naming torchrun, no traceback
        assert "torchrun" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    else:
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert math.isfinite(json.loads((run / "metrics.json").read_text())["best_val_rmse"])


def test_two_rank_cpu_checkpoint_resumes_on_one_gpu(tiny_shards, tmp_path):
    """A checkpoint of two (gloo, CPU) ranks resumed by one process on the GPU: fewer
    devices than the checkpoint's ranks, state mapped onto the GPU."""
    run = tmp_path / "run"
    args = [
        "train",
        "--shards",
        str(tiny_shards.directory),
        "--run-dir",
        str(run),
        "--epochs",
        "1",
        "--batch-size",
        "20",
        "--no-progress",
    ]
    proc = _cli([*args, "--device", "cpu", "--max-steps", "4"], nproc=2, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert torch.load(run / "last.pt", weights_only=False, map_location="cpu")["world_size"] == 2
    proc = _cli([*args, "--device", "cuda", "--resume"], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = torch.load(run / "last.pt", weights_only=False, map_location="cpu")
    assert state["world_size"] == 1 and state["global_step"] > 4


def test_aggr_max_on_cuda_trains_or_is_refused_before_any_work(tiny_shards, tmp_path):
    """With CPU-only torch-scatter (the carried wheels) ``--aggr max`` on CUDA is refused
    with one line; with CUDA kernels it trains."""
    from scalable_rec.model.recommender import torch_scatter_runs_on, torch_sparse_runs_on

    run = tmp_path / "run"
    proc = _cli(
        [
            "train",
            "--shards",
            str(tiny_shards.directory),
            "--run-dir",
            str(run),
            "--epochs",
            "1",
            "--device",
            "cuda",
            "--aggr",
            "max",
            "--no-progress",
        ],
        timeout=300,
    )
    device = torch.device("cuda")
    if not torch_sparse_runs_on(device) and torch_scatter_runs_on(device) is False:
        assert proc.returncode == 2 and "'aggr' max on CUDA" in proc.stderr and "Traceback" not in proc.stderr
        assert not run.exists()
    else:
        assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize("mode", ["gcmc", "scale"])
@pytest.mark.parametrize("kind", ["torch_sparse", "csr", "edge_index"])
def test_total_degree_encoding_on_cuda_equals_the_cpu(tiny_shards, kind, mode):
    """GC-MC's degree (also ``scale``'s) is read from the adjacency on the device (no
    bincount, no host sync) for every adjacency kind a CUDA step or full-graph encode may use;
    under fp16 autocast the scaled sums stay finite and close to the CPU's fp32 encoding."""
    from scalable_rec.model.recommender import Recommender, torch_sparse_runs_on

    if kind == "torch_sparse" and not torch_sparse_runs_on(torch.device("cuda")):
        pytest.skip("torch-sparse has no CUDA kernels here")
    g = RatingGraph.from_shards(tiny_shards)
    torch.manual_seed(0)
    model = Recommender(g.num_users, g.num_movies, g.movie_x.size(1), ModelConfig(hidden=16, rating_messages=mode))
    vary_scale_scalars(model.eval())
    data = g.hetero_data()
    n_id = {"user": torch.arange(g.num_users), "movie": torch.arange(g.num_movies)}
    with torch.no_grad():
        ref = model.encoder(n_id, g.movie_x, model._adjacency(data, torch.device("cpu"), kind))
        cuda = torch.device("cuda")
        model.cuda()
        n_id = {k: v.cuda() for k, v in n_id.items()}
        got = model.encoder(n_id, g.movie_x.cuda(), model._adjacency(data, cuda, kind))
        with torch.autocast("cuda", dtype=torch.float16):
            half = model.encoder(n_id, g.movie_x.cuda(), model._adjacency(data, cuda, kind))
    for key in ref:
        torch.testing.assert_close(got[key].cpu(), ref[key], atol=1e-4, rtol=1e-4)
        assert torch.isfinite(half[key]).all()
        torch.testing.assert_close(half[key].float().cpu(), ref[key], atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("mode", ["embed", "center"])
@pytest.mark.parametrize("kind", ["torch_sparse", "csr", "edge_index"])
def test_embed_encoding_on_cuda_equals_the_cpu(tiny_shards, kind, mode):
    """``embed``'s bucket fractions and ``center``'s deviation adjacency are built on the
    device (``index_add_``, no host sync) for every adjacency kind; under fp16 autocast the
    rating term stays finite and close to the CPU's fp32 encoding."""
    from scalable_rec.model.recommender import Recommender, torch_sparse_runs_on

    if kind == "torch_sparse" and not torch_sparse_runs_on(torch.device("cuda")):
        pytest.skip("torch-sparse has no CUDA kernels here")
    g = RatingGraph.from_shards(tiny_shards)
    torch.manual_seed(0)
    model = Recommender(g.num_users, g.num_movies, g.movie_x.size(1), ModelConfig(hidden=16, rating_messages=mode))
    model.eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("bucket_emb", "lin_c.weight")):
                p.normal_()
    data = g.hetero_data()
    n_id = {"user": torch.arange(g.num_users), "movie": torch.arange(g.num_movies)}
    with torch.no_grad():
        cpu = torch.device("cpu")
        ref = model.encoder(n_id, g.movie_x, model._adjacency(data, cpu, kind), model._rating_inputs(data, cpu))
        cuda = torch.device("cuda")
        model.cuda()
        n_id = {k: v.cuda() for k, v in n_id.items()}
        frac = model._rating_inputs(data, cuda)
        # a tensor, or torch-sparse's SparseTensor (whose device is a method)
        assert all((f.device() if callable(f.device) else f.device).type == "cuda" for f in frac.values())
        got = model.encoder(n_id, g.movie_x.cuda(), model._adjacency(data, cuda, kind), frac)
        with torch.autocast("cuda", dtype=torch.float16):
            half = model.encoder(n_id, g.movie_x.cuda(), model._adjacency(data, cuda, kind), frac)
    for key in ref:
        torch.testing.assert_close(got[key].cpu(), ref[key], atol=1e-4, rtol=1e-4)
        assert torch.isfinite(half[key]).all()
        torch.testing.assert_close(half[key].float().cpu(), ref[key], atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("mode,learned", [("embed", "bucket_emb"), ("center", "lin_c.weight")])
def test_embed_trains_on_cuda_in_fp16(small_shards, tmp_path, mode, learned):
    g = RatingGraph.from_shards(small_shards)
    split = split_edges(g, SplitConfig())
    result = train(
        g,
        split,
        ModelConfig(rating_messages=mode),
        TrainConfig(epochs=2, device="cuda", precision="fp16", progress=False),
        tmp_path,
    )
    assert math.isfinite(result.best_val_rmse) and result.best_val_rmse < 1.2
    assert any(bool(p.abs().sum() > 0) for name, p in result.model.named_parameters() if name.endswith(learned))
