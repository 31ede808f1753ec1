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
        {"user_key": "u0", "movie_key": "d", "score": pytest.approx(rows[0]["score"]), "rank": 1}
    ]
    assert [r["rank"] for r in rows if r["user_key"] == "u1"] == [1, 2, 3]


def test_score_config_validation():
    with pytest.raises(ValueError, match="'k' needs to be positive.*'score_memory_mb'"):
        ScoreConfig(k=0, score_memory_mb=0)


@pytest.mark.parametrize("users", [[4, 5, 6, 7], [1, 4, 8], [7, 2, 9], [3]])
def test_mask_of_consecutive_and_scattered_users_matches_a_dense_mask(users):
    """Consecutive users take one slice of ``col``; others gather their rows: same mask."""
    g = torch.Generator().manual_seed(3)
    src, dst = torch.randint(0, 10, (60,), generator=g), torch.randint(0, 12, (60,), generator=g)
    rated = RatedIndex.from_edges(src, dst, num_users=10)
    users = torch.tensor(users)
    scores = torch.zeros(users.numel(), 12)
    rated.mask_(scores, users)
    dense = torch.zeros(10, 12, dtype=torch.bool)
    dense[src, dst] = True
    assert torch.equal(scores == float("-inf"), dense[users])


def test_pair_fn_values_come_back_with_their_top_k():
    table, fn = _scores()
    cfg = ScoreConfig(k=3)
    cfg.chunk_users = lambda num_movies: 4
    chunks = list(topk_chunks(fn, 13, 40, cfg, pair_fn=lambda u, top: table[u[:, None], top] * 2))
    assert [c[0].numel() for c in chunks] == [4, 4, 4, 1]
    for _users, _movies, scores, doubled in chunks:
        assert torch.equal(doubled, scores * 2)


def test_device_chunks_follow_free_device_memory(monkeypatch):
    from scalable_rec.model import topk

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (24 << 30, 80 << 30))
    expected = int((24 << 30) * topk.DEVICE_MEMORY_SHARE) // (topk.DEVICE_BYTES_PER_SCORE * 59_000)
    assert topk.device_chunk_users(59_000, torch.device("cuda")) == expected > 16_384  # 16k users: one chunk
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1 << 20, 80 << 30))
    assert topk.device_chunk_users(10**9, torch.device("cuda")) == 1


@pytest.mark.cuda
def test_cuda_scoring_matches_cpu_without_a_sync_per_chunk(monkeypatch):
    """Mask and top-K on the device, results back through pinned memory: the same top-K
    as the CPU's, and no synchronising call while chunks are queued (sync debug mode
    'error'; the per-chunk event wait is the one named sync)."""
    from scalable_rec.model import topk

    table, fn = _scores(num_users=300, num_movies=2000)
    src = torch.randint(0, 300, (5000,), generator=torch.Generator().manual_seed(1))
    dst = torch.randint(0, 2000, (5000,), generator=torch.Generator().manual_seed(2))
    rated = RatedIndex.from_edges(src, dst, 300)
    cpu = [torch.cat(x) for x in zip(*topk_chunks(fn, 300, 2000, ScoreConfig(k=10), rated))]
    gpu_table = table.cuda()
    monkeypatch.setattr(topk, "device_chunk_users", lambda num_movies, device: 64)  # several chunks
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        chunks = list(
            topk_chunks(
                lambda u: gpu_table[u],
                300,
                2000,
                ScoreConfig(k=10),
                rated,
                device="cuda",
                pair_fn=lambda u, top: gpu_table[u[:, None], top],
            )
        )
    finally:
        torch.cuda.set_sync_debug_mode("default")
    users, movies, scores, again = (torch.cat(x) for x in zip(*chunks))
    assert not movies.is_cuda and movies.is_pinned()
    assert torch.equal(users, cpu[0]) and torch.equal(movies, cpu[1]) and torch.equal(scores, cpu[2])
    assert torch.equal(again, scores)
