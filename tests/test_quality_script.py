import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "quality.py"


@pytest.fixture(scope="module")
def quality():
    spec = importlib.util.spec_from_file_location("quality_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _result(methods, seeds=(0, 1, 2), ablation=()):
    return {
        "seeds": list(seeds),
        "relevance_threshold": 4.0,
        "threads": 1,
        "machine": "x",
        "commit": "abc",
        "target": {"rmse": 0.85, "recall@10": 0.23, "ndcg@10": 0.24},
        "methods": methods,
        "ablation": list(ablation),
        "ablation_seeds": [0],
    }


def test_markdown_reports_mean_std_and_range_per_method(quality):
    rows = [{"seed": s, "recall@10": r, "ndcg@10": r, "rmse": 0.9} for s, r in enumerate([0.1, 0.2, 0.3])]
    table = quality.markdown(_result({"ease": rows, "pop": [{"seed": 0, "recall@10": 0.1, "ndcg@10": 0.1}]}))
    assert "| ease | 0.2000 ± 0.1000 (0.1000–0.3000) |" in table
    assert "| pop | 0.1000 ± 0.0000 (0.1000–0.1000) | 0.1000 ± 0.0000 (0.1000–0.1000) | – |" in table
    assert "≥ 0.23" in table and "≤ 0.85" in table


def test_ablation_table_shows_the_validation_recall_that_selected_each_run(quality):
    runs = [
        {"seed": 0, "recall@10": 0.15, "ndcg@10": 0.14, "rmse": 0.87, "best_val_recall@10": 0.16, "best_val_rmse": 0.88}
    ]
    result = _result(
        {
            quality.MODEL: [
                {
                    "seed": 0,
                    "recall@10": 0.2,
                    "ndcg@10": 0.2,
                    "rmse": 0.86,
                    "best_val_recall@10": 0.19,
                    "best_val_rmse": 0.87,
                }
            ]
        },
        ablation=[{"name": "no-x", "what": "without x", "runs": runs}],
    )
    table = quality.markdown(result)
    assert "| val Recall@10 (best.pt) | val RMSE (best.pt) | Recall@10 |" in table
    assert "| no-x | without x | 0.1600 ± 0.0000 (0.1600–0.1600) | 0.8800 ± 0.0000 (0.8800–0.8800) | 0.1500" in table
    assert "| default | the package's defaults (rows above) | 0.1900 ± 0.0000 (0.1900–0.1900) | 0.8700" in table


def test_combine_merges_parts_and_refuses_a_seed_twice(quality):
    model0 = _result({"model": [{"seed": 0, "rmse": 0.8}]}, seeds=(0,), ablation=[{"name": "a", "runs": []}])
    model1 = _result({"model": [{"seed": 1, "rmse": 0.9}]}, seeds=(1,))
    base = _result({"ease": [{"seed": 0, "recall@10": 0.2}]})
    out = quality.combine([model0, model1, base])
    assert list(out["methods"]) == ["model", "ease"] and len(out["ablation"]) == 1
    assert [r["seed"] for r in out["methods"]["model"]] == [0, 1] and out["seeds"] == [0, 1, 2]
    with pytest.raises(SystemExit, match="same seed"):
        quality.combine([model0, model0])


def test_combine_joins_an_ablation_row_split_over_seed_processes(quality):
    def part(seed):
        r = _result({}, seeds=(seed,), ablation=[{"name": "no-x", "what": "w", "runs": [{"seed": seed}]}])
        return dict(r, ablation_seeds=[seed])

    out = quality.combine([part(0), part(1), part(2)])
    assert [a["name"] for a in out["ablation"]] == ["no-x"]
    assert [r["seed"] for r in out["ablation"][0]["runs"]] == [0, 1, 2] and out["ablation_seeds"] == [0, 1, 2]
    with pytest.raises(SystemExit, match="ablation 'no-x' for the same seed"):
        quality.combine([part(0), part(0)])


def test_update_doc_replaces_only_the_marked_block(quality, tmp_path):
    readme = tmp_path / "RESULTS.md"
    readme.write_text(f"intro\n{quality.MARK_START}\nold\n{quality.MARK_END}\noutro\n")
    quality.update_doc(readme, "new table\n")
    assert readme.read_text() == f"intro\n{quality.MARK_START}\nnew table\n{quality.MARK_END}\noutro\n"
    (tmp_path / "bare.md").write_text("no markers\n")
    with pytest.raises(SystemExit, match="no"):
        quality.update_doc(tmp_path / "bare.md", "x")
