"""Fresh recommendations without retraining: fold new ratings into the message-passing
graph and re-score only what they can change.

What "users whose recommendations can change" means, for a ``k``-layer encoder and a
dot-product ranking (``⟨r_u, r_m⟩``): user ``u``'s score for movie ``m`` changes iff
``u``'s or ``m``'s final embedding changes. New edges change the final embeddings of
``D_L`` (see ``scalable_rec.score.incremental``): users ``U_c`` and movies ``M_c``. So

- users in ``U_c`` (new users included) are re-encoded and re-scored against every
  movie (rated movies masked, including the new ratings);
- every other user's score vector changes only in the ``M_c`` columns. Each user keeps
  ``width = k + margin`` candidates with exact scores and a *floor*, an upper bound on
  the score of every movie outside the list. Their ``M_c`` columns are re-scored
  (``users × |M_c|``, one matmul) and merged into the list; anything that falls off
  raises the floor. The top ``k`` is provably exact while the ``k``-th candidate beats
  the floor; otherwise (too many candidates fell away) the user is re-scored in full.

``exact`` mode does exactly that, so its top-``k`` equals a full re-score of the
updated graph for every user (tests/test_refresh.py checks it). ``bounded`` mode
re-encodes only the endpoints of the new edges (users who rated, movies they rated),
updating their cached mean aggregates with the new messages alone, and re-scores only
the users who rated: cost independent of how popular the rated movies are, at the
price of drift in the lists of users it does not touch (measured by
benchmarks/bench_refresh.py). The state is then
marked inexact, and the next ``exact`` refresh re-encodes and re-scores everything.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor

from scalable_rec.atomic import sha256_file, write_json_atomic
from scalable_rec.errors import ConfigError
from scalable_rec.graph.hetero import MOVIE, USER, RatingGraph
from scalable_rec.model.config import ModelConfig
from scalable_rec.model.recommender import Recommender
from scalable_rec.model.topk import RatedIndex, to_record_batch
from scalable_rec.refresh_config import RefreshConfig  # re-export
from scalable_rec.score import state_store
from scalable_rec.score.incremental import (
    USER_RATING_SUM,
    EdgeList,
    Encoded,
    affected_sets,
    bounded_update,
    encode_layers,
    recompute,
)
from scalable_rec.shards import KeyIndex
from scalable_rec.sink.parquet import replace_user_rows, write_parquet
from scalable_rec.source.base import RatingBounds
from scalable_rec.source.new_ratings import fingerprint as new_ratings_fingerprint
from scalable_rec.source.new_ratings import read_new_ratings
from scalable_rec.source.report import SkipReport

log = logging.getLogger(__name__)

STATE_VERSION = 1
BIG_FIELDS = ("layers", "aggs", "degree", "cand_idx", "cand_score", "floor")
"""State tables saved row-wise (changed rows only) by ``state_store``."""


@dataclass
class RefreshState:
    """What a refresh continues from; stored in ``<run_dir>/refresh/state.pt``."""

    k: int
    width: int
    exact: bool
    model_sha: str
    new_user_keys: list
    extra: dict[str, Tensor]
    layers: list[dict[str, Tensor]]
    aggs: list[dict[str, Tensor]]
    degree: dict[str, Tensor]
    cand_idx: Tensor
    cand_score: Tensor
    floor: Tensor
    folded: list[dict[str, Any]] = field(default_factory=list)
    store_base: state_store.Base | None = field(default=None, repr=False)
    """Where the state file on disk stands (``state_store``), when loaded from one."""
    dirty: dict[str, Tensor] | None = field(default=None, repr=False)
    """Rows of the ``BIG_FIELDS`` tables changed since the load (None: unknown, save all)."""

    def save(self, path: Path) -> None:
        fields = {k: v for k, v in self.__dict__.items() if k not in ("store_base", "dirty")}
        self.store_base = state_store.save(
            path, {"version": STATE_VERSION, **fields}, BIG_FIELDS, self.store_base, self.dirty
        )
        self.dirty = None

    @classmethod
    def load(cls, path: Path) -> RefreshState | None:
        loaded = state_store.load(path, BIG_FIELDS)
        if loaded is None:
            return None
        obj, base = loaded
        if obj.pop("version", None) != STATE_VERSION:
            return None
        return cls(**obj, store_base=base)


def empty_extra() -> dict[str, Tensor]:
    return {
        "src": torch.empty(0, dtype=torch.long),
        "dst": torch.empty(0, dtype=torch.long),
        "rating": torch.empty(0),
        "timestamp": torch.empty(0, dtype=torch.long),
    }


def edge_list(graph: RatingGraph, extra: dict[str, Tensor], num_new_users: int) -> EdgeList:
    return EdgeList(
        base_src=graph.src,
        base_dst=graph.dst,
        num_users=graph.num_users + num_new_users,
        num_movies=graph.num_movies,
        extra_src=extra["src"],
        extra_dst=extra["dst"],
        base_rating=graph.rating,
        extra_rating=extra["rating"],
    )


def _rated_subset(edges: EdgeList, users: Tensor) -> RatedIndex:
    """Movies rated by ``users`` (distinct), indexed by position in ``users``.

    Edges sorted by user (shards written from a user-sorted source are) are sliced by
    binary search when ``users`` are few, instead of scanning every edge."""
    local = torch.full((edges.num_users,), -1, dtype=torch.long)
    local[users] = torch.arange(users.numel())
    src, dst = [], []
    for part_src, part_dst in edges.parts():
        if users.numel() * 64 < part_src.numel() and bool((part_src[1:] >= part_src[:-1]).all()):
            lo = torch.searchsorted(part_src, users)
            counts = torch.searchsorted(part_src, users, right=True) - lo
            starts = torch.repeat_interleave(lo - (torch.cumsum(counts, 0) - counts), counts)
            src.append(torch.repeat_interleave(torch.arange(users.numel()), counts))
            dst.append(part_dst[starts + torch.arange(int(counts.sum()))])
            continue
        keep = local[part_src] >= 0
        src.append(local[part_src[keep]])
        dst.append(part_dst[keep])
    return RatedIndex.from_edges(torch.cat(src), torch.cat(dst), users.numel())


def _chunk(budget_mb: int, columns: int) -> int:
    return max(1, (budget_mb << 20) // (4 * max(1, columns)))


@torch.no_grad()
def score_rows(
    model: Recommender, z: dict[str, Tensor], edges: EdgeList, users: Tensor, width: int, memory_mb: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Full-row scoring of ``users``: top ``width`` candidates (rated movies masked) and the
    floor (the next score, an upper bound on everything outside the list)."""
    rated = _rated_subset(edges, users)
    movies = torch.arange(edges.num_movies)
    n = min(width + 1, edges.num_movies)
    idx = torch.empty(users.numel(), width, dtype=torch.long)
    score = torch.full((users.numel(), width), float("-inf"))
    floor = torch.full((users.numel(),), float("-inf"))
    step = _chunk(memory_mb, edges.num_movies)
    for i in range(0, users.numel(), step):
        local = torch.arange(i, min(i + step, users.numel()))
        s = model.rank_block(z, users[local], movies).float()
        rated.mask_(s, local)
        top = torch.topk(s, n, dim=1, sorted=True)
        w = min(width, n)
        idx[local, :w], score[local, :w] = top.indices[:, :w], top.values[:, :w]
        idx[local, w:] = top.indices[:, :1]  # padding (score -inf) when the catalog is tiny
        if n > width:
            floor[local] = top.values[:, width]
    return idx, score, floor


@torch.no_grad()
def merge_columns(
    model: Recommender,
    z: dict[str, Tensor],
    edges: EdgeList,
    state: RefreshState,
    users: Tensor,
    movies: Tensor,
    memory_mb: int,
) -> Tensor:
    """Re-scores the changed ``movies`` columns for ``users`` (whose own embedding did not
    change) and merges them into their candidate lists in ``state``. Returns the users
    whose top ``k`` is no longer provably exact (to be re-scored in full)."""
    changed = torch.zeros(edges.num_movies, dtype=torch.bool)
    changed[movies] = True
    col = torch.full((edges.num_movies,), -1, dtype=torch.long)
    col[movies] = torch.arange(movies.numel())
    local = torch.full((edges.num_users,), -1, dtype=torch.long)
    local[users] = torch.arange(users.numel())
    keep = (local[edges.src] >= 0) & changed[edges.dst]  # earlier ratings of a changed movie stay masked
    rated = RatedIndex.from_edges(local[edges.src[keep]], col[edges.dst[keep]], users.numel())
    width, k = state.width, state.k
    fallback = []
    step = _chunk(memory_mb, movies.numel() + width)
    for i in range(0, users.numel(), step):
        pos = torch.arange(i, min(i + step, users.numel()))
        u = users[pos]
        s = model.rank_block(z, u, movies).float()
        rated.mask_(s, pos)
        old_idx, old_score = state.cand_idx[u], state.cand_score[u].clone()
        old_score[changed[old_idx]] = float("-inf")  # stale: re-scored in s
        cat_score = torch.cat([old_score, s], 1)
        cat_idx = torch.cat([old_idx, movies.expand(u.numel(), -1)], 1)
        top = torch.topk(cat_score, width + 1, dim=1, sorted=True)
        state.cand_idx[u] = torch.gather(cat_idx, 1, top.indices[:, :width])
        state.cand_score[u] = top.values[:, :width]
        state.floor[u] = torch.maximum(state.floor[u], top.values[:, width])
        fallback.append(u[~(state.cand_score[u][:, k - 1] > state.floor[u])])
    return torch.cat(fallback) if fallback else torch.empty(0, dtype=torch.long)


def initial_state(
    model: Recommender,
    graph: RatingGraph,
    k: int,
    margin: int,
    memory_mb: int,
    model_sha: str,
    extra: dict[str, Tensor] | None = None,
    new_user_keys: list | None = None,
    folded: list | None = None,
) -> RefreshState:
    """Encodes the whole graph (trained edges plus ``extra``), keeps every layer, and scores
    every user: the full re-score that incremental refreshes must equal."""
    extra = extra if extra is not None else empty_extra()
    new_user_keys = new_user_keys or []
    edges = edge_list(graph, extra, len(new_user_keys))
    enc = encode_layers(model, edges, graph.movie_x)
    idx, score, floor = score_rows(model, enc.layers[-1], edges, torch.arange(edges.num_users), k + margin, memory_mb)
    return RefreshState(
        k=k,
        width=k + margin,
        exact=True,
        model_sha=model_sha,
        new_user_keys=new_user_keys,
        extra=extra,
        layers=enc.layers,
        aggs=enc.aggs,
        degree=enc.degree,
        cand_idx=idx,
        cand_score=score,
        floor=floor,
        folded=folded or [],
    )


@dataclass
class RefreshOutcome:
    """Which users' lists were recomputed and what it cost."""

    replaced_users: Tensor
    stats: dict[str, Any]


@torch.no_grad()
def apply_edges(
    model: Recommender,
    graph: RatingGraph,
    state: RefreshState,
    src: Tensor,
    dst: Tensor,
    rating: Tensor,
    timestamp: Tensor,
    new_user_keys: list,
    mode: str,
    memory_mb: int,
) -> RefreshOutcome:
    """Folds new edges (node indices; users past the known ones are new) into ``state``
    and re-scores what ``mode`` asks for. Returns the users whose top ``k`` changed."""
    t0 = time.perf_counter()
    old_users = graph.num_users + len(state.new_user_keys)
    k = state.k
    state.extra = {
        "src": torch.cat([state.extra["src"], src]),
        "dst": torch.cat([state.extra["dst"], dst]),
        "rating": torch.cat([state.extra["rating"], rating]),
        "timestamp": torch.cat([state.extra["timestamp"], timestamp]),
    }
    state.new_user_keys = state.new_user_keys + list(new_user_keys)
    edges = edge_list(graph, state.extra, len(state.new_user_keys))
    old_top = (state.cand_idx[:, :k].clone(), state.cand_score[:, :k].clone())
    grow = edges.num_users - old_users
    if grow:
        state.cand_idx = torch.cat([state.cand_idx, torch.zeros(grow, state.width, dtype=torch.long)])
        state.cand_score = torch.cat([state.cand_score, torch.full((grow, state.width), float("-inf"))])
        state.floor = torch.cat([state.floor, torch.full((grow,), float("-inf"))])
    endpoints = {USER: torch.unique(src), MOVIE: torch.unique(dst)}
    stats: dict[str, Any] = {"mode": mode, "new_edges": int(src.numel()), "new_users": grow}
    if mode == "exact" and not state.exact:
        # An earlier bounded refresh left stale states: only a full pass is exact again.
        fresh = initial_state(
            model, graph, k, state.width - k, memory_mb, state.model_sha, state.extra, state.new_user_keys, state.folded
        )
        state.__dict__.update(fresh.__dict__)
        stats.update(full_rescore=True, rescored_users=edges.num_users)
    else:
        cached = Encoded(state.layers, state.aggs, state.degree)
        if mode == "exact":
            sets = affected_sets(edges, endpoints, len(state.layers))
            enc = recompute(model, edges, graph.movie_x, cached, sets)
        else:
            sets = [endpoints]
            enc = bounded_update(model, edges, graph.movie_x, cached, src, dst, rating)
        state.layers, state.aggs, state.degree = enc.layers, enc.aggs, enc.degree
        z = state.layers[-1]
        changed_users, changed_movies = sets[-1][USER], sets[-1][MOVIE]
        if mode == "bounded":
            rescore, merged, fallback = endpoints[USER], 0, 0
            state.exact = False
            state.dirty = bounded_dirty_rows(state, endpoints, rescore)
        elif changed_movies.numel() * 2 >= edges.num_movies:
            # Merging that many columns costs about as much as scoring whole rows.
            rescore, merged, fallback = torch.arange(edges.num_users), 0, 0
        else:
            rescore = changed_users
            others = torch.ones(edges.num_users, dtype=torch.bool)
            others[changed_users] = False
            others = torch.nonzero(others).flatten()
            fb = (
                merge_columns(model, z, edges, state, others, changed_movies, memory_mb)
                if changed_movies.numel() and others.numel()
                else torch.empty(0, dtype=torch.long)
            )
            merged, fallback = int(others.numel()), int(fb.numel())
            rescore = torch.unique(torch.cat([rescore, fb]))
        idx, score, floor = score_rows(model, z, edges, rescore, state.width, memory_mb)
        state.cand_idx[rescore], state.cand_score[rescore], state.floor[rescore] = idx, score, floor
        stats.update(
            full_rescore=False,
            reencoded_users=int(changed_users.numel()),
            reencoded_movies=int(changed_movies.numel()),
            rescored_users=int(rescore.numel()),
            column_merged_users=merged,
            fallback_users=fallback,
        )
    n_old = old_top[0].size(0)
    same = (state.cand_idx[:n_old, :k] == old_top[0]).all(1) & (state.cand_score[:n_old, :k] == old_top[1]).all(1)
    replaced = torch.cat([torch.nonzero(~same).flatten(), torch.arange(n_old, edges.num_users)])
    stats.update(replaced_users=int(replaced.numel()), seconds=time.perf_counter() - t0)
    return RefreshOutcome(replaced_users=replaced, stats=stats)


def bounded_dirty_rows(state: RefreshState, endpoints: dict[str, Tensor], rescored: Tensor) -> dict[str, Tensor]:
    """The state rows a bounded update changes (``bounded_update`` writes the endpoints'
    rows of every layer (retrieval projections included), aggregate and degree; scoring
    the re-scored users' candidates).
    Rows appended for new users are saved without being listed here."""
    # retrieval projections, and (``center``) each user's rating sum beside its degree
    node_type = {USER: USER, MOVIE: MOVIE, "user_rank": USER, "movie_rank": MOVIE, USER_RATING_SUM: USER}
    rows = {f"degree/{t}": endpoints[node_type[t]] for t in state.degree}
    for name in ("layers", "aggs"):
        for i, layer in enumerate(getattr(state, name)):
            for key in layer:
                rows[f"{name}/{i}/{key}"] = endpoints[node_type[key]]
    return {**rows, "cand_idx": rescored, "cand_score": rescored, "floor": rescored}


def record_batch(
    model: Recommender,
    state: RefreshState,
    graph: RatingGraph,
    users: Tensor,
    user_keys: pa.Array,
    rating_range: tuple[float, float] = (0.5, 5.0),
) -> pa.RecordBatch:
    """Top-``k`` rows of ``users`` in the ``recommend`` schema (``predicted_rating``, clamped
    to the run's ``rating_range``, included)."""
    k = state.k
    top, scores = state.cand_idx[users, :k], state.cand_score[users, :k]
    with torch.no_grad():
        rated = model.predict_pairs(state.layers[-1], users.repeat_interleave(k), top.flatten())
    return to_record_batch(
        users, top, scores, user_keys, graph.movie_keys, predicted_rating=rated.view_as(top).clamp(*rating_range)
    )


def user_keys_of(graph: RatingGraph, state: RefreshState) -> pa.Array:
    if not state.new_user_keys:
        return graph.user_keys
    return pa.concat_arrays([graph.user_keys, pa.array(np.array(state.new_user_keys)).cast(graph.user_keys.type)])


RowWriter = Callable[[pa.RecordBatch, pa.Array, str], dict[str, Any]]
"""Replaces the given users' recommendations by the batch's rows; gets the input's
fingerprint (for deterministic keys) and returns what it wrote."""


def parquet_writer(run_dir: Path, k: int) -> RowWriter:
    """Replaces rows in ``<run_dir>/recommendations.parquet`` (written in full from the state
    by ``refresh`` when it does not exist yet)."""

    def write(batch: pa.RecordBatch, users: pa.Array, fingerprint: str) -> dict[str, Any]:
        out = run_dir / "recommendations.parquet"
        return {"parquet": str(out), "parquet_rows": replace_user_rows(out, batch, users)}

    return write


def check_refreshable(model_cfg: ModelConfig) -> None:
    """Refuses a model whose layers ``refresh`` cannot re-evaluate from their parts:
    ``rating_messages`` ``embed`` (its bucket vectors are not in the cached aggregates)."""
    if model_cfg.rating_messages == "embed":
        raise ConfigError(
            "'refresh' does not support runs trained with rating_messages 'embed' (score the run again instead)"
        )


def refresh(
    run_dir: str | Path,
    model: Recommender,
    graph: RatingGraph,
    cfg: RefreshConfig,
    k: int = 10,
    memory_mb: int = 256,
    bounds: RatingBounds | None = None,
    strict: bool = False,
    writer: RowWriter | None = None,
) -> dict[str, Any]:
    """Folds ``cfg.new_ratings`` into the run's graph and updates its recommendations.

    ``<run_dir>/refresh/state.pt`` holds the per-layer embeddings, candidate lists and the
    folded edges; it is built by a full encode and score the first time (or when the
    checkpoint, ``k`` or margin changed). ``writer`` (default: ``recommendations.parquet``,
    written in full from the state when it does not exist) gets new rows for exactly the
    users whose top ``k`` changed, then the state is replaced. Both writes are atomic, the
    recommendations first: a crash between them leaves the old state, and re-running the
    same input reproduces the same rows. An input whose fingerprint was folded before
    changes nothing. ``bounds`` is the run's rating range: new ratings outside it are
    skipped, predicted ratings clamped to it.

    Returns a report: counts, skipped rows, timings.
    """
    check_refreshable(model.cfg)
    run_dir = Path(run_dir)
    state_path = run_dir / "refresh" / "state.pt"
    model.eval()
    t0 = time.perf_counter()
    model_sha = sha256_file(run_dir / "best.pt")
    state = RefreshState.load(state_path)
    fp = new_ratings_fingerprint(cfg.new_ratings)
    if state is not None and any(r["fingerprint"] == fp for r in state.folded):
        return {
            "already_folded": True,
            "fingerprint": fp,
            "source": str(cfg.new_ratings),
            "changed": "nothing (this input was folded in before)",
        }
    report: dict[str, Any] = {"already_folded": False, "fingerprint": fp}
    if state is None or state.model_sha != model_sha or state.k != k or state.width != k + cfg.candidate_margin:
        t1 = time.perf_counter()
        keep = state if state is not None and state.model_sha == model_sha else None
        state = initial_state(
            model,
            graph,
            k,
            cfg.candidate_margin,
            memory_mb,
            model_sha,
            keep.extra if keep else None,
            keep.new_user_keys if keep else None,
            keep.folded if keep else None,
        )
        report["initial_full_score_s"] = time.perf_counter() - t1
    users = KeyIndex(user_keys_of(graph, state).to_pylist())
    movies = KeyIndex(graph.movie_keys.to_pylist())
    known = len(users)
    skips = SkipReport(strict=strict)
    new = read_new_ratings(cfg.new_ratings, users, movies, skips, bounds or RatingBounds())
    outcome = apply_edges(
        model,
        graph,
        state,
        torch.from_numpy(new.src),
        torch.from_numpy(new.dst),
        torch.from_numpy(new.rating),
        torch.from_numpy(new.timestamp),
        users.keys[known:],
        cfg.mode,
        memory_mb,
    )
    t2 = time.perf_counter()
    rating_range = (bounds.min, bounds.max) if bounds is not None else (0.5, 5.0)
    keys = user_keys_of(graph, state)
    out = run_dir / "recommendations.parquet"
    if writer is None and not out.is_file():
        written = {
            "parquet": str(out),
            "parquet_rows": write_parquet(
                [record_batch(model, state, graph, torch.arange(len(keys)), keys, rating_range)],
                out,
                metadata={"run_dir": str(run_dir), "k": str(k)},
            ),
        }
    else:
        batch = record_batch(model, state, graph, outcome.replaced_users, keys, rating_range)
        written = (writer or parquet_writer(run_dir, k))(batch, keys.take(pa.array(outcome.replaced_users.numpy())), fp)
    record = {
        "fingerprint": fp,
        "source": new.source,
        "mode": cfg.mode,
        "edges": int(new.src.size),
        "new_users": len(users) - known,
        "skipped": skips.counts,
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    state.folded = state.folded + [record]
    state.save(state_path)
    write_json_atomic(run_dir / "refresh" / "folded.json", state.folded)
    report.update(
        outcome.stats,
        input_report=skips.to_json(),
        written=written,
        write_s=time.perf_counter() - t2,
        total_s=time.perf_counter() - t0,
    )
    return report
