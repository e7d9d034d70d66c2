"""pathsearch: hyperparameter search for path-ensemble Vision Transformers (Ray Tune, Optuna, MLflow).

The layers, one package each: config (the search-file schema), ensemble (tensors), trial (one trial), search (the
orchestration), and the doors to outside systems: tracking (MLflow), storage (files and object stores), cluster (Ray
clusters). `from pathsearch import create_path_vit, PathConfig` rebuilds an exported model; the CLI is `pathsearch`.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
from types import ModuleType
from typing import Any

__all__ = ["PathConfig", "create_path_vit"]

# Where the modules of the flat layout (before the layer packages) live now. Ray Tune's and Optuna's snapshots of a
# search pickle functions and classes by module name (the trainable, the searcher, the callbacks, the confirmation's
# param space): `resume` of a search started before the move unpickles them through these names.
MOVED = {
    "paths": "config.paths",
    "model": "ensemble.model",
    "scoring": "ensemble.scoring",
    "analysis": "ensemble.analysis",
    "supernet": "ensemble.supernet",
    "proxy": "trial.proxy",
    "data": "trial.data",
    "train": "trial.train",
    "configcheck": "config.checks",
    "typed": "config.typed",
    "datasets": "config.datasets",
    "space": "config.space",
    "workcopy": "storage.workcopy",
    "rundirs": "storage.rundirs",
    "clustercheck": "cluster.check",
    "localcluster": "cluster.local",
    "placement": "cluster.placement",
    "full": "search.full",
    "oneshot": "search.oneshot",
    "confirm": "search.confirm",
    "sequential": "search.sequential",
    "searcher": "search.searcher",
    "results": "search.results",
    "verdict": "search.verdict",
    "runner": "search.runner",
}


class _Alias(importlib.abc.Loader):
    """Loads an old module name as the module that now holds its code (one module object under two names)."""

    def __init__(self, target: str) -> None:
        self.target = target

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        return importlib.import_module(self.target)

    def exec_module(self, module: ModuleType) -> None:
        pass  # already executed under its own name


class _MovedFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        prefix, _, leaf = name.rpartition(".")
        if prefix != __name__ or leaf not in MOVED:
            return None
        return importlib.util.spec_from_loader(name, _Alias(f"{__name__}.{MOVED[leaf]}"))


if not any(isinstance(finder, _MovedFinder) for finder in sys.meta_path):
    sys.meta_path.append(_MovedFinder())


def __getattr__(name: str) -> Any:
    # torch and timm load only when the model is asked for
    if name == "create_path_vit":
        from pathsearch.ensemble.model import create_path_vit

        return create_path_vit
    if name == "PathConfig":
        from pathsearch.config.paths import PathConfig

        return PathConfig
    raise AttributeError(f"module 'pathsearch' has no attribute {name!r}")
