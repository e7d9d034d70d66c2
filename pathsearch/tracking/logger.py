"""The trial logger: exactly one MLflow run per Ray Tune trial, nested under its search's parent run.

A Ray Tune callback (driver side) turns each trial event into a plain-data operation on an ordered queue (run
creation with params, one `log_batch` per reported result, artifacts + state tag + terminal status at the end) and
sends the queue in order. While the MLflow server is unreachable the operations stay queued, are retried every few
seconds, travel in Tune's experiment checkpoint, and are flushed (or saved to a JSON file) when the search ends.
Runs are found again by the `pathsearch.trial_id` tag, so a resumed trial continues its own run. No tensors, no torch.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT
from ray.tune import Callback

from pathsearch.storage import fetch, result_checkpoint
from pathsearch.tracking.outage import (
    GAVE_UP,
    RETRY_EVERY_S,
    TRANSFER_TIMEOUT_S,
    deadline_s,
    fail_fast,
    flush_timeout_s,
    is_retryable,
    reason,
    say,
)
from pathsearch.tracking.tags import (
    ERROR_TAG,
    NODE_TAG,
    RETRIES_TAG,
    SEARCH_TAG,
    SEED_TAG,
    STATE_TAG,
    TRIAL_TAG,
    find_trial_run,
    param_value,
)

TRIAL_ARTIFACTS = ("path_config.yaml", "path_analysis.json", "path_analysis.png", "model_0.safetensors")
PENDING_FILE = "mlflow_pending.json"  # in the run directory: operations a flush could not send before its deadline
Op = dict[str, Any]  # plain data only (str, float, int, lists, dicts): pickled with Tune's state, dumped as JSON


class MlflowTrialLogger(Callback):
    """Logs each Tune trial to a nested MLflow run: params once, one batched request per result, artifacts and
    status at the end, all through an ordered queue of operations that survives an MLflow outage.

    Every operation can be sent twice without harm, because a send that failed mid-flight is sent again: run
    creation looks the run up by tag first, params are re-logged with the same values, a metric batch carries the
    timestamp of its report (MLflow's SQL store keeps one row per key, timestamp, step and value, so a resent
    batch adds no history entry), artifacts are overwritten, tags and status are set.
    """

    def __init__(
        self,
        tracking_uri: str,
        experiment_id: str,
        parent_run_id: str,
        final_epoch: int,
        run_dir: str | Path | None = None,
        groups: dict[str, dict[str, str]] | None = None,
    ) -> None:
        self.tracking_uri = tracking_uri
        # candidate label -> tags of its trials' runs (a confirmation nests each seed's run under its configuration's)
        self.groups = dict(groups or {})
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self.final_epoch = final_epoch
        self.run_dir = str(run_dir) if run_dir is not None else None  # where a flush that times out saves the queue
        self._pending: list[Op] = []  # oldest first; kept in the pickled state
        self._runs: dict[str, str] = {}  # trial id -> run id, of the runs this process has open
        self._logged: dict[str, int] = {}  # trial id -> the last epoch its run holds (logged, or found on reopening)
        self._nodes: dict[str, str] = {}  # trial id -> the node it last reported from (tagged when it changes)
        self._inputs: dict[str, str] = {}  # trial id -> the splits it read (JSON, from its reports), logged at its end
        self._started: set[str] = set()  # trials whose start operation this process queued
        self._client: MlflowClient | None = None
        self._next_try = 0.0  # monotonic time before which the queue is not sent again (set while down)
        self._down_since: float | None = None  # start of the current outage, for its two log lines

    @property
    def client(self) -> MlflowClient:
        if self._client is None:  # made once per process (the callback is pickled without it)
            self._client = MlflowClient(self.tracking_uri)
        return self._client

    @property
    def pending(self) -> list[Op]:
        """The operations not yet sent, oldest first."""
        return list(self._pending)

    # ----- Tune events -> operations ------------------------------------------------------------------------
    def on_trial_start(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._started.add(trial.trial_id)
        config = trial.config
        params = [[k, param_value(v)] for k, v in sorted(config.items()) if k not in ("overrides",)]
        params += [[f"config.{k}", param_value(v)] for k, v in sorted(config.get("overrides", {}).items())]
        tags = {
            "mlflow.parentRunId": self.parent_run_id,
            SEARCH_TAG: self.parent_run_id,
            TRIAL_TAG: trial.trial_id,
            "pathsearch.optuna_trial": str(config.get("optuna_trial", "")),
            **self.groups.get(str(config.get("candidate")), {}),
        }
        if "seed" in config:
            tags[SEED_TAG] = str(config["seed"])
        self._send({"op": "start", "trial": trial.trial_id, "tags": tags, "params": params})

    def on_trial_result(
        self, iteration: int, trials: list[Any], trial: Any, result: dict[str, Any], **info: Any
    ) -> None:
        step = int(result.get("epoch", result.get("training_iteration", 0)))
        now = int(time.time() * 1000)  # fixed at the report, so a resent batch matches its stored rows exactly
        metrics = [
            [k, float(v), now, step]
            for k, v in result.items()
            if k in REPORTED and isinstance(v, int | float) and not isinstance(v, bool)
        ]
        if isinstance(result.get("dataset_inputs"), str):  # logged with the run's end: no request per result
            self._inputs[trial.trial_id] = result["dataset_inputs"]
        tags = []
        node = result.get("node_id")  # train_trial reports it: where the trial runs, after a retry too
        if isinstance(node, str) and self._nodes.get(trial.trial_id) != node:
            self._nodes[trial.trial_id] = node
            tags.append([NODE_TAG, node])
        if metrics or tags:  # one request per result
            self._send({"op": "metrics", "trial": trial.trial_id, "metrics": metrics, "tags": tags})

    def on_trial_recover(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        """A failed trial that Tune retries from its last checkpoint (search.max_failures) keeps its run."""
        self._open(trial)
        self._send({"op": "tags", "trial": trial.trial_id, "tags": [[RETRIES_TAG, str(trial.num_failures)]]})

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        last = trial.last_result or {}
        pruned = int(last.get("epoch", 0) or 0) < self.final_epoch  # ASHA stopped it before its final epoch
        self._finish(trial, "KILLED" if pruned else "FINISHED", "PRUNED" if pruned else "COMPLETE")

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        """The run of a failed trial says why: its last error's final line as a tag, and Tune's error.txt (every
        attempt's traceback) as an artifact, so the MLflow UI answers what the console's count of failures does not."""
        self._open(trial)
        error = Path(trial.error_file) if trial.error_file else None  # Tune's error.txt, once it has written one
        if error is not None and error.is_file():
            self._send({"op": "tags", "trial": trial.trial_id, "tags": [[ERROR_TAG, error_line(error.read_text())]]})
            self._send({"op": "artifacts", "trial": trial.trial_id, "folder": str(error.parent), "names": [error.name]})
        self._finish(trial, "FAILED", "FAIL")

    def _open(self, trial: Any) -> None:
        """Tune retries or fails a trial whose actor died in its creation task (its node lost, say) without ever
        calling on_trial_start: such a trial gets its run here, so that every trial has one (a trial that did start
        is found again by its tag: no second run)."""
        if trial.trial_id not in self._started:
            self.on_trial_start(0, [], trial)

    def _finish(self, trial: Any, status: str, state: str) -> None:
        # Tune keeps a finished trial's last checkpoint (Ray Train a data-parallel trial's), locally or in a store:
        # its place suffices; its own operation: files MLflow refuses must not cost the run its final status
        folder = result_checkpoint(getattr(trial, "checkpoint", None), getattr(trial, "last_result", None))
        if folder is not None:
            self._send({"op": "artifacts", "trial": trial.trial_id, "folder": folder, "names": list(TRIAL_ARTIFACTS)})
        inputs = self._inputs.pop(trial.trial_id, None)
        if inputs is not None:  # the runs page's Dataset column and MLflow's dataset filters read these
            self._send({"op": "inputs", "trial": trial.trial_id, "inputs": inputs})
        self._send({"op": "end", "trial": trial.trial_id, "state": state, "status": status})

    def on_step_end(self, iteration: int, trials: list[Any], **info: Any) -> None:
        if self._pending and time.monotonic() >= self._next_try:  # Tune calls this every loop: the retry clock
            self._drain()

    def on_experiment_end(self, trials: list[Any], **info: Any) -> None:
        self.flush()

    # ----- the queue ---------------------------------------------------------------------------------------------
    def _send(self, op: Op) -> None:
        self._pending.append(op)
        if time.monotonic() >= self._next_try:
            self._drain()

    def flush(self, timeout_s: float | None = None) -> bool:
        """Sends the queue, retrying every few seconds until it is empty or `timeout_s` (default: env
        PATHSEARCH_MLFLOW_FLUSH_TIMEOUT_S, else 300 s) has passed. Then saves what is left to the run directory's
        `mlflow_pending.json` (see `send_pending`) and says so. Returns True when everything was sent."""
        timeout = deadline_s(self.tracking_uri, timeout_s)
        deadline = time.monotonic() + timeout
        try:
            while not self._drain():
                wait = min(RETRY_EVERY_S, deadline - time.monotonic())
                if wait <= 0:
                    self._give_up(f"still unreachable after {timeout:.0f}s")
                    return False
                time.sleep(wait)
        except KeyboardInterrupt:  # a second Ctrl-C while waiting (Tune takes the first): keep the queue, stop
            self._give_up("not waited for (interrupted)")
            raise
        GAVE_UP.discard(self.tracking_uri)
        return True

    def _give_up(self, why: str) -> None:
        GAVE_UP.add(self.tracking_uri)
        if self._pending:
            path = self.save_pending()
            say(
                f"MLflow at {self.tracking_uri} {why}: {len(self._pending)} operation(s) not sent, saved to {path} "
                f"(send them later with pathsearch.tracking.logger.send_pending('{path}'))"
            )

    def save_pending(self) -> Path:
        """Writes the queue (with where it goes) as JSON to the run directory, or the working directory."""
        path = Path(self.run_dir or Path.cwd()) / PENDING_FILE
        data = {
            "tracking_uri": self.tracking_uri,
            "experiment_id": self.experiment_id,
            "parent_run_id": self.parent_run_id,
            "ops": self._pending,
        }
        path.write_text(json.dumps(data, indent=1))
        return path

    def _drain(self) -> bool:
        """Sends queued operations in order until the queue is empty (True) or the server is unreachable (False:
        the failed operation stays first in line). An operation MLflow refuses for good is dropped, with a warning.
        """
        sent = 0
        while self._pending:
            op = self._pending[0]
            try:
                with fail_fast():
                    self._apply(op)
            except Exception as err:
                if is_retryable(err):
                    self._next_try = time.monotonic() + RETRY_EVERY_S
                    if sent:
                        self._recovered(sent)
                    if self._down_since is None:
                        self._down_since = time.monotonic()
                        say(
                            f"MLflow at {self.tracking_uri} unreachable: {len(self._pending)} operation(s) buffered, "
                            f"retrying every {RETRY_EVERY_S:.0f}s ({reason(err)})"
                        )
                    return False
                say(f"MLflow refused the {op['op']} operation of trial {op['trial']}, dropped: {reason(err)}")
            else:
                sent += 1
            self._pending.pop(0)
        self._next_try = 0.0
        if sent:
            self._recovered(sent)
        return True

    def _recovered(self, sent: int) -> None:
        if self._down_since is not None:
            left = f", {len(self._pending)} still queued" if self._pending else ""
            say(
                f"MLflow at {self.tracking_uri} reachable again after {time.monotonic() - self._down_since:.0f}s: "
                f"sent {sent} buffered operation(s){left}"
            )
            self._down_since = None

    def _apply(self, op: Op) -> None:
        client, trial_id = self.client, op["trial"]
        if op["op"] == "start":
            run_id = self._runs.get(trial_id)
            if run_id is None:
                run_id = self._find_run(trial_id)
                if run_id is not None:  # a restored trial (or a create whose answer was lost): reopen it
                    client.update_run(run_id, status="RUNNING")
                    # a trial restored from a snapshot older than its run retrains (or reports again) epochs the
                    # run already holds: those are not logged twice
                    logged = client.get_run(run_id).data.metrics.get("epoch")
                    if logged is not None:
                        self._logged[trial_id] = int(logged)
                else:
                    run = client.create_run(self.experiment_id, run_name=f"trial {trial_id}", tags=op["tags"])
                    run_id = run.info.run_id
                self._runs[trial_id] = run_id
            client.log_batch(run_id, params=[Param(k, v) for k, v in op["params"]])  # same values: a no-op
        elif op["op"] == "metrics":
            metrics = [Metric(k, v, t, s) for k, v, t, s in op["metrics"] if s > self._logged.get(trial_id, 0)]
            tags = [RunTag(k, v) for k, v in op.get("tags", [])]
            if metrics or tags:
                client.log_batch(self._run_id(trial_id), metrics=metrics, tags=tags)
            if metrics:  # a retried trial restored at its last epoch reports it again: not logged twice
                self._logged[trial_id] = max(m.step for m in metrics)
        elif op["op"] == "tags":
            client.log_batch(self._run_id(trial_id), tags=[RunTag(k, v) for k, v in op["tags"]])
        elif op["op"] == "artifacts":
            run_id = self._run_id(trial_id)
            with tempfile.TemporaryDirectory() as tmp:  # the chosen files only, not the whole checkpoint
                if "folder" in op:
                    fetch(op["folder"], op["names"], Path(tmp))
                for f in op.get("files", []):  # a queue saved by an older pathsearch: local paths
                    if Path(f).is_file():
                        shutil.copy(f, tmp)
                if any(Path(tmp).iterdir()):
                    with fail_fast(TRANSFER_TIMEOUT_S):  # weights need more than a request's few seconds
                        client.log_artifacts(run_id, tmp)
        elif op["op"] == "inputs":  # logging the same dataset and context again adds nothing
            client.log_inputs(self._run_id(trial_id), datasets=dataset_inputs(op["inputs"]))
        elif op["op"] == "end":
            run_id = self._run_id(trial_id)
            client.log_batch(run_id, tags=[RunTag(STATE_TAG, op["state"])])
            client.set_terminated(run_id, status=op["status"])
            self._runs.pop(trial_id, None)
        else:
            raise ValueError(f"unknown operation {op['op']!r}")

    def _find_run(self, trial_id: str) -> str | None:
        return find_trial_run(self.client, self.experiment_id, self.parent_run_id, trial_id)

    def _run_id(self, trial_id: str) -> str:
        """The trial's run; after a restore (`_runs` is not pickled) found by tag."""
        if trial_id not in self._runs:
            run_id = self._find_run(trial_id)
            if run_id is None:  # its start operation was refused: nothing to log to
                raise LookupError(f"no MLflow run for trial {trial_id}")
            self._runs[trial_id] = run_id
        return self._runs[trial_id]

    # ----- state: Tune pickles the callback with the Tuner, and checkpoints get_state() with the experiment -------
    def get_state(self) -> dict[str, Any]:
        # never empty: an empty dict would make Tune skip the save and a restore replay an older queue
        return {"pending": list(self._pending)}

    def set_state(self, state: dict[str, Any]) -> None:
        self._pending = list(state.get("pending", []))  # replayed in order after `pathsearch resume`

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_runs"], state["_logged"], state["_started"] = {}, {}, set()  # looked up again by tag after a restore
        state["_client"] = None
        state["_next_try"], state["_down_since"] = 0.0, None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        # a logger pickled before the queue existed (a search started with an older pathsearch) still restores
        defaults: dict[str, Any] = {"run_dir": None, "_pending": [], "_nodes": {}, "_next_try": 0.0, "groups": {}}
        defaults["_logged"], defaults["_started"] = {}, set()
        defaults["_down_since"] = None
        self.__dict__.update({**defaults, **state})


REPORTED = {
    "train_loss", "val_loss", "val_acc", "val_acc_full", "kept_paths", "params", "images_per_s", "epoch",
    "train_loss_std", "val_loss_std", "val_acc_std", "val_acc_full_std",
    "test_acc", "test_loss", "test_acc_std", "test_loss_std",
}  # fmt: skip


def send_pending(path: str | Path, timeout_s: float | None = None) -> int:
    """Sends the operations a flush saved to `path` (a `mlflow_pending.json`); removes the file once all are
    sent. Sending them twice does no harm. Returns how many are still not sent."""
    path = Path(path)
    data = json.loads(path.read_text())
    logger = MlflowTrialLogger(
        data["tracking_uri"], data["experiment_id"], data["parent_run_id"], final_epoch=0, run_dir=path.parent
    )
    logger.set_state({"pending": data["ops"]})
    if logger.flush(flush_timeout_s() if timeout_s is None else timeout_s):  # asked for: wait the full deadline
        path.unlink()
    return len(logger.pending)


def error_line(text: str, limit: int = 1000) -> str:
    """The final non-blank line of Tune's error.txt (the exception of the trial's last failure: Tune appends each
    attempt as "Failure # N (occurred at ...)" and the error's text, traceback first), cut to `limit` characters."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    line = lines[-1] if lines else "(Tune's error file is empty)"
    return line if len(line) <= limit else line[: limit - 3] + "..."


def dataset_inputs(text: str) -> list[DatasetInput]:
    """MLflow dataset inputs from a trial's `dataset_inputs` report (JSON: name, context, size, digest, source):
    the data itself is not uploaded, only its name, digest, size and where it came from."""
    inputs = []
    for split in json.loads(text):
        dataset = Dataset(
            name=split["name"],
            digest=split["digest"],
            source_type="pathsearch",
            source=json.dumps(split["source"]),
            profile=json.dumps({"num_rows": split["size"]}),
        )
        inputs.append(DatasetInput(dataset, tags=[InputTag(MLFLOW_DATASET_CONTEXT, split["context"])]))
    return inputs
