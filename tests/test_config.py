"""Config docstrings are the flags' contracts: every field documented in at most three lines,
and ``--help`` a reference without lab notes (measurements, seeds, history, cross-references)."""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from scalable_rec.cli import build_parser, main
from scalable_rec.config import GROUPS, RARELY_USED, TITLES, WHY, default_text, field_docs
from scalable_rec.refresh import RefreshConfig

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = [*GROUPS.values(), RefreshConfig]
COMMANDS = ("run", "prepare", "train", "score", "refresh")

# What a reference has no place for: measurements, seeds of an experiment, ablation rows,
# history, issue numbers, commit hashes and pointers into the README.
LAB_NOTES = re.compile(
    r"measured|ablation|\bseeds? \d|Recall@\d+ (from |of )?0\.\d|RMSE (from |of )?0\.\d|\d\.\d+ → \d|"
    r"\bformer\b|before issue|this round|\bissue\b|#\d+\b|README|"
    r"\b(?=[0-9a-f]*[a-f])(?=[0-9a-f]*\d)[0-9a-f]{7,40}\b",
    re.IGNORECASE,
)


# Flags a command adds itself, with its own help, outside their config group.
OWN_WORDING = {
    ("refresh", "DataConfig.strict"),
    ("prepare", "TrainConfig.progress"),
    ("score", "TrainConfig.progress"),
    ("refresh", "ScoreConfig.k"),
}  # refresh keeps the Parquet's k: its own help says so


def entry_lines(cls: type) -> dict[str, int]:
    """Lines of each field's entry in the ``Args:`` section of ``cls``'s docstring."""
    lines: dict[str, int] = {}
    current, in_args = None, False
    for line in (cls.__doc__ or "").splitlines():
        if line.strip() == "Args:":
            in_args = True
            continue
        m = re.match(r"^\s{4,8}(\w+): ", line)
        if in_args and m and len(line) - len(line.lstrip()) <= 8:
            current = m.group(1)
            lines[current] = 1
        elif in_args and current and line.strip():
            lines[current] += 1
    return lines


def subparser(name: str) -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return sub.choices[name]


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_every_field_is_documented_in_at_most_three_lines(cls):
    lines = entry_lines(cls)
    for f in dataclasses.fields(cls):
        assert f.name in lines, f"{cls.__name__}.{f.name} has no entry in the docstring's Args section"
        assert lines[f.name] <= 3, f"{cls.__name__}.{f.name}: {lines[f.name]} lines (at most 3)"
        assert not LAB_NOTES.search(field_docs(cls)[f.name]), f"{cls.__name__}.{f.name}: {field_docs(cls)[f.name]}"


@pytest.mark.parametrize("command", COMMANDS)
def test_help_is_a_reference_without_lab_notes(command):
    text = subparser(command).format_help()
    found = [m.group(0) for m in LAB_NOTES.finditer(text)]
    assert not found, f"'{command} --help' carries lab notes: {found}"
    assert "``" not in text


@pytest.mark.parametrize("command", COMMANDS)
def test_each_field_has_one_help_line_stating_its_default_once(command):
    parser = subparser(command)
    by_dest = {a.dest: a for a in parser._actions}
    classes = {cls.__name__: cls for cls in CONFIGS}
    flags = [d for d in by_dest if "." in d and d.split(".")[0] in classes]
    assert len(flags) > 10
    for dest in flags:
        cls_name, name = dest.split(".")
        if (command, dest) in OWN_WORDING or by_dest[dest].help == argparse.SUPPRESS:
            continue  # own wording, or a flag the command refuses and hides
        f = next(f for f in dataclasses.fields(classes[cls_name]) if f.name == name)
        help_text = by_dest[dest].help
        assert help_text and help_text.startswith(field_docs(classes[cls_name])[name].replace("``", "")[:20]), dest
        assert help_text.lower().count("(default") <= 1, f"{dest} states its default twice: {help_text}"
        assert default_text(f) in help_text


def test_rarely_used_flags_come_after_the_others_in_advanced_groups():
    parser = subparser("train")
    titles = [g.title for g in parser._action_groups]
    assert titles.index("training") < titles.index("advanced training")
    assert max(i for i, t in enumerate(titles) if not t.startswith("advanced")) < min(
        i for i, t in enumerate(titles) if t.startswith("advanced")
    )
    advanced = next(g for g in parser._action_groups if g.title == "advanced training")
    assert {a.dest for a in advanced._group_actions} == {f"TrainConfig.{n}" for n in RARELY_USED["TrainConfig"]}


def test_rarely_used_titles_and_why_name_real_fields():
    classes = {cls.__name__: cls for cls in CONFIGS}
    assert set(RARELY_USED) | set(WHY) <= set(TITLES) == set(classes)
    for cls_name, names in RARELY_USED.items():
        fields = {f.name for f in dataclasses.fields(classes[cls_name])}
        assert set(names) <= fields, f"{cls_name}: {set(names) - fields} are not fields"
    for anchor in WHY.values():  # the page the help points to exists and has the section
        page, section = anchor.split("#")
        headings = [
            re.sub(r"[^a-z0-9 -]", "", h.lower()).strip().replace(" ", "-")
            for h in re.findall(r"^#+ (.*)$", (ROOT / page).read_text(), re.M)
        ]
        assert section in headings, anchor


def test_default_text_states_unset_list_and_bool_defaults():
    @dataclasses.dataclass
    class Example:
        a: int | None = None
        b: list[int] = dataclasses.field(default_factory=lambda: [10, 5])
        c: bool = True

    a, b, c = dataclasses.fields(Example)
    assert (default_text(a), default_text(b), default_text(c)) == ("", " (default: 10 5)", " (default: on)")


def test_train_help_exits_0(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith("usage: scalable-rec train [options]")


def test_run_help_exits_0_in_a_fresh_process():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "scalable_rec", "run", "--help"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=180,
    )
    elapsed = time.monotonic() - start
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("usage: scalable-rec run [options]") and not LAB_NOTES.search(proc.stdout)
    assert elapsed < 120, f"'run --help' took {elapsed:.0f} s"  # imports only; generous for a shared machine
