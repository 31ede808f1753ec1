"""Reading new ratings for a refresh: CSV (quoted or not), MovieLens folder, shard directory."""

from __future__ import annotations

import pytest

from scalable_rec.errors import ConfigError
from scalable_rec.shards import KeyIndex
from scalable_rec.source.new_ratings import fingerprint, read_new_ratings
from scalable_rec.source.report import SkipReport


def _maps():
    return KeyIndex([10, 11, 12]), KeyIndex([100, 101])


@pytest.mark.parametrize("header", ["userId,movieId,rating,timestamp", '"userId","movieId","rating","timestamp"'])
def test_csv_rows_are_mapped_new_users_appended_bad_rows_counted(tmp_path, header):
    path = tmp_path / "ratings.csv"
    path.write_text(header + "\n11,100,4.0,1\n99,101,3.5,2\n99,100,5,3\n12,555,4,4\n12,100,7,5\nx,100,4,6\n")
    users, movies = _maps()
    report = SkipReport()
    new = read_new_ratings(path, users, movies, report)
    assert new.src.tolist() == [1, 3, 3] and new.dst.tolist() == [0, 1, 0]
    assert new.rating.tolist() == [4.0, 3.5, 5.0] and users.keys[3:] == [99]
    assert report.counts == {"unknown_movie": 1, "rating_out_of_range": 1, "unparseable_user_id": 1}
    # a folder holding ratings.csv reads the same, with the same fingerprint
    assert read_new_ratings(tmp_path, *_maps(), SkipReport()).fingerprint == new.fingerprint == fingerprint(path)


def test_shard_directory_input(tiny_shards):
    users = KeyIndex(tiny_shards.nodes("user").column("key").to_pylist()[:10])  # the rest are "new"
    movies = KeyIndex(tiny_shards.nodes("movie").column("key").to_pylist())
    new = read_new_ratings(tiny_shards.directory, users, movies, SkipReport())
    assert new.src.size == tiny_shards.manifest.edge_types["user__rates__movie"].num_rows
    assert len(users) == tiny_shards.num_nodes("user")
    assert fingerprint(tiny_shards.directory) == new.fingerprint


def test_fingerprint_follows_content(tmp_path):
    a = tmp_path / "a.csv"
    a.write_text("userId,movieId,rating,timestamp\n1,2,3,4\n")
    before = fingerprint(a)
    a.write_text("userId,movieId,rating,timestamp\n1,2,3,5\n")
    assert fingerprint(a) != before


def test_bad_inputs_name_the_problem(tmp_path):
    with pytest.raises(ConfigError, match="needs an existing file"):
        read_new_ratings(tmp_path / "nope.csv", *_maps(), SkipReport())
    with pytest.raises(ConfigError, match="neither ratings.csv nor manifest.json"):
        read_new_ratings(tmp_path, *_maps(), SkipReport())
    bad = tmp_path / "bad.csv"
    bad.write_text("user,movie\n1,2\n")
    with pytest.raises(ConfigError, match="missing \\['userId', 'movieId', 'rating', 'timestamp'\\]"):
        read_new_ratings(bad, *_maps(), SkipReport())
