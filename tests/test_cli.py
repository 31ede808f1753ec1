import json

import pyarrow.parquet as pq
import torch

from scalable_rec.cli import build_parser, main
from scalable_rec.config import RunConfig, field_docs
from scalable_rec.train import TrainConfig


def test_every_flag_has_help_from_its_docstring():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name in ("run", "train", "prepare", "score"):
        for action in sub.choices[name]._actions:
            if action.option_strings and action.dest not in ("help",):
                assert action.help, f"{name} {action.option_strings} has no help"
    assert "half-star" in field_docs(TrainConfig)["loss"]


def test_invalid_options_are_reported_together(caplog):
    rc = main(["train", "--shards", "/nowhere", "--epochs", "0", "--dropout", "2"])
    assert rc == 2
    err = caplog.text
    assert "'epochs' needs to be positive" in err and "'dropout' needs to be in [0, 1)" in err


def test_synth_train_score_through_the_cli(tmp_path, capsys):
    shards = tmp_path / "shards"
    assert main(["synth", "--preset", "tiny", "--out", str(shards)]) == 0
    run_dir = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--shards",
                str(shards),
                "--run-dir",
                str(run_dir),
                "--epochs",
                "1",
                "--batch-size",
                "64",
                "--hidden",
                "8",
                "--no-progress",
            ]
        )
        == 0
    )
    saved = RunConfig.load(run_dir / "config.json")
    assert saved.model.hidden == 8 and saved.train.batch_size == 64
    assert main(["score", "--run-dir", str(run_dir), "--k", "3"]) == 0
    table = pq.read_table(run_dir / "recommendations.parquet")
    # rated movies are excluded: a user who rated all but n < 3 of the 50 movies gets n
    from scalable_rec.graph import RatingGraph
    from scalable_rec.shards import GraphShards

    rated = RatingGraph.from_shards(GraphShards(shards)).src.bincount(minlength=50)
    assert table.num_rows == int((50 - rated).clamp(max=3).sum())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert "rmse" in metrics["test"]


def test_missing_shards_is_a_clear_error(tmp_path, caplog):
    assert main(["train", "--workdir", str(tmp_path), "--data", str(tmp_path / "ml")]) == 2
    assert "run 'scalable-rec prepare' first" in caplog.text


def test_every_command_formats_its_help():
    # argparse %-formats help strings: a bare '%' in a config docstring breaks `--help`.
    import argparse

    def walk(parser, path):
        parser.format_help()
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, f"{path} {name}")

    walk(build_parser(), "scalable-rec")


def test_aggr_max_on_cuda_without_its_kernels_is_one_line_before_any_work(tmp_path, caplog, monkeypatch):
    """As on a GPU machine whose torch-scatter is CPU-only: exit 2, one line, nothing read."""
    import scalable_rec.cli as cli_mod
    from scalable_rec.model import recommender as model_mod
    from scalable_rec.train import config as train_config

    monkeypatch.setattr(cli_mod, "cuda_cannot_exist", lambda: False)  # a driver is there
    monkeypatch.setattr(train_config, "resolve_device", lambda cfg, env: torch.device("cuda"))
    monkeypatch.setattr(model_mod, "torch_sparse_runs_on", lambda device: False)
    monkeypatch.setattr(model_mod, "torch_scatter_runs_on", lambda device: False)
    rc = main(
        [
            "train",
            "--shards",
            str(tmp_path / "nowhere"),
            "--run-dir",
            str(tmp_path / "run"),
            "--device",
            "cuda",
            "--aggr",
            "max",
        ]
    )
    assert rc == 2
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "'aggr' max on CUDA" in errors[0].getMessage() and not errors[0].exc_info
    assert not (tmp_path / "run").exists()
