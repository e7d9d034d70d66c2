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


def module_name(path: Path) -> str:
    """pathsearch/x.py -> "x"; pathsearch/tracking/runs.py -> "tracking.runs"; pathsearch/tracking/__init__.py ->
    "tracking"."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


FILES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py")) if module_name(p) not in ("", "__main__")}
# the verbs, and the reference pages generated from the schema and the parser: they may import every layer
WIRING = {"cli", "export", "ui", "fitscales", "demo", "preflight", "reference"}
# The layers, lowest first: which layers of pathsearch a package's modules may import (anywhere, inside functions
# too). Each layer sees only those below it; the wiring (the verbs) sees everything.
LAYERS: dict[str, set[str]] = {
    "config": {"config"},  # the search-file schema, its checks, path names and PathConfig: data only
    "storage": {"storage"},  # the door to files and object stores
    "ensemble": {"ensemble", "config"},  # tensors: the path-ensemble ViT, scores, the supernet
    "trial": {
        "trial",
        "ensemble",
        "config",
        "storage",
    },  # one trial: data, fit, the trainable adapters, the proxy scorer
    "tracking": {"tracking", "storage", "config", "ensemble"},  # the door to MLflow (the model flavour loads it)
    "cluster": {"cluster", "storage", "config"},  # the door to Ray clusters
    # the orchestration: the tensor layers inside the functions Ray runs only (FORBIDDEN keeps torch out at import)
    "search": {"search", "trial", "ensemble", "tracking", "storage", "cluster", "config"},
}
# The libraries a module must never import at module level: by module, else by its package. Ray, Optuna and MLflow
# are imported inside functions where a lighter entry point must not pay for them.
FORBIDDEN: dict[str, set[str]] = {
    "config": HEAVY_TENSOR | ORCHESTRATION | {"numpy"},
    "storage": HEAVY_TENSOR | ORCHESTRATION | {"numpy", "pyarrow"},  # pyarrow inside the functions that open a store
    "storage.workcopy": HEAVY_TENSOR | ORCHESTRATION | {"numpy", "pyarrow", "pathsearch"},  # the flock: stdlib only
    "storage.rundirs": HEAVY_TENSOR | ORCHESTRATION | {"numpy", "pathsearch"},
    "ensemble": ORCHESTRATION,
    "trial": ORCHESTRATION,
    "trial.trainable": HEAVY_TENSOR | {"optuna", "mlflow"},  # the one module of the trial layer that knows Ray
    "tracking": HEAVY_TENSOR | {"ray", "optuna"},
    "tracking.logger": HEAVY_TENSOR | {"optuna"},  # a Ray Tune callback
    "tracking.tags": HEAVY_TENSOR | ORCHESTRATION | {"numpy", "pathsearch"},
    "cluster": HEAVY_TENSOR | ORCHESTRATION,  # the client side stays quick: Ray inside the functions
    "cluster.placement": HEAVY_TENSOR | ORCHESTRATION | {"pathsearch"},
    "search": HEAVY_TENSOR | {"mlflow"},  # torch only inside the functions Ray runs; MLflow through tracking
    "search.results": HEAVY_TENSOR | ORCHESTRATION,  # export reads it: no Ray, Optuna inside functions
    "search.verdict": HEAVY_TENSOR | ORCHESTRATION | {"pathsearch"},
    "search.sequential": HEAVY_TENSOR | ORCHESTRATION | {"pathsearch"},
    "export": HEAVY_TENSOR | {"ray", "optuna"},  # reads MLflow only (see test_imports.py)
    "ui": HEAVY_TENSOR | {"ray"},
    "fitscales": HEAVY_TENSOR | {"ray"},
    "cli": HEAVY_TENSOR | ORCHESTRATION,  # each verb imports what it needs
    "demo": ORCHESTRATION,
    "preflight": ORCHESTRATION,
    "reference": HEAVY_TENSOR | ORCHESTRATION,  # reads the config dataclasses and the CLI's parser: no torch
    "": HEAVY_TENSOR | ORCHESTRATION,  # pathsearch/__init__.py
}


def rule_of(module: str) -> set[str]:
    """The libraries `module` must not import at module level: its own rule, else its package's."""
    return FORBIDDEN[module] if module in FORBIDDEN else FORBIDDEN[module.split(".")[0]]


def layer_of(module: str) -> str:
    return module.split(".")[0]


def module_level_imports(path: Path) -> set[str]:
    """Imports executed at import time (module body, not inside functions)."""
    names: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_every_module_has_a_layer_and_a_rule():
    assert set(FILES) >= {"cli", "search.run", "ensemble.model"}, "the modules are found"
    homeless = sorted(m for m in FILES if layer_of(m) not in LAYERS and m not in WIRING)
    assert not homeless, f"give each module a layer (LAYERS) or make it a verb (WIRING): {homeless}"
    assert all(rule_of(m) is not None for m in FILES)


@pytest.mark.parametrize("module", sorted(FILES))
def test_module_respects_import_boundaries(module):
    imported = module_level_imports(FILES[module])
    bad = sorted(
        name for name in imported for banned in rule_of(module) if name == banned or name.startswith(banned + ".")
    )
    assert not bad, f"{FILES[module].relative_to(ROOT)} imports {bad} at module level"


def layer_violations(module: str, imported: set[str]) -> list[str]:
    """The pathsearch modules `module` imports from a layer it may not see (see LAYERS)."""
    if module in WIRING or layer_of(module) not in LAYERS:
        return []
    allowed = LAYERS[layer_of(module)]
    return sorted(name for name in imported if layer_of(name) not in allowed)


@pytest.mark.parametrize("module", sorted(m for m in FILES if m not in WIRING))
def test_each_layer_imports_only_the_layers_below_it(module):
    bad = layer_violations(module, module_imports(FILES[module]))
    assert not bad, f"{FILES[module].relative_to(ROOT)} ({layer_of(module)}) imports {bad}: above its layer"


def test_a_layer_reaching_up_is_found():
    """The check itself: the tensors reaching into the orchestration, the trial into MLflow's door, are refused."""
    assert layer_violations("ensemble.model", {"search.run", "config"}) == ["search.run"]
    assert layer_violations("trial.train", {"tracking.runs", "ensemble.model"}) == ["tracking.runs"]
    assert layer_violations("config.space", {"config.paths"}) == []
    assert layer_violations("cli", {"search.driver"}) == []


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
    logger.write_text("from pathsearch.tracking.runs import TAG\nfrom pathsearch.search.results import S\n")
    runs.write_text("def trial_logger():\n    from pathsearch.tracking import logger\n    import pathsearch.storage\n")
    assert module_imports(logger) == {"tracking.runs", "search.results"}
    assert module_imports(runs) == {"tracking.logger", "storage"}
    graph = {"tracking.logger": module_imports(logger), "tracking.runs": module_imports(runs)}
    assert find_cycle(graph) == ["tracking.logger", "tracking.runs", "tracking.logger"]
    assert pathsearch_imports(logger) == {"tracking", "search"}  # as one node, the package imports itself


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
    path.write_text("from pathsearch.search.driver import _base\nfrom pathsearch import data\ndata._rows(1)\n")
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
    found = {m for path in texts for m in re.findall(r"pathsearch((?:\.[a-z_]+)+)\.([A-Za-z_]+)", path.read_text())}
    cited = {(mod.lstrip("."), name) for mod, name in found}
    assert len(cited) >= 10, "the docs cite the code by module.name"
    modules = {f"pathsearch.{m}" if m else "pathsearch" for m in FILES}
    missing = [f"pathsearch.{mod}.{name}" for mod, name in sorted(cited)  # a name of a module, or a module
               if f"pathsearch.{mod}.{name}" not in modules
               and not hasattr(importlib.import_module(f"pathsearch.{mod}"), name)]  # fmt: skip
    assert not missing, f"cited in the docs but not in the code: {missing}"


def without_links_inside(path: Path, line: str) -> str:
    """`line` without its markdown links to files of the repository: from docs/reference/, `](../paths.md)` goes up
    a folder but stays inside."""
    import re

    def inside(match: re.Match[str]) -> str:
        target = (path.parent / match.group(1).partition("#")[0]).resolve()
        return "]()" if target.is_relative_to(ROOT) else match.group(0)

    return re.sub(r"\]\(([^()\s]+)\)", inside, line)


def test_nothing_refers_outside_the_repository():
    """The repository explains itself: no path that leaves it (`../somewhere/...`), no "design note" or tracker
    issue a user of the package cannot open. New files count before they are committed."""
    import re

    pattern = re.compile(r"\.\./[A-Za-z_]|design note|\bissue \d")
    listed = ["git", "ls-files", "--cached", "--others", "--exclude-standard"]
    files = subprocess.run(listed, cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    hits = [
        f"{name}:{n}"
        for name in files
        if name.endswith((".py", ".md", ".yaml", ".toml", ".sh")) and name != "tests/test_layout.py"
        and (ROOT / name).is_file()
        for n, line in enumerate((ROOT / name).read_text().splitlines(), start=1)
        if pattern.search(without_links_inside(ROOT / name, line))
    ]  # fmt: skip
    assert not hits, hits


def test_a_link_that_leaves_the_repository_is_found():
    docs = ROOT / "docs" / "reference" / "x.md"
    assert without_links_inside(docs, "see [paths](../paths.md#ensemblescale)") == "see [paths]()"
    assert "../" in without_links_inside(docs, "see [x](../../../elsewhere/x.md)")
