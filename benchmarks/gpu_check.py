"""The CUDA benchmarks of ``scripts/gpu_check.sh``: one JSON + Markdown report, rewritten
after every step so that a timeout still leaves the finished steps' numbers.

    python benchmarks/gpu_check.py --out DIR [--tests-xml FILE] [--dry-run] [--edges N] [--steps N]

Steps, most valuable first (a step that fails records its error and the next one runs):

1. ``sampling``: sampled edges/s of PyG's CPU sampler (the rank's workers) and of the GPU
   sampler (``TrainConfig.sampler="torch"``, where this version has it), same seeds;
2. ``train``: the synthetic graph (default 1M edges), width 128, bf16, through the real loop
   (``scalable_rec.train.train``): labelled edges/s, loader share and GPU busy % per
   sampler; then the same on the CPU (every core), for the ratio;
3. ``syncs``: training steps under ``torch.cuda.set_sync_debug_mode("warn")`` (bf16, fp16
   with dense tables, fp16 with row-wise sparse tables): every warning, with its line;
4. ``scoring``: scores + mask + top-K (``topk_chunks``) as a share of a bare ``torch.mm``;
5. ``fp16`` and ``sparse_tables``: fp16 with GradScaler (dense tables, fused AdamW) and fp16
   over row-wise sparse tables on CUDA;
6. ``ddp``: ``SCALABLE_REC_FORCE_DDP=1``, one rank through the NCCL DDP path (a subprocess
   of the ``train`` command, fp16 and row-wise tables);
7. ``aggr_max``: refused with one line on CUDA without CUDA scatter kernels;
8. ``ml25m_estimate``: one epoch at ML-25M's 20M training edges from the measured edges/s
   (an estimate: the larger graph's neighbourhoods are not measured).

``--dry-run`` runs the same code on CPU with a small graph (bf16/fp32, no utilisation), to
check the script where no GPU is present; its numbers are not GPU numbers.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from scalable_rec.atomic import atomic_open, write_json_atomic
from scalable_rec.dist import FORCE_DDP_ENV
from scalable_rec.graph import RATES, REV_RATES, RatingGraph, SplitConfig, split_edges
from scalable_rec.model.recommender import check_model_device
from scalable_rec.model.topk import device_chunk_users
from scalable_rec.score import RatedIndex, ScoreConfig, topk_chunks
from scalable_rec.shards import GraphShards
from scalable_rec.source import SkipReport, write_rating_shards
from scalable_rec.source.synthetic import SyntheticSource
from scalable_rec.train import ModelConfig, TrainConfig, train
from scalable_rec.train.loop import build_job, train_step

ML25M_TRAIN_EDGES = 20_000_000  # 80 % of ML-25M's 25M ratings


class UtilisationSampler:
    """Samples GPU utilisation (%) every ``interval`` s in a thread: ``nvidia-smi`` when on
    the PATH, else ``torch.cuda.utilization`` (needs pynvml); empty when neither works."""

    def __init__(self, device_index: int, interval: float = 0.2) -> None:
        self.index, self.interval = device_index, interval
        self.samples: list[float] = []
        self.source = "nvidia-smi" if shutil.which("nvidia-smi") else "torch.cuda.utilization"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _read(self) -> float | None:
        try:
            if self.source == "nvidia-smi":
                out = subprocess.run(
                    [
                        "nvidia-smi",
                        f"--id={self.index}",
                        "--query-gpu=utilization.gpu",
                        "--format=csv,noheader,nounits",
                    ],
                    capture_output=True,
                    text=True,
                    timeout=5,
                )
                return float(out.stdout.strip().splitlines()[0])
            return float(torch.cuda.utilization(self.index))
        except Exception:  # a sampler that cannot read reports no samples, not a crash
            return None

    def _run(self) -> None:
        while not self._stop.is_set():
            value = self._read()
            if value is not None:
                self.samples.append(value)
            self._stop.wait(self.interval)

    def __enter__(self) -> UtilisationSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict:
        s = self.samples
        return {
            "source": self.source,
            "samples": len(s),
            "mean_pct": sum(s) / len(s) if s else None,
            "max_pct": max(s) if s else None,
        }


def gpu_sampler_available() -> bool:
    """Whether this version's ``TrainConfig`` takes ``sampler="torch"`` (the GPU sampler)."""
    if "sampler" not in {f.name for f in dataclasses.fields(TrainConfig)}:
        return False
    try:
        TrainConfig(sampler="torch")
    except (TypeError, ValueError):
        return False
    return True


def samplers() -> list[str]:
    return ["pyg", "torch"] if gpu_sampler_available() else ["pyg"]


def train_cfg(sampler: str, **kw) -> TrainConfig:
    return TrainConfig(progress=False, **({"sampler": sampler} if sampler != "pyg" else {}), **kw)


def bench_sampling(graph, split, device: str, sampler: str, batches: int, workdir: Path) -> dict:
    """Batches of the real training loader (``build_job``), one warm-up batch first."""
    job = build_job(graph, split, ModelConfig(), train_cfg(sampler, epochs=1, device=device), workdir, None)
    it = iter(job.train_loader)
    next(it)
    edges = 0
    t0 = time.perf_counter()
    for _ in range(batches):
        batch = next(it)
        edges += sum(batch[et].edge_index.size(1) for et in (RATES, REV_RATES))
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    workers = job.train_loader.num_workers
    del job, it
    gc.collect()
    return {
        "sampler": sampler,
        "batches": batches,
        "workers": workers,
        "sampled_edges_per_s": edges / seconds,
        "batches_per_s": batches / seconds,
    }


def bench_training(
    graph,
    split,
    device: str,
    precision: str,
    steps: int,
    workdir: Path,
    sampler: str = "pyg",
    table_optimizer: str = "auto",
) -> dict:
    cfg = train_cfg(
        sampler, epochs=1, steps_per_epoch=steps, precision=precision, device=device, table_optimizer=table_optimizer
    )
    util = UtilisationSampler(torch.cuda.current_device()) if device == "cuda" else None
    t0 = time.perf_counter()
    with util or _nothing():
        result = train(graph, split, ModelConfig(hidden=128), cfg, workdir / f"train-{device}-{precision}-{sampler}")
    rec = result.history[-1]
    return {
        "device": device,
        "precision": precision,
        "sampler": sampler,
        "table_optimizer": table_optimizer,
        "steps": rec["steps"],
        "batch_size": cfg.batch_size,
        "threads": torch.get_num_threads(),
        "labelled_edges_per_s": rec["edges_per_s"],
        "loader_share": rec["loader_share"],
        "val_rmse": rec["val_rmse"],
        "wall_s": time.perf_counter() - t0,
        "gpu_utilisation": util.summary() if util else None,
    }


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def bench_syncs(graph, split, device: str, precision: str, table_optimizer: str, steps: int, workdir: Path) -> dict:
    """``train_step`` ``steps`` times under sync debug mode ``warn`` (after one warm-up step)."""
    cfg = TrainConfig(epochs=1, precision=precision, device=device, table_optimizer=table_optimizer, progress=False)
    job = build_job(graph, split, ModelConfig(hidden=128), cfg, workdir / f"syncs-{precision}-{table_optimizer}", None)
    batches = [b.to(job.device) for _, b in zip(range(steps + 1), job.train_loader)]
    train_step(job, batches[0])
    cuda = job.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if cuda:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            for batch in batches[1:]:
                train_step(job, batch)
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode("default")
    syncs = [
        f"{Path(w.filename).name}:{w.lineno}: {str(w.message).splitlines()[0][:160]}"
        for w in caught
        if "synchroniz" in str(w.message).lower()
    ]
    del job, batches
    gc.collect()
    return {
        "precision": precision,
        "table_optimizer": table_optimizer,
        "steps": steps,
        "checked": cuda,
        "syncs": len(syncs),
        "where": sorted(set(syncs)),
    }


def bench_scoring(device: str, users: int, movies: int, hidden: int = 64, rounds: int = 3) -> dict:
    """Scores + mask + top-K (``topk_chunks``) vs bare ``torch.mm``, same shapes and chunks."""
    dev = torch.device(device)
    g = torch.Generator().manual_seed(0)
    zu, zm = torch.randn(users, hidden, generator=g).to(dev), torch.randn(movies, hidden, generator=g).to(dev)
    src = torch.arange(users).repeat_interleave(150)  # ~150 rated movies per user (ML-25M's mean)
    rated = RatedIndex.from_edges(src, torch.randint(0, movies, (src.numel(),), generator=g), users)
    cfg = ScoreConfig(k=10)
    step = device_chunk_users(movies, dev) if dev.type == "cuda" else cfg.chunk_users(movies)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def ours() -> None:
        for _ in topk_chunks(lambda u: zu[u] @ zm.T, users, movies, cfg, rated, device=dev):
            pass

    def roofline() -> None:
        for i in range(0, users, step):
            torch.mm(zu[i : i + step], zm.T)

    def timed(fn) -> float:
        fn()
        sync()
        t0 = time.perf_counter()
        for _ in range(rounds):
            fn()
        sync()
        return (time.perf_counter() - t0) / rounds

    ours_s, mm_s = timed(ours), timed(roofline)
    return {
        "users": users,
        "movies": movies,
        "hidden": hidden,
        "chunk_users": min(step, users),
        "threads": torch.get_num_threads(),
        "pairs_per_s": users * movies / ours_s,
        "mm_pairs_per_s": users * movies / mm_s,
        "fraction_of_mm": mm_s / ours_s,
    }


def bench_ddp(shards: Path, device: str, steps: int, workdir: Path) -> dict:
    """The ``train`` command with ``SCALABLE_REC_FORCE_DDP=1`` (one rank, the DDP path)."""
    run = workdir / "ddp"
    precision = ["--precision", "fp16"] if device == "cuda" else []
    cmd = [
        sys.executable,
        "-m",
        "scalable_rec",
        "train",
        "--shards",
        str(shards),
        "--run-dir",
        str(run),
        "--epochs",
        "1",
        "--steps-per-epoch",
        str(steps),
        "--device",
        device,
        *precision,
        "--table-optimizer",
        "rowwise_adagrad",
        "--hidden",
        "128",
        "--no-progress",
    ]
    env = {**os.environ, FORCE_DDP_ENV: "1"}
    env.pop("WORLD_SIZE", None)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    out: dict[str, Any] = {
        "command": " ".join(cmd[1:]),
        "returncode": proc.returncode,
        "wall_s": time.perf_counter() - t0,
        "ddp_log": "[rank 0]" in proc.stderr,
    }
    if proc.returncode != 0:
        out["stderr_tail"] = proc.stderr[-1500:]
    elif (run / "metrics.json").is_file():
        rec = json.loads((run / "metrics.json").read_text())["history"][-1]
        out.update(labelled_edges_per_s=rec["edges_per_s"], val_rmse=rec["val_rmse"])
    return out


def check_aggr_max(device: str) -> dict:
    try:
        check_model_device(ModelConfig(aggr="max"), torch.device(device))
    except ValueError as err:
        return {"refused": True, "message": str(err)}
    return {"refused": False, "message": f"allowed on {device} (kernels present or CPU)"}


def ml25m_estimate(report: dict) -> dict:
    rows = [r for r in report.get("train", []) if isinstance(r, dict) and r.get("labelled_edges_per_s")]
    return {
        "train_edges": ML25M_TRAIN_EDGES,
        "rows": [
            {
                "device": r["device"],
                "precision": r["precision"],
                "sampler": r["sampler"],
                "epoch_minutes": ML25M_TRAIN_EDGES / r["labelled_edges_per_s"] / 60,
            }
            for r in rows
        ],
    }


def cuda_tests(xml_path: Path | None) -> dict | None:
    if xml_path is None or not xml_path.is_file():
        return None
    root = ET.parse(xml_path).getroot()
    cases, totals = [], dict.fromkeys(("tests", "failures", "errors", "skipped"), 0)
    for suite in [root] if root.tag == "testsuite" else root.findall("testsuite"):
        for key in totals:
            totals[key] += int(suite.get(key, 0))
        for case in suite.iter("testcase"):
            outcome = "passed"
            for tag in ("failure", "error", "skipped"):
                node = case.find(tag)
                if node is not None:
                    outcome = f"{tag}: {(node.get('message') or '')[:200]}"
            cases.append(
                {
                    "test": f"{case.get('classname')}::{case.get('name')}",
                    "outcome": outcome,
                    "seconds": float(case.get("time", 0)),
                }
            )
    return totals | {"cases": cases}


def _num(v, fmt: str = ",.0f") -> str:
    return "n/a" if v is None else format(v, fmt)


def markdown(report: dict) -> str:
    g = report.get("graph", {})
    lines = [
        f"# GPU check ({'DRY RUN on CPU: not GPU numbers' if report['dry_run'] else report['device']})",
        "",
        f"torch {report['torch']}, CUDA {report['cuda']}, python {report['python']}, "
        f"{report['cpu_cores']} CPU cores, graph: {g.get('edges', 0):,} edges, {g.get('users', 0):,} users, "
        f"{g.get('movies', 0):,} movies; GPU sampler in this version: {report['gpu_sampler']}",
        "",
    ]
    steps = report["steps"]
    lines += ["Steps: " + ", ".join(f"{k} {v['status']} ({v['seconds']:.0f}s)" for k, v in steps.items()), ""]
    for name, v in steps.items():
        if v["status"] == "failed":
            lines += [f"**{name} failed**: `{v['error']}`", ""]
    tests = report.get("cuda_tests")
    if tests:
        lines += (
            [
                f"## CUDA tests: {tests['tests']} run, {tests['failures']} failed, {tests['errors']} errors, "
                f"{tests['skipped']} skipped",
                "",
            ]
            + [f"- `{c['test']}`: {c['outcome']}" for c in tests["cases"]]
            + [""]
        )
    if report.get("sampling"):
        lines += [
            "## Sampling (the training loader alone, same seeds)",
            "",
            "| sampler | workers | sampled edges/s | batches/s |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {r['sampler']} | {r['workers']} | {_num(r['sampled_edges_per_s'])} | {r['batches_per_s']:.1f} |"
            for r in report["sampling"]
        ]
        lines.append("")
    train_rows = report.get("train", []) + report.get("fp16", []) + report.get("sparse_tables", [])
    if train_rows:
        lines += [
            "## Training (labelled edges/s, one process, width 128)",
            "",
            "| device | precision | sampler | tables | steps × batch | edges/s | loader share | GPU busy mean / max % |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in train_rows:
            u = r.get("gpu_utilisation") or {}
            util = f"{u['mean_pct']:.0f} / {u['max_pct']:.0f}" if u.get("samples") else "n/a"
            lines.append(
                f"| {r['device']} | {r['precision']} | {r['sampler']} | {r['table_optimizer']} | "
                f"{r['steps']} × {r['batch_size']} | {_num(r['labelled_edges_per_s'])} | "
                f"{r['loader_share']:.0%} | {util} |"
            )
        lines.append("")
    if report.get("syncs"):
        lines += ["## Host syncs in train_step (sync debug mode 'warn')", ""]
        for r in report["syncs"]:
            where = "; ".join(f"`{w}`" for w in r["where"]) or "none"
            lines.append(
                f"- {r['precision']}, tables {r['table_optimizer']}: {r['syncs']} in {r['steps']} steps"
                f"{'' if r['checked'] else ' (not checked: CPU)'}: {where}"
            )
        lines.append("")
    s = report.get("scoring")
    if s:
        lines += [
            "## Full-catalog scoring",
            "",
            f"{s['users']:,} users × {s['movies']:,} movies, hidden {s['hidden']}, {s['chunk_users']:,} users "
            f"a chunk: {s['pairs_per_s']:,.0f} pairs/s (scores + mask + top-10) vs {s['mm_pairs_per_s']:,.0f} "
            f"pairs/s for a bare torch.mm (**{s['fraction_of_mm']:.0%}** of it)",
            "",
        ]
    d = report.get("ddp")
    if d:
        lines += [
            "## One rank through the DDP path (SCALABLE_REC_FORCE_DDP=1)",
            "",
            f"`{d['command']}`: exit {d['returncode']}, process group log {d['ddp_log']}, "
            f"{_num(d.get('labelled_edges_per_s'))} edges/s, {d['wall_s']:.0f}s",
            "",
        ]
        if d.get("stderr_tail"):
            lines += ["```", d["stderr_tail"], "```", ""]
    a = report.get("aggr_max")
    if a:
        lines += ["## --aggr max", "", f"{'refused' if a['refused'] else 'allowed'}: {a['message']}", ""]
    e = report.get("ml25m_estimate")
    if e:
        lines += [
            "## ML-25M shape: one epoch (estimate from the measured edges/s)",
            "",
            "| device | precision | sampler | minutes per epoch of 20M edges |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {r['device']} | {r['precision']} | {r['sampler']} | {r['epoch_minutes']:.1f} |" for r in e["rows"]
        ]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="folder for gpu_check.json and gpu_check.md")
    parser.add_argument("--tests-xml", type=Path, help="JUnit XML of the CUDA tests to include")
    parser.add_argument("--dry-run", action="store_true", help="CPU, small sizes: checks the script, not the GPU")
    parser.add_argument("--edges", type=int, help="synthetic rating edges (default 1,000,000; dry run 20,000)")
    parser.add_argument("--steps", type=int, help="training steps per GPU row (default 150; dry run 4)")
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible to torch (use --dry-run to check the script on CPU)", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = "cpu" if args.dry_run else "cuda"
    edges = args.edges or (20_000 if args.dry_run else 1_000_000)
    steps = args.steps or (4 if args.dry_run else 150)
    report: dict[str, Any] = {
        "dry_run": args.dry_run,
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "cpu_cores": len(os.sched_getaffinity(0)),
        "threads": torch.get_num_threads(),
        "gpu_sampler": gpu_sampler_available(),
        "edges": edges,
        "steps_per_row": steps,
        "steps": {},
        "cuda_tests": cuda_tests(args.tests_xml),
    }

    def save() -> None:
        write_json_atomic(out / "gpu_check.json", report)
        with atomic_open(out / "gpu_check.md", "w") as f:
            f.write(markdown(report))

    def step(name: str, fn: Callable[[], Any], append: bool = False) -> None:
        t0 = time.perf_counter()
        print(f"gpu_check: {name} ...", file=sys.stderr, flush=True)
        try:
            value = fn()
            if append:
                report.setdefault(name, []).append(value)
            else:
                report[name] = value
            status = {"status": "done"}
        except Exception as err:  # recorded; the next step still runs
            status = {
                "status": "failed",
                "error": f"{type(err).__name__}: {err}"[:500],
                "traceback": traceback.format_exc()[-3000:],
            }
        key = name if not append else f"{name}[{len(report.get(name, []))}]"
        report["steps"][key] = {**status, "seconds": time.perf_counter() - t0}
        save()

    ratio = edges / 25_000_000  # users and movies scaled from ML-25M's shape, as benchmarks/conftest.py
    source = SyntheticSource(
        num_users=max(100, int(162_000 * ratio**0.75)),
        num_movies=max(100, int(59_000 * ratio**0.6)),
        num_edges=edges,
        seed=0,
    )
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        workdir = Path(tmp)
        write_rating_shards(source, f"{tmp}/shards", SkipReport())
        graph = RatingGraph.from_shards(GraphShards(f"{tmp}/shards", verify=False))
        split = split_edges(graph, SplitConfig())
        split = type(split)(train=split.train, val=split.val[:20_000], test=split.test)
        report["graph"] = {"edges": edges, "users": graph.num_users, "movies": graph.num_movies}
        save()
        low = "bf16"
        for sampler in samplers():
            step(
                "sampling",
                lambda: bench_sampling(graph, split, device, sampler, 4 * steps // 5 or 1, workdir),
                append=True,
            )
        for sampler in samplers():
            step("train", lambda: bench_training(graph, split, device, low, steps, workdir, sampler), append=True)
        cpu_steps = max(2, steps // 3)
        if device == "cuda":
            step("train", lambda: bench_training(graph, split, "cpu", "fp32", cpu_steps, workdir), append=True)
        for precision, tables in ((low, "adamw"), ("fp16", "adamw"), ("fp16", "rowwise_adagrad")):
            if precision == "fp16" and device != "cuda":
                precision = "fp32"
            step("syncs", lambda: bench_syncs(graph, split, device, precision, tables, 5, workdir), append=True)
        step("scoring", lambda: bench_scoring(device, *((2048, 20_000) if args.dry_run else (16_384, 59_000))))
        fp16 = "fp16" if device == "cuda" else "fp32"
        step(
            "fp16",
            lambda: bench_training(graph, split, device, fp16, steps // 2, workdir, table_optimizer="adamw"),
            append=True,
        )
        step(
            "sparse_tables",
            lambda: bench_training(graph, split, device, fp16, steps // 2, workdir, table_optimizer="rowwise_adagrad"),
            append=True,
        )
        step("ddp", lambda: bench_ddp(Path(tmp) / "shards", device, max(2, steps // 5), workdir))
        step("aggr_max", lambda: check_aggr_max(device))
        step("ml25m_estimate", lambda: ml25m_estimate(report))
    print(markdown(report))
    return 1 if any(v["status"] == "failed" for v in report["steps"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
