#!/usr/bin/env python
"""Scale curves: time and peak RSS of each stage against the number of rating edges.

    python scripts/scale_curves.py                          # 100k, 1M, 10M, 25M edges
    python scripts/scale_curves.py --edges 100000 1000000 --out runs/scale

Every stage runs in its own process, so its peak RSS (``ru_maxrss``) is its own:
``prepare`` (synthetic generator → shards, streamed), ``load`` (shards → tensors →
HeteroData), ``train`` (one epoch capped at ``--train-steps`` steps through the real
loop) and ``score`` (encode once + full-catalog top-10 for every user by the ranking head).
Users and movies grow with edges like MovieLens-25M (162k × 59k at 25M). Writes
``scale.json``, ``scale.md`` and ``scale.png`` (time and RSS vs edges, log-log).
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("prepare", "load", "train", "score")


def sizes_for(edges: int) -> tuple[int, int]:
    ratio = edges / 25_000_000
    return max(100, int(162_000 * ratio ** 0.75)), max(100, int(59_000 * ratio ** 0.6))


def run_stage(stage: str, edges: int, workdir: Path, train_steps: int) -> dict:
    """Child-process body: runs one stage and returns its figures."""
    import torch

    from scalable_rec.graph import RatingGraph, SplitConfig, split_edges
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
    elif stage == "load":
        g = RatingGraph.from_shards(GraphShards(shards_dir))
        g.hetero_data()
        out["edges_per_s"] = edges / (time.perf_counter() - t0)
    elif stage == "train":
        from scalable_rec.train import ModelConfig, TrainConfig, train

        g = RatingGraph.from_shards(GraphShards(shards_dir))
        split = split_edges(g, SplitConfig())
        split.val = split.val[:50_000]  # validation of a capped epoch on a slice
        cfg = TrainConfig(epochs=1, steps_per_epoch=train_steps, progress=False)
        result = train(g, split, ModelConfig(), cfg, workdir / f"run-{edges}")
        out.update(steps=result.history[-1]["steps"], labelled_edges_per_s=result.history[-1]["edges_per_s"],
                   message_passing_edges=edges)
    elif stage == "score":
        from scalable_rec.score import RatedIndex, ScoreConfig, topk_chunks
        from scalable_rec.train import ModelConfig, Recommender

        g = RatingGraph.from_shards(GraphShards(shards_dir))
        model = Recommender(g.num_users, g.num_movies, g.movie_x.size(1), ModelConfig()).eval()
        t1 = time.perf_counter()
        z = model.encode_all(g.hetero_data())
        out["encode_s"] = time.perf_counter() - t1
        rated = RatedIndex.from_edges(g.src, g.dst, g.num_users)
        all_movies = torch.arange(g.num_movies)
        t2 = time.perf_counter()
        n = 0
        for users_chunk, _, _ in topk_chunks(lambda u: model.rank_block(z, u, all_movies), g.num_users,
                                             g.num_movies, ScoreConfig(), rated):
            n += users_chunk.numel()
        out["rank_s"] = time.perf_counter() - t2
        out["pairs_per_s"] = n * g.num_movies / out["rank_s"]
    out["seconds"] = time.perf_counter() - t0
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for stage in STAGES:
        pts = sorted((r["edges"], r) for r in rows if r["stage"] == stage)
        if not pts:
            continue
        xs = [e for e, _ in pts]
        axes[0].plot(xs, [r["seconds"] for _, r in pts], marker="o", label=stage)
        axes[1].plot(xs, [r["peak_rss_mib"] for _, r in pts], marker="o", label=stage)
    for ax, label in zip(axes, ("seconds", "peak RSS (MiB)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("rating edges")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def markdown(rows: list[dict]) -> str:
    lines = ["| edges | users × movies | stage | seconds | peak RSS MiB | throughput |", "|---:|---|---|---:|---:|---|"]
    for r in sorted(rows, key=lambda r: (r["edges"], STAGES.index(r["stage"]))):
        thr = ", ".join(f"{k}={v:,.0f}" for k, v in r.items() if k.endswith("_per_s"))
        lines.append(f"| {r['edges']:,} | {r['users']:,} × {r['movies']:,} | {r['stage']} | {r['seconds']:.1f} | "
                     f"{r['peak_rss_mib']:,.0f} | {thr} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--edges", type=int, nargs="+", default=[100_000, 1_000_000, 10_000_000, 25_000_000])
    p.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    p.add_argument("--train-steps", type=int, default=50)
    p.add_argument("--out", default="runs/scale")
    p.add_argument("--stage", help=argparse.SUPPRESS)  # child mode
    args = p.parse_args()
    out = Path(args.out)
    if args.stage:
        print(json.dumps(run_stage(args.stage, args.edges[0], out, args.train_steps)))
        return
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for edges in args.edges:
        for stage in args.stages:
            cmd = [sys.executable, __file__, "--stage", stage, "--edges", str(edges), "--out", str(out),
                   "--train-steps", str(args.train_steps)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                print(f"{stage} at {edges:,} edges failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
                rows.append({"stage": stage, "edges": edges, "users": 0, "movies": 0, "seconds": float("nan"),
                             "peak_rss_mib": float("nan"), "error": proc.stderr[-500:]})
                continue
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(f"{edges:>11,} {stage:8s} {row['seconds']:8.1f}s  {row['peak_rss_mib']:8,.0f} MiB", flush=True)
            (out / "scale.json").write_text(json.dumps(rows, indent=2))
    (out / "scale.md").write_text(markdown(rows))
    plot(rows, out / "scale.png")
    print(markdown(rows))


if __name__ == "__main__":
    main()
