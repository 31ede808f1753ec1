#!/usr/bin/env python
"""Scale curves: time and memory of each stage against the number of rating edges.

    python experiments/scale_curves.py                          # 100k, 1M, 10M, 25M edges
    python experiments/scale_curves.py --edges 100000 1000000 --out runs/scale
    python experiments/scale_curves.py --edges 25000000 --stages index train-store train-store-2 score-store

Every stage runs in its own process (tree), so its memory is its own:
``prepare`` (synthetic generator → shards, streamed), ``index`` (shards → memory-mapped
graph index, ``scalable_rec.graph.index``), ``load`` (shards → tensors → HeteroData),
``train`` (one epoch capped at ``--train-steps`` steps through the real loop, graph in
memory), ``train-store`` (the same through the PyG stores over the index),
``train-store-2`` / ``train-2`` (two torchrun ranks, gloo), ``train-store-2-fork`` (the same
two ranks forked by ``--nproc-per-node``'s launcher after its imports,
``scalable_rec.train.launch``; the launcher's own memory is counted), ``score`` (full-graph encode +
full-catalog top-10 for every user by the ranking head) and ``score-store`` (layer-wise
encode over the index + the same top-10). Users and movies grow with edges like
MovieLens-25M (162k × 59k at 25M).

Memory, sampled every 50 ms by the parent from ``/proc`` and summed over the stage's
process tree (peaks of the sums):

- ``private_mib``: RSS minus file-backed pages (``RssAnon + RssShmem``): what a process
  holds that no other process can share (the ``≤ 2 GiB`` target is on this);
- ``uss_mib``: ``Private_Clean + Private_Dirty`` (psutil's USS); it also counts mapped
  file pages that only this process happens to map, so one process over the index shows
  the index here, while they are shared page cache as soon as a second rank maps them;
- ``pss_mib``: proportional set size, shared pages split between the processes mapping
  them; the sum over ranks is the tree's real footprint (the two-rank ratio uses it);
- ``peak_rss_mib``: ``ru_maxrss`` of the stage's main process (as before).

Writes ``scale.json``, ``scale.md`` and ``scale.png`` (time and memory vs edges, log-log).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from scalable_rec.heap import hugepages_environ

ROOT = Path(__file__).resolve().parents[1]
STAGES = (
    "prepare",
    "index",
    "load",
    "train",
    "train-store",
    "train-2",
    "train-store-2",
    "train-store-2-fork",
    "train-store-phases",
    "score",
    "score-store",
)
DEFAULT_STAGES = ("prepare", "index", "load", "train", "train-store", "score", "score-store")
TWO_RANKS = ("train-2", "train-store-2")  # under torchrun; its launcher's memory is left out
FORKED = "train-store-2-fork"  # two ranks forked by scalable_rec.train.launch, the launcher counted


def sizes_for(edges: int) -> tuple[int, int]:
    ratio = edges / 25_000_000
    return max(100, int(162_000 * ratio**0.75)), max(100, int(59_000 * ratio**0.6))


def run_stage(
    stage: str,
    edges: int,
    workdir: Path,
    train_steps: int,
    score_users: int = 0,
    table_optimizer: str = "auto",
    heap_kb: int = 0,
    rating_messages: str = "none",
) -> dict:
    """Child-process body: runs one stage and returns its figures."""
    import torch

    from scalable_rec.graph import RatingGraph, SplitConfig, split_edges
    from scalable_rec.graph.index import GraphIndex, build_index
    from scalable_rec.graph.store import open_stores
    from scalable_rec.shards import GraphShards
    from scalable_rec.source import SkipReport, write_rating_shards
    from scalable_rec.source.synthetic import SyntheticSource

    users, movies = sizes_for(edges)
    shards_dir = workdir / f"shards-{edges}"
    t0 = time.perf_counter()
    out: dict = {"stage": stage, "edges": edges, "users": users, "movies": movies}
    if stage == "prepare":
        source = SyntheticSource(num_users=users, num_movies=movies, num_edges=edges)
        write_rating_shards(source, str(shards_dir), SkipReport(), overwrite=True)
        out["edges_per_s"] = edges / (time.perf_counter() - t0)
    elif stage == "index":
        build_index(GraphShards(shards_dir), SplitConfig())
        out["edges_per_s"] = edges / (time.perf_counter() - t0)
    elif stage == "load":
        g = RatingGraph.from_shards(GraphShards(shards_dir))
        g.hetero_data()
        out["edges_per_s"] = edges / (time.perf_counter() - t0)
    elif stage == "train-store-phases":
        out.update(train_phases(shards_dir, workdir / f"run-{stage}-{edges}", train_steps, table_optimizer))
    elif stage.startswith("train"):
        from scalable_rec.train import ModelConfig, TrainConfig, train

        shards = GraphShards(shards_dir, verify=False)
        data = None
        if "store" in stage:  # mapped edges, split and CSC; the checksums were checked by 'index'
            index = GraphIndex.for_shards(shards, SplitConfig(), verify=False)
            g, split, data = index.rating_graph(shards), index.split(), open_stores(index, "train")
        else:
            g = RatingGraph.from_shards(shards)
            split = split_edges(g, SplitConfig())
        split.val = split.val[:50_000]  # validation of a capped epoch on a slice
        cfg = TrainConfig(
            epochs=1,
            steps_per_epoch=train_steps,
            progress=False,
            table_optimizer=table_optimizer,
            heap_mmap_threshold_kb=heap_kb,
        )
        c0 = time.process_time()
        model_cfg = ModelConfig(rating_messages=rating_messages)
        out["rating_messages"] = rating_messages
        result = train(g, split, model_cfg, cfg, workdir / f"run-{stage}-{edges}", data=data)
        out["train_cpu_s"] = time.process_time() - c0
        if data is not None:  # what this rank's heap ran with ('auto' resolved: ranks on this node)
            from scalable_rec.dist import DistEnv

            out["heap_threshold_kb_applied"] = cfg.heap_threshold_kb(DistEnv.from_environ())
        out.update(
            steps=result.history[-1]["steps"],
            labelled_edges_per_s=result.history[-1]["edges_per_s"],
            message_passing_edges=edges,
            ranks=int(os.environ.get("WORLD_SIZE", "1")),
            train_loop_s=result.seconds,
        )
    elif stage.startswith("score"):
        from scalable_rec.model.layerwise import encode_layerwise
        from scalable_rec.score import RatedIndex, ScoreConfig, topk_chunks
        from scalable_rec.train import ModelConfig, Recommender

        shards = GraphShards(shards_dir, verify=False)
        if stage == "score-store":
            index = GraphIndex.for_shards(shards, SplitConfig(), verify=False)
            num_users, num_movies = index.num_users, index.num_movies
            model = Recommender(num_users, num_movies, index.tensor("movie_x").size(1), ModelConfig()).eval()
            t1, c1 = time.perf_counter(), time.process_time()
            z = encode_layerwise(model, *open_stores(index, "all"), spill_dir=workdir)
            rev_row, rev_colptr = index.csc("all")["rev_rates"]
            rated = RatedIndex(rowptr=rev_colptr, col=rev_row)  # each user's movies: the mapped CSR
        else:
            g = RatingGraph.from_shards(shards)
            num_users, num_movies = g.num_users, g.num_movies
            model = Recommender(num_users, num_movies, g.movie_x.size(1), ModelConfig()).eval()
            t1, c1 = time.perf_counter(), time.process_time()
            z = model.encode_all(g.hetero_data())
            rated = RatedIndex.from_edges(g.src, g.dst, num_users)
        out["encode_s"] = time.perf_counter() - t1
        out["encode_cpu_s"] = time.process_time() - c1
        all_movies = torch.arange(num_movies)
        # A fixed slice of users, evenly spaced over the ids (heavy and light users alike),
        # when full-catalog ranking of every user would take too long; the full time is then
        # extrapolated linearly in users (ranking costs the same per user: one score row).
        users = None
        if 0 < score_users < num_users:
            users = torch.arange(num_users)[:: -(-num_users // score_users)]
        t2, c2 = time.perf_counter(), time.process_time()
        n = 0
        for users_chunk, _, _ in topk_chunks(
            lambda u: model.rank_block(z, u, all_movies), num_users, num_movies, ScoreConfig(), rated, users
        ):
            n += users_chunk.numel()
        out["rank_s"] = time.perf_counter() - t2
        out["rank_cpu_s"] = time.process_time() - c2
        out["pairs_per_s"] = n * num_movies / out["rank_s"]
        out["scored_users"] = n
        scale = num_users / n
        out["rank_s_all_users"] = out["rank_s"] * scale  # == rank_s when every user was scored
        out["rank_cpu_s_all_users"] = out["rank_cpu_s"] * scale
        out["score_cpu_s_all_users"] = out["encode_cpu_s"] + out["rank_cpu_s_all_users"]
    out["seconds"] = time.perf_counter() - t0
    # CPU seconds (user + sys of this process): on a shared, oversubscribed machine they
    # compare two code paths more fairly than wall time.
    out["cpu_s"] = time.process_time()
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def train_phases(shards_dir: Path, run_dir: Path, train_steps: int, table_optimizer: str = "auto") -> dict:
    """One store-backed training rank, phase by phase through the loop's own steps
    (``build_job``, the steps of ``train_epoch``, ``validate``): this process's private
    memory (``RssAnon``) after each phase and its peak within it, sampled every 5 ms, and
    the training steps part by part (``step_parts``)."""
    import threading

    status = Path("/proc/self/status")

    def anon_mib() -> float:
        for line in status.read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
        return 0.0

    peak, done = [anon_mib()] * 2, threading.Event()  # [phase peak, step-part peak]

    def watch() -> None:
        while not done.wait(0.005):
            now = anon_mib()
            peak[0], peak[1] = max(peak[0], now), max(peak[1], now)

    threading.Thread(target=watch, daemon=True).start()
    phases: dict[str, dict[str, float]] = {}

    def mark(name: str) -> None:
        now = anon_mib()
        phases[name] = {"after_mib": round(now, 1), "peak_mib": round(max(peak[0], now), 1)}
        peak[0] = now

    mark("torch, PyG and the package imported")  # by run_stage, before this
    from scalable_rec.graph import SplitConfig
    from scalable_rec.graph.index import GraphIndex
    from scalable_rec.graph.store import open_stores
    from scalable_rec.shards import GraphShards
    from scalable_rec.train import ModelConfig, TrainConfig
    from scalable_rec.train.loop import build_job, validate

    shards = GraphShards(shards_dir, verify=False)
    index = GraphIndex.for_shards(shards, SplitConfig(), verify=False)
    graph, split, data = index.rating_graph(shards), index.split(), open_stores(index, "train")
    split.val = split.val[:50_000]
    mark("open index")
    cfg = TrainConfig(epochs=1, steps_per_epoch=train_steps, progress=False, table_optimizer=table_optimizer)
    job = build_job(graph, split, ModelConfig(), cfg, run_dir, None, data=data)
    mark("build_job (loader, model, optimiser)")
    steps = step_parts(job, train_steps, anon_mib, peak)
    mark(f"{train_steps} training steps")
    validate(job)
    mark("validation (layer-wise)")
    done.set()
    return {"phases": phases, "step_parts": steps}


def step_parts(job, train_steps: int, anon_mib, peak: list) -> dict[str, dict[str, float]]:
    """``train_steps`` steps of ``train_epoch``'s body, part by part: for each part the
    largest rise of private memory within it over its start (``peak_rise_mib``) and what
    it leaves behind (``kept_mib``, summed over the steps), in MiB."""
    from scalable_rec.train.loop import training_loss

    parts: dict[str, dict[str, float]] = {}
    job.ddp_model.train()
    job.train_sampler.set_epoch(0)
    it = iter(job.train_loader)

    def timed(name: str, fn):
        start = anon_mib()
        peak[1] = start
        value = fn()
        end = anon_mib()
        entry = parts.setdefault(name, {"peak_rise_mib": 0.0, "kept_mib": 0.0})
        entry["peak_rise_mib"] = round(max(entry["peak_rise_mib"], max(peak[1], end) - start), 1)
        entry["kept_mib"] = round(entry["kept_mib"] + end - start, 1)
        return value

    for _ in range(train_steps):
        batch = timed("sample (loader)", lambda: next(it).to(job.device))
        loss = timed("forward + loss", lambda: training_loss(job, batch)[0])
        timed("zero_grad + backward", lambda: (job.optimizer.zero_grad(set_to_none=True), loss.backward()))
        timed("optimiser step", lambda: job.optimizer.step())
        batch = loss = None  # not kept alive into the next sampling
    return parts


def _proc_kib(pid: int) -> dict[str, int]:
    """``/proc/<pid>/status`` and ``smaps_rollup`` fields in KiB (empty if it has gone)."""
    out: dict[str, int] = {}
    for name in ("status", "smaps_rollup"):
        try:
            text = Path(f"/proc/{pid}/{name}").read_text()
        except OSError:
            return {}
        for line in text.splitlines():
            key, _, rest = line.partition(":")
            parts = rest.split()
            if len(parts) == 2 and parts[1] == "kB":
                out[f"{name}.{key}"] = int(parts[0])
    return out


def tree_memory(root: int, ranks_only: bool) -> dict[str, float]:
    """Summed memory (MiB) of ``root``'s process tree; ``ranks_only`` leaves the root (the
    torchrun launcher) out."""
    import psutil

    try:
        procs = psutil.Process(root).children(recursive=True)
    except psutil.NoSuchProcess:
        return {}
    pids = [p.pid for p in procs] + ([] if ranks_only else [root])
    tot = {"private_mib": 0.0, "uss_mib": 0.0, "pss_mib": 0.0, "max_private_mib": 0.0}
    for pid in pids:
        kv = _proc_kib(pid)
        if not kv:
            continue
        private = (kv.get("status.RssAnon", 0) + kv.get("status.RssShmem", 0)) / 1024
        tot["private_mib"] += private
        tot["max_private_mib"] = max(tot["max_private_mib"], private)
        tot["uss_mib"] += (kv.get("smaps_rollup.Private_Clean", 0) + kv.get("smaps_rollup.Private_Dirty", 0)) / 1024
        tot["pss_mib"] += kv.get("smaps_rollup.Pss", 0) / 1024
    return tot


def run_child(
    cmd: list[str], ranks_only: bool, log_dir: Path, name: str = "child", env: dict[str, str] | None = None
) -> tuple[int, str, str, dict[str, float]]:
    """Runs ``cmd``, sampling its tree's memory every 50 ms; returns rc, stdout, stderr, peaks."""
    out_path, err_path = log_dir / f".{name}.out", log_dir / f".{name}.err"
    peaks: dict[str, float] = {}
    with open(out_path, "w") as fo, open(err_path, "w") as fe:
        proc = subprocess.Popen(cmd, stdout=fo, stderr=fe, text=True, env=env)
        while proc.poll() is None:
            for key, value in tree_memory(proc.pid, ranks_only).items():
                peaks[key] = max(peaks.get(key, 0.0), value)
            time.sleep(0.05)
    return proc.returncode, out_path.read_text(), err_path.read_text(), peaks


def merged_rows(out: Path) -> list[dict]:
    """Rows of every ``scale*.json`` in ``out`` (oldest file first; a later file's row for the
    same stage and size replaces an earlier one)."""
    rows: dict[tuple[str, int], dict] = {}
    files = sorted((p for p in out.glob("scale*.json") if p.name != "scale.json"), key=lambda p: p.stat().st_mtime)
    for path in ([out / "scale.json"] if (out / "scale.json").is_file() else []) + files:
        for row in json.loads(path.read_text()):
            rows[(row["stage"], row["edges"])] = row
    return list(rows.values())


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for stage in STAGES:
        pts = sorted(((r["edges"], r) for r in rows if r["stage"] == stage and "error" not in r), key=lambda p: p[0])
        if not pts:
            continue
        xs = [e for e, _ in pts]
        axes[0].plot(xs, [r["seconds"] for _, r in pts], marker="o", label=stage)
        axes[1].plot(xs, [r.get("private_mib", float("nan")) for _, r in pts], marker="o", label=stage)
        axes[2].plot(xs, [r.get("pss_mib", float("nan")) for _, r in pts], marker="o", label=stage)
    for ax, label in zip(
        axes, ("seconds", "peak private MiB (RSS − file pages, all ranks)", "peak PSS MiB (all ranks)")
    ):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("rating edges")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def markdown(rows: list[dict]) -> str:
    lines = [
        "| edges | users × movies | stage | seconds | CPU s | private MiB | USS MiB | PSS MiB | peak RSS MiB "
        "| throughput |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    nan = float("nan")
    for r in sorted(rows, key=lambda r: (r["edges"], STAGES.index(r["stage"]))):
        if "error" in r:
            lines.append(f"| {r['edges']:,} | | {r['stage']} | failed | | | | | | {r['error'][-80:]!r} |")
            continue
        thr = ", ".join(f"{k}={v:,.0f}" for k, v in r.items() if k.endswith("_per_s"))
        lines.append(
            f"| {r['edges']:,} | {r['users']:,} × {r['movies']:,} | {r['stage']} | {r['seconds']:.1f} | "
            f"{r.get('cpu_s', nan):.1f} | {r.get('private_mib', nan):,.0f} | {r.get('uss_mib', nan):,.0f} | "
            f"{r.get('pss_mib', nan):,.0f} | {r['peak_rss_mib']:,.0f} | {thr} |"
        )
    return "\n".join(lines) + "\n"


MARK_START, MARK_END = "<!-- scale:start -->", "<!-- scale:end -->"
PATHS = {
    "prepare": "shards",
    "index": "graph index",
    "load": "memory",
    "train": "memory",
    "train-store": "store",
    "train-2": "memory, 2 ranks",
    "train-store-2": "store, 2 ranks",
    "train-store-2-fork": "store, 2 forked ranks + launcher",
    "train-store-phases": "store, by phase",
    "score": "memory",
    "score-store": "store",
}


def _score_cpu(r: dict) -> float:
    """Encode + ranking CPU seconds for every user (rows from before user slices: as measured)."""
    return r.get("score_cpu_s_all_users", r.get("encode_cpu_s", 0.0) + r.get("rank_cpu_s", 0.0))


def _score_cell(r: dict) -> str:
    users = r.get("scored_users", r["users"])
    if users < r["users"]:
        return (
            f"encode {r['encode_cpu_s']:.1f} + rank {r['rank_cpu_s']:.1f} CPU s for {users:,} users → "
            f"{_score_cpu(r):.0f} CPU s for all {r['users']:,} (extrapolated)"
        )
    return f"encode {r['encode_cpu_s']:.1f} + rank {r['rank_cpu_s']:.1f} CPU s, all {users:,} users"


def results_block(rows: list[dict]) -> str:
    """The scale block of docs/RESULTS.md: one table per graph size and the target checks, all from ``rows``."""
    nan = float("nan")
    out = []
    for edges in sorted({r["edges"] for r in rows}):
        by = {r["stage"]: r for r in rows if r["edges"] == edges and "error" not in r}
        if not by:
            continue
        any_row = next(iter(by.values()))
        out += [
            f"**{edges:,} edges** ({any_row['users']:,} users × {any_row['movies']:,} movies)",
            "",
            "| stage | path | wall s | CPU s | private MiB | PSS MiB | figure |",
            "|---|---|---:|---:|---:|---:|---|",
        ]
        for stage in STAGES:
            r = by.get(stage)
            if r is None or stage == "train-store-phases":
                continue
            if stage.startswith("train"):
                cpu = r.get("train_cpu_s", nan)
                fig = f"{r['steps']} steps × {r.get('ranks', 1)} rank(s), {r['labelled_edges_per_s']:,.0f} labelled edges/s"
            elif stage.startswith("score"):
                cpu = _score_cpu(r)
                fig = _score_cell(r)
            else:
                cpu = r.get("cpu_s", nan)
                fig = f"{r.get('edges_per_s', nan):,.0f} edges/s"
            if r.get("note"):
                fig += f" ({r['note']})"
            out.append(
                f"| {stage} | {PATHS[stage]} | {r['seconds']:.0f} | {cpu:.1f} | {r.get('private_mib', nan):,.0f} | "
                f"{r.get('pss_mib', nan):,.0f} | {fig} |"
            )
        for name, fail in [("failed", [r for r in rows if r["edges"] == edges and "error" in r])]:
            for r in fail:
                out.append(f"| {r['stage']} | {PATHS[r['stage']]} | {name} | | | | {r['error'][-60:]!r} |")
        checks = []
        if "train-store" in by and "train-store-2" in by:
            one, two = by["train-store"], by["train-store-2"]
            checks.append(
                f"two ranks / one rank, summed PSS: {two['pss_mib']:,.0f} / {one['pss_mib']:,.0f} = "
                f"**{two['pss_mib'] / one['pss_mib']:.2f}×** (target < 1.3×)"
            )
        if "train-store" in by and FORKED in by:
            one, two = by["train-store"], by[FORKED]
            checks.append(
                f"two forked ranks with their launcher / one rank, summed PSS: {two['pss_mib']:,.0f} / "
                f"{one['pss_mib']:,.0f} = **{two['pss_mib'] / one['pss_mib']:.2f}×** (target < 1.3×)"
            )
        for stage in ("train-store", "score-store"):
            if stage in by:
                target = "target ≤ 2,048" if edges == 25_000_000 else "the ≤ 2,048 target is set at 25M"
                checks.append(f"{stage} peak private memory **{by[stage]['private_mib']:,.0f} MiB** ({target})")
        if "train" in by and "train-store" in by:
            m, st = by["train"], by["train-store"]
            checks.append(
                f"train CPU s store / memory: {st['train_cpu_s']:.1f} / {m['train_cpu_s']:.1f} = "
                f"**{st['train_cpu_s'] / m['train_cpu_s']:.2f}** (target ≤ 1.2); labelled edges/s "
                f"{st['labelled_edges_per_s']:,.0f} / {m['labelled_edges_per_s']:,.0f} = "
                f"{st['labelled_edges_per_s'] / m['labelled_edges_per_s']:.2f} (wall time)"
            )
        if "score" in by and "score-store" in by:
            m, st = by["score"], by["score-store"]
            checks.append(
                f"score CPU s store / memory: {_score_cpu(st):.0f} / {_score_cpu(m):.0f} = "
                f"**{_score_cpu(st) / _score_cpu(m):.2f}** (target ≤ 1.2)"
            )
        out += [""] + [f"- {c}" for c in checks] + [""]
        if "train-store-phases" in by:
            out += [
                "One store-backed training rank by phase (`train-store-phases`: this process's private "
                "memory after each phase, and its peak within it):",
                "",
                "| phase | private MiB after | peak MiB within |",
                "|---|---:|---:|",
            ]
            out += [
                f"| {name} | {v['after_mib']:,.0f} | {v['peak_mib']:,.0f} |"
                for name, v in by["train-store-phases"]["phases"].items()
            ] + [""]
            parts = by["train-store-phases"].get("step_parts")
            if parts:
                out += [
                    "Its training steps part by part (largest rise of private memory within each part over "
                    "the part's start, over all steps):",
                    "",
                    "| step part | largest rise MiB |",
                    "|---|---:|",
                ]
                out += [f"| {name} | {v['peak_rise_mib']:,.0f} |" for name, v in parts.items()] + [""]
            if by["train-store-phases"].get("table_optimizer"):
                out += [
                    f"Tables: `table_optimizer={by['train-store-phases']['table_optimizer']}` (`auto`: row-wise "
                    "Adagrad from 100,000 users + movies on).",
                    "",
                ]
    return "\n".join(out)


def update_doc(doc: Path, block: str) -> None:
    """Replaces the generated block (between the marks) of ``doc``, atomically."""
    from scalable_rec.atomic import replace_marked_block  # lazily: stage children measure their imports

    try:
        replace_marked_block(doc, MARK_START, MARK_END, block + "\n")
    except ValueError as err:
        raise SystemExit(f"--doc: {err}") from None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--edges", type=int, nargs="+", default=[100_000, 1_000_000, 10_000_000, 25_000_000])
    p.add_argument("--stages", nargs="+", default=list(DEFAULT_STAGES), choices=STAGES)
    p.add_argument("--train-steps", type=int, default=50)
    p.add_argument(
        "--heap-mmap-threshold-kb",
        type=int,
        default=None,
        help="TrainConfig.heap_mmap_threshold_kb of the train-store stages (recorded in each row; "
        "default: TrainConfig's, -1: auto; 0: glibc's dynamic threshold)",
    )
    p.add_argument(
        "--no-hugepages",
        dest="hugepages",
        action="store_false",
        help="run the stages without glibc's transparent huge pages, which the scalable-rec "
        "command turns on (scalable_rec/heap.py)",
    )
    p.add_argument(
        "--table-optimizer",
        default="auto",
        choices=("auto", "adamw", "rowwise_adagrad"),
        help="TrainConfig.table_optimizer of the train stages (recorded in each row)",
    )
    p.add_argument(
        "--rating-messages",
        default="none",
        choices=("none", "relation", "gcmc", "scale", "embed", "center"),
        help="ModelConfig.rating_messages of the train stages (recorded in each row)",
    )
    p.add_argument(
        "--score-users",
        type=int,
        default=0,
        help="score stages rank this many users (evenly spaced) and extrapolate to all; 0: all",
    )
    p.add_argument(
        "--results",
        default="scale.json",
        help="rows file in --out for this invocation (several may run at once); reports merge scale*.json",
    )
    p.add_argument(
        "--doc",
        type=Path,
        default=None,
        help="Markdown file whose scale block is replaced, with --report (docs/RESULTS.md)",
    )
    p.add_argument("--out", default="runs/scale")
    p.add_argument("--stage", help=argparse.SUPPRESS)  # child mode
    p.add_argument("--report", action="store_true", help="only rewrite scale.md and scale.png from scale.json")
    args = p.parse_args()
    if args.heap_mmap_threshold_kb is None:
        from scalable_rec.train.config import TrainConfig

        args.heap_mmap_threshold_kb = TrainConfig().heap_mmap_threshold_kb
    out = Path(args.out)
    if args.report:
        rows = merged_rows(out)
        (out / "scale.md").write_text(markdown(rows))
        (out / "scale.json").write_text(json.dumps(rows, indent=2))
        plot(rows, out / "scale.png")
        if args.doc:
            update_doc(args.doc, results_block(rows))
        print(markdown(rows))
        return
    if args.stage:
        from scalable_rec.train.launch import LAUNCHED_ENV, launch

        if args.stage == FORKED and not os.environ.get(LAUNCHED_ENV):
            sys.exit(launch(_forked_rank, sys.argv[1:], 2))
        row = run_stage(
            args.stage,
            args.edges[0],
            out,
            args.train_steps,
            args.score_users,
            args.table_optimizer,
            args.heap_mmap_threshold_kb,
            args.rating_messages,
        )
        if int(os.environ.get("RANK", "0")) == 0:
            print(json.dumps(row))
        return
    out.mkdir(parents=True, exist_ok=True)
    # The children run as the scalable-rec command runs: with glibc's transparent huge pages
    # (scalable_rec.heap.restart_with_hugepages), unless --no-hugepages.
    env = (hugepages_environ(os.environ) if args.hugepages else None) or dict(os.environ)
    results = out / args.results
    rows = json.loads(results.read_text()) if results.is_file() else []  # runs add to earlier ones
    for edges in args.edges:
        for stage in args.stages:
            child = [
                __file__,
                "--stage",
                stage,
                "--edges",
                str(edges),
                "--out",
                str(out),
                "--train-steps",
                str(args.train_steps),
                "--score-users",
                str(args.score_users),
                "--table-optimizer",
                args.table_optimizer,
                "--heap-mmap-threshold-kb",
                str(args.heap_mmap_threshold_kb),
                "--rating-messages",
                args.rating_messages,
            ]
            two = stage in TWO_RANKS
            cmd = (
                [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *child]
                if two
                else [sys.executable, *child]
            )  # FORKED: the child forks its two ranks itself
            rc, stdout, stderr, peaks = run_child(cmd, ranks_only=two, log_dir=out, name=f"{stage}-{edges}", env=env)
            rows = [r for r in rows if (r["stage"], r["edges"]) != (stage, edges)]
            if rc != 0:
                print(f"{stage} at {edges:,} edges failed:\n{stderr[-2000:]}", file=sys.stderr)
                rows.append(
                    {
                        "stage": stage,
                        "edges": edges,
                        "users": 0,
                        "movies": 0,
                        "seconds": float("nan"),
                        "peak_rss_mib": float("nan"),
                        "error": stderr[-500:],
                    }
                )
                continue
            row = json.loads(stdout.strip().splitlines()[-1])
            row.update(
                {k: round(v, 1) for k, v in peaks.items()},
                threads=os.environ.get("OMP_NUM_THREADS"),
                glibc_tunables=env.get("GLIBC_TUNABLES", ""),
            )
            if stage.startswith("train"):
                row["table_optimizer"] = args.table_optimizer
                row["heap_mmap_threshold_kb"] = args.heap_mmap_threshold_kb
            rows.append(row)
            print(
                f"{edges:>11,} {stage:14s} {row['seconds']:8.1f}s  private {row.get('private_mib', 0):8,.0f} MiB"
                f"  USS {row.get('uss_mib', 0):8,.0f}  PSS {row.get('pss_mib', 0):8,.0f}"
                f"  RSS {row['peak_rss_mib']:8,.0f} MiB",
                flush=True,
            )
            results.write_text(json.dumps(rows, indent=2))
    rows = merged_rows(out)
    (out / "scale.md").write_text(markdown(rows))
    plot(rows, out / "scale.png")
    print(markdown(rows))


def _forked_rank(argv: list[str]) -> int:
    """A rank of ``train-store-2-fork``: this script's child mode, in a forked process."""
    sys.argv = [__file__, *argv]
    main()
    return 0


if __name__ == "__main__":
    main()
