"""experiments/eval_cold_movies.py: the held-out movies leave no rating behind, the content
baseline ranks by profile similarity, and the catalog mix counts cold slots."""

import importlib.util
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "eval_cold_movies.py"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("eval_cold_movies_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_hold_out_removes_every_rating_of_the_cold_movies_and_keeps_the_catalog(script, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    rows = [(u, m, 4.0, 100 + u) for u in range(1, 21) for m in range(1, 31) if (u * m) % 3]
    pacsv.write_csv(
        pa.table(
            {
                "userId": [r[0] for r in rows],
                "movieId": [r[1] for r in rows],
                "rating": [r[2] for r in rows],
                "timestamp": [r[3] for r in rows],
            }
        ),
        src / "ratings.csv",
    )
    (src / "movies.csv").write_text("movieId,title,genres\n" + "".join(f"{m},T{m},Drama\n" for m in range(1, 32)))
    held, cold = script.hold_out_movies(src, tmp_path / "out", 0.2, seed=0)
    again_held, again = script.hold_out_movies(src, tmp_path / "again", 0.2, seed=0)
    assert cold.tolist() == again.tolist() and len(cold) == 4  # seeded; 20% of the 20 rated movies
    kept = pacsv.read_csv(tmp_path / "out" / "ratings.csv")
    assert not set(kept.column("movieId").to_pylist()) & set(cold.tolist())
    assert set(held.column("movieId").to_pylist()) == set(cold.tolist())
    assert kept.num_rows + held.num_rows == len(rows)
    assert (tmp_path / "out" / "movies.csv").read_text() == (src / "movies.csv").read_text()


def test_content_baseline_prefers_the_movie_closest_to_the_liked_ones(script):
    import dataclasses

    from scalable_rec.graph import RatingGraph

    vectors = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.9, 0.1], [0.1, 0.9]])
    g = RatingGraph(
        user_keys=pa.array([10, 11]),
        movie_keys=pa.array([1, 2, 3, 4]),
        movie_x=vectors,
        src=torch.tensor([0, 0, 1]),
        dst=torch.tensor([0, 1, 1]),
        rating=torch.tensor([5.0, 1.0, 4.5]),
        timestamp=torch.zeros(3, dtype=torch.long),
    )
    score = script.content_score_fn(g, vectors, torch.tensor([2, 3]), 4.0)(torch.tensor([0, 1]))
    assert score[0, 0] > score[0, 1] and score[1, 1] > score[1, 0]  # user 0 liked movie 0 only
    # a user without a liked movie falls back to all of their movies
    low = dataclasses.replace(g, rating=torch.tensor([1.0, 1.0, 1.0]))
    assert torch.isfinite(script.content_score_fn(low, vectors, torch.tensor([2, 3]), 4.0)(torch.arange(2))).all()


def test_catalog_mix_counts_cold_slots_and_users(script):
    recs = pa.table({"user_key": [1, 1, 2, 2, 3, 3], "movie_key": [7, 8, 7, 9, 8, 8], "rank": [1, 2, 1, 2, 1, 2]})
    mix = script.catalog_mix(recs, {7}, num_movies=10, k=2)
    assert mix["users_with_a_cold_movie_in_top_k"] == 2 and mix["cold_share_of_slots"] == pytest.approx(2 / 6)
    assert mix["cold_share_of_catalog"] == 0.1 and mix["distinct_cold_movies_recommended"] == 1
    assert script.catalog_mix(recs, {7}, num_movies=10, k=1)["cold_share_of_slots"] == pytest.approx(2 / 3)


def test_best_cold_rank_counts_the_unrated_movies_scored_above_the_best_cold_one(script):
    from scalable_rec.model.topk import RatedIndex

    scores = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0, 5.0]])
    rated = RatedIndex.from_edges(torch.tensor([0]), torch.tensor([0]), 2)  # user 0 rated movie 0
    ranks = script.best_cold_rank(
        lambda u: scores[u].clone(), torch.tensor([0, 1]), torch.tensor([2, 3]), rated, chunk=1
    )
    assert ranks.tolist() == [2, 2]  # user 0: movie 1 above cold 2 (rated 0 masked); user 1: movie 4 above 3
