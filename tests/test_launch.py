"""``--nproc-per-node``: DDP ranks forked from the command's process (gloo, 2 CPU ranks)."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from process_group import finish_group

from scalable_rec.cli import main
from scalable_rec.train.launch import FORKSERVER_PRELOAD, SHUTDOWN_TIMEOUT_S, _launch_config

TRAIN = ["--epochs", "2", "--batch-size", "20", "--seed", "3", "--no-progress", "--device", "cpu"]


def _env() -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "SCALABLE_REC_LAUNCHED"):
        env.pop(key, None)
    return env


def _start(args: list[str], *, torchrun: bool = False) -> subprocess.Popen:
    cmd = (
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "scalable_rec"]
        if torchrun
        else [sys.executable, "-m", "scalable_rec"]
    )
    return subprocess.Popen(
        cmd + args, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )


def _finish(proc: subprocess.Popen, timeout: int = 240) -> tuple[int, str]:
    out, err = finish_group(proc, timeout)
    return proc.returncode, out + err


def _shared_dirty_mib(pid: int) -> int:
    """Dirty pages of ``pid`` that another process maps too (copy-on-write after a fork)."""
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Shared_Dirty:"):
            return int(line.split()[1]) // 1024
    return 0


@pytest.fixture(scope="module")
def forked_run(tiny_shards, tmp_path_factory):
    """A two-rank training run started with --nproc-per-node 2, and each rank's largest
    copy-on-write share seen while it ran (the ranks: the forkserver's children, the
    launcher's grandchildren)."""
    run_dir = tmp_path_factory.mktemp("launch") / "run-fork"
    proc = _start(
        ["train", "--shards", str(tiny_shards.directory), "--run-dir", str(run_dir), *TRAIN, "--nproc-per-node", "2"]
    )
    shared: dict[int, int] = {}
    while proc.poll() is None:
        try:
            ranks = psutil.Process(proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            break
        for rank in ranks:
            try:
                if rank.ppid() == proc.pid:  # the forkserver or multiprocessing's resource tracker
                    continue
                # a rank is a fork of the forkserver, with its command line; a program one of them
                # runs for a moment (uname, ldconfig: seen under load) has another and is not a rank
                parent = rank.parent()
                if parent is None or rank.cmdline() != parent.cmdline():
                    continue
                shared[rank.pid] = max(shared.get(rank.pid, 0), _shared_dirty_mib(rank.pid))
            except (OSError, psutil.Error):  # it has just exited
                pass
        time.sleep(0.1)
    rc, output = _finish(proc)
    assert rc == 0, output[-3000:]
    return run_dir, shared


def test_forked_ranks_train_exactly_like_torchrun_ranks(forked_run, tiny_shards, tmp_path):
    run_dir, _ = forked_run
    rc, output = _finish(
        _start(
            ["train", "--shards", str(tiny_shards.directory), "--run-dir", str(tmp_path / "run-t"), *TRAIN],
            torchrun=True,
        )
    )
    assert rc == 0, output[-3000:]
    fork = torch.load(run_dir / "last.pt", weights_only=False)
    ref = torch.load(tmp_path / "run-t" / "last.pt", weights_only=False)
    assert fork["world_size"] == ref["world_size"] == 2 and fork["global_step"] == ref["global_step"] > 0
    for name, value in ref["model"].items():
        assert torch.equal(fork["model"][name], value), f"{name} differs from the torchrun run"


def test_forked_ranks_share_the_imports_copy_on_write(forked_run):
    """Each rank maps torch's, PyG's and the package's imported pages shared with the
    forkserver that imported them (about 270 MiB here; a torchrun worker shares none of its own)."""
    _, shared = forked_run
    assert len(shared) == 2 and all(mib >= 100 for mib in shared.values()), shared


def test_sigterm_to_the_launcher_stops_every_rank_with_last_pt(tiny_shards, tmp_path):
    run_dir = tmp_path / "run-term"
    args = [
        "train",
        "--shards",
        str(tiny_shards.directory),
        "--run-dir",
        str(run_dir),
        "--epochs",
        "12",
        "--patience",
        "12",
        "--batch-size",
        "8",
        "--no-progress",
        "--device",
        "cpu",
    ]
    proc = _start([*args, "--nproc-per-node", "2"])
    deadline = time.monotonic() + 180
    while not (run_dir / "best.pt").is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)  # the first epoch's validation has written best.pt: training is under way
    assert proc.poll() is None, "the run ended before it could be signalled"
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    rc, output = _finish(proc, timeout=120)
    assert rc == 143, output[-3000:]
    assert time.monotonic() - t0 < 60, "the ranks did not stop promptly"
    stopped = torch.load(run_dir / "last.pt", weights_only=False)
    assert stopped["world_size"] == 2 and 0 < stopped["global_step"]
    assert output.count("interrupted by SIGTERM") == 2  # both ranks stopped at the agreed step
    rc, output = _finish(_start([*args, "--resume", "--nproc-per-node", "2"]))
    assert rc == 0, output[-3000:]
    done = torch.load(run_dir / "last.pt", weights_only=False)
    assert done["global_step"] > stopped["global_step"]
    assert json.loads((run_dir / "metrics.json").read_text())["interrupted"] is False


def test_nproc_per_node_under_torchrun_is_a_usage_error(tiny_shards, monkeypatch, caplog):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("SCALABLE_REC_LAUNCHED", raising=False)
    assert main(["train", "--shards", str(tiny_shards.directory), "--nproc-per-node", "2"]) == 2
    assert "under torchrun leave it out" in caplog.text


def test_a_rank_user_error_is_exit_status_2(tmp_path):
    rc, output = _finish(_start(["train", "--shards", str(tmp_path / "nowhere"), "--nproc-per-node", "2"]))
    assert rc == 2, output[-3000:]
    assert "No shard manifest" in output and "Traceback" not in output


def test_forked_score_writes_what_one_process_writes(forked_run):
    import pyarrow.parquet as pq

    run_dir, _ = forked_run
    rc, output = _finish(_start(["score", "--run-dir", str(run_dir), "--nproc-per-node", "2"]))
    assert rc == 0, output[-3000:]
    two = pq.read_table(run_dir / "recommendations.parquet")
    (run_dir / "recommendations.parquet").unlink()
    assert main(["score", "--run-dir", str(run_dir)]) == 0
    assert two.num_rows > 0 and two.equals(pq.read_table(run_dir / "recommendations.parquet"))


def test_ranks_are_forked_from_a_process_running_no_other_thread(tmp_path):
    """A fork copies every lock of the parent's other threads (the agent's store, pyarrow's
    allocator) in whatever state it is: the ranks come from a forkserver that runs none.
    It only imports and forks, so its threads when a rank looks are those at the fork."""
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("fork_probe.py")), str(tmp_path)],
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    rc, output = _finish(proc, timeout=180)
    assert rc == 0, output[-3000:]
    reports = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in (0, 1)]
    for report in reports:
        assert report["parent"] != report["launcher"], "a rank was forked from the launcher"
        assert len(report["threads"]) == 1, report["threads"]
    assert reports[0]["parent"] == reports[1]["parent"]  # one forkserver: the ranks share its pages


def test_the_forkserver_preload_names_a_module():
    """The forkserver skips a preload that does not import, without a word."""
    import importlib.util

    assert importlib.util.find_spec(FORKSERVER_PRELOAD) is not None


def test_shutdown_timeout_is_passed_only_where_launch_config_takes_it(monkeypatch):
    """torch 2.11's LaunchConfig has no shutdown_timeout (a keyword it would refuse)."""
    import torch.distributed.launcher.api as launcher_api

    options = dict(min_nodes=1, max_nodes=1, nproc_per_node=2, run_id="x", start_method="forkserver")
    takes_it = "shutdown_timeout" in {f.name for f in dataclasses.fields(launcher_api.LaunchConfig)}
    assert getattr(_launch_config(**options), "shutdown_timeout", None) == (SHUTDOWN_TIMEOUT_S if takes_it else None)

    @dataclasses.dataclass
    class OlderLaunchConfig:  # no shutdown_timeout, as in torch 2.11
        min_nodes: int
        max_nodes: int
        nproc_per_node: int
        run_id: str = ""
        start_method: str = "spawn"

    monkeypatch.setattr(launcher_api, "LaunchConfig", OlderLaunchConfig)
    assert _launch_config(**options) == OlderLaunchConfig(**options)
