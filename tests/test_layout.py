"""Checks the project's import rules from the AST (no cycles, no private names across modules, no torch in the
orchestration layer), and that ruff and mypy stay clean."""

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
TENSOR_MODULES = {
    f"pathsearch.{m}"
    for m in ("model", "scoring", "analysis", "data", "train", "supernet", "proxy", "demo", "preflight")
}


def module_name(path: Path) -> str:
    """pathsearch/x.py -> "x"; pathsearch/tracking/runs.py -> "tracking.runs"; pathsearch/tracking/__init__.py ->
    "tracking"."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


FILES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py")) if module_name(p) not in ("", "__main__")}
MODULES = {f"pathsearch.{name}" for name in FILES}
TRACKING_INTERNALS = {"pathsearch.model", "pathsearch.train", "pathsearch.data", "pathsearch.supernet"}
# module -> top-level packages it must never import at module level
FORBIDDEN = {
    "config": HEAVY_TENSOR | ORCHESTRATION | {"numpy"},
    # the config's checks: config imports them, so they take its dataclasses as plain objects and never import it
    "configcheck": HEAVY_TENSOR | ORCHESTRATION | {"numpy", "pathsearch.config"},
    # what each dataset is (shapes, sizes, files), for config, data and searcher alike: a leaf
    "datasets": HEAVY_TENSOR | ORCHESTRATION | {"numpy", "pathsearch"},
    "typed": HEAVY_TENSOR | ORCHESTRATION | {"numpy"},
    "rundirs": HEAVY_TENSOR | ORCHESTRATION | {"numpy", "pathsearch"},
    # object stores through pyarrow, imported inside the functions that open one
    "storage": HEAVY_TENSOR | ORCHESTRATION | {"numpy", "pathsearch", "pyarrow"},
    # the working copy's lock (flock, naming its process): stdlib only
    "workcopy": HEAVY_TENSOR | ORCHESTRATION | {"numpy", "pathsearch", "pyarrow"},
    "paths": HEAVY_TENSOR | ORCHESTRATION,
    "space": HEAVY_TENSOR | ORCHESTRATION,
    "model": ORCHESTRATION,
    "data": ORCHESTRATION,
    "train": ORCHESTRATION,
    "demo": ORCHESTRATION,
    "preflight": ORCHESTRATION,
    "search": HEAVY_TENSOR | {"pathsearch.model", "pathsearch.train", "pathsearch.data"},
    # the one door to MLflow (see test_only_tracking_imports_mlflow); reading runs imports no Ray
    "tracking": HEAVY_TENSOR | ORCHESTRATION | {"pathsearch"},
    "tracking.outage": HEAVY_TENSOR | {"ray", "optuna", "pathsearch"},
    "tracking.runs": HEAVY_TENSOR
    | {"ray", "optuna"}
    | (MODULES - {"pathsearch.tracking", "pathsearch.tracking.outage", "pathsearch.tracking.tags"}),
    # the tags both runs.py and logger.py need: no library, no other module
    "tracking.tags": HEAVY_TENSOR | ORCHESTRATION | {"numpy", "pathsearch"},
    # below runs.py (whose SearchRuns.trial_logger builds it): the tags come from tags.py
    "tracking.logger": HEAVY_TENSOR | {"optuna", "pathsearch.tracking.runs"} | TRACKING_INTERNALS,
    "tracking.registry": HEAVY_TENSOR | {"ray", "optuna"} | TRACKING_INTERNALS,
    # loaded by `mlflow.pyfunc.load_model`: builds the model (torch, pathsearch.model) inside load_context only
    "tracking.path_vit_model": HEAVY_TENSOR | {"ray", "optuna"} | TRACKING_INTERNALS,
    # reads MLflow only: no Ray or Optuna (confirm imports Ray; its tags are in tracking.tags), see test_imports.py
    "export": HEAVY_TENSOR
    | {"ray", "optuna", "pathsearch.confirm", "pathsearch.model", "pathsearch.train", "pathsearch.data"},
    # `pathsearch ui`: imports tracking/export (which import ray) only inside its functions
    "ui": HEAVY_TENSOR | {"ray", "pathsearch.model", "pathsearch.train", "pathsearch.data"},
    "confirm": HEAVY_TENSOR | {"pathsearch.model", "pathsearch.train", "pathsearch.data", "pathsearch.supernet"},
    "supernet": ORCHESTRATION,
    "scoring": ORCHESTRATION,
    "analysis": ORCHESTRATION,
    "proxy": ORCHESTRATION,
    # orchestration: torch and the tensor modules only inside the functions that Ray runs
    # where a checkpoint lives (storage); Optuna inside the functions that read a study: export and the logger use it
    "results": HEAVY_TENSOR | {"ray", "optuna", "mlflow"} | (MODULES - {"pathsearch.storage"}),
    "verdict": HEAVY_TENSOR | ORCHESTRATION | {"pathsearch"},
    "sequential": HEAVY_TENSOR | ORCHESTRATION | {"pathsearch"},
    "searcher": HEAVY_TENSOR | TENSOR_MODULES,
    "runner": HEAVY_TENSOR | TENSOR_MODULES,
    # placement on a cluster (its autoscaler included): Ray inside its functions only, no other pathsearch module
    "placement": HEAVY_TENSOR | ORCHESTRATION | {"pathsearch"},
    "full": HEAVY_TENSOR | TENSOR_MODULES,
    "fitscales": HEAVY_TENSOR | TENSOR_MODULES,
    "oneshot": HEAVY_TENSOR | {"pathsearch.model", "pathsearch.train", "pathsearch.data", "pathsearch.supernet"},
    # client side of a cluster: imports ray only inside the functions that need it, so `local.sh status` is quick
    "cluster": HEAVY_TENSOR | ORCHESTRATION | {"pathsearch.model", "pathsearch.train", "pathsearch.data"},
    # `pathsearch cluster check`: the same client side; its job's functions import ray (and torch, timm) when run
    "clustercheck": HEAVY_TENSOR | ORCHESTRATION | {"pathsearch.model", "pathsearch.train", "pathsearch.data"},
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
    modules = set(FILES)
    assert modules, "no modules found"
    assert modules <= set(FORBIDDEN), f"add an import rule for {sorted(modules - set(FORBIDDEN))}"


@pytest.mark.parametrize("module", sorted(name for name in FILES if name in FORBIDDEN))
def test_module_respects_import_boundaries(module):
    path = FILES[module]
    imported = module_level_imports(path)
    bad = sorted(
        name for name in imported for banned in FORBIDDEN[module] if name == banned or name.startswith(banned + ".")
    )
    assert not bad, f"pathsearch/{module}.py imports {bad} at module level"


def module_imports(path: Path) -> set[str]:
    """The pathsearch modules a file imports anywhere (module level, inside functions, under TYPE_CHECKING), named as
    FILES names them: `from pathsearch.tracking import runs` and `from pathsearch.tracking.runs import Store` are
    both "tracking.runs"; `from pathsearch import full` is "full"."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name[len("pathsearch.") :] for a in node.names if a.name.startswith("pathsearch.")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "pathsearch":  # from pathsearch import full, oneshot
                names |= {a.name for a in node.names}
            elif node.module.startswith("pathsearch."):
                module = node.module[len("pathsearch.") :]
                # a submodule imported by name (from pathsearch.tracking import runs), else a name of the module
                names |= {f"{module}.{a.name}" if f"{module}.{a.name}" in FILES else module for a in node.names}
    return names


def pathsearch_imports(path: Path) -> set[str]:
    """The top-level pathsearch modules and packages a file imports anywhere (module level and inside functions)."""
    return {name.split(".")[0] for name in module_imports(path)}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of a module graph (module -> modules it imports), or None."""
    state: dict[str, str] = {}

    def visit(module: str, trail: list[str]) -> list[str] | None:
        state[module] = "open"
        for target in sorted(graph.get(module, ())):
            if state.get(target) == "open":
                return [*trail[trail.index(target) :], target]
            if target not in state and (cycle := visit(target, [*trail, target])):
                return cycle
        state[module] = "done"
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module, [module])):
            return cycle
    return None


def imports_anywhere(path: Path, package: str) -> list[int]:
    """Lines of a file that import `package` (or a module of it), at module level or inside a function."""
    lines = []
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        if any(n == package or n.startswith(package + ".") for n in names):
            lines.append(node.lineno)
    return lines


def test_only_tracking_imports_mlflow():
    """One door to MLflow: runs are created, logged, found, read and retried in pathsearch.tracking only; the other
    modules hand it plain data."""
    outside = [
        f"pathsearch/{path.relative_to(PACKAGE)}:{line}"
        for name, path in FILES.items()
        if name.split(".")[0] != "tracking"
        for line in imports_anywhere(path, "mlflow")
    ]
    assert not outside, f"mlflow imported outside pathsearch.tracking: {outside}"
    assert imports_anywhere(FILES["tracking.runs"], "mlflow"), "the check looks for mlflow imports where they are"


def test_an_mlflow_import_inside_a_function_is_found(tmp_path):
    path = tmp_path / "x.py"
    path.write_text("import os\n\ndef f():\n    from mlflow.tracking import MlflowClient\n    import mlflowx\n")
    assert imports_anywhere(path, "mlflow") == [4]


def test_no_import_cycles():
    """Every arrow between modules points one way, function-level imports included."""
    graph: dict[str, set[str]] = {}
    for name, path in FILES.items():  # a package is one node: its modules may import each other
        top = name.split(".")[0]
        graph[top] = graph.get(top, set()) | (pathsearch_imports(path) - {top})
    assert find_cycle(graph) is None, "import cycle: " + " -> ".join(find_cycle(graph) or [])


def test_no_import_cycles_between_modules():
    """The same, one level finer: every module under pathsearch/ is a node of its own (`tracking.logger` and
    `tracking.runs` are two), so a circle inside a package is found too.

    An arrow is any import of the other module: at module level, inside a function or under TYPE_CHECKING. Only
    module-level imports can fail at import time (a partly initialised module), but a lazy import is a dependency
    all the same: a module that reaches up into one above it, even inside a function, leaves no layer below the
    other, and one more module-level import turns it into an ImportError. A graph of module-level imports alone
    is a part of this one, so it has no circle either."""
    graph = {name: module_imports(path) - {name} for name, path in FILES.items()}
    assert find_cycle(graph) is None, "import cycle: " + " -> ".join(find_cycle(graph) or [])


def test_a_cycle_inside_a_package_is_found(tmp_path):
    """The finer check sees two modules of one package that import each other, which the package-level one cannot."""
    logger, runs = tmp_path / "logger.py", tmp_path / "runs.py"
    logger.write_text("from pathsearch.tracking.runs import TAG\nfrom pathsearch.results import trained_to_end\n")
    runs.write_text("def trial_logger():\n    from pathsearch.tracking import logger\n    import pathsearch.storage\n")
    assert module_imports(logger) == {"tracking.runs", "results"}
    assert module_imports(runs) == {"tracking.logger", "storage"}
    graph = {"tracking.logger": module_imports(logger), "tracking.runs": module_imports(runs)}
    assert find_cycle(graph) == ["tracking.logger", "tracking.runs", "tracking.logger"]
    assert pathsearch_imports(logger) == {"tracking", "results"}  # as one node, the package imports itself


def test_a_cycle_is_found(tmp_path):
    """The check itself: two modules importing each other inside functions, and a longer circle."""
    (tmp_path / "a.py").write_text("def f():\n    from pathsearch.b import g\n")
    (tmp_path / "b.py").write_text("def g():\n    from pathsearch import a\n")
    graph = {p.stem: pathsearch_imports(p) for p in tmp_path.glob("*.py")}
    assert graph == {"a": {"b"}, "b": {"a"}}
    assert find_cycle(graph) == ["a", "b", "a"]
    assert find_cycle({"x": {"y"}, "y": {"z"}, "z": {"x"}, "w": {"x"}}) == ["x", "y", "z", "x"]
    assert find_cycle({"x": {"y"}, "y": {"z"}, "w": {"x", "z"}}) is None


def test_each_tag_is_defined_in_one_place():
    """A tag constant (module-level `NAME_TAG = "..."`) is defined in one module (tracking/tags.py) and imported
    everywhere else, so the runs one module writes are the runs another finds."""
    where: dict[str, list[str]] = {}
    for name, path in FILES.items():
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant):
                for target in node.targets:
                    if isinstance(target, ast.Name) and target.id.endswith("_TAG"):
                        where.setdefault(target.id, []).append(name)
    assert where.get("WINNER_TAG") == ["tracking.tags"], "the check finds the tags where they are defined"
    assert not {tag: modules for tag, modules in where.items() if len(modules) > 1}


def private_imports(path: Path) -> list[str]:
    """`from pathsearch.x import _y` and `module._y` (module imported from pathsearch) anywhere in a file."""
    tree = ast.parse(path.read_text())
    found, modules = [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "pathsearch":
            for alias in node.names:
                if alias.name.startswith("_"):
                    found.append(f"{path.name}:{node.lineno} imports {node.module}.{alias.name}")
                elif node.module == "pathsearch":
                    modules.add(alias.asname or alias.name)
        elif isinstance(node, ast.Import):
            modules |= {a.asname or a.name for a in node.names if a.name.startswith("pathsearch")}
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            base = ast.unparse(node.value)
            if base in modules:
                found.append(f"{path.name}:{node.lineno} uses {base}.{node.attr}")
    return found


@pytest.mark.parametrize("folder", ["pathsearch", "tests", "benchmarks"])
def test_no_private_name_crosses_a_module(folder):
    found = [hit for path in sorted((ROOT / folder).rglob("*.py")) for hit in private_imports(path)]
    assert not found, "a private name is used outside its module (make it public where both can see it):\n" + (
        "\n".join(found)
    )


def test_private_names_are_found(tmp_path):
    path = tmp_path / "x.py"
    path.write_text("from pathsearch.search import _base\nfrom pathsearch import data\ndata._rows(1)\n")
    assert len(private_imports(path)) == 2


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


def test_the_docs_name_only_code_that_exists():
    """Every `pathsearch.module.name` the README and docs/ cite imports: the docs follow the code when it moves."""
    import importlib
    import re

    texts = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    cited = {m for path in texts for m in re.findall(r"pathsearch\.([a-z_]+)\.([A-Za-z_]+)", path.read_text())}
    assert len(cited) >= 10, "the docs cite the code by module.name"
    missing = [f"pathsearch.{mod}.{name}" for mod, name in sorted(cited)
               if not hasattr(importlib.import_module(f"pathsearch.{mod}"), name)]  # fmt: skip
    assert not missing, f"cited in the docs but not in the code: {missing}"


def test_nothing_refers_outside_the_repository():
    """The repository explains itself: no path that leaves it (`../somewhere/...`), no "design note" or tracker
    issue a user of the package cannot open."""
    import re

    pattern = re.compile(r"\.\./[A-Za-z_]|design note|\bissue \d")
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    hits = [
        f"{name}:{n}"
        for name in files
        if name.endswith((".py", ".md", ".yaml", ".toml", ".sh")) and name != "tests/test_layout.py"
        for n, line in enumerate((ROOT / name).read_text().splitlines(), start=1)
        if pattern.search(line)
    ]
    assert not hits, hits
