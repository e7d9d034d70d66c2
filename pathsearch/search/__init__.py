"""The orchestration of a search: its life (run.SearchRun), the driver (`run_search`, `resume_search`), the strategies
(full, oneshot and its proxy search), the confirmation (confirm, sequential, verdict), the Optuna searcher and the
results. Ray and Optuna here; torch, timm and the model only inside the functions that Ray runs; MLflow through the
tracking door.
"""

from __future__ import annotations

from typing import Any

__all__ = ["STRATEGIES", "Interrupted", "resume_search", "run_search"]


def __getattr__(name: str) -> Any:
    # the driver loads Ray: only when it is asked for, so `pathsearch.search.verdict` and the like stay light
    if name in __all__:
        from pathsearch.search import driver

        return getattr(driver, name)
    raise AttributeError(f"module 'pathsearch.search' has no attribute {name!r}")
