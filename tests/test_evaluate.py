import math

import torch

from scalable_rec.score import RatedIndex, popularity_score_fn, ranking_metrics, rating_errors


def test_rating_errors_clamp_to_range():
    out = rating_errors(torch.tensor([6.0, 0.0, 3.0]), torch.tensor([5.0, 0.5, 4.0]))
    assert math.isclose(out["rmse"], math.sqrt(1 / 3), rel_tol=1e-6)
    assert math.isclose(out["mae"], 1 / 3, rel_tol=1e-6)


def test_ranking_metrics_perfect_and_useless_scorers():
    num_users, num_movies = 4, 20
    test_src = torch.tensor([0, 1, 1, 3])
    test_dst = torch.tensor([7, 2, 9, 15])
    relevant = torch.zeros(num_users, num_movies)
    relevant[test_src, test_dst] = 1
    seen = RatedIndex.from_edges(torch.tensor([0, 2]), torch.tensor([1, 3]), num_users)
    perfect = ranking_metrics(lambda u: relevant[u].clone(), num_users, num_movies, seen, test_src, test_dst, k=5)
    assert perfect["recall@5"] == 1.0 and math.isclose(perfect["ndcg@5"], 1.0, rel_tol=1e-6)
    assert perfect["eval_users"] == 3
    useless = ranking_metrics(lambda u: -relevant[u], num_users, num_movies, seen, test_src, test_dst, k=5)
    assert useless["recall@5"] == 0.0 and useless["ndcg@5"] == 0.0


def test_popularity_baseline_ranks_by_training_count():
    fn = popularity_score_fn(torch.tensor([3, 3, 3, 1, 1, 0]), num_movies=5)
    scores = fn(torch.tensor([0, 4]))
    assert scores.shape == (2, 5)
    assert scores[0].argsort(descending=True)[:3].tolist() == [3, 1, 0]
