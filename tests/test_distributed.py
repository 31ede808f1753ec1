"""DDP under torchrun (gloo, 2 CPU processes), per-rank edge slices and exact resume."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from process_group import finish_group

from scalable_rec.dist import FAULT_ENV, DistEnv, EdgeEpochSampler
from scalable_rec.errors import CheckpointError
from scalable_rec.graph import RATES, RatingGraph, SplitConfig, split_edges
from scalable_rec.train import ModelConfig, TrainConfig, train
from scalable_rec.train.batches import SupervisionEdges, make_loader

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
    b.set_epoch(0, position=30)
    assert list(b) == first[30:]


def test_union_of_rank_batches_is_the_single_process_batch():
    world, b = 2, 4
    ranks = [list(EdgeEpochSampler(16, r, world, seed=5)) for r in range(world)]
    single = list(EdgeEpochSampler(16, 0, 1, seed=5))
    for step in range(16 // (world * b)):
        union = sorted(i for r in ranks for i in r[step * b : (step + 1) * b])
        assert union == sorted(single[step * world * b : (step + 1) * world * b])


def test_real_loader_rank_slices_see_every_training_edge_once(tiny_shards):
    g = RatingGraph.from_shards(tiny_shards)
    split = split_edges(g, SplitConfig(val_ratio=0.1, test_ratio=0.11))  # 395 training edges: odd
    cfg = TrainConfig(num_neighbors=[2, 2], progress=False)
    edges = SupervisionEdges(g.src, g.dst, g.rating, split.train)
    seen, real = [], 0
    for rank in range(2):
        loader, sampler = make_loader(
            g.hetero_data(split.train), edges, cfg, 16, DistEnv(rank, rank, 2), shuffle=True, device=torch.device("cpu")
        )
        sampler.set_epoch(2)
        for batch in loader:
            weight = batch[RATES].edge_label[:, 1]
            seen += batch[RATES].input_id[weight > 0].tolist()
            real += int((weight > 0).sum())
    assert sorted(seen) == list(range(split.train.numel())) and real == 395


def _run_group(cmd: list[str], env: dict, timeout: int) -> subprocess.CompletedProcess:
    """Runs torchrun in its own process group; a deadlock fails the test after ``timeout``
    seconds and its workers are killed with it (none is left behind)."""
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    out, err = finish_group(proc, timeout)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _torchrun(
    tmp_path,
    shards,
    cfg: dict,
    nproc: int,
    name: str | None = None,
    extra_env: dict | None = None,
    torchrun_args: tuple = (),
    expect_ok: bool = True,
    timeout: int = 300,
    options: dict | None = None,
):
    """Runs tests/ddp_worker.py under torchrun; returns (output prefix, completed process)."""
    name = name or str(nproc)
    prefix = tmp_path / f"out-{name}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(extra_env or {})}
    env.pop("WORLD_SIZE", None)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        *torchrun_args,
        str(WORKER),
        str(shards.directory),
        str(tmp_path / f"run-{name}"),
        str(prefix),
        json.dumps(cfg),
    ] + ([json.dumps(options)] if options else [])
    proc = _run_group(cmd, env, timeout)
    if expect_ok:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return prefix, proc


# Two epochs of 10 steps on 2 ranks (400 training edges / (2 × 20)); all neighbours make
# sampling deterministic. The uninterrupted run is the reference the fault tests resume to.
# Supervision "none": with exclude_targets each rank drops only its own batch's targets from
# its subgraph, a legitimately different subgraph from the single process's.
EXACT = dict(
    epochs=2,
    num_neighbors=[-1, -1],
    seed=7,
    progress=False,
    device="cpu",
    lr=0.01,
    weight_decay=0.0,
    patience=10,
    supervision="none",
)


@pytest.fixture(scope="module")
def reference_two_ranks(tiny_shards, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp-ref")
    prefix, _ = _torchrun(tmp, tiny_shards, {**EXACT, "batch_size": 20}, nproc=2)
    return tmp, prefix


def _last_model(run_dir) -> dict:
    return torch.load(Path(run_dir) / "last.pt", weights_only=False)["model"]


def _assert_same_params(a: dict, b: dict, atol: float = 1e-6) -> None:
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=atol, msg=f"{name} differs")


def test_torchrun_two_ranks_match_single_process_on_same_global_batches(tiny_shards, tmp_path, reference_two_ranks):
    # DDP with per-rank batch b and one process with batch 2b see identical subgraphs and
    # must reach the same parameters.
    ref_dir, ddp = reference_two_ranks
    single, _ = _torchrun(tmp_path, tiny_shards, {**EXACT, "batch_size": 40}, nproc=1)
    r0 = torch.load(f"{ddp}-rank0.pt")
    r1 = torch.load(f"{ddp}-rank1.pt")
    meta = json.loads(Path(f"{ddp}-rank0.json").read_text())
    assert meta["world"] == 2 and meta["steps"] == 20  # 2 epochs × 400 training edges / (2 × 20)
    for name in r0:
        assert torch.equal(r0[name], r1[name]), f"{name} differs between ranks"
    one, two = _last_model(tmp_path / "run-1"), _last_model(ref_dir / "run-2")
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-5, msg=f"{name} differs from 1 process")
    start = torch.load(ref_dir / "run-2" / "best.pt", weights_only=False)  # only rank 0 wrote the run dir
    assert start["config"]["train"]["batch_size"] == 20
    assert torch.load(ref_dir / "run-2" / "last.pt", weights_only=False)["world_size"] == 2


def test_torchrun_two_ranks_with_the_ranking_bias_stay_near_one_process(tiny_shards, tmp_path):
    # The exactness tests run without the movie ranking bias; with it (the default) two
    # ranks and one process on the same global batches drift apart through float-level
    # differences (2.8e-3 at most after these 20 steps), far below what a DDP-only error in
    # the bias path gives (the bias halved under DDP only: 0.097).
    model = {"hidden": 16, "dropout": 0.0, "user_id_dropout": 0.0, "movie_id_dropout": 0.0, "retrieval_bias": True}
    two, _ = _torchrun(tmp_path, tiny_shards, {**EXACT, "batch_size": 20}, nproc=2, name="b2", options={"model": model})
    one, _ = _torchrun(tmp_path, tiny_shards, {**EXACT, "batch_size": 40}, nproc=1, name="b1", options={"model": model})
    a, b = _last_model(tmp_path / "run-b2"), _last_model(tmp_path / "run-b1")
    assert "retrieval.movie_bias.weight" in a
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a if a[k].numel())
    assert worst < 1e-2, worst


def test_torchrun_rowwise_tables_sparse_gradients_match_single_process(tiny_shards, tmp_path):
    # Sparse table gradients all-reduced beside DDP's reducer and row-wise Adagrad, with the
    # tables one node-shared copy stepped by local rank 0 (the default on CPU): both ranks
    # end equal, equal to one process on the same global batches, and bit-equal to two
    # ranks that each keep and step their own copy.
    cfg = {**EXACT, "epochs": 1, "table_optimizer": "rowwise_adagrad", "table_lr": 0.05}
    ddp, _ = _torchrun(tmp_path, tiny_shards, {**cfg, "batch_size": 20}, nproc=2, name="rw-2")
    own, _ = _torchrun(
        tmp_path, tiny_shards, {**cfg, "batch_size": 20, "node_shared_tables": False}, nproc=2, name="rw-2-own"
    )
    single, _ = _torchrun(tmp_path, tiny_shards, {**cfg, "batch_size": 40}, nproc=1, name="rw-1")
    r0, r1, one = torch.load(f"{ddp}-rank0.pt"), torch.load(f"{ddp}-rank1.pt"), torch.load(f"{single}-rank0.pt")
    own0 = torch.load(f"{own}-rank0.pt")
    assert set(torch.load(tmp_path / "run-rw-2" / "last.pt", weights_only=False)["optimizer"]) == {"dense", "tables"}
    for name in r0:
        assert torch.equal(r0[name], r1[name]), f"{name} differs between ranks"
        assert torch.equal(r0[name], own0[name]), f"{name} differs from ranks with their own tables"
        torch.testing.assert_close(r0[name], one[name], rtol=1e-4, atol=1e-5, msg=f"{name} differs from 1 process")
    # Both ranks map the same six table files (user, movie, two biases, two ranking tables);
    # with node_shared_tables off neither maps any.
    shared = [json.loads(Path(f"{ddp}-rank{r}.json").read_text())["table_inodes"] for r in (0, 1)]
    assert len(shared[0]) == 6 and shared[0] == shared[1], shared
    assert json.loads(Path(f"{own}-rank0.json").read_text())["table_inodes"] == []


def test_two_nodes_on_one_host_each_step_their_own_shared_tables(tiny_shards, tmp_path):
    # Two torchrun agents (--nnodes 2, 2 ranks each) on this host: each "node" maps and
    # steps its own copy (the node rank is in the file name), and four ranks of batch 10
    # end where one process with batch 40 does.
    import socket

    cfg = {**EXACT, "epochs": 1, "table_optimizer": "rowwise_adagrad", "table_lr": 0.05}
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    prefix = tmp_path / "out-nodes"
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes=2",
                "--nproc_per_node=2",
                f"--node_rank={node}",
                "--master_addr=127.0.0.1",
                f"--master_port={port}",
                str(WORKER),
                str(tiny_shards.directory),
                str(tmp_path / "run-nodes"),
                str(prefix),
                json.dumps({**cfg, "batch_size": 10}),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        for node in (0, 1)
    ]
    for proc in procs:
        out, err = finish_group(proc, 300)
        assert proc.returncode == 0, out[-2000:] + err[-2000:]
    single, _ = _torchrun(tmp_path, tiny_shards, {**cfg, "batch_size": 40}, nproc=1, name="nodes-1")
    one = torch.load(f"{single}-rank0.pt")
    inodes = [json.loads(Path(f"{prefix}-rank{r}.json").read_text())["table_inodes"] for r in range(4)]
    assert inodes[0] == inodes[1] and inodes[2] == inodes[3] and not set(inodes[0]) & set(inodes[2]), inodes
    for r in range(4):
        params = torch.load(f"{prefix}-rank{r}.pt")
        for name in one:
            torch.testing.assert_close(params[name], one[name], rtol=1e-4, atol=1e-5, msg=f"rank {r}: {name}")


def test_torchrun_pad_path_matches_single_process(tiny_shards, tmp_path):
    # 399 training edges: rank 1 gets a zero-weight pad, which must change nothing (the
    # rating loss, the softmax rows and its columns all ignore it).
    common = dict(
        epochs=1,
        num_neighbors=[-1, -1],
        seed=7,
        progress=False,
        device="cpu",
        lr=0.01,
        weight_decay=0.0,
        supervision="none",
    )
    options = {
        "train_edges": 399,
        "model": {"hidden": 16, "dropout": 0.0, "user_id_dropout": 0.0, "movie_id_dropout": 0.0},
    }
    assert EdgeEpochSampler.num_pad(399, 2) == 1
    ddp, _ = _torchrun(tmp_path, tiny_shards, {**common, "batch_size": 20}, nproc=2, name="pad-2", options=options)
    single, _ = _torchrun(tmp_path, tiny_shards, {**common, "batch_size": 40}, nproc=1, name="pad-1", options=options)
    r0, r1 = torch.load(f"{ddp}-rank0.pt"), torch.load(f"{ddp}-rank1.pt")
    one = torch.load(f"{single}-rank0.pt")
    meta = json.loads(Path(f"{ddp}-rank0.json").read_text())
    assert meta["world"] == 2 and meta["steps"] == 10  # (399 + 1 pad) training edges / (2 × 20)
    for name in r0:
        assert torch.equal(r0[name], r1[name]), f"{name} differs between ranks"
        torch.testing.assert_close(r0[name], one[name], rtol=1e-4, atol=1e-5, msg=f"{name} differs from 1 process")


def test_sigterm_to_one_rank_stops_both_at_the_same_step_and_resumes_exactly(
    tiny_shards, tmp_path, reference_two_ranks
):
    """SIGTERM reaches rank 1 only (after its step 13); before the stop agreement rank 1
    went to the checkpoint alone while rank 0 trained on: a deadlock torchrun had to kill."""
    ref_dir, _ = reference_two_ranks
    cfg = {**EXACT, "batch_size": 20}
    t0 = time.monotonic()
    prefix, _ = _torchrun(
        tmp_path, tiny_shards, cfg, nproc=2, name="term", timeout=120, extra_env={FAULT_ENV: "1:13:TERM"}
    )
    assert time.monotonic() - t0 < 120
    for rank in (0, 1):
        assert json.loads(Path(f"{prefix}-rank{rank}.json").read_text())["steps"] == 13
    state = torch.load(tmp_path / "run-term" / "last.pt", weights_only=False)
    assert (state["epoch"], state["step_in_epoch"], state["global_step"], state["world_size"]) == (1, 3, 13, 2)
    shutil.copytree(tmp_path / "run-term", tmp_path / "run-term-copy")  # for the world-size test below
    _torchrun(tmp_path, tiny_shards, {**cfg, "resume": True}, nproc=2, name="term", timeout=120)
    _assert_same_params(_last_model(ref_dir / "run-2"), _last_model(tmp_path / "run-term"))


def test_torchrun_restart_after_sigkill_resumes_from_last_checkpoint_by_itself(
    tiny_shards, tmp_path, reference_two_ranks
):
    """Rank 1 SIGKILLs itself after step 13 (first attempt only); torchrun restarts the
    group, which resumes from the step-12 last.pt without --resume and ends where an
    uninterrupted run ends."""
    ref_dir, _ = reference_two_ranks
    cfg = {**EXACT, "batch_size": 20, "checkpoint_every": 4}
    prefix, proc = _torchrun(
        tmp_path,
        tiny_shards,
        cfg,
        nproc=2,
        name="kill",
        timeout=240,
        torchrun_args=("--max-restarts=1",),
        extra_env={FAULT_ENV: "1:13:KILL"},
    )
    assert "torchrun restart 1: resuming from" in proc.stderr
    assert json.loads(Path(f"{prefix}-rank0.json").read_text())["steps"] == 20
    _assert_same_params(_last_model(ref_dir / "run-2"), _last_model(tmp_path / "run-kill"))


def test_torch_sampler_under_two_ranks_samples_each_ranks_slice_with_its_own_seed_and_resumes(tiny_shards, tmp_path):
    """``--sampler torch`` under a two-rank gloo job: each rank's batches are its own slice
    (disjoint, together the epoch), its draws are seeded by seed + rank (the two ranks'
    samplers draw differently from the same input edges, each the same on a rerun), the
    ranks end with the same parameters, and a resume repeats the uninterrupted batches."""
    cfg = {
        **EXACT,
        "epochs": 1,
        "batch_size": 20,
        "sampler": "torch",
        "num_neighbors": [3, 2],
        "supervision": "exclude_targets",
    }
    record = {"record_batches": True}
    runs = {}

    def run(name: str, run_name: str, **changes) -> Path:
        prefix, _ = _torchrun(tmp_path, tiny_shards, {**cfg, **changes}, nproc=2, name=run_name, options=record)
        runs[name] = [json.loads(Path(f"{prefix}-rank{r}.json").read_text()) for r in (0, 1)]
        return prefix

    full = run("full", "ts-full")
    run("part", "ts-part", max_steps=4)
    run("rest", "ts-part", resume=True)  # the same run directory: resumes after step 4
    # Under DDP a loader's first iteration is the unused-parameter probe's single batch.
    batches = {name: [ranks[r]["iterations"][1] for r in (0, 1)] for name, ranks in runs.items()}
    n = 400  # supervision edges: the tiny graph's training edges
    ids = [[i for b in batches["full"][r] for i in b["input_id"]] for r in (0, 1)]
    assert len(batches["full"][0]) == len(batches["full"][1]) == 10 and runs["full"][0]["steps"] == 10
    assert not set(ids[0]) & set(ids[1])  # each rank its own slice
    assert sorted(ids[0] + ids[1]) == list(range(n))  # together the epoch, each edge once
    probes = [runs["full"][r]["probe"] for r in (0, 1)]
    assert probes[0] != probes[1]  # the same 16 input edges, drawn with seed + rank
    assert [runs[name][r]["probe"] for name in ("part", "rest") for r in (0, 1)] == probes * 2  # reruns repeat
    for r in (0, 1):
        resumed = batches["part"][r] + batches["rest"][r]
        assert len(batches["part"][r]) == 4 and resumed == batches["full"][r], f"rank {r}"
    r0, r1 = torch.load(f"{full}-rank0.pt"), torch.load(f"{full}-rank1.pt")
    for name in r0:
        assert torch.equal(r0[name], r1[name]), f"{name} differs between ranks"
    _assert_same_params(_last_model(tmp_path / "run-ts-full"), _last_model(tmp_path / "run-ts-part"))


def test_hung_rank_fails_with_a_clear_error_after_the_collective_timeout(tiny_shards, tmp_path):
    cfg = {**EXACT, "epochs": 1, "batch_size": 20, "collective_timeout_s": 5}
    t0 = time.monotonic()
    _, proc = _torchrun(
        tmp_path,
        tiny_shards,
        cfg,
        nproc=2,
        name="hang",
        timeout=180,
        expect_ok=False,
        extra_env={FAULT_ENV: "1:3:HANG"},
    )
    assert proc.returncode != 0
    assert "did not complete within 'collective_timeout_s' (5s)" in proc.stderr, proc.stderr[-3000:]
    assert time.monotonic() - t0 < 180


def test_rank_loss_weight_zero_trains_under_ddp(tiny_shards, tmp_path):
    """The unused-parameter probe runs the real loss: with the retrieval head out of the
    loss DDP must know some parameters get no gradient."""
    cfg = {**EXACT, "epochs": 1, "batch_size": 20, "steps_per_epoch": 3, "rank_loss_weight": 0.0}
    prefix, _ = _torchrun(tmp_path, tiny_shards, cfg, nproc=2, name="nork", timeout=180)
    assert json.loads(Path(f"{prefix}-rank0.json").read_text())["steps"] == 3


def test_resume_with_another_world_size_redeals_the_rest_of_the_epoch(tiny_shards, tmp_path):
    """A 2-rank checkpoint at step 13 (epoch 1, step 3: 120 of its 400 edges consumed)
    resumed by 1 process: the other 280 are dealt to it (14 steps of 20), deterministically."""
    cfg = {**EXACT, "batch_size": 20}
    _torchrun(tmp_path, tiny_shards, {**cfg, "max_steps": 13}, nproc=2, name="w2", timeout=180)
    g = RatingGraph.from_shards(tiny_shards)
    split = split_edges(g, SplitConfig())
    shutil.copytree(tmp_path / "run-w2", tmp_path / "run-w2b")
    model = ModelConfig(hidden=16, dropout=0.0, user_id_dropout=0.0, movie_id_dropout=0.0, retrieval_bias=False)
    runs = [train(g, split, model, TrainConfig(**cfg, resume=True), tmp_path / d) for d in ("run-w2", "run-w2b")]
    assert [r.global_step for r in runs] == [13 + 14, 13 + 14]
    _assert_same_params(_last_model(tmp_path / "run-w2"), _last_model(tmp_path / "run-w2b"), atol=0)
    assert torch.load(tmp_path / "run-w2" / "last.pt", weights_only=False)["world_size"] == 1


@pytest.mark.parametrize("old,new", [(2, 1), (2, 3), (1, 2), (3, 2)])
def test_sampler_redeals_the_unconsumed_rest_of_the_epoch(old, new):
    n, b, steps = 101, 4, 5
    consumed = []
    for rank in range(old):
        s = EdgeEpochSampler(n, rank, old, seed=2)
        s.set_epoch(1)
        consumed += list(s)[: steps * b]
    rest = []
    for rank in range(new):
        s = EdgeEpochSampler(n, rank, new, seed=2)
        s.set_epoch(1, position=steps * b * old)
        assert len(s) == len(list(s))
        rest.append(list(s))
    assert len({len(x) for x in rest}) == 1  # equal slices on the new world size
    real = sorted(i for i in consumed + [i for x in rest for i in x] if i < n)
    assert real == list(range(n))  # every edge exactly once in the epoch


@pytest.mark.parametrize("stop_at,ema_decay", [(5, 0.0), (17, 0.0), (17, 0.9)], ids=["5", "17", "17-ema"])
def test_resume_mid_epoch_matches_uninterrupted_run(tiny_shards, tmp_path, stop_at, ema_decay):
    g = RatingGraph.from_shards(tiny_shards)
    split = split_edges(g, SplitConfig())
    model_cfg = ModelConfig(hidden=16, dropout=0.3)  # dropout: the RNG state must be restored too
    cfg = dict(epochs=3, batch_size=32, num_neighbors=[3, 2], progress=False, patience=10, seed=3, ema_decay=ema_decay)
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
    for name in a.get("ema", {}):  # the weights' moving average resumes exactly too
        torch.testing.assert_close(a["ema"][name], b["ema"][name], rtol=0, atol=1e-6)
    assert ("ema" in a) == (ema_decay > 0)


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


def test_resuming_an_early_stopped_run_trains_no_further(tiny_shards, tmp_path):
    """A learning rate too small to improve validation: epoch 1 is a bad epoch and, with
    patience 1, the run stops. last.pt records that decision, so a resume (with a larger
    epoch budget) returns at once instead of training one more epoch."""
    g = RatingGraph.from_shards(tiny_shards)
    split = split_edges(g, SplitConfig())
    cfg = dict(batch_size=64, num_neighbors=[2, 2], progress=False, patience=1, lr=1e-12)
    first = train(g, split, ModelConfig(hidden=8), TrainConfig(**cfg, epochs=5), tmp_path)
    assert first.stopped_early and len(first.history) == 2
    again = train(g, split, ModelConfig(hidden=8), TrainConfig(**cfg, epochs=8, resume=True), tmp_path)
    assert again.stopped_early and again.global_step == first.global_step and len(again.history) == 2
    # a larger patience is a new budget: the run trains on until it is used up
    longer = train(
        g, split, ModelConfig(hidden=8), TrainConfig(**{**cfg, "patience": 3}, epochs=8, resume=True), tmp_path
    )
    assert longer.stopped_early and longer.global_step > first.global_step and len(longer.history) == 4


def _tiny_movielens(d: Path, users: int = 40, movies: int = 30, per_user: int = 15) -> None:
    """A MovieLens-format folder (titles, so features are text-encoded and cached)."""
    g = torch.Generator().manual_seed(0)
    d.mkdir(parents=True)
    genres = ["Drama", "Comedy", "Action|Crime", "Animation|Children"]
    (d / "movies.csv").write_text(
        "movieId,title,genres\n"
        + "".join(f"{m},Movie number {m} ({1950 + m}),{genres[m % 4]}\n" for m in range(1, movies + 1))
    )
    rows = []
    for u in range(1, users + 1):
        for m in torch.randperm(movies, generator=g)[:per_user].tolist():
            rows.append(f"{u},{m + 1},{0.5 * int(torch.randint(1, 11, (1,), generator=g))},{u * 1000 + m}\n")
    (d / "ratings.csv").write_text("userId,movieId,rating,timestamp\n" + "".join(rows))


def _cli_torchrun(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "scalable_rec",
        "-v",
        *args,
    ]
    proc = _run_group(cmd, env, timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_two_rank_train_and_score_match_one_process(tmp_path):
    """`train` under torchrun on shards without a feature cache: only rank 0 encodes the
    titles; test metrics are reduced over ranks and equal one process's evaluation of the
    same best.pt; 2-rank `score` writes exactly the recommendations of 1 process."""
    import pyarrow.parquet as pq

    from scalable_rec import pipeline
    from scalable_rec.config import RunConfig
    from scalable_rec.score import evaluate_split
    from scalable_rec.shards import GraphShards
    from scalable_rec.source import MovieLensSource, SkipReport, write_rating_shards
    from scalable_rec.train import Recommender

    _tiny_movielens(tmp_path / "ml")
    shards = tmp_path / "shards"
    write_rating_shards(MovieLensSource(str(tmp_path / "ml")), str(shards), SkipReport())
    run = tmp_path / "run"
    proc = _cli_torchrun(
        [
            "train",
            "--shards",
            str(shards),
            "--run-dir",
            str(run),
            "--epochs",
            "2",
            "--batch-size",
            "64",
            "--num-neighbors",
            "3",
            "2",
            "--device",
            "cpu",
            "--no-progress",
            "--hidden",
            "16",
        ]
    )
    encodes = [line for line in proc.stderr.splitlines() if "movie features: encoding" in line]
    assert len(encodes) == 1 and "[rank 0]" in encodes[0], encodes
    test = json.loads((run / "metrics.json").read_text())["test"]

    saved = RunConfig.load(run / "config.json")
    g = RatingGraph.from_shards(GraphShards(shards), saved.features)
    model = Recommender(g.num_users, g.num_movies, g.movie_x.size(1), saved.model)
    model.load_state_dict(torch.load(run / "best.pt", weights_only=False)["model"])
    one = evaluate_split(model, g, split_edges(g, saved.split), k=saved.score.k)
    assert test["test_edges"] == one["test_edges"] and test["model"]["eval_users"] == one["model"]["eval_users"]
    for key in ("rmse", "mae"):
        assert test[key] == pytest.approx(one[key], rel=1e-5)
    for group in ("model", "popularity"):
        for key, value in one[group].items():
            assert test[group][key] == pytest.approx(value, rel=1e-5), (group, key)

    proc = _cli_torchrun(["score", "--run-dir", str(run)])
    assert "[rank 1]" in "".join(line for line in proc.stderr.splitlines() if "score: rank 1 ranked users" in line)
    (run / "recommendations.parquet").rename(tmp_path / "two.parquet")
    assert not list(run.glob(".recommendations.parquet*"))  # parts merged and removed
    pipeline.score_stage(RunConfig(run_dir=str(run)), run)
    two, single = pq.read_table(tmp_path / "two.parquet"), pq.read_table(run / "recommendations.parquet")
    assert two.num_rows == single.num_rows == 40 * 10
    assert two.equals(single)


def test_epoch_sampler_does_not_hold_the_epoch_as_python_ints():
    """A list of 10M ids would take ~360 MB of Python objects in every rank."""
    import tracemalloc

    from scalable_rec.dist import EdgeEpochSampler

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


def _rss_anon_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no RssAnon in /proc/self/status")


def test_epoch_sampler_keeps_only_this_ranks_share_of_the_order():
    """Each rank's epoch holds its own slice as int32 (40 MiB of 20M edges at 2 ranks), not
    the global int64 order (160 MiB) that a strided view of it would keep alive."""
    from scalable_rec.dist import EdgeEpochSampler

    sampler = EdgeEpochSampler(20_000_001, rank=1, world_size=2, seed=3)  # odd: one pad
    before = _rss_anon_mib()
    it = iter(sampler)
    first = [next(it) for _ in range(3)]
    held = _rss_anon_mib() - before
    assert held < 80, f"the epoch's iterator holds {held:.0f} MiB"
    g = torch.Generator().manual_seed(3 * 100_003)
    assert first == torch.randperm(20_000_001, generator=g)[1::2][:3].tolist()
    sampler.set_epoch(0, position=20_000_001 - 3)  # the rest: 3 edges and one pad, dealt round-robin
    order = torch.randperm(20_000_001, generator=torch.Generator().manual_seed(3 * 100_003))
    assert list(sampler) == [int(order[-2]), 20_000_001]
    del it


def test_epoch_sampler_peak_while_dealing_is_the_order_and_one_share():
    """Building an epoch's slice peaks at the int32 order (80 MiB of 20M edges) plus this
    rank's share (40 MiB at 2 ranks): no slot-sized temporaries (they peaked near 280 MiB).
    The peak is the kernel's high-water mark (VmHWM, reset through /proc/self/clear_refs)."""
    from scalable_rec.dist import EdgeEpochSampler

    sampler = EdgeEpochSampler(20_000_001, rank=1, world_size=2, seed=3)
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError as err:
        pytest.skip(f"cannot reset the RSS high-water mark here ({err})")

    def status_mib(key: str) -> float:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
        raise AssertionError(f"no {key} in /proc/self/status")

    base = status_mib("VmRSS")
    it = iter(sampler)
    next(it)
    rise = status_mib("VmHWM") - base
    assert rise < 160, f"dealing the epoch peaked {rise:.0f} MiB above the start"
    del it


@pytest.mark.parametrize("table_optimizer", ["adamw", "rowwise_adagrad"])
def test_forced_ddp_runs_every_collective_with_one_rank_and_matches_one_process(
    tiny_shards, tmp_path, monkeypatch, table_optimizer
):
    """``SCALABLE_REC_FORCE_DDP=1`` in one process: the process group (gloo here, NCCL on
    CUDA) is created, the model is wrapped in DDP, and the loss counts' all-reduce, the
    ranking all-gathers, the sparse tables' all-reduce and the object collectives all run
    with world size 1; the result equals the plain single process's."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from scalable_rec.dist import FORCE_DDP_ENV, shutdown_distributed
    from scalable_rec.train import loop

    g = RatingGraph.from_shards(tiny_shards)
    split = split_edges(g, SplitConfig())
    model = ModelConfig(hidden=16, dropout=0.0, user_id_dropout=0.0, movie_id_dropout=0.0)
    cfg = TrainConfig(**{**EXACT, "epochs": 1, "batch_size": 50, "table_optimizer": table_optimizer})
    plain = train(g, split, model, cfg, tmp_path / "plain")

    called: dict[str, int] = {}
    for name in ("all_reduce", "all_gather", "all_gather_object", "broadcast", "broadcast_object_list"):
        original = getattr(dist, name)

        def spy(*args, _original=original, _name=name, **kwargs):
            called[_name] = called.get(_name, 0) + 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(dist, name, spy)
    wrapped = []
    build_job = loop.build_job
    monkeypatch.setattr(loop, "build_job", lambda *a, **k: wrapped.append(build_job(*a, **k)) or wrapped[-1])
    monkeypatch.setenv(FORCE_DDP_ENV, "1")
    try:
        forced = train(g, split, model, cfg, tmp_path / "forced")
        assert dist.is_initialized() and dist.get_world_size() == 1
    finally:
        shutdown_distributed()
    assert isinstance(wrapped[0].ddp_model, DistributedDataParallel)
    assert {"all_reduce", "all_gather", "all_gather_object", "broadcast_object_list"} <= called.keys(), called
    if table_optimizer == "rowwise_adagrad":
        assert called["broadcast"] >= 1  # the tables' initial rows, outside DDP's reducer
    _assert_same_params(_last_model(tmp_path / "plain"), _last_model(tmp_path / "forced"), atol=1e-6)
    assert forced.best_val_rmse == pytest.approx(plain.best_val_rmse, abs=1e-5)


def test_resume_accepts_another_device_setting(tiny_shards, tmp_path):
    """A checkpoint resumed on other hardware (here 'cpu' → 'auto', which is the CPU on this
    machine; on a GPU host the CUDA tests resume a CPU checkpoint on the GPU): the state is
    read onto the CPU and loaded into the model wherever it lives."""
    g = RatingGraph.from_shards(tiny_shards)
    split = split_edges(g, SplitConfig())
    cfg = dict(epochs=1, batch_size=64, progress=False)
    train(g, split, ModelConfig(hidden=8), TrainConfig(**cfg, max_steps=2, device="cpu"), tmp_path)
    resumed = train(g, split, ModelConfig(hidden=8), TrainConfig(**cfg, resume=True, device="auto"), tmp_path)
    assert resumed.global_step > 2
