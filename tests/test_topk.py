import pyarrow as pa
import pytest
import torch

from scalable_rec.score import RatedIndex, ScoreConfig, to_record_batch, topk_chunks


def _scores(num_users=13, num_movies=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(num_users, num_movies, generator=g)
    return table, (lambda users: table[users])


def test_rated_index_masks_exactly_the_rated_pairs():
    src = torch.tensor([2, 0, 2, 1, 2])
    dst = torch.tensor([5, 1, 0, 3, 5])
    idx = RatedIndex.from_edges(src, dst, num_users=4)
    scores = torch.zeros(3, 6)
    idx.mask_(scores, torch.tensor([2, 3, 0]))
    masked = {(r, c) for r, c in zip(*torch.nonzero(scores == float("-inf"), as_tuple=True))}
    assert {(int(r), int(c)) for r, c in masked} == {(0, 5), (0, 0), (2, 1)}


@pytest.mark.parametrize("memory_mb_users", [1, 5, 13])
def test_topk_excludes_rated_sorted_distinct_and_chunk_invariant(memory_mb_users):
    table, fn = _scores()
    src = torch.randint(0, 13, (100,), generator=torch.Generator().manual_seed(1))
    dst = torch.randint(0, 40, (100,), generator=torch.Generator().manual_seed(2))
    rated = RatedIndex.from_edges(src, dst, 13)
    cfg = ScoreConfig(k=5)
    cfg.chunk_users = lambda num_movies: memory_mb_users  # force several chunk sizes
    users, movies, scores = map(torch.cat, zip(*topk_chunks(fn, 13, 40, cfg, rated)))
    assert users.tolist() == list(range(13))
    rated_pairs = set(zip(src.tolist(), dst.tolist()))
    for u, ms, ss in zip(users.tolist(), movies.tolist(), scores.tolist()):
        assert len(set(ms)) == 5
        assert ss == sorted(ss, reverse=True)
        assert not any((u, m) in rated_pairs for m in ms)
        # nothing unrated scores higher than the 5th recommendation
        unrated = [table[u, m].item() for m in range(40) if (u, m) not in rated_pairs]
        assert sorted(unrated, reverse=True)[:5] == pytest.approx(ss)


def test_chunk_size_follows_memory_budget():
    assert ScoreConfig(score_memory_mb=1).chunk_users(num_movies=1024) == 256
    assert ScoreConfig(score_memory_mb=1).chunk_users(num_movies=10**9) == 1


def test_users_with_fewer_unrated_movies_than_k():
    _, fn = _scores(num_users=2, num_movies=4)
    rated = RatedIndex.from_edges(torch.tensor([0, 0, 0]), torch.tensor([0, 1, 2]), 2)
    chunks = list(topk_chunks(fn, 2, 4, ScoreConfig(k=3), rated))
    batch = to_record_batch(*chunks[0], pa.array(["u0", "u1"]), pa.array(["a", "b", "c", "d"]))
    rows = batch.to_pylist()
    assert [r for r in rows if r["user_key"] == "u0"] == [
        {"user_key": "u0", "movie_key": "d", "score": pytest.approx(rows[0]["score"]), "rank": 1}]
    assert [r["rank"] for r in rows if r["user_key"] == "u1"] == [1, 2, 3]


def test_score_config_validation():
    with pytest.raises(ValueError, match="'k' needs to be positive.*'score_memory_mb'"):
        ScoreConfig(k=0, score_memory_mb=0)
