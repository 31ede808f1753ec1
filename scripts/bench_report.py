#!/usr/bin/env python
"""Renders pytest-benchmark JSON to a Markdown table and a PNG chart; compares two runs.

    python scripts/bench_report.py benchmarks/results/latest.json
    python scripts/bench_report.py OLD.json NEW.json --out report      # comparison

Each row shows the median time and the throughput figures the benchmark recorded in
``extra_info`` (keys ending in ``_per_s``, ratios such as ``speedup`` and
``fraction_of_mm``). With two files, a ``new/old`` column compares medians.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

RATIO_KEYS = ("speedup", "fraction_of_mm", "loader_share")


def load(path: str) -> dict[str, dict]:
    doc = json.loads(Path(path).read_text())
    return {b["fullname"].split("::", 1)[-1]: b for b in doc["benchmarks"]}, doc.get("machine_info", {})


def throughput(extra: dict) -> str:
    parts = [f"{k}={v:,.0f}" for k, v in extra.items() if k.endswith("_per_s") and isinstance(v, (int, float))]
    parts += [f"{k}={v:.3g}" for k, v in extra.items() if k in RATIO_KEYS and isinstance(v, (int, float))]
    return ", ".join(parts)


def markdown(new: dict, old: dict | None, machine: dict) -> str:
    lines = [
        f"Machine: {machine.get('cpu', {}).get('brand_raw', '?')}, {machine.get('cpu', {}).get('count', '?')} cores, "
        f"python {machine.get('python_version', '?')}",
        "",
    ]
    header = "| benchmark | median s | throughput |" + (" old median s | new/old |" if old else "")
    lines += [header, "|---|---:|---|" + ("---:|---:|" if old else "")]
    for name, b in sorted(new.items()):
        med = b["stats"]["median"]
        row = f"| {name} | {med:.4f} | {throughput(b.get('extra_info', {}))} |"
        if old:
            o = old.get(name)
            row += f" {o['stats']['median']:.4f} | {med / o['stats']['median']:.2f} |" if o else " – | – |"
        lines.append(row)
    return "\n".join(lines) + "\n"


def chart(new: dict, old: dict | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted(new)
    fig, ax = plt.subplots(figsize=(9, 0.4 * len(names) + 1.5))
    y = range(len(names))
    ax.barh(
        [i + (0.2 if old else 0) for i in y],
        [new[n]["stats"]["median"] for n in names],
        height=0.4,
        label="new" if old else "median",
    )
    if old:
        ax.barh(
            [i - 0.2 for i in y], [old[n]["stats"]["median"] if n in old else 0 for n in names], height=0.4, label="old"
        )
        ax.legend()
    ax.set_yticks(list(y), names, fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("median seconds (log)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("files", nargs="+", help="one JSON (report) or two (OLD NEW, comparison)")
    p.add_argument("--out", help="output prefix (default: beside the newest JSON)")
    args = p.parse_args()
    if len(args.files) > 2:
        p.error("give one or two JSON files")
    new, machine = load(args.files[-1])
    old = load(args.files[0])[0] if len(args.files) == 2 else None
    out = Path(args.out) if args.out else Path(args.files[-1]).with_suffix("")
    text = markdown(new, old, machine)
    out.with_suffix(".md").write_text(text)
    chart(new, old, out.with_suffix(".png"))
    print(text)
    print(f"wrote {out.with_suffix('.md')} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
