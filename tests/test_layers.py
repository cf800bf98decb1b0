"""The layers as docs/architecture.md draws them, checked on every import statement (those
inside functions included): engines never import service, export or training; training and
export never import service."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "engines": {"service", "export", "training", "bench", "loadtests"},
    "export": {"service", "training", "bench", "loadtests"},
    "training": {"service", "loadtests"},
}


def imported_packages(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module.split(".")[0])
    return out


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_only_layers_below(package):
    wrong = {str(p.relative_to(ROOT)): sorted(imported_packages(p) & FORBIDDEN[package])
             for p in sorted((ROOT / package).rglob("*.py"))}
    assert not {p: w for p, w in wrong.items() if w}
