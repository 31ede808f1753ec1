"""Base + delta state files: changed rows only, atomic, stale deltas ignored."""

from __future__ import annotations

import pytest
import torch

from scalable_rec.score import state_store

BIG = ("layers", "cand")


def _obj(n=1000):
    g = torch.Generator().manual_seed(0)
    return {
        "k": 3,
        "folded": ["a"],
        "layers": [{"user": torch.randn(n, 8, generator=g)}],
        "cand": torch.arange(n * 4).view(n, 4),
    }


def _equal(a, b):
    assert a["k"] == b["k"] and a["folded"] == b["folded"]
    assert torch.equal(a["layers"][0]["user"], b["layers"][0]["user"]) and torch.equal(a["cand"], b["cand"])


def _saved(path):
    state_store.save(path, _obj(), BIG, None, None)
    return state_store.load(path, BIG)


def test_save_with_dirty_rows_writes_a_small_cumulative_delta_and_leaves_the_base(tmp_path):
    path = tmp_path / "state.pt"
    obj, base = _saved(path)
    base_bytes = path.read_bytes()
    obj["layers"][0]["user"][[3, 7]] += 1
    obj["cand"] = torch.cat([obj["cand"], torch.full((2, 4), -1)])  # appended rows (new users)
    obj["folded"] = ["a", "b"]
    state_store.save(path, obj, BIG, base, {"layers/0/user": torch.tensor([7, 3])})
    assert path.read_bytes() == base_bytes
    delta = torch.load(state_store.delta_path(path), weights_only=True)
    assert delta["rows"]["layers/0/user"]["rows"].tolist() == [3, 7]
    assert delta["rows"]["cand"]["rows"].tolist() == [1000, 1001]
    assert state_store.delta_path(path).stat().st_size < path.stat().st_size / 10
    again, base = state_store.load(path, BIG)
    _equal(again, obj)
    again["layers"][0]["user"][9] = 0  # a second delta still carries the first one's rows
    state_store.save(path, again, BIG, base, {"layers/0/user": torch.tensor([9])})
    assert path.read_bytes() == base_bytes
    _equal(state_store.load(path, BIG)[0], again)


def test_unknown_or_large_changes_write_a_new_base(tmp_path):
    path = tmp_path / "state.pt"
    obj, base = _saved(path)
    obj["layers"][0]["user"][1] += 1
    state_store.save(path, obj, BIG, base, {"layers/0/user": torch.tensor([1])})
    assert state_store.delta_path(path).is_file()
    obj, base = state_store.load(path, BIG)
    obj["layers"][0]["user"] += 1  # every row
    new = state_store.save(path, obj, BIG, base, {"layers/0/user": torch.arange(1000)})
    assert new.base_id != base.base_id and not state_store.delta_path(path).exists()
    _equal(state_store.load(path, BIG)[0], obj)
    obj["cand"][0] = 5
    state_store.save(path, obj, BIG, new, None)  # changes not known: full save
    assert not state_store.delta_path(path).exists()
    _equal(state_store.load(path, BIG)[0], obj)


def test_delta_of_an_older_base_is_ignored(tmp_path):
    """A crash after a new base was renamed but before the old delta was removed."""
    path = tmp_path / "state.pt"
    obj, base = _saved(path)
    obj["cand"][0] = 7
    state_store.save(path, obj, BIG, base, {"cand": torch.tensor([0])})
    stale = state_store.delta_path(path).read_bytes()
    fresh = _obj()
    fresh["k"] = 5
    state_store.save(path, fresh, BIG, None, None)
    state_store.delta_path(path).write_bytes(stale)
    _equal(state_store.load(path, BIG)[0], fresh)


def test_failed_delta_write_keeps_the_previous_state(tmp_path):
    path = tmp_path / "state.pt"
    obj, base = _saved(path)
    obj["cand"][5] = 1
    base = state_store.save(path, obj, BIG, base, {"cand": torch.tensor([5])})
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    broken, _ = state_store.load(path, BIG)
    broken["cand"][6] = 2
    broken["folded"] = [lambda: None]  # cannot be serialised: the write fails midway
    with pytest.raises(Exception):  # noqa: B017 - whatever pickle raises, nothing may be left half-written
        state_store.save(path, broken, BIG, base, {"cand": torch.tensor([6])})
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    _equal(state_store.load(path, BIG)[0], obj)
