"""A confirmed winner in MLflow's Model Registry: a new version of a registered model, made from the exported
PathConfig and weights (models from code, see path_vit_model.py), linked to the confirmation seed run whose weights
it holds and tagged with where it came from and what the confirmation concluded.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import io
import logging
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from pathsearch.tracking.outage import TRANSFER_TIMEOUT_S, fail_fast

MODEL_FILE = Path(__file__).with_name("path_vit_model.py")
PACKAGE = Path(__file__).resolve().parents[1]  # pathsearch travels with the model: it loads where it is not installed
REQUIREMENTS = ("torch", "timm", "safetensors", "pyyaml", "numpy")


def register_model(
    tracking_uri: str,
    name: str,
    experiment_id: str,
    source_run_id: str,
    path_config: Path,
    weights: Path,
    tags: Mapping[str, str],
    description: str,
) -> str:
    """Logs the model (linked to `source_run_id`, the run that trained these weights, without reopening it) and
    registers it as a new version of `name`, with `tags` and `description` on the version. Returns the version."""
    with _tracking_uri(tracking_uri), fail_fast(TRANSFER_TIMEOUT_S), _quiet():
        client = MlflowClient(tracking_uri)
        logged = client.create_logged_model(experiment_id, name="path_vit", source_run_id=source_run_id)
        info = mlflow.pyfunc.log_model(
            name="path_vit",
            python_model=str(MODEL_FILE),
            artifacts={"path_config": str(path_config), "weights": str(weights)},
            code_paths=[str(PACKAGE)],
            pip_requirements=[_pinned(p) for p in REQUIREMENTS],
            registered_model_name=name,
            model_id=logged.model_id,
        )
        version = str(info.registered_model_version)
        for key, value in tags.items():
            client.set_model_version_tag(name, version, key, value)
        client.update_model_version(name, version, description=description)
    return version


def _pinned(package: str) -> str:
    """`package==version` as installed here (the loader needs the same torch and timm to rebuild the model)."""
    try:
        return f"{package}=={importlib.metadata.version(package)}"
    except importlib.metadata.PackageNotFoundError:
        return package


@contextmanager
def _tracking_uri(uri: str) -> Iterator[None]:
    """MLflow's `log_model` writes to the process-wide tracking URI: set for the call, then put back (an unset one
    as the URI MLflow would have used)."""
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)


@contextmanager
def _quiet() -> Iterator[None]:
    """MLflow's own lines while logging and registering a model (its INFO log, "Successfully registered model ...",
    download progress bars) stay out of the export's output, which says what was registered; errors still raise."""
    logger = logging.getLogger("mlflow")
    level = logger.level
    logger.setLevel(logging.WARNING)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        logger.setLevel(level)
