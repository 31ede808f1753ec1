"""Start-up: ``--help``, a bad flag and a command's missing input are answered before torch,
PyG, Arrow or python-arango is imported, and within about a second."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from scalable_rec.train.config import cuda_cannot_exist

# What parsing and checking flags must not import (each takes 0.1 s to several seconds).
HEAVY = ("torch", "torch_geometric", "pyarrow", "arango", "numpy")

# (argv, exit status): --help of every command, argparse's own errors, and what the config
# dataclasses and the commands' checks refuse.
CASES = [
    (["--help"], 0),
    (["run", "--help"], 0),
    (["prepare", "--help"], 0),
    (["train", "--help"], 0),
    (["score", "--help"], 0),
    (["refresh", "--help"], 0),
    (["synth", "--help"], 0),
    (["arango", "--help"], 0),
    (["arango", "load", "--help"], 0),
    (["arango", "export", "--help"], 0),
    (["frobnicate"], 2),
    (["train", "--epochs", "many"], 2),
    (["train", "--precision", "fp64"], 2),
    (["synth", "--preset", "huge", "--out", "x"], 2),
    (["train", "--lr", "-1"], 2),
    (["train", "--epochs", "0"], 2),
    (["train", "--device", "tpu"], 2),
    (["run", "--num-layers", "3"], 2),
    (["prepare", "--max-rows-per-shard", "0"], 2),
    (["score"], 2),
    (["score", "--run-dir", "r", "--k", "0"], 2),
    (["refresh"], 2),
    (["refresh", "--run-dir", "r", "--new-ratings", "n", "--candidate-margin", "-1"], 2),
    (["arango", "export"], 2),
    (["arango", "load", "--load-batch-size", "0"], 2),
    (["run", "--data", "/nowhere/ml-latest-small"], 2),
    (["prepare", "--data", "/nowhere/ml-latest-small"], 2),
    (["prepare", "--train-file", "/nowhere/u1.base", "--test-file", "/nowhere/u1.test"], 2),
]

PROBE = textwrap.dedent(
    """
    import json, sys
    from scalable_rec.cli import main

    statuses = []
    for argv in json.loads(sys.argv[1]):
        try:
            statuses.append(main(argv))
        except SystemExit as stop:  # argparse: --help and its own errors
            statuses.append(stop.code)
    print(json.dumps({"statuses": statuses, "loaded": sorted(m for m in sys.modules if m in json.loads(sys.argv[2]))}))
    """
)


def _env() -> dict[str, str]:
    """This environment with this checkout first on the path (also for a re-executed process)."""
    root = str(Path(__file__).resolve().parents[1])
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": root if not path else f"{root}{os.pathsep}{path}"}


def test_help_and_user_errors_import_no_heavy_module():
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps([argv for argv, _ in CASES]), json.dumps(HEAVY)],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["statuses"] == [status for _, status in CASES], proc.stderr
    assert result["loaded"] == [], f"imported while parsing and checking flags: {result['loaded']}"


def test_the_commands_still_import_what_they_run():
    """The other side: a command that does work gets torch (here, 'train' on missing shards)."""
    probe = "import sys; from scalable_rec.cli import main; rc = main(['train', '--shards', sys.argv[1]]); "
    probe += "print(rc, 'torch' in sys.modules)"
    proc = subprocess.run(
        [sys.executable, "-c", probe, "/nowhere/shards"], capture_output=True, text=True, env=_env(), timeout=300
    )
    assert proc.stdout.split() == ["2", "True"], proc.stderr


@pytest.mark.parametrize(
    "package",
    ["scalable_rec.graph", "scalable_rec.model", "scalable_rec.train", "scalable_rec.sink", "scalable_rec.source"],
)
def test_lazy_package_exports_resolve(package):
    """Every name a package lists is reachable from it (imported on first access)."""
    module = importlib.import_module(package)
    for name in module.__all__:
        assert getattr(module, name) is not None
        assert name in dir(module)
    with pytest.raises(AttributeError, match="has no attribute 'nothing_here'"):
        module.nothing_here  # noqa: B018


def _imported(stderr: str) -> set[str]:
    """Module names from ``-X importtime`` lines (``import time: self | cumulative | name``)."""
    return {line.rsplit("|", 1)[1].strip() for line in stderr.splitlines() if line.startswith("import time:")}


def _fastest(cmd: list[str], expect: int, runs: int = 3) -> tuple[float, str]:
    """The fastest wall time of ``runs`` runs (the machine may be busy with other work), and
    the stderr of one more, untimed run with import profiling."""
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=120)
        best = min(best, time.perf_counter() - start)
        assert proc.returncode == expect, proc.stderr
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**_env(), "PYTHONPROFILEIMPORTTIME": "1"})
    assert proc.returncode == expect, proc.stderr
    return best, proc.stderr


# Generous for a loaded machine: about 0.5 s when idle, while importing torch alone takes seconds.
BOUND_S = 2.5


@pytest.mark.parametrize(
    "argv, expect, says",
    [
        (["train", "--help"], 0, ""),
        (["train", "--lr", "-1"], 2, "'lr' needs to be positive (got -1.0)"),
        (
            ["run", "--data", "/nowhere/ml"],
            2,
            "'data' '/nowhere/ml': MovieLens directory '/nowhere/ml' lacks ['ratings.csv', 'movies.csv']",
        ),
    ],
)
def test_python_m_answers_within_a_second(argv, expect, says):
    """The whole path of ``python -m scalable_rec``, its huge-pages restart included."""
    best, stderr = _fastest([sys.executable, "-m", "scalable_rec", *argv], expect)
    assert not _imported(stderr) & set(HEAVY), sorted(_imported(stderr) & set(HEAVY))
    assert says in stderr and "Traceback" not in stderr
    assert best < BOUND_S, f"scalable-rec {' '.join(argv)} took {best:.2f} s"


def test_console_script_answers_within_a_second():
    script = shutil.which("scalable-rec", path=str(Path(sys.executable).parent))
    if script is None:
        pytest.skip("no scalable-rec console script beside this interpreter (package not installed)")
    best, stderr = _fastest([script, "run", "--help"], 0)
    assert "scalable_rec.cli" in _imported(stderr)
    assert not _imported(stderr) & set(HEAVY), sorted(_imported(stderr) & set(HEAVY))
    assert best < BOUND_S, f"scalable-rec run --help took {best:.2f} s"


def test_every_invalid_option_is_named_on_one_line():
    proc = subprocess.run(
        [sys.executable, "-m", "scalable_rec", "train", "--lr", "-1", "--epochs", "0"],
        capture_output=True,
        text=True,
        env=_env(),
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert "'lr' needs to be positive" in lines[0] and "'epochs' needs to be positive" in lines[0]


@pytest.mark.skipif(not cuda_cannot_exist(), reason="this machine has a CUDA driver: torch decides, as it should")
@pytest.mark.parametrize(
    "argv, says",
    [
        (["train", "--device", "cuda"], "Invalid options: 'device' is 'cuda' but no CUDA device is available"),
        (["run", "--device", "cuda:1"], "Invalid options: 'device' is 'cuda:1' but no CUDA device is available"),
        (["train", "--precision", "fp16"], "Invalid options: 'precision' fp16 needs CUDA (CPU autocast supports bf16)"),
        (
            ["score", "--run-dir", "r", "--score-device", "cuda"],
            "Cannot score: 'device' is 'cuda' but no CUDA device is available",
        ),
    ],
)
def test_cuda_asked_of_a_machine_without_a_driver_is_refused_before_torch(argv, says):
    best, stderr = _fastest([sys.executable, "-m", "scalable_rec", *argv], 2)
    assert not _imported(stderr) & set(HEAVY), sorted(_imported(stderr) & set(HEAVY))
    assert says in stderr and "Traceback" not in stderr
    assert best < BOUND_S, f"scalable-rec {' '.join(argv)} took {best:.2f} s"


@pytest.mark.skipif(not cuda_cannot_exist(), reason="this machine has a CUDA driver: torch decides, as it should")
def test_scoring_a_cuda_trained_run_on_a_machine_without_a_driver_is_refused_before_torch(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"train": {"device": "cuda"}}))
    best, stderr = _fastest([sys.executable, "-m", "scalable_rec", "score", "--run-dir", str(tmp_path)], 2)
    assert not _imported(stderr) & set(HEAVY), sorted(_imported(stderr) & set(HEAVY))
    says = "Cannot score: 'device' is 'cuda' but no CUDA device is available (the run trained there; --score-device cpu"
    assert says in stderr and "Traceback" not in stderr
    assert best < BOUND_S, f"scalable-rec score took {best:.2f} s"


def test_cuda_cannot_exist_only_without_nvidia_and_rocm_drivers(monkeypatch):
    from scalable_rec.train import config

    def no_library(name):
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(config.sys, "platform", "linux")
    monkeypatch.setattr(config.os.path, "exists", lambda path: False)
    monkeypatch.setattr(config.ctypes, "CDLL", no_library)
    assert config.cuda_cannot_exist()
    monkeypatch.setattr(config.ctypes, "CDLL", lambda name: object())  # NVIDIA's driver loads
    assert not config.cuda_cannot_exist()
    monkeypatch.setattr(config.ctypes, "CDLL", no_library)
    monkeypatch.setattr(config.os.path, "exists", lambda path: path == "/dev/kfd")  # ROCm
    assert not config.cuda_cannot_exist()
    monkeypatch.setattr(config.os.path, "exists", lambda path: False)
    monkeypatch.setattr(config.sys, "platform", "win32")  # elsewhere torch decides
    assert not config.cuda_cannot_exist()


def test_device_problems_name_what_a_machine_without_cuda_cannot_do():
    from scalable_rec.train.config import TrainConfig, device_problems

    assert device_problems(TrainConfig(device="auto"), cuda_available=False) == []
    assert device_problems(TrainConfig(device="cpu", precision="bf16"), cuda_available=False) == []
    assert device_problems(TrainConfig(device="cuda", precision="fp16"), cuda_available=True) == []
    assert device_problems(TrainConfig(device="auto", precision="fp16"), cuda_available=False) == [
        "'precision' fp16 needs CUDA (CPU autocast supports bf16)"
    ]
    assert device_problems(TrainConfig(device="cuda:0"), cuda_available=False) == [
        "'device' is 'cuda:0' but no CUDA device is available"
    ]
