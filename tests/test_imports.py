"""What a light entry point loads: `import pathsearch.export`, `pathsearch --help` and `pathsearch validate` run in
a Python where Ray and Optuna (and, for the CLI, MLflow) cannot be imported, and leave them out of `sys.modules`.
The AST rules in test_layout.py see one module's own imports; these see everything an import pulls in."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# installed first on sys.meta_path by a sitecustomize.py: importing a blocked package (or a module of it) fails as
# when it is not installed; every other name goes on to the usual finders (find_spec returns None: torch and others
# probe optional packages with importlib.util.find_spec, which must keep answering)
BLOCKER = """
import os
import sys

BLOCKED = tuple(os.environ["PATHSEARCH_BLOCKED_IMPORTS"].split(","))


class Blocker:
    @staticmethod
    def find_spec(name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)", name=name)
        return None


sys.meta_path.insert(0, Blocker())
"""

LIGHT = [  # (arguments to python, packages it must not import)
    (["-c", "import pathsearch.export"], ("ray", "optuna")),
    (["-c", "import pathsearch.tracking.logger"], ("optuna",)),  # a Ray Tune callback: Ray, but no Optuna
    (["-m", "pathsearch.cli", "--help"], ("ray", "optuna", "mlflow")),
    (["-m", "pathsearch.cli", "validate", "search_spaces/digits_tiny.yaml"], ("ray", "optuna", "mlflow")),
]


def run_python(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(("args", "blocked"), LIGHT, ids=[" ".join(a[1:]) for a, _ in LIGHT])
def test_runs_without_ray_or_optuna(args, blocked, tmp_path):
    (tmp_path / "sitecustomize.py").write_text(BLOCKER)
    env = dict(os.environ, PATHSEARCH_BLOCKED_IMPORTS=",".join(blocked))
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), *filter(None, [env.get("PYTHONPATH")])])
    probe = run_python(["-c", f"import {blocked[0]}"], env)  # the blocker itself works
    assert probe.returncode != 0 and "blocked by the test" in probe.stderr, probe.stderr
    result = run_python(args, env)
    assert result.returncode == 0, result.stderr[-3000:]


def test_export_leaves_ray_and_optuna_unloaded():
    """Nothing is imported and then forgotten: a guarded `try: import ray` would pass the blocker, not this."""
    code = "import sys, pathsearch.export; print(sorted(m for m in ('ray', 'optuna') if m in sys.modules))"
    result = run_python(["-c", code], dict(os.environ))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "[]"


def test_the_flat_layouts_module_names_are_the_modules_that_hold_their_code_now():
    """Tune's and Optuna's snapshots of a search started before the layer packages pickle the trainable, the
    searcher, the callbacks and the search space by their old module names: each old name imports as the module
    that holds that code now (one module object, not a copy), and a pickle naming an old module's function loads."""
    import importlib
    import pickle

    import pathsearch

    assert len(pathsearch.MOVED) >= 20
    for old, new in pathsearch.MOVED.items():
        assert importlib.import_module(f"pathsearch.{old}") is importlib.import_module(f"pathsearch.{new}"), old
    from pathsearch.search.runner import ProgressLine
    from pathsearch.trial.trainable import train_trial

    assert pickle.loads(b"cpathsearch.runner\ntrain_trial\n.") is train_trial  # protocol 0: module, then name
    assert pickle.loads(b"cpathsearch.runner\nProgressLine\n.") is ProgressLine
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("pathsearch.no_such_module")
    assert pathsearch.create_path_vit.__module__ == "pathsearch.ensemble.model"
    assert pathsearch.PathConfig.__module__ == "pathsearch.config.paths"
