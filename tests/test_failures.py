"""Hostile inputs and faults: each gives one clear line and the right exit code, leaves no
secret and no temporary file behind, and never ends in a silent wrong result.

The CLI is driven in-process (``cli.main``); one test runs it in a child process to send it
SIGTERM. Text embeddings are replaced by a cheap stand-in where the test is not about them.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from scalable_rec import cli
from scalable_rec.atomic import write_json_atomic
from scalable_rec.errors import CheckpointError, ShardError
from scalable_rec.graph import features as feat
from scalable_rec.shards import GraphShards
from scalable_rec.source import SkipReport, write_rating_shards
from scalable_rec.source.synthetic import SyntheticSource
from scalable_rec.train import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--epochs", "1", "--batch-size", "64", "--hidden", "8", "--no-progress"]
MOVIES = "movieId,title,genres\n1,Toy Story (1995),Comedy\n2,Heat (1995),Action|Crime\n3,Up (2009),Drama\n"


def temp_files(root: Path) -> list[str]:
    return [str(p) for p in root.rglob("*") if ".tmp" in p.name or p.name.endswith(".incomplete")]


def files_containing(root: Path, secret: str) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]


def ratings_csv(n_users: int = 12, garbage: int = 0) -> str:
    rows = [f"{u},{m},{1 + (u * m) % 5}.0,{u * 10 + m}" for u in range(1, n_users + 1) for m in (1, 2, 3)]
    rows += [f"x{i},y,z,w" for i in range(garbage)]
    return "userId,movieId,rating,timestamp\n" + "\n".join(rows) + "\n"


def movielens(tmp_path: Path, ratings: str | bytes | None = None, movies: str | bytes = MOVIES) -> Path:
    d = tmp_path / "ml"
    d.mkdir(exist_ok=True)
    for name, text in (("movies.csv", movies), ("ratings.csv", ratings if ratings is not None else ratings_csv())):
        (d / name).write_bytes(text if isinstance(text, bytes) else text.encode())
    return d


def cheap_titles(titles, cfg, progress=True):
    """Stands in for the sentence-transformer (tens of seconds to load on two cores)."""
    return np.stack([np.full(4, len(t), np.float32) for t in titles])


@pytest.fixture
def no_encoder(monkeypatch):
    monkeypatch.setattr(feat, "embed_titles", cheap_titles)


@pytest.fixture
def shards(tiny_shards, tmp_path) -> Path:
    out = tmp_path / "shards"
    shutil.copytree(tiny_shards.directory, out)
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A finished tiny run (its own shards), copied by ``run_copy`` for each test."""
    root = tmp_path_factory.mktemp("trained")
    write_rating_shards(SyntheticSource.preset("tiny", seed=0), str(root / "shards"), SkipReport())
    assert cli.main(["train", "--shards", str(root / "shards"), "--run-dir", str(root / "run"), *TINY]) == 0
    return root


@pytest.fixture
def run_copy(trained, tmp_path) -> Path:
    shutil.copytree(trained, tmp_path / "t")
    run_dir = tmp_path / "t" / "run"
    cfg = json.loads((run_dir / "config.json").read_text())
    cfg["data"]["shards"] = str(tmp_path / "t" / "shards")
    (run_dir / "config.json").write_text(json.dumps(cfg))
    return run_dir


def fails(argv: list[str], caplog, code: int = 2, match: str = "") -> str:
    """Runs the CLI, checks the exit code, one message containing ``match``, no traceback."""
    caplog.clear()
    assert cli.main(argv) == code
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert errors, "no error was logged"
    text = "\n".join(r.getMessage() for r in errors)
    assert match in text, text
    assert "Traceback" not in caplog.text
    return text


# --- secrets and untrusted files -------------------------------------------------------------


def test_url_userinfo_is_refused_before_anything_is_written(tmp_path, caplog):
    run_dir = tmp_path / "run"
    data = movielens(tmp_path)
    text = fails(
        [
            "run",
            "--data",
            str(data),
            "--workdir",
            str(tmp_path / "w"),
            "--run-dir",
            str(run_dir),
            "--sink",
            "arango",
            "--arango-url",
            "http://alice:s3cr3t@127.0.0.1:9",
        ],
        caplog,
        match="'arango_url' must not contain user:password@",
    )
    assert "s3cr3t" not in text and "s3cr3t" not in caplog.text
    assert not run_dir.exists() and not (tmp_path / "w").exists()
    assert files_containing(tmp_path, "s3cr3t") == []


@pytest.mark.parametrize(
    "case, match", [("wrong password", "rejected the credentials"), ("read-only user", "HTTP 403")]
)
def test_run_checks_the_arango_sink_before_training(tmp_path, caplog, monkeypatch, no_encoder, case, match):
    from arango_double import ArangoDouble

    with ArangoDouble({"root": "pw-123456", "reader": "pw-abcdef"}, read_only=("reader",)) as double:
        double.create_database("recs")
        user, password = ("root", "wrong-password-xyz") if case == "wrong password" else ("reader", "pw-abcdef")
        for var, value in (("URL", double.url), ("DB", "recs"), ("USER", user), ("PASSWORD", password)):
            monkeypatch.setenv(f"SCALABLE_REC_ARANGO_{var}", value)
        run_dir = tmp_path / "run"
        fails(
            [
                "run",
                "--data",
                str(movielens(tmp_path)),
                "--workdir",
                str(tmp_path / "w"),
                "--run-dir",
                str(run_dir),
                "--sink",
                "arango",
                *TINY,
            ],
            caplog,
            match=match,
        )
    assert not (run_dir / "best.pt").exists() and not (tmp_path / "w" / "shards").exists()
    assert files_containing(tmp_path, password) == [] and password not in caplog.text


@pytest.mark.parametrize(
    "server, user, match",
    [
        (dict(version="3.7"), "root", "ArangoDB 3.7.99-double is too old: expected 3.8 or later"),
        (dict(access={"app": ("elsewhere",)}), "app", "wrong credentials or no access to this database"),
    ],
)
def test_arango_export_refusals_are_one_line(tmp_path, caplog, monkeypatch, server, user, match):
    from arango_double import ArangoDouble

    with ArangoDouble({"root": "pw-123456", "app": "pw-123456"}, **server) as double:
        double.create_database("recs")
        for var, value in (("URL", double.url), ("DB", "recs"), ("USER", user), ("PASSWORD", "pw-123456")):
            monkeypatch.setenv(f"SCALABLE_REC_ARANGO_{var}", value)
        text = fails(["arango", "export", "--shards", str(tmp_path / "s")], caplog, match=match)
    assert "\n" not in text and "pw-123456" not in caplog.text
    assert not (tmp_path / "s").exists()


class _Payload:
    """Unpickling this creates ``marker``: what a crafted checkpoint could do instead."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_crafted_checkpoint_does_not_run_code(run_copy, tmp_path, caplog):
    marker = tmp_path / "pwned"
    torch.save({"model": _Payload(marker), "config": {}}, run_copy / "best.pt")
    fails(["score", "--run-dir", str(run_copy)], caplog, match="cannot be read")
    assert not marker.exists()


def test_last_pt_loads_without_pickle_and_restores_rng(run_copy):
    state = torch.load(run_copy / "last.pt", weights_only=True)  # raises on any pickled object
    random_state = state["rng"][0]
    ckpt.set_rng_state(random_state)
    first = (torch.rand(3), np.random.rand(3), __import__("random").random())
    ckpt.set_rng_state(random_state)
    assert torch.equal(first[0], torch.rand(3)) and np.array_equal(first[1], np.random.rand(3))
    assert first[2] == __import__("random").random()


@pytest.mark.parametrize("bad", ["../outside.arrow", "/etc/hostname", "link"])
def test_manifest_paths_stay_inside_the_directory(shards, tmp_path, bad):
    outside = tmp_path / "outside.arrow"
    outside.write_bytes(b"x")
    manifest = json.loads((shards / "manifest.json").read_text())
    entry = manifest["edge_types"]["user__rates__movie"]["files"][0]
    if bad == "link":
        (shards / "link").symlink_to(outside)
    entry["path"] = bad
    (shards / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match="outside the shard directory"):
        GraphShards(shards)


# --- silent wrong results --------------------------------------------------------------------


def test_diverged_training_fails_and_cannot_be_scored(shards, tmp_path, caplog):
    run_dir = tmp_path / "run"
    fails(
        ["train", "--shards", str(shards), "--run-dir", str(run_dir), "--lr", "1e30", *TINY],
        caplog,
        match="Training diverged",
    )
    assert not (run_dir / "metrics.json").exists()
    fails(["score", "--run-dir", str(run_dir)], caplog, match="training did not finish")
    assert not (run_dir / "recommendations.parquet").exists() and temp_files(tmp_path) == []


def test_corrupted_feature_cache_is_rebuilt(tmp_path, monkeypatch):
    data = movielens(tmp_path)
    write_rating_shards(feat_source(data), str(tmp_path / "s"), SkipReport())
    calls = []
    monkeypatch.setattr(feat, "embed_titles", lambda t, c, progress=True: calls.append(1) or cheap_titles(t, c))
    good = feat.movie_features(GraphShards(tmp_path / "s"))
    cache = next((tmp_path / "s" / "features").glob("movie-*.npy"))
    poisoned = np.load(cache)
    poisoned[0, 0] += 1.0  # finite and the same size: only the checksum can tell
    np.save(cache, poisoned)
    again = feat.movie_features(GraphShards(tmp_path / "s"))
    assert len(calls) == 2 and np.isfinite(again).all()
    np.testing.assert_array_equal(good, again)


def feat_source(data: Path):
    from scalable_rec.source import MovieLensSource

    return MovieLensSource(str(data))


@pytest.mark.parametrize(
    "batches, match",
    [
        ([], "No rows to write"),
        (
            [
                pa.record_batch(
                    [
                        pa.array([], pa.int64()),
                        pa.array([], pa.int64()),
                        pa.array([], pa.float32()),
                        pa.array([], pa.int32()),
                    ],
                    names=["user_key", "movie_key", "score", "rank"],
                )
            ],
            "got 0 rows",
        ),
    ],
)
def test_an_empty_recommendation_set_is_not_success(run_copy, caplog, monkeypatch, batches, match):
    from scalable_rec import pipeline

    monkeypatch.setattr(pipeline, "recommend", lambda model, graph, cfg, **kw: iter(batches))
    fails(["score", "--run-dir", str(run_copy)], caplog, match=match)
    assert not (run_copy / "recommendations.parquet").exists() and temp_files(run_copy) == []


@pytest.mark.parametrize(
    "flags, first_rows, second_rows",
    [
        (["--rating-max", "4.0"], 36, None),  # ratings of 5.0 are out of range now
        (["--max-rows-per-shard", "7"], 36, 36),
    ],
)
def test_prepare_rebuilds_when_an_option_changes_the_shards(tmp_path, no_encoder, flags, first_rows, second_rows):
    data, work = movielens(tmp_path), tmp_path / "w"
    assert cli.main(["prepare", "--data", str(data), "--workdir", str(work), "--no-progress"]) == 0
    out = work / "shards" / "ml"
    assert GraphShards(out).edges("user", "rates", "movie").num_rows == first_rows
    assert (
        cli.main(
            [
                "prepare",
                "--data",
                str(data),
                "--workdir",
                str(work),
                "--no-progress",
                "--max-skipped-share",
                "1",
                *flags,
            ]
        )
        == 0
    )
    manifest = GraphShards(out).manifest
    rows = manifest.edge_types["user__rates__movie"].num_rows
    if second_rows is None:
        assert rows < first_rows and manifest.report["skipped"]["rating_out_of_range"] == first_rows - rows
    else:
        assert rows == second_rows and len(manifest.edge_types["user__rates__movie"].files) > 1


def test_strict_prepare_is_not_satisfied_by_lenient_shards(tmp_path, caplog, no_encoder):
    data = movielens(tmp_path, ratings_csv(garbage=1))
    work = tmp_path / "w"
    assert cli.main(["prepare", "--data", str(data), "--workdir", str(work), "--no-progress"]) == 0
    fails(["prepare", "--data", str(data), "--workdir", str(work), "--strict"], caplog, match="ratings.csv line 38")


def test_score_refuses_shards_the_model_was_not_trained_on(run_copy, caplog):
    shards = run_copy.parent / "shards"
    before = GraphShards(shards).manifest.identity()["content_sha256"]
    write_rating_shards(SyntheticSource.preset("tiny", seed=1), str(shards), SkipReport(), overwrite=True)
    after = GraphShards(shards).manifest.identity()["content_sha256"]
    text = fails(["score", "--run-dir", str(run_copy)], caplog, match="not the ones the model")
    assert before in text and after in text
    assert cli.main(["score", "--run-dir", str(run_copy), "--allow-shard-mismatch"]) == 0


def test_sigterm_exits_143_and_marks_the_run_interrupted(shards, tmp_path, caplog):
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "scalable_rec.cli",
            "train",
            "--shards",
            str(shards),
            "--run-dir",
            str(run_dir),
            "--epochs",
            "100000",
            "--batch-size",
            "16",
            "--hidden",
            "8",
            "--no-progress",
            "--checkpoint-every",
            "5",
            "--patience",
            "100000",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not (run_dir / "best.pt").exists() and time.monotonic() < deadline and child.poll() is None:
        time.sleep(0.2)
    child.send_signal(signal.SIGTERM)
    _, err = child.communicate(timeout=120)
    assert child.returncode == 143, err[-2000:]
    assert "interrupted by SIGTERM" in err and "Traceback" not in err
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["interrupted"] is True and metrics["interrupted_by"] == "SIGTERM"
    fails(["score", "--run-dir", str(run_dir)], caplog, match="--allow-interrupted")
    assert cli.main(["score", "--run-dir", str(run_dir), "--allow-interrupted"]) == 0


def test_a_run_dir_belongs_to_one_config(run_copy, caplog):
    shards = str(run_copy.parent / "shards")
    fails(
        ["train", "--shards", shards, "--run-dir", str(run_copy), "--lr", "0.01", *TINY],
        caplog,
        match="pass --resume to continue it or --overwrite to replace it",
    )
    old_best = (run_copy / "best.pt").stat().st_mtime_ns
    assert (
        cli.main(["train", "--shards", shards, "--run-dir", str(run_copy), "--lr", "0.01", "--overwrite", *TINY]) == 0
    )
    assert json.loads((run_copy / "config.json").read_text())["train"]["lr"] == 0.01
    assert (run_copy / "best.pt").stat().st_mtime_ns != old_best


def test_resume_accepts_output_only_options():
    saved = {"train": {"lr": 0.01}, "score": {"k": 10}, "sink": {"sink": "parquet"}}
    ckpt.check_compatible(saved, {"train": {"lr": 0.01}, "score": {"k": 20}, "sink": {"sink": "arango"}})
    with pytest.raises(CheckpointError, match="train.lr"):
        ckpt.check_compatible(saved, {"train": {"lr": 0.02}, "score": {"k": 10}, "sink": {"sink": "parquet"}})


def test_resuming_an_early_stopped_run_does_not_train_on(shards, tmp_path, caplog):
    run_dir = tmp_path / "run"
    argv = [
        "train",
        "--shards",
        str(shards),
        "--run-dir",
        str(run_dir),
        "--epochs",
        "200",
        "--patience",
        "1",
        "--lr",
        "0.05",
        "--batch-size",
        "64",
        "--hidden",
        "8",
        "--no-progress",
    ]
    assert cli.main(argv) == 0
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["stopped_early"], "the tiny run should stop early with --patience 1"
    caplog.clear()
    caplog.set_level("INFO")
    assert cli.main([*argv, "--resume"]) == 0
    assert "already stopped early" in caplog.text
    assert json.loads((run_dir / "metrics.json").read_text())["history"] == metrics["history"]


# --- concurrency, disks and encodings --------------------------------------------------------


def test_a_locked_run_dir_names_its_holder(shards, tmp_path, caplog):
    run_dir = tmp_path / "run"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from scalable_rec import locking\n"
            f"with locking.hold({str(run_dir)!r}):\n    print('held', flush=True); time.sleep(60)",
        ],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        fails(
            ["train", "--shards", str(shards), "--run-dir", str(run_dir), *TINY],
            caplog,
            match=f"is in use by pid {holder.pid} on host {os.uname().nodename}",
        )
        assert not (run_dir / "config.json").exists()
    finally:
        holder.kill()  # SIGKILL: the kernel drops the lock with the process
        holder.wait()
    from scalable_rec import locking

    with locking.hold(run_dir):  # no stale lock after kill -9
        pass


def test_bom_and_undecodable_rows(tmp_path, caplog, no_encoder):
    ratings = ("\ufeff" + ratings_csv()).encode() + b"7,2,4\xe9,1\n"
    movies = ("\ufeff" + MOVIES).encode() + b"4,Caf\xe9 (1990),Drama\n"
    data, work = movielens(tmp_path, ratings, movies), tmp_path / "w"
    assert cli.main(["prepare", "--data", str(data), "--workdir", str(work), "--no-progress"]) == 0
    report = GraphShards(work / "shards" / "ml").manifest.report
    assert report["accepted"]["ratings"] == 36 and report["skipped"] == {"undecodable_row": 2}
    assert any("movies.csv line 5" in e for e in report["examples"]["undecodable_row"])
    fails(
        ["prepare", "--data", str(data), "--workdir", str(work), "--strict", "--overwrite"],
        caplog,
        match="movies.csv line 5",
    )
    assert temp_files(tmp_path) == []


@pytest.mark.parametrize(
    "ratings, match",
    [
        ("userId,movieId,rating,timestamp\n", "no usable ratings"),
        (ratings_csv(n_users=1, garbage=20), "more than --max-skipped-share"),
    ],
)
def test_empty_or_mostly_invalid_input_is_refused_at_prepare(tmp_path, caplog, ratings, match):
    work = tmp_path / "w"
    fails(["prepare", "--data", str(movielens(tmp_path, ratings)), "--workdir", str(work)], caplog, match=match)
    assert not (work / "shards" / "ml").exists() and temp_files(tmp_path) == []


def test_skipped_share_flag_accepts_what_the_user_allows(tmp_path, no_encoder):
    data = movielens(tmp_path, ratings_csv(n_users=1, garbage=20))
    assert (
        cli.main(
            [
                "prepare",
                "--data",
                str(data),
                "--workdir",
                str(tmp_path / "w"),
                "--no-progress",
                "--max-skipped-share",
                "0.9",
            ]
        )
        == 0
    )


def test_full_disk_is_one_line_and_leaves_no_temp_file(shards, tmp_path, caplog):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / f".config.json.tmp-{os.getpid()}").symlink_to("/dev/full")  # every write: ENOSPC
    fails(
        ["train", "--shards", str(shards), "--run-dir", str(run_dir), *TINY],
        caplog,
        match="no space left on the device",
    )
    assert temp_files(tmp_path) == [] and not (run_dir / "config.json").exists()


@pytest.mark.parametrize(
    "how",
    [
        # root (as in CI) ignores permissions, but not a path that runs through a regular file
        "under a file",
        pytest.param("read-only", marks=pytest.mark.skipif(os.geteuid() == 0, reason="root ignores permissions")),
    ],
)
def test_unwritable_workdir_is_one_line(tmp_path, caplog, how):
    argv = ["prepare", "--data", str(movielens(tmp_path)), "--no-progress", "--workdir"]
    if how == "under a file":
        (tmp_path / "a-file").write_text("not a directory\n")
        fails([*argv, str(tmp_path / "a-file" / "w")], caplog, match="not a directory")
        assert (tmp_path / "a-file").read_text() == "not a directory\n"
        return
    work = tmp_path / "w"
    work.mkdir()
    work.chmod(0o500)
    try:
        fails([*argv, str(work)], caplog, match="permission denied")
    finally:
        work.chmod(0o700)


def test_missing_config_json(tmp_path, caplog):
    (tmp_path / "run").mkdir()
    fails(["score", "--run-dir", str(tmp_path / "run")], caplog, match="No config.json in")


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--text-model", "./no-such-model"], "'text_model' './no-such-model' looks like a local path"),
        (["--val-ratio", "0"], "'val_ratio' needs to be positive"),
        (["--aggr", "meen"], "'aggr' needs to be 'mean', 'sum' or 'max' (got 'meen')"),
        (["--num-neighbors", "10", "5", "5"], "'num_neighbors' needs one entry per layer"),
        pytest.param(
            ["--device", "cuda"],
            "no CUDA device is available",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present"),
        ),
        pytest.param(
            ["--precision", "fp16", "--device", "cpu"],
            "'precision' fp16 needs CUDA",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present"),
        ),
    ],
)
def test_bad_options_are_one_line_and_exit_2(shards, tmp_path, caplog, argv, match):
    run_dir = tmp_path / "run"
    fails(["train", "--shards", str(shards), "--run-dir", str(run_dir), *TINY, *argv], caplog, match=match)
    assert not run_dir.exists()


def test_score_device_choice(shards, tmp_path, caplog):
    """`score --score-device` overrides the device the run trained on; a bad value or a
    missing CUDA device is one line and exit 2, and nothing is written."""
    run_dir = tmp_path / "run"
    assert cli.main(["train", "--shards", str(shards), "--run-dir", str(run_dir), *TINY]) == 0
    fails(
        ["score", "--run-dir", str(run_dir), "--score-device", "gpu"],
        caplog,
        match="'score_device' needs run, auto, cpu, cuda or cuda:N (got 'gpu')",
    )
    if not torch.cuda.is_available():
        fails(
            ["score", "--run-dir", str(run_dir), "--score-device", "cuda"], caplog, match="no CUDA device is available"
        )
        config = json.loads((run_dir / "config.json").read_text())  # as if trained on a GPU machine
        config["train"]["device"] = "cuda"
        (run_dir / "config.json").write_text(json.dumps(config))
        fails(["score", "--run-dir", str(run_dir)], caplog, match="--score-device cpu scores it here")
    assert not (run_dir / "recommendations.parquet").exists()
    assert cli.main(["score", "--run-dir", str(run_dir), "--score-device", "cpu"]) == 0
    assert (run_dir / "recommendations.parquet").exists()


def test_unloadable_text_model_is_a_config_error(tmp_path, caplog):
    model_dir = tmp_path / "empty-model"
    model_dir.mkdir()
    fails(
        [
            "prepare",
            "--data",
            str(movielens(tmp_path)),
            "--workdir",
            str(tmp_path / "w"),
            "--no-progress",
            "--text-model",
            str(model_dir),
        ],
        caplog,
        match="cannot be loaded",
    )


@pytest.mark.parametrize("where", ["before", "after"])
def test_traceback_only_with_verbose(tmp_path, caplog, where):
    """``-v`` works before the command and after it (where the error messages suggest it)."""
    (tmp_path / "run").mkdir()
    argv = ["score", "--run-dir", str(tmp_path / "run")]
    assert cli.main(["-v", *argv] if where == "before" else [*argv, "-v"]) == 2
    assert "Traceback" in caplog.text
    caplog.clear()
    assert cli.main(argv) == 2 and "Traceback" not in caplog.text


# --- determinism and small things ------------------------------------------------------------


def test_deterministic_runs_are_identical(shards, tmp_path):
    states = []
    for name in ("a", "b"):
        assert (
            cli.main(["train", "--shards", str(shards), "--run-dir", str(tmp_path / name), "--deterministic", *TINY])
            == 0
        )
        states.append(torch.load(tmp_path / name / "best.pt", weights_only=True)["model"])
    cli.main(["score", "--run-dir", str(tmp_path / "a")])  # leaves deterministic mode off again
    assert not torch.are_deterministic_algorithms_enabled()
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_threads_are_split_between_local_ranks():
    from scalable_rec.config import RuntimeConfig

    cores = os.cpu_count() or 1
    # torchrun sets OMP_NUM_THREADS=1 for every rank; the cores are shared out instead
    assert RuntimeConfig().resolved_threads({"LOCAL_WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"}) == max(1, cores // 2)
    assert RuntimeConfig().resolved_threads({}) == cores
    assert RuntimeConfig().resolved_threads({"OMP_NUM_THREADS": "1"}) == 1
    assert RuntimeConfig(threads=3).resolved_threads({"LOCAL_WORLD_SIZE": "8"}) == 3
    assert RuntimeConfig(deterministic=True).resolved_threads({}) == 1


def test_json_outputs_have_no_nan(tmp_path, capsys):
    write_json_atomic(tmp_path / "m.json", {"best_val_rmse": math.inf, "h": [{"x": math.nan}]})

    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    assert json.loads((tmp_path / "m.json").read_text(), parse_constant=refuse) == {
        "best_val_rmse": None,
        "h": [{"x": None}],
    }


def test_help_lists_what_each_command_does(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert "run  run" not in " ".join(out.split(" ")) and not any(
        line.split() == ["run", "run"] for line in out.splitlines()
    )
    assert "Prepare → train → evaluate → score" in out


def test_overwrite_message_names_the_flag(tiny_shards, caplog):
    fails(["synth", "--preset", "tiny", "--out", str(tiny_shards.directory)], caplog, match="pass --overwrite")


def test_malformed_row_examples_name_the_line(tmp_path, no_encoder):
    data = movielens(tmp_path, ratings_csv() + "1,2\n")
    assert cli.main(["prepare", "--data", str(data), "--workdir", str(tmp_path / "w"), "--no-progress"]) == 0
    report = GraphShards(tmp_path / "w" / "shards" / "ml").manifest.report
    assert report["examples"]["malformed_row_ratings"] == ["ratings.csv line 38: '1,2' (expected 4 columns, got 2)"]


def test_no_progress_silences_the_text_encoder(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(feat, "embed_titles", lambda t, c, progress=True: seen.append(progress) or cheap_titles(t, c))
    assert (
        cli.main(["prepare", "--data", str(movielens(tmp_path)), "--workdir", str(tmp_path / "w"), "--no-progress"])
        == 0
    )
    assert seen == [False]


def test_refit_interrupted_while_selecting_resumes_selection_then_refits(shards, tmp_path, caplog, monkeypatch):
    """``train --refit`` stopped by SIGTERM during the selecting run: a plain rerun is
    refused with the way on, ``--resume`` finishes the selection and then trains the refit
    (which had not started), and the run scores; ``--overwrite`` replaces both."""
    run_dir = tmp_path / "run"
    argv = [
        "train",
        "--shards",
        str(shards),
        "--run-dir",
        str(run_dir),
        "--refit",
        "--epochs",
        "2",
        "--batch-size",
        "64",
        "--hidden",
        "8",
        "--no-progress",
    ]
    monkeypatch.setenv("SCALABLE_REC_FAULT", "0:3:TERM")  # SIGTERM at the selecting run's third step
    assert cli.main(argv) == 143
    monkeypatch.delenv("SCALABLE_REC_FAULT")
    assert json.loads((run_dir / "select" / "metrics.json").read_text())["interrupted_by"] == "SIGTERM"
    assert not (run_dir / "last.pt").exists()
    fails(argv, caplog, match="select/last.pt")  # names what it found, and --resume
    assert "pass --resume" in caplog.text
    assert cli.main([*argv, "--resume"]) == 0
    selection = json.loads((run_dir / "select" / "metrics.json").read_text())
    assert selection["interrupted"] is False and "test" not in selection
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["selection"]["epochs"] >= 1 and math.isfinite(metrics["test"]["rmse"])
    assert cli.main(["score", "--run-dir", str(run_dir)]) == 0
    # a finished refit run: --resume reuses the selection and trains nothing new
    assert cli.main([*argv, "--resume"]) == 0
    assert json.loads((run_dir / "select" / "metrics.json").read_text()) == selection
    assert cli.main([*argv, "--overwrite"]) == 0 and not (run_dir / "recommendations.parquet").exists()


def test_overwrite_replaces_the_run_directory_and_reuses_unchanged_shards(tmp_path, caplog, no_encoder):
    """``run --overwrite`` replaces the run's artifacts; the shards, unchanged input and
    options, are verified and reused. ``prepare --overwrite`` is how to rebuild them."""
    import logging

    caplog.set_level(logging.INFO)
    rows = [f"{u},{m},{1 + (u * m) % 5}.0,{u * 10 + m}" for u in range(1, 13) for m in (1, 2, 3) if u < 7 or m < 3]
    data = movielens(tmp_path, "userId,movieId,rating,timestamp\n" + "\n".join(rows) + "\n")  # 6 users left to rank
    argv = ["run", "--data", str(data), "--workdir", str(tmp_path / "w"), "--run-dir", str(tmp_path / "run"), *TINY]
    assert cli.main(argv) == 0
    manifest = tmp_path / "w" / "shards" / "ml" / "manifest.json"
    written, old_best = manifest.stat().st_mtime_ns, (tmp_path / "run" / "best.pt").stat().st_mtime_ns
    caplog.clear()
    assert cli.main([*argv, "--overwrite"]) == 0
    assert (tmp_path / "run" / "best.pt").stat().st_mtime_ns != old_best  # the run was replaced
    assert manifest.stat().st_mtime_ns == written and "reusing shards" in caplog.text
    assert (
        cli.main(
            [
                "prepare",
                "--data",
                str(tmp_path / "ml"),
                "--workdir",
                str(tmp_path / "w"),
                "--no-progress",
                "--overwrite",
            ]
        )
        == 0
    )
    assert manifest.stat().st_mtime_ns != written


def test_given_split_files_with_a_data_folder_holding_only_movies(tmp_path, caplog, no_encoder):
    """``--train-file/--test-file``: ``--data`` then only supplies movies.csv, so a folder
    with nothing else works; a missing rating file is one line."""
    from scalable_rec.shards import GraphShards

    data = tmp_path / "movies-only"
    data.mkdir()
    (data / "movies.csv").write_text(MOVIES)
    (tmp_path / "train.tsv").write_text(
        "".join(f"{u}\t{m}\t{1 + (u + m) % 5}\t{u * 10 + m}\n" for u in range(1, 9) for m in (1, 2, 3))
    )
    (tmp_path / "test.tsv").write_text("1\t2\t4\t99\n2\t3\t3\t99\n")
    argv = [
        "prepare",
        "--data",
        str(data),
        "--workdir",
        str(tmp_path / "w"),
        "--no-progress",
        "--train-file",
        str(tmp_path / "train.tsv"),
        "--test-file",
    ]
    assert cli.main([*argv, str(tmp_path / "test.tsv")]) == 0
    shards = GraphShards(tmp_path / "w" / "shards" / "given-train-test")
    assert sorted(shards.nodes("movie").column("key").to_pylist()) == [1, 2, 3]  # from movies.csv
    fails([*argv, str(tmp_path / "nope.tsv")], caplog, match="Rating file(s) not found")
