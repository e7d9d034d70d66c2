"""MLflow runs as plain data: `Store` reads runs and artifacts of a tracking store and writes runs, `SearchRuns` is
one search's parent run and everything nested under it. Every request goes through the outage rules (outage.py):
reads fail fast with a clear error, writes wait out an outage up to a deadline. No torch, no Ray.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pathsearch.tracking.outage import TRANSFER_TIMEOUT_S, fail_fast, is_retryable, retry_until, start_timeout_s

# the tags live in tags.py (logger.py, which this module builds, needs them too); imported from here they still work
from pathsearch.tracking.tags import KIND_TAG as KIND_TAG
from pathsearch.tracking.tags import NODE_TAG as NODE_TAG
from pathsearch.tracking.tags import NOTE_TAG as NOTE_TAG
from pathsearch.tracking.tags import PARENT_TAG as PARENT_TAG
from pathsearch.tracking.tags import RETRIES_TAG as RETRIES_TAG
from pathsearch.tracking.tags import ROLE_TAG as ROLE_TAG
from pathsearch.tracking.tags import SEARCH_TAG as SEARCH_TAG
from pathsearch.tracking.tags import SEED_TAG as SEED_TAG
from pathsearch.tracking.tags import STATE_TAG as STATE_TAG
from pathsearch.tracking.tags import TRIAL_TAG as TRIAL_TAG
from pathsearch.tracking.tags import find_trial_run
from pathsearch.tracking.tags import param_value as param_value

if TYPE_CHECKING:
    from mlflow.entities import Run as MlflowRun

    from pathsearch.tracking.logger import MlflowTrialLogger

# MLflow's UI opens a runs page in a saved view (sort order, columns) that an experiment tag holds, named by the
# page's `viewStateShareKey` URL parameter (its "Share" button makes one): pathsearch saves one per experiment
VIEW_KEY = "pathsearch"
VIEW_TAG_PREFIX = "mlflow.sharedViewState."


def default_tracking_uri() -> str:
    return f"sqlite:///{Path.cwd() / 'mlflow.db'}"


@dataclass
class Run:
    """An MLflow run as plain data."""

    run_id: str
    name: str
    experiment_id: str
    status: str
    start_time: int
    tags: dict[str, str]
    params: dict[str, str]
    metrics: dict[str, float]

    @classmethod
    def of(cls, run: MlflowRun) -> Run:
        info, data = run.info, run.data
        return cls(
            info.run_id,
            info.run_name or "",
            info.experiment_id,
            info.status,
            int(info.start_time or 0),
            dict(data.tags),
            dict(data.params),
            dict(data.metrics),
        )


@dataclass
class RunLog:
    """What to write to one run: a new one (`run_id` None: created with `name` and `tags`) or an existing one.
    `metrics` are logged at `step`; `texts` become artifacts of those names; `status` ends the run."""

    run_id: str | None = None
    name: str = ""
    tags: dict[str, str] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    step: int = 0
    artifacts: list[Path] = field(default_factory=list)
    texts: dict[str, str] = field(default_factory=dict)
    status: str | None = None
    experiment_id: str | None = None  # for a new run (default: the store's or search's experiment)


class Store:
    """A tracking store (SQLite file, database or `mlflow server`) seen through plain data."""

    def __init__(self, uri: str | None = None) -> None:
        self.uri = uri or default_tracking_uri()
        self._client: MlflowClient | None = None

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            self._client = MlflowClient(self.uri)
        return self._client

    # ----- reads: one attempt, fail fast -------------------------------------------------------------------------
    def check(self) -> None:
        """A ValueError naming the URI when MLflow cannot open the store; a server that is down raises its own
        (retryable) error for the caller to decide."""
        try:
            with fail_fast():
                self.client.search_experiments(max_results=1)
        except MlflowException as err:
            if err.get_http_status_code() >= 500 and self.uri.startswith(("http://", "https://")):
                raise
            raise ValueError(f"--tracking-uri {self.uri}: {str(err).splitlines()[0]}") from None

    def wait_for(self, what: str) -> None:
        """A ValueError within the start timeout when the store does not answer, not a hang in MLflow's own
        retries (a search that starts or resumes needs it before anything else happens)."""
        call = self.client.search_experiments
        if retry_until(self.uri, what, call, start_timeout_s(), say_gave_up=False) is None:
            raise ValueError(f"no MLflow tracking server answers at {self.uri}: start it, or check --tracking-uri")

    def run(self, run_id: str) -> Run:
        try:
            with fail_fast():
                return Run.of(self.client.get_run(run_id))
        except Exception as err:  # MLflow raises its own exception types for an unknown or malformed run id
            if is_retryable(err):
                raise
            raise ValueError(f"no MLflow run {run_id!r} at {self.uri}: {str(err).splitlines()[0]}") from None

    def find_experiment(self, name: str) -> str | None:
        with fail_fast():
            found = self.client.get_experiment_by_name(name)
        return None if found is None else str(found.experiment_id)

    def experiment_name(self, experiment_id: str) -> str:
        with fail_fast():
            return str(self.client.get_experiment(experiment_id).name)

    def view_key(self, experiment_id: str) -> str | None:
        """The `viewStateShareKey` of the runs-page view a search saved on the experiment, if one did."""
        with fail_fast():
            tags = self.client.get_experiment(experiment_id).tags
        return VIEW_KEY if VIEW_TAG_PREFIX + VIEW_KEY in tags else None

    def runs(
        self,
        experiment_ids: Sequence[str] | None,
        query: str = "",
        order_by: Sequence[str] | None = None,
        max_results: int = 50000,
    ) -> list[Run]:
        """Runs matching an MLflow filter string in `experiment_ids` (None: every active experiment)."""
        with fail_fast():
            if experiment_ids is None:
                experiment_ids = [e.experiment_id for e in self.client.search_experiments()]
            if not experiment_ids:
                return []
            found = self.client.search_runs(
                list(experiment_ids), query, order_by=list(order_by or []), max_results=max_results
            )
        return [Run.of(r) for r in found]

    def children(self, run_id: str, experiment_id: str, query: str = "") -> list[Run]:
        """The runs nested directly under `run_id`, optionally filtered further."""
        where = f"tags.`{PARENT_TAG}` = '{run_id}'" + (f" and {query}" if query else "")
        return self.runs([experiment_id], where)

    def latest_search(self, experiment_ids: Sequence[str] | None = None, finished: bool = False) -> Run | None:
        """The latest-started search parent run in `experiment_ids` (default: every active experiment), or None.
        `finished`: only searches that ended normally."""
        query = f"tags.`{KIND_TAG}` = 'search'" + (" and attributes.status = 'FINISHED'" if finished else "")
        found = self.runs(experiment_ids, query, ["attributes.start_time DESC"], max_results=1)
        return found[0] if found else None

    def download(self, run_id: str, name: str, folder: str | Path) -> Path:
        """A run's artifact downloaded into `folder`; a ValueError naming the run and the file when it has none.

        Through the tracking server, unless MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD says otherwise: a server whose
        artifacts are in an object store (`--artifacts-destination s3://...`) offers MLflow 3 clients presigned
        URLs on the store's endpoint as the server sees it, which this machine may not reach (an in-cluster one).
        """
        os.environ.setdefault("MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD", "false")
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # the caller says what it fetched
        try:
            with fail_fast(TRANSFER_TIMEOUT_S):
                return Path(self.client.download_artifacts(run_id, name, str(folder)))
        except Exception as err:  # MLflow raises several types for a missing artifact
            raise ValueError(f"run {run_id} has no artifact {name!r}: {err}") from None

    # ----- writes: retried through an outage ---------------------------------------------------------------------
    def write(self, logs: Sequence[RunLog], what: str, timeout_s: float | None = None) -> list[str] | None:
        """Writes each RunLog in order (creating the new runs), retrying while the server is unreachable, until
        the flush deadline. Returns the runs' ids, or None when the deadline passed (said on stderr). A retry after
        a partial send repeats it harmlessly: a created run keeps its id, metrics carry the same timestamps."""
        now = int(time.time() * 1000)

        def send() -> list[str]:
            return [self._write_one(log, now) for log in logs]

        return retry_until(self.uri, what, send, timeout_s)

    def _write_one(self, log: RunLog, now: int) -> str:
        client = self.client
        if log.run_id is None:
            experiment_id = log.experiment_id or self.default_experiment()
            log.run_id = client.create_run(experiment_id, run_name=log.name or None, tags=log.tags).info.run_id
            tags = []
        else:
            tags = [RunTag(k, v) for k, v in log.tags.items()]
        metrics = [Metric(k, float(v), now, log.step) for k, v in log.metrics.items() if _finite(v)]
        params = [Param(k, param_value(v)) for k, v in log.params.items()]
        if metrics or params or tags:
            client.log_batch(log.run_id, metrics=metrics, params=params, tags=tags)
        with fail_fast(TRANSFER_TIMEOUT_S), tempfile.TemporaryDirectory() as tmp:
            for path in log.artifacts:
                if Path(path).exists():
                    client.log_artifact(log.run_id, str(path))
            for name, text in log.texts.items():
                (Path(tmp) / name).write_text(text)
            if log.texts:
                client.log_artifacts(log.run_id, tmp)
        if log.status is not None:
            client.set_terminated(log.run_id, status=log.status)
        return str(log.run_id)

    def default_experiment(self) -> str:
        raise ValueError("a new run needs an experiment_id")


def _finite(value: float) -> bool:
    return isinstance(value, int | float) and value == value and abs(value) != float("inf")


class SearchRuns(Store):
    """One search's MLflow runs: its parent run (tag `pathsearch.kind: search`) and the runs nested under it."""

    def __init__(self, uri: str, experiment_id: str, parent_run_id: str) -> None:
        super().__init__(uri)
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id

    @classmethod
    def of(cls, state: Mapping[str, Any]) -> SearchRuns:
        """The runs of a search from its run directory's state (`tracking_uri`, `experiment_id`, `parent_run_id`)."""
        return cls(state["tracking_uri"], state["experiment_id"], state["parent_run_id"])

    @classmethod
    def start(
        cls,
        uri: str,
        experiment: str,
        run_name: str,
        params: Mapping[str, Any],
        artifacts: Iterable[Path] = (),
        metric: str = "val_acc",
        mode: str = "max",
    ) -> SearchRuns:
        """Creates the store, the experiment and the search's parent run in the driver, before any trial starts
        (two trials creating a fresh SQLite store at once raced here), and saves the experiment's runs-page view:
        sorted by the search's `metric`, with its columns (see `runs_view`). A server that does not answer within
        the start timeout is a clear error before anything else happens."""
        store = Store(uri)
        store.wait_for("starting the search")
        with fail_fast():
            experiment_id = store.find_experiment(experiment)
            if experiment_id is None:  # keep artifacts beside a SQLite store, not in whatever folder this ran in
                location = None
                if uri.startswith("sqlite:///"):
                    location = (Path(uri[len("sqlite:///") :]).resolve().parent / "mlruns").as_uri()
                experiment_id = store.client.create_experiment(experiment, artifact_location=location)
            view = json.dumps(runs_view(metric, mode))
            store.client.set_experiment_tag(experiment_id, VIEW_TAG_PREFIX + VIEW_KEY, view)
        parent = RunLog(name=run_name, tags={KIND_TAG: "search"}, params=dict(params), artifacts=list(artifacts))
        parent.experiment_id = experiment_id
        ids = store.write([parent], "starting the search", timeout_s=start_timeout_s())
        if ids is None:
            raise ValueError(f"no MLflow tracking server answers at {uri}: start it, or check --tracking-uri")
        return cls(uri, experiment_id, ids[0])

    def default_experiment(self) -> str:
        return self.experiment_id

    def write(self, logs: Sequence[RunLog], what: str, timeout_s: float | None = None) -> list[str] | None:
        """As `Store.write`; a new run nests under the parent unless its tags say where."""
        for log in logs:
            if log.run_id is None:
                log.tags = {PARENT_TAG: self.parent_run_id, SEARCH_TAG: self.parent_run_id, **log.tags}
        return super().write(logs, what, timeout_s)

    def reopen(self) -> None:
        """Sets the parent run RUNNING again for `resume`, failing fast when the store is down."""
        self.wait_for("resuming the search")
        with fail_fast():
            self.client.update_run(self.parent_run_id, status="RUNNING")

    def reopen_runs(self, run_ids: Iterable[str], what: str) -> None:
        """Sets the given runs RUNNING again unless they already finished."""

        def reopen() -> None:
            for run_id in run_ids:
                if self.client.get_run(run_id).info.status != "FINISHED":
                    self.client.update_run(run_id, status="RUNNING")

        retry_until(self.uri, what, reopen)

    def end(
        self,
        status: str | None,
        metrics: Mapping[str, float] | None = None,
        artifacts: Iterable[Path] = (),
        tags: Mapping[str, str] | None = None,
    ) -> None:
        """Logs summary metrics, tags and files to the parent run and ends it with `status` (None: leaves it
        running, as a search does between its stages); waits out an outage up to the flush timeout."""
        log = RunLog(self.parent_run_id, metrics=dict(metrics or {}), artifacts=list(artifacts), status=status)
        log.tags = dict(tags or {})
        self.write([log], f"ending the parent run {self.parent_run_id} (left RUNNING if this fails)")

    def close_orphans(self, under: str | None = None, state: str = "LOST") -> int:
        """Ends trial runs left RUNNING under `under` (default: the parent). After a finished search these are
        trials lost in a driver crash that Tune's last snapshot did not know (Tune trains them again as new
        trials): KILLED, state LOST. After an interrupted one they are the unfinished trials: KILLED, state
        INTERRUPTED, until `resume`. Waits out an outage up to the flush timeout; returns how many it closed."""
        parent = under or self.parent_run_id

        def close() -> int:
            query = f"tags.`{PARENT_TAG}` = '{parent}' and attributes.status = 'RUNNING'"
            orphans = self.client.search_runs([self.experiment_id], filter_string=query, max_results=10000)
            for run in orphans:
                self.client.log_batch(run.info.run_id, tags=[RunTag(STATE_TAG, state)])
                self.client.set_terminated(run.info.run_id, status="KILLED")
            return len(orphans)

        return retry_until(self.uri, "closing orphaned trial runs", close) or 0

    def find_trial(self, trial_id: str) -> str | None:
        """The MLflow run of one of this search's Tune trials (any stage), found by its tags; None if none yet."""
        return find_trial_run(self.client, self.experiment_id, self.parent_run_id, trial_id)

    def tag_trial(self, trial_id: str, tags: Mapping[str, str], what: str) -> str | None:
        """Tags a trial's run (the trial logger creates it before the trial's first result); its run id."""

        def tag() -> str:
            run_id = self.find_trial(trial_id)
            if run_id is None:
                raise LookupError(f"no MLflow run for trial {trial_id}")
            self.client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
            return run_id

        return retry_until(self.uri, what, tag)

    def trial_logger(
        self, final_epoch: int, run_dir: str | Path | None = None, groups: Mapping[str, dict[str, str]] | None = None
    ) -> MlflowTrialLogger:
        """The Ray Tune callback that logs this search's trials as runs nested under the parent (or under the run
        `groups` names for a trial's candidate)."""
        from pathsearch.tracking.logger import MlflowTrialLogger  # Ray's Callback: only where Tune runs

        return MlflowTrialLogger(
            self.uri, self.experiment_id, self.parent_run_id, final_epoch, run_dir, dict(groups or {})
        )


def runs_view(metric: str, mode: str) -> dict[str, Any]:
    """MLflow UI's runs-page state for a search: runs best first by `metric` (sorted by a metric, MLflow lists nested
    runs flat, so every trial is a row) and the columns a person compares them by: the metric, test accuracy where
    there is one (confirmation seeds), the kept paths and the data each run read. Keys as the UI names them."""
    column = f"metrics.`{metric}`"
    columns = [column, *(f"metrics.`{m}`" for m in ("test_acc", "kept_paths") if m != metric), "attributes.`Dataset`"]
    order = ["attributes.`Run Name`", *columns]  # the metrics first, where a person looks; Created, Duration after
    return {"orderByKey": column, "orderByAsc": mode == "min", "selectedColumns": columns, "columnOrder": order}
