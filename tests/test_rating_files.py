"""A given train/test split: tab/comma files without header, MovieLens CSV with header."""

import json

import numpy as np
import pytest

from scalable_rec.cli import main
from scalable_rec.graph import RatingGraph, SplitConfig, split_edges
from scalable_rec.shards import GraphShards
from scalable_rec.source import SkipReport, write_rating_shards
from scalable_rec.source.rating_files import RatingFilesSource, sniff


def _pair(tmp_path, n_users=30, n_items=20, seed=0):
    """Tab-separated training file (no timestamp), comma-separated test file (with)."""
    rng = np.random.default_rng(seed)
    pairs = [(u, i) for u in range(1, n_users + 1) for i in range(1, n_items + 1) if rng.random() < 0.4]
    rng.shuffle(pairs)
    test, train = pairs[:60], pairs[60:]
    (tmp_path / "u.base").write_text("".join(f"{u}\t{i}\t{1 + (u * i) % 5}\n" for u, i in train))
    (tmp_path / "u.test").write_text(
        "".join(f"{u},{i},{1 + (u * i) % 5},{1000 + k}\n" for k, (u, i) in enumerate(test))
    )
    return tmp_path / "u.base", tmp_path / "u.test", train, test


def test_sniff_formats(tmp_path):
    (tmp_path / "a").write_text("1\t2\t3.5\n")
    (tmp_path / "b").write_text("userId,movieId,rating,timestamp\n1,2,3.5,9\n")
    (tmp_path / "c").write_text("1 2\n")
    assert sniff(tmp_path / "a") == ("\t", False, 3)
    assert sniff(tmp_path / "b") == (",", True, 4)
    with pytest.raises(ValueError, match="needs 3 or 4 tab- or comma-separated columns"):
        sniff(tmp_path / "c")


def test_given_split_is_kept_exactly_and_validation_is_carved_from_train(tmp_path):
    train_f, test_f, train, test = _pair(tmp_path)
    with open(test_f, "a") as f:
        f.write("7,oops,4,1\n")  # an unparseable row is counted, not lost silently
    report = SkipReport()
    write_rating_shards(RatingFilesSource(str(train_f), str(test_f)), str(tmp_path / "s"), report)
    assert report.counts == {"unparseable_rating_row": 1}
    shards = GraphShards(tmp_path / "s")
    g = RatingGraph.from_shards(shards)
    users = shards.nodes("user").column("key").to_pylist()
    movies = shards.nodes("movie").column("key").to_pylist()

    def pairs(ids):
        return {(users[s], movies[d]) for s, d in zip(g.src[ids].tolist(), g.dst[ids].tolist())}

    split = split_edges(g, SplitConfig(val_ratio=0.2, split_seed=1))
    assert pairs(split.test) == set(test)
    assert pairs(split.train) | pairs(split.val) == set(train)
    assert split.val.numel() == round(0.2 * len(train))
    other = split_edges(g, SplitConfig(val_ratio=0.2, split_seed=2))
    assert pairs(other.test) == set(test) and pairs(other.val) != pairs(split.val)  # seeded carve-out
    assert g.movie_x.shape == (len(movies), 1)


def test_cli_run_on_a_given_split_with_movielens_header_files(tmp_path):
    train_f, test_f, train, test = _pair(tmp_path)
    header = "userId,movieId,rating,timestamp\n"
    (tmp_path / "train.csv").write_text(
        header + "".join(f"{u},{i},{1 + (u * i) % 5},{k}\n" for k, (u, i) in enumerate(train))
    )
    (tmp_path / "test.csv").write_text(header + test_f.read_text())
    run_dir = tmp_path / "run"
    files = [
        "--train-file",
        str(tmp_path / "train.csv"),
        "--test-file",
        str(tmp_path / "test.csv"),
        "--workdir",
        str(tmp_path),
    ]
    assert main(["prepare", *files]) == 0
    rc = main(
        [
            "train",
            "--train-file",
            str(tmp_path / "train.csv"),
            "--test-file",
            str(tmp_path / "test.csv"),
            "--workdir",
            str(tmp_path),
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
    assert rc == 0
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["test"]["test_edges"] == len(test)


def test_train_and_test_file_go_together():
    from scalable_rec.config import DataConfig

    with pytest.raises(ValueError, match="'train_file' and 'test_file' go together"):
        DataConfig(train_file="a.tsv")


def test_a_missing_rating_file_is_named(tmp_path):
    """The source and the command line's early check (``source.config.missing_input``) give
    the same refusal."""
    from scalable_rec.source.config import missing_input

    train_f = tmp_path / "u1.base"
    train_f.write_text("1\t1\t5\t0\n")
    with pytest.raises(FileNotFoundError, match=r"Rating file\(s\) not found: \['.*u1.test'\]"):
        RatingFilesSource(str(train_f), str(tmp_path / "u1.test"))
    assert missing_input(None, str(train_f), str(tmp_path / "u1.test")) == (
        f"'train_file'/'test_file': Rating file(s) not found: ['{tmp_path / 'u1.test'}']"
    )
    assert missing_input(None, str(train_f), str(train_f)) is None
