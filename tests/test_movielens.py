import pyarrow.compute as pc
import pytest

from scalable_rec.errors import MalformedInputError
from scalable_rec.shards import GraphShards
from scalable_rec.source import MovieLensSource, RatingBounds, SkipReport, write_rating_shards

MOVIES = """movieId,title,genres
1,Toy Story (1995),Adventure|Animation|Children|Comedy|Fantasy
2,"American President, The (1995)",Comedy|Drama|Romance
3,Heat (1995),(no genres listed)
"""


def _dataset(tmp_path, ratings_rows):
    d = tmp_path / "ml"
    d.mkdir()
    (d / "movies.csv").write_text(MOVIES)
    (d / "ratings.csv").write_text("userId,movieId,rating,timestamp\n" + "\n".join(ratings_rows) + "\n")
    return d


def test_shared_movielens_full_counts_and_half_stars(movielens_dir, tmp_path):
    report = SkipReport()
    manifest = write_rating_shards(MovieLensSource(str(movielens_dir)), str(tmp_path / "s"), report)
    assert report.counts == {}
    shards = GraphShards(tmp_path / "s")
    edges = shards.edges("user", "rates", "movie")
    assert edges.num_rows == 100_004
    assert shards.num_nodes("user") == 671
    assert shards.num_nodes("movie") == 9_125
    ratings = edges.column("rating")
    # Half stars survive (the article's int() cast turned 4.5 into 4 and 0.5 into 0).
    assert pc.min(ratings).as_py() == 0.5 and pc.max(ratings).as_py() == 5.0
    assert pc.sum(pc.equal(ratings, 4.5)).as_py() > 0
    assert manifest.report["accepted"]["ratings"] == 100_004
    # Original ids are kept as keys: user 1 rated movie 31 with 2.5 (first CSV row).
    users = shards.nodes("user").column("key").to_pylist()
    movies = shards.nodes("movie").column("key").to_pylist()
    first = edges.slice(0, 1).to_pylist()[0]
    assert (users[first["src"]], movies[first["dst"]], first["rating"]) == (1, 31, 2.5)


def test_bad_rows_are_counted_with_examples(tmp_path):
    d = _dataset(
        tmp_path,
        [
            "1,1,4.5,100",
            "1,2,0.5,101",
            "2,1,five,102",  # unparseable rating
            "2,99,3.0,103",  # unknown movie
            "3,1,7.0,104",  # out of range
            "3,2,0.0,105",  # out of range (below 0.5)
            "3,3,3.5,106,extra",  # malformed row (5 columns)
            "x,3,3.5,107",  # unparseable user id
            "4,3,2.0,108",
        ],
    )
    report = SkipReport()
    write_rating_shards(MovieLensSource(str(d)), str(tmp_path / "s"), report)
    assert report.counts == {
        "unparseable_rating": 1,
        "unknown_movie": 1,
        "rating_out_of_range": 2,
        "malformed_row_ratings": 1,
        "unparseable_user_id": 1,
    }
    assert "99" in report.examples["unknown_movie"][0]
    assert "extra" in report.examples["malformed_row_ratings"][0]
    assert "five" in report.examples["unparseable_rating"][0]
    edges = GraphShards(tmp_path / "s").edges("user", "rates", "movie")
    assert sorted(edges.column("rating").to_pylist()) == [0.5, 2.0, 4.5]
    assert "skipped 6 input rows" in report.summary()
    # users with no valid rating are not nodes
    assert GraphShards(tmp_path / "s").nodes("user").column("key").to_pylist() == [1, 4]


def test_strict_mode_raises_on_first_problem(tmp_path):
    d = _dataset(tmp_path, ["1,1,4.5,100", "2,99,3.0,103"])
    with pytest.raises(MalformedInputError, match="unknown_movie.*99"):
        write_rating_shards(MovieLensSource(str(d)), str(tmp_path / "s"), SkipReport(strict=True))
    assert not (tmp_path / "s").exists()


def test_custom_rating_bounds(tmp_path):
    d = _dataset(tmp_path, ["1,1,4.5,100", "1,2,1.0,101"])
    report = SkipReport()
    write_rating_shards(MovieLensSource(str(d)), str(tmp_path / "s"), report, RatingBounds(2.0, 5.0))
    assert report.counts == {"rating_out_of_range": 1}


def test_missing_files_and_wrong_header(tmp_path):
    with pytest.raises(FileNotFoundError, match="ratings.csv"):
        MovieLensSource(str(tmp_path))
    d = _dataset(tmp_path, ["1,1,4.5,100"])
    (d / "ratings.csv").write_text("user,movie,stars,time\n1,1,4.5,100\n")
    with pytest.raises(ValueError, match="expected \\['userId'"):
        write_rating_shards(MovieLensSource(str(d)), str(tmp_path / "s"), SkipReport())


def test_streams_in_blocks(tmp_path):
    rows = [f"{u},{1 + u % 3},{0.5 + (u % 10) / 2},{u}" for u in range(5000)]
    d = _dataset(tmp_path, rows)
    source = MovieLensSource(str(d), block_size=4096)
    batches = list(source.ratings(SkipReport()))
    assert len(batches) > 5  # several blocks, never the whole file at once
    assert sum(b.num_rows for b in batches) == 5000


def test_fingerprint_tracks_content(tmp_path):
    d = _dataset(tmp_path, ["1,1,4.5,100"])
    a = MovieLensSource(str(d)).fingerprint()
    assert a == MovieLensSource(str(d)).fingerprint()
    (d / "ratings.csv").write_text("userId,movieId,rating,timestamp\n1,1,4.0,100\n")
    assert MovieLensSource(str(d)).fingerprint() != a


def test_repeated_pairs_keep_the_latest_rating_and_are_counted(tmp_path):
    # user 1 rates movie 1 three times (the latest, ts 300, is in the middle of the file and
    # lands in another shard than its repeats); user 2 rates movie 2 twice with equal
    # timestamps (the later row wins).
    rows = ["1,1,1.0,100", "1,2,3.0,50", "2,2,2.0,70", "1,1,5.0,300", "3,3,4.0,10", "2,2,4.5,70", "1,1,2.0,200"]
    report = SkipReport()
    manifest = write_rating_shards(
        MovieLensSource(str(_dataset(tmp_path, rows))), str(tmp_path / "s"), report, max_rows_per_shard=2
    )
    edges = GraphShards(tmp_path / "s").edges("user", "rates", "movie")
    users = GraphShards(tmp_path / "s").nodes("user").column("key").to_pylist()
    movies = GraphShards(tmp_path / "s").nodes("movie").column("key").to_pylist()
    got = sorted(
        (users[s], movies[d], r, t)
        for s, d, r, t in zip(*(edges.column(c).to_pylist() for c in ("src", "dst", "rating", "timestamp")))
    )
    assert got == [(1, 1, 5.0, 300), (1, 2, 3.0, 50), (2, 2, 4.5, 70), (3, 3, 4.0, 10)]
    assert report.counts == {"duplicate_rating": 3}
    assert manifest.report["accepted"]["ratings"] == 4
    assert manifest.report["skipped"] == {"duplicate_rating": 3}
