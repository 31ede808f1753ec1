"""Seed-by-seed screen of ``rating_messages`` variants against the default 'none', from
``experiments/quality.py`` outputs: runs of the default (``--none LABEL=PATH``, its
default-run rows) and variants (``--variant MODE=PATH``, the ablation row whose override
sets that mode). A variant passes on a seed when its validation Recall@10 is above, and
its validation RMSE no worse than, every listed run of the default on that seed.
Writes ``benchmarks/reference/rating-screen-ml-latest-small.{json,md}``.

    python experiments/rating_screen.py \\
        --none stored=benchmarks/reference/quality-part-26-previous.json \\
        --variant relation=benchmarks/reference/quality-part-26-rating-relation.json
"""

import argparse
import json

KEYS = ("best_val_recall@10", "best_val_rmse", "recall@10", "ndcg@10", "rmse", "best_epoch", "epochs")
OUT = "benchmarks/reference/rating-screen-ml-latest-small"


def labelled(value: str) -> tuple[str, str]:
    label, sep, path = value.partition("=")
    if not sep or not label or not path:
        raise argparse.ArgumentTypeError(f"expected LABEL=PATH (got {value!r})")
    return label, path


p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--none", type=labelled, action="append", required=True, help="LABEL=quality.py JSON of the default")
p.add_argument("--variant", type=labelled, action="append", required=True, help="MODE=quality.py JSON (ablation)")
args = p.parse_args()

nones = []  # (label, commit, {seed: row})
for label, path in args.none:
    part = json.load(open(path))
    nones.append((label, part["commit"], {r["seed"]: r for r in part["methods"]["scalable-rec (default run)"]}))
variants = []  # (mode, commit, {seed: row})
for mode, path in args.variant:
    part = json.load(open(path))
    row = next(a for a in part["ablation"] if a["overrides"].get("model", {}).get("rating_messages") == mode)
    variants.append((mode, part["commit"], {r["seed"]: r for r in row["runs"]}))

rows = []
for seed in sorted({s for _, _, runs in variants for s in runs}):
    defaults = [(label, runs[seed]) for label, _, runs in nones if seed in runs]
    row = {"seed": seed, "none": {label: {k: r.get(k) for k in KEYS} for label, r in defaults}, "variants": {}}
    for mode, _, runs in variants:
        if seed not in runs:
            continue
        r = runs[seed]
        holds = bool(defaults) and all(
            r["best_val_recall@10"] > m["best_val_recall@10"] and r["best_val_rmse"] <= m["best_val_rmse"]
            for _, m in defaults
        )
        row["variants"][mode] = {**{k: r.get(k) for k in KEYS}, "rule_holds": holds}
    rows.append(row)
adopted = {
    mode: all(r["variants"][mode]["rule_holds"] for r in rows if mode in r["variants"]) for mode, _, _ in variants
}
out = {
    "rule": "validation Recall@10 (best.pt) above, validation RMSE (best.pt) no worse than, every listed run of "
    "the default on the seed",
    "none_runs": {label: commit for label, commit, _ in nones},
    "variant_commits": {mode: commit for mode, commit, _ in variants},
    "threads": 1,
    "rows": rows,
    "adopted": adopted,
}
json.dump(out, open(f"{OUT}.json", "w"), indent=1)


def f(v):
    return "–" if v is None else f"{v:.4f}"


lines = [
    "Screen of `rating_messages` on shared ml-latest-small (split seed = model seed), rule: "
    + out["rule"]
    + ". Runs of the default `none`, labelled by the commit that ran them: "
    + ", ".join(label for label, _, _ in nones)
    + "; variants: "
    + ", ".join(f"`{mode}` (commit {commit})" for mode, commit, _ in variants)
    + ". 1 thread on the shared 2-core CPU machine. Validation numbers at best.pt (selected by validation "
    "Recall@10); test numbers of the same model.",
    "",
    "| seed | model | val Recall@10 | val RMSE | test Recall@10 | test NDCG@10 | test RMSE | best epoch | rule holds |",
    "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
]
for r in rows:
    entries = [(f"none ({label})", m, "") for label, m in r["none"].items()]
    entries += [(mode, m, "yes" if m["rule_holds"] else "no") for mode, m in r["variants"].items()]
    for name, m, holds in entries:
        lines.append(
            f"| {r['seed']} | {name} | {f(m['best_val_recall@10'])} | {f(m['best_val_rmse'])} | "
            f"{f(m['recall@10'])} | {f(m['ndcg@10'])} | {f(m['rmse'])} | {m['best_epoch']} | {holds} |"
        )
lines += [
    "",
    "Adopted as the default: "
    + ", ".join(f"`{mode}` {'yes' if ok else 'no'}" for mode, ok in adopted.items())
    + ". Made by `experiments/rating_screen.py "
    + " ".join(f"--none {label}={path}" for label, path in args.none)
    + " "
    + " ".join(f"--variant {mode}={path}" for mode, path in args.variant)
    + "` from `experiments/quality.py` runs (`--seeds S --baselines` for the default, "
    "`--no-model --baselines --ablation rating-MODE --ablation-seeds S` for a variant; OMP_NUM_THREADS=1).",
]
open(f"{OUT}.md", "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
