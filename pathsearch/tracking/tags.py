"""The names every pathsearch MLflow run carries, as plain strings: its tags, how a trial's run is found by them, and
how a param value is written. runs.py (which writes and reads runs, and builds the trial logger) and logger.py (the
Ray Tune callback) share them from here, so logger.py needs nothing of runs.py. Imports nothing (a client is passed
in): `export` reads these tags without Ray or Optuna.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

TRIAL_TAG = "pathsearch.trial_id"
SEARCH_TAG = "pathsearch.search"  # the search's parent run id, on every run of that search at any depth
KIND_TAG = "pathsearch.kind"  # "search" on a search's parent run
ROLE_TAG = "pathsearch.role"  # supernet | proxy | confirmation | confirmation_seed | fit_scales (search trials: none)
SEED_TAG = "pathsearch.seed"  # a confirmation trial's seed
STATE_TAG = "pathsearch.state"  # COMPLETE | PRUNED | FAIL | LOST | INTERRUPTED: how a trial run ended
NODE_TAG = "pathsearch.node_id"  # the Ray node a trial last ran on
RETRIES_TAG = "pathsearch.retries"  # how often Tune retried the trial from its checkpoint
ERROR_TAG = "pathsearch.error"  # a failed trial's last error, its final line (the whole of Tune's error.txt attached)
WINNER_TAG = "pathsearch.confirmed_run"  # on the parent: the winning configuration's MLflow run
VERDICT_TAG = "pathsearch.verdict"  # on the parent: the confirmation's verdict, as a person reads it
PARENT_TAG = "mlflow.parentRunId"  # MLflow's own nesting tag
NOTE_TAG = "mlflow.note.content"  # MLflow's run description


def find_trial_run(client: MlflowClient, experiment_id: str, parent_run_id: str, trial_id: str) -> str | None:
    """The MLflow run of one of a search's Tune trials (any stage), found by its tags; None if none yet."""
    query = f"tags.`{TRIAL_TAG}` = '{trial_id}' and tags.`{SEARCH_TAG}` = '{parent_run_id}'"
    runs = client.search_runs([experiment_id], filter_string=query, max_results=1)
    return runs[0].info.run_id if runs else None


def param_value(value: Any) -> str:
    """A parameter value as every pathsearch run logs it: str of the value, cut to MLflow's limit."""
    text = str(value)
    return text if len(text) <= 6000 else text[:5997] + "..."
