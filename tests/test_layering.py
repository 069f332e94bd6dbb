"""Imports go one way, layer by layer (every import statement, including the ones inside functions), every
folder and top-level module of the package has a layer, and no two modules import each other, directly or
through others: a cycle hidden by a function-level import is still a cycle."""
from __future__ import annotations

import ast
import functools
import sys
from collections import defaultdict
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "diffsynth"

# Bottom to top: a module may import its own layer and the layers below.
LAYERS = (
    ("ops",),                                  # no model knowledge
    ("schedulers", "controlnets"),             # pure math; image annotators
    ("models",),                               # one file per model family, with its table entry
    ("loading",),                              # the component table, detection, LoRA, VRAM, ModelConfig
    ("pipelines",),
    ("training",),
    ("nano", "utils", "core", "generation", "testing"),
    ("ui",),                                   # the web UI: generation's helpers, not the command line's
    ("cli",),                                  # every command, `diffsynth ui` included
)
LAYER = {name: i for i, names in enumerate(LAYERS) for name in names}
# Within-layer bans: the shipped model's code must not depend on the test helpers.
ALSO_FORBIDDEN = {"nano": ("testing",)}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file, relative imports resolved."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # `from . import x` may name a submodule: count each imported name as one too
            found += [(node.lineno, target)] + [(node.lineno, f"{target}.{a.name}") for a in node.names]
    return found


def modules() -> dict[str, Path]:
    return _modules(PACKAGE)


@functools.lru_cache
def _modules(package: Path) -> dict[str, Path]:
    return {module_name(p): p for p in sorted(package.rglob("*.py"))}


@functools.lru_cache
def root_exports() -> dict[str, str]:
    """`from diffsynth import X` names a lazily exported attribute: the module it comes from."""
    tree = ast.parse((Path(__file__).resolve().parents[1] / "diffsynth" / "__init__.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "_EXPORTS":
            exports = ast.literal_eval(node.value)
            return {f"diffsynth.{k}": "diffsynth" + v for k, v in exports.items()}
    return {}


def resolve(target: str, known: dict) -> str | None:
    """The package module an import names (a name inside a module counts as the module), or None."""
    target = root_exports().get(target, target)
    while target and target not in known:
        target = target.rsplit(".", 1)[0] if "." in target else ""
    return target if target and target != "diffsynth" else None


def layer_of(module: str) -> str:
    """The first name below `diffsynth` ("" for the package root, whose lazy exports name no module)."""
    return module.split(".")[1] if "." in module else ""


def import_graph() -> dict[str, set[tuple[int, str]]]:
    return _import_graph(PACKAGE)


@functools.lru_cache
def _import_graph(package: Path) -> dict[str, set[tuple[int, str]]]:
    known = _modules(package)
    graph = defaultdict(set)
    for name, path in known.items():
        for line, target in imported_modules(path):
            resolved = resolve(target, known)
            if resolved is not None and resolved != name:
                graph[name].add((line, resolved))
    return graph


def violations(layer: str) -> list[str]:
    out = []
    for name, edges in sorted(import_graph().items()):
        if layer_of(name) != layer:
            continue
        for line, target in sorted(edges):
            other = layer_of(target)
            if LAYER[other] > LAYER[layer] or other in ALSO_FORBIDDEN.get(layer, ()):
                out.append(f"{modules()[name].relative_to(PACKAGE.parent)}:{line} imports {target}")
    return out


def cycles() -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan)."""
    graph = {k: {t for _, t in v} for k, v in import_graph().items()}
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_every_folder_and_module_has_a_layer():
    unplaced = sorted({layer_of(m) for m in modules()} - set(LAYER) - {""})
    assert unplaced == []


@pytest.mark.parametrize("layer", sorted(LAYER))
def test_imports_go_one_way(layer):
    assert violations(layer) == []


def test_no_import_cycles():
    assert cycles() == []


def test_the_checker_sees_relative_and_function_level_imports(tmp_path, monkeypatch):
    """A violation hidden in a function, written relatively, is caught; so is a cycle (the tests are not vacuous)."""
    fake = tmp_path / "diffsynth"
    for folder in ("models", "loading", "nano", "testing"):
        (fake / folder).mkdir(parents=True)
        (fake / folder / "__init__.py").write_text("")
    (fake / "__init__.py").write_text("_EXPORTS = {}\n")
    (fake / "models" / "m.py").write_text("def f():\n    from ..loading import registry\n")
    (fake / "loading" / "registry.py").write_text("from . import table\n")
    (fake / "loading" / "table.py").write_text("def f():\n    from .registry import x\n")
    (fake / "nano" / "demo.py").write_text("from ..testing import tiny\n")
    (fake / "testing" / "tiny.py").write_text("")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    assert violations("models") == ["diffsynth/models/m.py:2 imports diffsynth.loading",
                                    "diffsynth/models/m.py:2 imports diffsynth.loading.registry"]
    assert violations("nano") == ["diffsynth/nano/demo.py:1 imports diffsynth.testing",
                                  "diffsynth/nano/demo.py:1 imports diffsynth.testing.tiny"]
    assert cycles() == [["diffsynth.loading.registry", "diffsynth.loading.table"]]
