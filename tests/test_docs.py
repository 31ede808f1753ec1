"""The documentation as a reader meets it: a short README without lab notes, links that
resolve (files and #anchors), the generated result blocks where their scripts write them,
and indexes that list every benchmark, reference file and experiment."""

import importlib.util
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
RESULTS = ROOT / "docs" / "RESULTS.md"
BLOCKS = ("quality", "scale", "arango-export")

# docs/ pages written on parallel branches of the same change; linked already. Once a page
# exists, the test below fails until it is taken off this set, so the set only shrinks.
PENDING: set[str] = set()  # pages other documents may link to before they exist

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def markdown_files() -> list[Path]:
    files = [README, ROOT / "CHANGELOG.md", ROOT / "benchmarks" / "README.md", ROOT / "experiments" / "README.md"]
    return files + sorted((ROOT / "docs").glob("*.md"))


def anchors(path: Path) -> set[str]:
    """GitHub's heading ids: lower case, punctuation dropped, spaces to hyphens."""
    text = FENCE.sub("", path.read_text())
    out = set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*$", text, re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        out.add(slug)
    return out


def relative_links(path: Path) -> list[str]:
    text = FENCE.sub("", path.read_text())
    text = re.sub(r"`[^`\n]*`", "", text)  # inline code is not a link
    return [t for t in LINK.findall(text) if not re.match(r"[a-z]+:", t)]


def broken_links(path: Path, root: Path = ROOT) -> list[str]:
    broken = []
    for target in relative_links(path):
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        rel = dest.relative_to(root).as_posix() if dest.is_relative_to(root) else str(dest)
        if rel in PENDING and not dest.exists():
            continue
        if not dest.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target} (no heading #{anchor} in {rel})")
    return broken


def test_readme_is_a_short_guide():
    lines = README.read_text().splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines (at most 250)"
    long = [i + 1 for i, line in enumerate(lines) if len(line) > 120]
    assert not long, f"README.md lines over 120 characters: {long}"


def test_readme_holds_no_lab_notes():
    text = README.read_text()
    hashes = [t for t in re.findall(r"\b[0-9a-f]{7,40}\b", text) if re.search(r"\d", t) and re.search(r"[a-f]", t)]
    assert not hashes, f"commit-hash-looking tokens in README.md: {hashes}"
    notes = re.findall(
        r"(?i)\bissues?\s*#?\d+|(?<![\w/])#\d+\b|\bmeasured\b|\bbefore issue\b|\bformer default\b"
        r"|\bthis round\b",
        text,
    )
    assert not notes, f"issue numbers or lab notes in README.md: {notes}"


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_resolves(path):
    assert not broken_links(path), f"{path.relative_to(ROOT)}: {broken_links(path)}"


def test_pending_pages_leave_the_list_once_they_exist():
    present = sorted(p for p in PENDING if (ROOT / p).exists())
    assert not present, f"{present} exist now: take them off PENDING in tests/test_docs.py"


def test_link_check_sees_a_broken_file_and_a_broken_anchor(tmp_path):
    (tmp_path / "a.md").write_text("# Title\n[ok](b.md#part-one) [gone](c.md) [bad](b.md#nope) `[code](x.md)`\n")
    (tmp_path / "b.md").write_text("## Part one\n")
    assert broken_links(tmp_path / "a.md", tmp_path) == ["c.md (no such file)", "b.md#nope (no heading #nope in b.md)"]


def test_generated_blocks_live_in_results_once():
    results, readme = RESULTS.read_text(), README.read_text()
    for name in BLOCKS:
        start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
        assert results.count(start) == 1 and results.count(end) == 1, name
        assert results.index(start) < results.index(end), name
        assert start not in readme, f"the {name} block belongs in docs/RESULTS.md"


def test_indexes_list_every_benchmark_reference_file_and_experiment():
    bench_index = (ROOT / "benchmarks" / "README.md").read_text()
    listed = {
        p.name
        for p in (ROOT / "benchmarks").iterdir()
        if p.suffix in (".py", ".sh", ".ini") and not p.name.startswith("__")
    }
    missing = sorted(n for n in listed if n not in bench_index)
    stems = {p.name.split(".")[0] for p in (ROOT / "benchmarks" / "reference").iterdir()}
    missing += sorted(
        f"reference/{s}" for s in stems if not re.search(rf"(?<![\w-]){re.escape(s)}(?![\w-])", bench_index)
    )
    exp_index = (ROOT / "experiments" / "README.md").read_text()
    missing += sorted(f"experiments/{p.name}" for p in (ROOT / "experiments").glob("*.py") if p.name not in exp_index)
    assert not missing, f"not in benchmarks/README.md or experiments/README.md: {missing}"


def _script(relpath: str):
    spec = importlib.util.spec_from_file_location(Path(relpath).stem + "_for_docs", ROOT / relpath)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _block(name: str) -> str:
    text = RESULTS.read_text()
    start = text.index(f"<!-- {name}:start -->") + len(f"<!-- {name}:start -->\n")
    return text[start : text.index(f"<!-- {name}:end -->")]


def test_generated_blocks_are_what_their_scripts_make_of_the_reference_json():
    """The blocks are regenerated, never edited: each equals its script's rendering of the
    JSON kept in benchmarks/reference (a new JSON without a regenerated block fails here)."""
    ref = ROOT / "benchmarks" / "reference"
    quality = _script("experiments/quality.py")
    assert _block("quality") == quality.markdown(json.loads((ref / "quality-ml-latest-small.json").read_text()))
    scale = _script("experiments/scale_curves.py")
    rows = json.loads((ref / "scale-store-distinct-cpu-2core.json").read_text())
    assert _block("scale") == scale.results_block(rows) + "\n"
    arango = _script("benchmarks/arango_report.py")
    assert _block("arango-export") == arango.render(json.loads((ref / "arango-export-1m.json").read_text()))
