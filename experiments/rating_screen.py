"""Seed-by-seed screen of ``rating_messages`` 'relation' against the default 'none', from
``experiments/quality.py`` outputs: the default's rows (``--none``), the ablation row
rating-relation (``--relation``) and optionally a rerun of the default (``--rerun``).
Writes ``benchmarks/reference/rating-screen-ml-latest-small.{json,md}``.

    python experiments/rating_screen.py --rerun runs/none-seed0.json
"""

import argparse
import json

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--none", default="benchmarks/reference/quality-part-26-previous.json")
p.add_argument("--relation", default="benchmarks/reference/quality-part-26-rating-relation.json")
p.add_argument("--rerun", default=None, help="quality.py JSON of the default rerun on some seeds")
args = p.parse_args()
ref = json.load(open(args.none))
rel = json.load(open(args.relation))
rerun = json.load(open(args.rerun)) if args.rerun else None
keys = ("best_val_recall@10", "best_val_rmse", "recall@10", "ndcg@10", "rmse", "best_epoch", "epochs")
none = {r["seed"]: r for r in ref["methods"]["scalable-rec (default run)"]}
again = {r["seed"]: r for r in rerun["methods"]["scalable-rec (default run)"]} if rerun else {}
rows = []
for r in rel["ablation"][0]["runs"]:
    s = r["seed"]
    # against every run of the default on that seed (the stored one and a rerun)
    holds = all(
        r["best_val_recall@10"] > m["best_val_recall@10"] and r["best_val_rmse"] <= m["best_val_rmse"]
        for m in [none[s]] + ([again[s]] if s in again else [])
    )
    rows.append(
        {
            "seed": s,
            "none": {k: none[s].get(k) for k in keys},
            "none_rerun": {k: again[s].get(k) for k in keys} if s in again else None,
            "relation": {k: r.get(k) for k in keys},
            "rule_holds": holds,
        }
    )
out = {
    "rule": "validation Recall@10 (best.pt) up without a worse validation RMSE (best.pt), seed by seed",
    "none_commit": "6767ed5",
    "none_rerun_commit": rerun["commit"] if rerun else None,
    "relation_commit": rel["commit"],
    "threads": 1,
    "machine": rel["machine"],
    "rows": rows,
    "adopted": all(r["rule_holds"] for r in rows),
}
json.dump(out, open("benchmarks/reference/rating-screen-ml-latest-small.json", "w"), indent=1)


def f(v):
    return "–" if v is None else f"{v:.4f}"


lines = [
    "Screen of `rating_messages` on shared ml-latest-small (split seed = model seed), rule: "
    + out["rule"]
    + ". `none` is the default row of the quality table (commit 6767ed5"
    + (f"; rerun at {out['none_rerun_commit']} where given" if rerun else "")
    + "), `relation` its "
    f"ablation row rating-relation (commit {out['relation_commit']}); 1 thread, {out['machine']}. "
    "Validation numbers at best.pt (selected by validation Recall@10); test numbers of the same model.",
    "",
    "| seed | model | val Recall@10 | val RMSE | test Recall@10 | test NDCG@10 | test RMSE | best epoch | rule holds |",
    "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
]
for r in rows:
    for name in ("none", "none_rerun", "relation"):
        m = r[name]
        if m is None:
            continue
        lines.append(
            f"| {r['seed']} | {name.replace('_', ' ')} | {f(m['best_val_recall@10'])} | {f(m['best_val_rmse'])} | "
            f"{f(m['recall@10'])} | {f(m['ndcg@10'])} | {f(m['rmse'])} | {m['best_epoch']} | "
            + ("yes" if r["rule_holds"] else "no") * (name == "relation")
            + " |"
        )
lines += [
    "",
    f"Adopted as the default: {'yes' if out['adopted'] else 'no'}. Made by `experiments/rating_screen.py` from "
    f"`{args.none}` and `{args.relation}`"
    + (" and a rerun of the default (`experiments/quality.py --seeds 0 --baselines`)" if rerun else "")
    + ".",
]
open("benchmarks/reference/rating-screen-ml-latest-small.md", "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
