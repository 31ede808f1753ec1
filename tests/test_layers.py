"""The package's import layers: no cycle, and no module imports from a layer above its own.

Every ``import`` and ``from ... import`` in ``scalable_rec/`` counts, at module level or
inside a function (a deferred import is still a dependency). Layers, lowest first:

    errors, atomic, heap, locking, connection, dist_env
                shared utilities, no package imports above them
    shards      the Arrow shard format every source writes and the graph reads
    source      MovieLens, synthetic, ArangoDB readers → shards
    graph       shards → HeteroData, the mapped graph index and its stores
    dist        process group, per-rank slices, reductions (used by train, score, pipeline)
    model       the recommender and what training and scoring both run on it: layer-wise
                encoding, chunked top-K, evaluation metrics
    train       training loop, optimisers, checkpoints, the rank launcher
    score       recommendations, baselines, incremental refresh
    sink        Parquet and ArangoDB writers (and loading MovieLens into ArangoDB)
    refresh     new ratings folded into a trained run's graph, affected users re-scored
                and their rows rewritten in the sinks (``refresh_config``: its settings)
    config      ``RunConfig``: every stage's config composed
    pipeline    the stages chained
    cli         the command line and ``python -m scalable_rec`` (and the forkserver's preload,
                which imports what a rank runs)

The package's own ``__init__`` imports nothing and sits with the utilities.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "scalable_rec"

LAYERS: list[tuple[str, ...]] = [
    (
        "scalable_rec",
        "scalable_rec.errors",
        "scalable_rec.atomic",
        "scalable_rec.heap",
        "scalable_rec.locking",
        "scalable_rec.connection",
        "scalable_rec.dist_env",
        "scalable_rec.lazy",
    ),
    ("scalable_rec.shards",),
    ("scalable_rec.source",),
    ("scalable_rec.graph",),
    ("scalable_rec.dist",),
    ("scalable_rec.model",),
    ("scalable_rec.train",),
    ("scalable_rec.score",),
    ("scalable_rec.sink",),
    ("scalable_rec.refresh", "scalable_rec.refresh_config"),
    ("scalable_rec.config",),
    ("scalable_rec.pipeline",),
    ("scalable_rec.cli", "scalable_rec.__main__", "scalable_rec.forkserver_preload"),
]


def module_name(path: Path, root: Path = PACKAGE) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules(root: Path = PACKAGE) -> dict[str, Path]:
    return {module_name(p, root): p for p in sorted(root.rglob("*.py"))}


def layer_of(module: str) -> int | None:
    """Index in ``LAYERS`` of the longest entry that is ``module`` or a package above it
    (the root package's entry stands for its ``__init__`` alone)."""
    best, best_len = None, -1
    for i, names in enumerate(LAYERS):
        for name in names:
            below = name != "scalable_rec" and module.startswith(name + ".")
            if (module == name or below) and len(name) > best_len:
                best, best_len = i, len(name)
    return best


def imports_of(module: str, path: Path, known: set[str]) -> set[str]:
    """The package modules ``path`` imports anywhere in it. ``from pkg import sub`` counts
    as an import of ``pkg.sub`` when that is a module, else of ``pkg``."""
    is_package = path.name == "__init__.py"
    deps: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            deps.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                deps.add(sub if sub in known else target)
    return {d for d in deps if d == "scalable_rec" or d.startswith("scalable_rec.")} - {module}


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    modules = package_modules(root)
    known = set(modules)
    return {m: imports_of(m, p, known) for m, p in modules.items()}


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    problems = []
    for module, deps in sorted(graph.items()):
        own = layer_of(module)
        for dep in sorted(deps):
            theirs = layer_of(dep)
            if own is not None and theirs is not None and theirs > own:
                problems.append(
                    f"{module} (layer {LAYERS[own][0]}) imports {dep} (layer {LAYERS[theirs][0]}), a layer above it"
                )
    return problems


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_a_module_outside_every_layer_has_none():
    assert layer_of("scalable_rec.utils") is None and layer_of("scalable_rec") == 0


def test_every_module_has_a_layer():
    unplaced = [m for m in package_modules() if layer_of(m) is None]
    assert not unplaced, f"modules outside every layer (add them to LAYERS): {unplaced}"


def test_no_module_imports_from_a_layer_above_its_own():
    problems = upward_imports(import_graph())
    assert not problems, "\n".join(problems)


def test_no_import_cycle():
    found = cycles(import_graph())
    assert not found, f"import cycles: {found}"


def test_function_level_upward_import_and_cycle_are_caught(tmp_path):
    """The checks see an import inside a function, and a cycle through one."""
    pkg = tmp_path / "scalable_rec"
    for rel, text in {
        "__init__.py": "",
        "graph/__init__.py": "",
        "train/__init__.py": "",
        "graph/hetero.py": "def f():\n    from scalable_rec.train import loop\n",
        "train/loop.py": "from scalable_rec.graph.hetero import f\n",
    }.items():
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text(text)
    graph = import_graph(pkg)
    assert graph["scalable_rec.graph.hetero"] == {"scalable_rec.train.loop"}
    problems = upward_imports(graph)
    assert len(problems) == 1 and problems[0].startswith(
        "scalable_rec.graph.hetero (layer scalable_rec.graph) imports scalable_rec.train.loop"
    )
    assert cycles(graph) == [["scalable_rec.graph.hetero", "scalable_rec.train.loop"]]


@pytest.mark.parametrize(
    "module, layer",
    [
        ("scalable_rec.train.loop", "scalable_rec.train"),
        ("scalable_rec.model", "scalable_rec.model"),
        ("scalable_rec.dist", "scalable_rec.dist"),
        ("scalable_rec.config", "scalable_rec.config"),
        ("scalable_rec.connection", "scalable_rec"),
    ],
)
def test_layer_of_takes_the_longest_match(module, layer):
    assert LAYERS[layer_of(module)][0] == layer
