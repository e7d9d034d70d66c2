"""MLflow, written by the driver: one parent run per search, exactly one nested child run per trial.

A Ray Tune callback (driver side) batches each reported result into one `log_batch` request and ends every run
with its real status (FINISHED, FAILED, or KILLED for pruned/stopped trials). Runs are found again by the
`pathsearch.trial_id` tag, so a resumed trial continues its own run. No tensors, no torch.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from ray.tune import Callback

TRIAL_TAG = "pathsearch.trial_id"
TRIAL_ARTIFACTS = ("path_config.yaml", "path_analysis.json", "path_analysis.png", "model_0.safetensors")


def default_tracking_uri() -> str:
    return f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def start_parent_run(tracking_uri: str, experiment: str, run_name: str, params: dict[str, Any]) -> tuple[str, str]:
    """Creates the store, the experiment and the search's parent run in the driver, before any trial starts
    (two trials creating a fresh SQLite store at once raced here). Returns (experiment_id, run_id)."""
    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is not None:
        experiment_id = found.experiment_id
    else:  # keep artifacts beside a SQLite store rather than in whatever folder the command ran from
        location = None
        if tracking_uri.startswith("sqlite:///"):
            location = (Path(tracking_uri[len("sqlite:///") :]).resolve().parent / "mlruns").as_uri()
        experiment_id = client.create_experiment(experiment, artifact_location=location)
    run = client.create_run(experiment_id, run_name=run_name, tags={"pathsearch.kind": "search"})
    client.log_batch(run.info.run_id, params=[Param(k, _short(v)) for k, v in params.items()])
    return experiment_id, run.info.run_id


class MlflowTrialLogger(Callback):
    """Logs each Tune trial to a nested MLflow run: params once, one batched request per result, artifacts and
    status at the end. Holds only strings, so Tune can checkpoint it with the experiment."""

    def __init__(self, tracking_uri: str, experiment_id: str, parent_run_id: str, final_epoch: int) -> None:
        self.tracking_uri = tracking_uri
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self.final_epoch = final_epoch
        self._runs: dict[str, str] = {}
        self._client: MlflowClient | None = None

    @property
    def client(self) -> MlflowClient:
        if self._client is None:  # made once per process (the callback is pickled without it)
            self._client = MlflowClient(self.tracking_uri)
        return self._client

    def run_id_for(self, trial: Any) -> str:
        """The trial's run: created once, found again by tag after a restore."""
        trial_id = trial.trial_id
        if trial_id in self._runs:
            return self._runs[trial_id]
        client = self.client
        query = f"tags.`{TRIAL_TAG}` = '{trial_id}' and tags.`mlflow.parentRunId` = '{self.parent_run_id}'"
        existing = client.search_runs([self.experiment_id], filter_string=query, max_results=1)
        if existing:
            run_id = existing[0].info.run_id
            client.update_run(run_id, status="RUNNING")
        else:
            config = trial.config
            tags = {
                "mlflow.parentRunId": self.parent_run_id,
                TRIAL_TAG: trial_id,
                "pathsearch.optuna_trial": str(config.get("optuna_trial", "")),
            }
            run = client.create_run(self.experiment_id, run_name=f"trial {trial_id}", tags=tags)
            run_id = run.info.run_id
            params = [Param(k, _short(v)) for k, v in sorted(config.items()) if k not in ("overrides",)]
            params += [Param(f"config.{k}", _short(v)) for k, v in sorted(config.get("overrides", {}).items())]
            client.log_batch(run_id, params=params)
        self._runs[trial_id] = run_id
        return run_id

    def on_trial_start(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self.run_id_for(trial)

    def on_trial_result(
        self, iteration: int, trials: list[Any], trial: Any, result: dict[str, Any], **info: Any
    ) -> None:
        run_id = self.run_id_for(trial)
        step = int(result.get("epoch", result.get("training_iteration", 0)))
        now = int(time.time() * 1000)
        metrics = [
            Metric(k, float(v), now, step)
            for k, v in result.items()
            if k in REPORTED and isinstance(v, int | float) and not isinstance(v, bool)
        ]
        self.client.log_batch(run_id, metrics=metrics)  # one request per result

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        last = trial.last_result or {}
        pruned = int(last.get("epoch", 0)) < self.final_epoch
        self._finish(trial, "KILLED" if pruned else "FINISHED", "PRUNED" if pruned else "COMPLETE")

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._finish(trial, "FAILED", "FAIL")

    def _finish(self, trial: Any, status: str, state: str) -> None:
        run_id = self.run_id_for(trial)
        client = self.client
        checkpoint = getattr(trial, "checkpoint", None)
        folder = Path(checkpoint.path) if checkpoint is not None else None
        if folder is not None and folder.is_dir():
            files = [folder / name for name in TRIAL_ARTIFACTS if (folder / name).is_file()]
            if files:
                with tempfile.TemporaryDirectory() as tmp:
                    for f in files:
                        shutil.copy(f, tmp)
                    client.log_artifacts(run_id, tmp)
        client.log_batch(run_id, tags=[RunTag("pathsearch.state", state)])
        client.set_terminated(run_id, status=status)
        self._runs.pop(trial.trial_id, None)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_runs"] = {}  # looked up again by tag after a restore
        state["_client"] = None
        return state


REPORTED = {
    "train_loss", "val_loss", "val_acc", "val_acc_full", "kept_paths", "params", "images_per_s", "epoch",
    "train_loss_std", "val_loss_std", "val_acc_std", "val_acc_full_std",
}  # fmt: skip


def close_orphan_runs(tracking_uri: str, experiment_id: str, parent_run_id: str, state: str = "LOST") -> int:
    """Ends trial runs left RUNNING under a search. After a finished search these are trials lost in a driver
    crash that Tune's last snapshot did not know (Tune trains them again as new trials): KILLED, state LOST.
    After an interrupted one they are the unfinished trials: KILLED, state INTERRUPTED, until `resume`."""
    client = MlflowClient(tracking_uri)
    query = f"tags.`mlflow.parentRunId` = '{parent_run_id}' and attributes.status = 'RUNNING'"
    orphans = client.search_runs([experiment_id], filter_string=query, max_results=10000)
    for run in orphans:
        client.log_batch(run.info.run_id, tags=[RunTag("pathsearch.state", state)])
        client.set_terminated(run.info.run_id, status="KILLED")
    return len(orphans)


def end_parent_run(
    tracking_uri: str, run_id: str, metrics: dict[str, float], artifacts: list[Path], status: str
) -> None:
    client = MlflowClient(tracking_uri)
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()])
    for path in artifacts:
        if path.exists():
            client.log_artifact(run_id, str(path))
    client.set_terminated(run_id, status=status)


def _short(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 6000 else text[:5997] + "..."


def ui_command(tracking_uri: str | None, port: int) -> tuple[list[str], dict[str, Any]]:
    """`mlflow server` for one store on 127.0.0.1 with lean settings (one worker, no job execution)."""
    uri = tracking_uri or default_tracking_uri()
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host", "127.0.0.1"]
    cmd += ["--port", str(port), "--workers", "1"]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    return cmd, env
