"""Imports go one way: ops < models < loading < pipelines < training / cli / ui (every import statement,
including the ones inside functions). `diffsynth/testing` may use anything below cli and ui."""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "diffsynth"

# layer -> the packages/modules under diffsynth/ it must never import
FORBIDDEN = {
    "ops": ("models", "loading", "pipelines", "training", "cli", "ui"),
    "models": ("loading", "pipelines", "training", "cli", "ui"),
    "loading": ("pipelines", "training", "cli", "ui"),
    "pipelines": ("training", "cli", "ui"),
    "training": ("ui",),
    "testing": ("cli", "ui"),
}


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


def violations(layer: str) -> list[str]:
    banned = tuple(f"diffsynth.{b}" for b in FORBIDDEN[layer])
    out = []
    for path in sorted((PACKAGE / layer).rglob("*.py")):
        for line, target in imported_modules(path):
            if any(target == b or target.startswith(b + ".") for b in banned):
                out.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {target}")
    return out


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_imports_go_one_way(layer):
    assert violations(layer) == []


def test_the_checker_sees_relative_and_function_level_imports(tmp_path, monkeypatch):
    """A violation hidden in a function, written relatively, is caught (the test is not vacuous)."""
    fake = tmp_path / "diffsynth"
    (fake / "models").mkdir(parents=True)
    (fake / "models" / "m.py").write_text("def f():\n    from ..loading import registry\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    assert violations("models") == ["diffsynth/models/m.py:2 imports diffsynth.loading",
                                    "diffsynth/models/m.py:2 imports diffsynth.loading.registry"]
