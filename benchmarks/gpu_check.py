"""The CUDA benchmarks of ``scripts/gpu_check.sh``: one JSON + Markdown report.

    python benchmarks/gpu_check.py --out DIR [--tests-xml DIR/cuda-tests.xml] [--dry-run]

- training: labelled edges/s per precision (fp32, bf16, fp16) through the real loop
  (``scalable_rec.train.train``, loader included), GPU utilisation sampled during it;
- scoring: full-catalog pairs/s (scores + mask + top-K, ``topk_chunks``) beside a bare
  ``torch.mm`` of the same shapes and chunking (the roofline);
- the CUDA test results (JUnit XML written by pytest), when given.

``--dry-run`` runs the same code on CPU with a small graph (fp32/bf16 only, utilisation
not sampled), to check the script where no GPU is present; its numbers are not GPU numbers.
"""
from __future__ import annotations

import argparse
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

from scalable_rec.atomic import atomic_open, write_json_atomic
from scalable_rec.graph import RatingGraph, SplitConfig, split_edges
from scalable_rec.score import RatedIndex, ScoreConfig, topk_chunks
from scalable_rec.source import SkipReport, write_rating_shards
from scalable_rec.source.synthetic import SyntheticSource
from scalable_rec.shards import GraphShards
from scalable_rec.train import ModelConfig, TrainConfig, train


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
                out = subprocess.run(["nvidia-smi", f"--id={self.index}", "--query-gpu=utilization.gpu",
                                      "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=5)
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

    def __enter__(self) -> "UtilisationSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict:
        s = self.samples
        return {"source": self.source, "samples": len(s), "mean_pct": sum(s) / len(s) if s else None,
                "max_pct": max(s) if s else None}


def bench_training(graph: RatingGraph, device: str, precisions: list[str], steps: int, sample_util: bool,
                   workdir: Path) -> list[dict]:
    split = split_edges(graph, SplitConfig())
    split = type(split)(train=split.train, val=split.val[:20_000], test=split.test)
    rows = []
    for precision in precisions:
        cfg = TrainConfig(epochs=1, steps_per_epoch=steps, precision=precision, device=device, progress=False)
        sampler = UtilisationSampler(torch.cuda.current_device()) if sample_util else None
        t0 = time.perf_counter()
        if sampler:
            with sampler:
                result = train(graph, split, ModelConfig(), cfg, workdir / f"train-{precision}")
        else:
            result = train(graph, split, ModelConfig(), cfg, workdir / f"train-{precision}")
        rec = result.history[-1]
        rows.append({"precision": precision, "steps": rec["steps"], "batch_size": cfg.batch_size,
                     "labelled_edges_per_s": rec["edges_per_s"], "loader_share": rec["loader_share"],
                     "val_rmse": rec["val_rmse"], "wall_s": time.perf_counter() - t0,
                     "gpu_utilisation": sampler.summary() if sampler else None})
    return rows


def bench_scoring(device: str, users: int, movies: int, hidden: int = 64, rounds: int = 3) -> dict:
    """Scores + mask + top-K (``topk_chunks``) vs bare ``torch.mm``, same shapes and chunks."""
    dev = torch.device(device)
    g = torch.Generator().manual_seed(0)
    zu, zm = torch.randn(users, hidden, generator=g).to(dev), torch.randn(movies, hidden, generator=g).to(dev)
    src = torch.arange(users).repeat_interleave(150)  # ~150 rated movies per user (ML-25M's mean)
    rated = RatedIndex.from_edges(src, torch.randint(0, movies, (src.numel(),), generator=g), users)
    cfg = ScoreConfig(k=10, score_memory_mb=1024 if dev.type == "cuda" else 256)
    step = cfg.chunk_users(movies)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def ours() -> None:
        for _ in topk_chunks(lambda u: zu[u.to(dev)] @ zm.T, users, movies, cfg, rated):
            pass

    def roofline() -> None:
        for i in range(0, users, step):
            torch.mm(zu[i:i + step], zm.T)

    def timed(fn) -> float:
        fn()
        sync()
        t0 = time.perf_counter()
        for _ in range(rounds):
            fn()
        sync()
        return (time.perf_counter() - t0) / rounds

    ours_s, mm_s = timed(ours), timed(roofline)
    return {"users": users, "movies": movies, "hidden": hidden, "chunk_users": step,
            "pairs_per_s": users * movies / ours_s, "mm_pairs_per_s": users * movies / mm_s,
            "fraction_of_mm": mm_s / ours_s}


def cuda_tests(xml_path: Path | None) -> dict | None:
    if xml_path is None or not xml_path.is_file():
        return None
    root = ET.parse(xml_path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    cases = []
    for case in suite.iter("testcase"):
        outcome = "passed"
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = f"{tag}: {(node.get('message') or '')[:200]}"
        cases.append({"test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                      "seconds": float(case.get("time", 0))})
    return {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")} | {"cases": cases}


def markdown(report: dict) -> str:
    lines = [f"# GPU check ({'DRY RUN on CPU: not GPU numbers' if report['dry_run'] else report['device']})", "",
             f"torch {report['torch']}, CUDA {report['cuda']}, python {report['python']}, "
             f"graph: {report['graph']['edges']:,} edges, {report['graph']['users']:,} users, "
             f"{report['graph']['movies']:,} movies", ""]
    tests = report.get("cuda_tests")
    if tests:
        lines += [f"## CUDA tests: {tests['tests']} run, {tests['failures']} failed, {tests['errors']} errors, "
                  f"{tests['skipped']} skipped", ""] + [f"- `{c['test']}`: {c['outcome']}" for c in tests["cases"]] + [""]
    lines += ["## Training (labelled edges/s, one process)", "",
              "| precision | steps × batch | edges/s | loader share | GPU util mean / max % |", "|---|---|---|---|---|"]
    for r in report["training"]:
        u = r["gpu_utilisation"] or {}
        util = f"{u.get('mean_pct'):.0f} / {u.get('max_pct'):.0f}" if u.get("samples") else "n/a"
        lines.append(f"| {r['precision']} | {r['steps']} × {r['batch_size']} | {r['labelled_edges_per_s']:,.0f} | "
                     f"{r['loader_share']:.0%} | {util} |")
    s = report["scoring"]
    lines += ["", "## Full-catalog scoring", "",
              f"{s['users']:,} users × {s['movies']:,} movies, hidden {s['hidden']}: "
              f"{s['pairs_per_s']:,.0f} pairs/s (scores + mask + top-10) vs {s['mm_pairs_per_s']:,.0f} pairs/s for a "
              f"bare torch.mm ({s['fraction_of_mm']:.0%} of it)", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="folder for gpu_check.json and gpu_check.md")
    parser.add_argument("--tests-xml", type=Path, help="JUnit XML of the CUDA tests to include")
    parser.add_argument("--dry-run", action="store_true", help="CPU, small sizes: checks the script, not the GPU")
    parser.add_argument("--edges", type=int, help="synthetic rating edges (default 1,000,000; dry run 20,000)")
    parser.add_argument("--steps", type=int, help="training steps per precision (default 200; dry run 5)")
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible to torch (use --dry-run to check the script on CPU)", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = "cpu" if args.dry_run else "cuda"
    edges = args.edges or (20_000 if args.dry_run else 1_000_000)
    steps = args.steps or (5 if args.dry_run else 200)
    precisions = ["fp32", "bf16"] if args.dry_run else ["fp32", "bf16", "fp16"]
    ratio = edges / 25_000_000  # users and movies scaled from ML-25M's shape, as benchmarks/conftest.py
    source = SyntheticSource(num_users=max(100, int(162_000 * ratio ** 0.75)),
                             num_movies=max(100, int(59_000 * ratio ** 0.6)), num_edges=edges, seed=0)
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        write_rating_shards(source, f"{tmp}/shards", SkipReport())
        graph = RatingGraph.from_shards(GraphShards(f"{tmp}/shards", verify=False))
        report = {
            "dry_run": args.dry_run, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
            "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
            "threads": torch.get_num_threads(),
            "graph": {"edges": edges, "users": graph.num_users, "movies": graph.num_movies},
            "cuda_tests": cuda_tests(args.tests_xml),
            "training": bench_training(graph, device, precisions, steps, sample_util=device == "cuda",
                                       workdir=Path(tmp)),
            "scoring": bench_scoring(device, *((2048, 20_000) if args.dry_run else (16_384, 59_000))),
        }
    write_json_atomic(out / "gpu_check.json", report)
    with atomic_open(out / "gpu_check.md", "w") as f:
        f.write(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
