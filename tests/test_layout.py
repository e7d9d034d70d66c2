"""Checks the project's import rules (STYLE.md) from the AST, and that ruff and mypy stay clean."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "pathsearch"
HEAVY_TENSOR = {"torch", "timm", "torchvision"}
ORCHESTRATION = {"ray", "optuna", "mlflow"}
# module -> top-level packages it must never import at module level
FORBIDDEN = {
    "config": HEAVY_TENSOR | ORCHESTRATION | {"numpy"},
    "paths": HEAVY_TENSOR | ORCHESTRATION,
    "space": HEAVY_TENSOR | ORCHESTRATION,
    "model": ORCHESTRATION,
    "data": ORCHESTRATION,
    "train": ORCHESTRATION,
    "demo": ORCHESTRATION,
    "search": HEAVY_TENSOR | {"pathsearch.model", "pathsearch.train", "pathsearch.data"},
    "tracking": HEAVY_TENSOR | {"pathsearch.model", "pathsearch.train", "pathsearch.data"},
    "export": HEAVY_TENSOR | {"pathsearch.model", "pathsearch.train", "pathsearch.data"},
    "confirm": HEAVY_TENSOR | {"pathsearch.model", "pathsearch.train", "pathsearch.data", "pathsearch.supernet"},
    "supernet": ORCHESTRATION,
    "oneshot": HEAVY_TENSOR | {"pathsearch.model", "pathsearch.train", "pathsearch.data", "pathsearch.supernet"},
    # client side of a cluster: imports ray only inside the functions that need it, so `local.sh status` is quick
    "cluster": HEAVY_TENSOR | ORCHESTRATION | {"pathsearch.model", "pathsearch.train", "pathsearch.data"},
    "localcluster": HEAVY_TENSOR | ORCHESTRATION | {"pathsearch.model", "pathsearch.search", "pathsearch.train"},
    "cli": HEAVY_TENSOR
    | ORCHESTRATION
    | {"pathsearch.model", "pathsearch.train", "pathsearch.data", "pathsearch.search"},
}


def module_level_imports(path: Path) -> set[str]:
    """Imports executed at import time (module body, not inside functions)."""
    names: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_every_module_has_a_rule():
    modules = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__", "__main__"}
    assert modules, "no modules found"
    assert modules <= set(FORBIDDEN), f"add an import rule for {sorted(modules - set(FORBIDDEN))}"


@pytest.mark.parametrize("module", sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem in FORBIDDEN))
def test_module_respects_import_boundaries(module):
    path = PACKAGE / f"{module}.py"
    imported = module_level_imports(path)
    bad = sorted(
        name for name in imported for banned in FORBIDDEN[module] if name == banned or name.startswith(banned + ".")
    )
    assert not bad, f"pathsearch/{module}.py imports {bad} at module level"


def test_cli_help_imports_no_torch():
    code = "import sys, pathsearch.cli; pathsearch.cli.build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def _tool(name: str) -> str:
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    assert found, f"{name} is not installed (it is in the dev extras)"
    return found


def test_ruff_is_clean():
    result = subprocess.run(
        [_tool("ruff"), "check", "pathsearch", "tests", "benchmarks"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_is_clean():
    result = subprocess.run([_tool("mypy")], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
