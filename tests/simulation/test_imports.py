"""The simulation package depends only on the standard library, numpy, polars and the
event contract (no torch, nothing else of ours)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import simulation

ALLOWED = {"numpy", "polars", "simulation", "features.contract"}


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_simulation_imports_only_numpy_polars_and_the_contract():
    package = Path(simulation.__file__).parent
    for path in sorted(package.glob("*.py")):
        for name in imported_modules(path):
            root = name.split(".")[0]
            allowed = (root in sys.stdlib_module_names or root in ALLOWED
                       or name in ALLOWED or root == "simulation")
            assert allowed, f"{path.name} imports {name}"
