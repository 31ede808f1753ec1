"""What ``--deterministic`` costs and buys: two identical CLI trainings per mode.

    PYTHONPATH=. python benchmarks/bench_determinism.py [--edges 100000] [--steps 40] [--modes ...] [--out FILE]

Each mode trains the same synthetic graph twice through ``scalable-rec train`` in child
processes (one epoch capped at ``--steps`` steps, then validation) and reports the
training seconds of each run (``metrics.json`` ``timings.train_s``) and the largest
absolute difference between the two runs' ``best.pt`` parameters. Modes: ``default``
(all cores), ``threads1`` (``--threads 1``) and ``deterministic`` (``--deterministic``: one
thread plus torch's deterministic algorithms).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
MODES = {"default": [], "threads1": ["--threads", "1"], "deterministic": ["--deterministic"]}


def cli(*argv: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("OMP_NUM_THREADS", None)  # the CLI picks threads itself
    subprocess.run(
        [sys.executable, "-m", "scalable_rec.cli", *argv],
        check=True,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--edges", type=int, default=100_000)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES), help="modes to run")
    parser.add_argument("--out", default=None, help="also write the results as JSON here")
    args = parser.parse_args()
    results = {
        "cores": os.cpu_count(),
        "edges": args.edges,
        "steps": args.steps,
        "load_average_start": os.getloadavg()[0],
        "modes": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        shards = Path(tmp) / "shards"
        cli("synth", "--preset", "small", "--edges", str(args.edges), "--out", str(shards))
        for mode in args.modes:
            flags = MODES[mode]
            seconds, params = [], []
            for i in range(2):
                run_dir = Path(tmp) / f"{mode}-{i}"
                cli(
                    "train",
                    "--shards",
                    str(shards),
                    "--run-dir",
                    str(run_dir),
                    "--epochs",
                    "1",
                    "--steps-per-epoch",
                    str(args.steps),
                    "--no-progress",
                    *flags,
                )
                seconds.append(json.loads((run_dir / "metrics.json").read_text())["timings"]["train_s"])
                params.append(torch.load(run_dir / "best.pt", weights_only=True)["model"])
            diff = max(float((params[0][k].float() - params[1][k].float()).abs().max()) for k in params[0])
            results["modes"][mode] = {"train_s": seconds, "max_abs_param_diff": diff}
            print(f"{mode:>16}: train {seconds[0]:.1f}s / {seconds[1]:.1f}s, max |Δparam| {diff:.3g}", flush=True)
    results["load_average_end"] = os.getloadavg()[0]
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
