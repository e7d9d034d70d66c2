"""One search's life in one object: its run folder (for a search kept in an object store, this machine's working
copy of it), its state, the store, the MLflow parent run and each Tune stage.

A `SearchRun` is made by `claim` (a new search: a folder no other search has) or `open` (resume). Strategies and the
confirmation ask it to run their stages (`stage`), to save files (`save`), to log records (`log`) and to end the
search (`finish`); they never touch the store or the parent run themselves. Every way out of a stage or of the
search (done, Ctrl-C, an exception, a stopped trial) goes through one rule, `_close`: runs left RUNNING are closed,
the parent's status is set, the store is synced. Orchestration: no torch, timm or model code.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any

from ray import tune

from pathsearch import storage
from pathsearch.cluster import placement
from pathsearch.config import SearchFile
from pathsearch.config.checks import trial_workers, worker_resources
from pathsearch.search.results import SearchResult, trained_to_end
from pathsearch.search.runner import StopSignal, quiet_console, stop_signalled
from pathsearch.storage import workcopy
from pathsearch.storage.rundirs import unique_run_dir, unique_run_name
from pathsearch.tracking.runs import PARENT_TAG, RunLog, SearchRuns, default_tracking_uri
from pathsearch.trial.trainable import WorkerGroup, group_trial, train_trial

STATE_FILE = "pathsearch_state.json"  # in the run directory: the search's name, tracking store and parent run
RESUME_HINT = "continue that search with `pathsearch resume`"
SEARCH_STAGE = "search"  # the search's own Tune experiment: the run folder itself (named after the run)


class Interrupted(KeyboardInterrupt):
    """Ctrl-C stopped a started search outside Tune's own handling of it; `run_dir` is what `resume` continues."""

    def __init__(self, run_dir: str) -> None:
        super().__init__(run_dir)
        self.run_dir = run_dir


class SearchRun:
    """A search's run folder, state, store, MLflow parent run and Tune stages.

    Use it as a context manager around the strategy: leaving it with an exception ends the parent FAILED (Ctrl-C:
    KILLED, raised again as `Interrupted` naming the folder to resume), closes the runs left RUNNING and syncs the
    store. `status` is the parent's: RUNNING until `finish`, or KILLED once a stage was stopped (`stopped`).
    """

    def __init__(self, folder: Path, spec: SearchFile, state: dict[str, Any] | None = None) -> None:
        self.folder = folder
        self.spec = spec
        self.state: dict[str, Any] = state or {}
        self.status = "RUNNING"
        self._made: Path | None = None  # the highest folder `claim` created (removed by `discard`)
        self._runs: SearchRuns | None = None

    # ----- making one ------------------------------------------------------------------------------------------
    @classmethod
    def claim(cls, spec: SearchFile, storage_path: str | Path = "runs/search", name: str | None = None) -> SearchRun:
        """A new search's folder under `storage_path` (see `new_run_dir`); `begin` opens its MLflow parent run."""
        local = None if storage.is_remote(storage_path) else Path(storage_path).expanduser().resolve()
        made = next((p for p in reversed([local, *local.parents]) if not p.exists()), None) if local else None
        folder, store = new_run_dir(spec, storage_path, name)
        run = cls(folder, spec, {"name": folder.name, **({"storage": store} if store else {})})
        run._made = made or folder
        return run

    @classmethod
    def open(cls, where: str | Path) -> SearchRun:
        """An existing search from its run folder (a local path, or a URI in an object store: copied first into a
        fresh working copy that this process claims until `close`). ValueError naming what is missing."""
        from pathsearch.config import load_search_file

        uri = str(where).rstrip("/") if storage.is_remote(where) else None
        folder = storage.download_run(uri) if uri else Path(where).expanduser().resolve()
        try:
            state_file = folder / STATE_FILE
            if not state_file.is_file():
                raise ValueError(f"{uri or folder} is not a pathsearch run directory (no {STATE_FILE})")
            state = json.loads(state_file.read_text())
            if uri:  # the store it is found in now (a bucket may have been copied or renamed since)
                state["storage"] = storage.parent_of(uri)
            # the depth the search parsed its space for (a file may name a timm model without model.kwargs.depth):
            # from the state, so the driver never imports torch; a folder from before it was recorded asks timm
            if "depth" in state:
                spec = load_search_file(folder / "search.yaml", model_depth=lambda *_: state["depth"])
            else:
                from pathsearch.ensemble.model import model_depth

                spec = load_search_file(folder / "search.yaml", model_depth=model_depth)
        except BaseException:
            workcopy.release(folder)
            raise
        return cls(folder, spec, state)

    def begin(self, tracking_uri: str | None = None) -> None:
        """Writes the resolved search file and the state into the new folder (and the store) and opens the MLflow
        parent run. Removes the folder when that fails (an unreachable tracking server, say)."""
        spec = self.spec
        try:
            uri = tracking_uri or spec.tracking.tracking_uri or default_tracking_uri()
            params = {"search_file": spec.source, **{f"search.{k}": v for k, v in spec.search.__dict__.items()}}
            (self.folder / "search.yaml").write_text(spec.to_yaml())  # on the parent from the start: the UI
            files = [self.folder / "search.yaml"]
            metric, mode = spec.search.metrics[0], spec.search.modes[0]
            runs = SearchRuns.start(uri, spec.tracking.experiment, self.folder.name, params, files, metric, mode)
            self.state.update(tracking_uri=uri, experiment_id=runs.experiment_id, parent_run_id=runs.parent_run_id)
            self.state["depth"] = spec.space.depth
            (self.folder / STATE_FILE).write_text(json.dumps(self.state, indent=1))
            self.save("search.yaml", STATE_FILE)  # the state last: it marks a run folder
        except BaseException:
            self.discard()
            raise
        self._runs = runs

    def reopen(self) -> None:
        """Sets the parent run RUNNING again (resume), failing fast when the tracking store is down."""
        self.runs.reopen()

    def discard(self) -> None:
        """Removes a search that never started: its folder, with the folders above it that `claim` made."""
        shutil.rmtree(self._made or self.folder, ignore_errors=True)

    def close(self, keep_copy: bool = False) -> None:
        """Ends this process's claim on a working copy (nothing for a local run folder). A finished search has
        uploaded its last file (an upload that fails raises), so its copy is removed unless `keep_copy`; a stopped
        or failed one keeps it, a cache that `resume` starts afresh from the store."""
        if self.stored:
            workcopy.release(self.folder, remove=self.status == "FINISHED" and not keep_copy)

    # ----- what it is ----------------------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return str(self.state.get("name") or self.folder.name)

    @property
    def stored(self) -> bool:
        """Kept in an object store (the folder is then this machine's working copy)."""
        return bool(self.state.get("storage"))

    @property
    def uri(self) -> str:
        """Where the run folder lives: `<storage>/<name>` in a store, else the local folder."""
        return storage.run_uri(self.folder, self.state)

    @property
    def parent_run_id(self) -> str:
        return str(self.state["parent_run_id"])

    @property
    def stopped(self) -> bool:
        """A stage was stopped (Ctrl-C reached Tune, which returned with unfinished trials kept for `resume`)."""
        return self.status == "KILLED"

    @property
    def runs(self) -> SearchRuns:
        """The door to this search's MLflow runs."""
        if self._runs is None:
            self._runs = SearchRuns.of(self.state)
        return self._runs

    def path(self, name: str) -> Path:
        return self.folder / name

    def has(self, name: str) -> bool:
        """The run folder holds the file `name` (the working copy holds what the store does)."""
        return (self.folder / name).is_file()

    def has_stage(self, name: str) -> bool:
        """Tune left a snapshot of stage `name` that it can restore."""
        return storage.restorable(self._stage_uri(name))

    def result(self, best: dict[str, Any] | None = None, baseline: dict[str, Any] | None = None) -> SearchResult:
        """A result of this search (files, counts and the confirmation are the caller's to add)."""
        out = SearchResult(self.folder, self.spec.tracking.experiment, self.parent_run_id, best, baseline)
        out.stored_at = self.uri if self.stored else None
        out.interrupted = self.stopped
        return out

    @contextmanager
    def console(self, library_output: bool = False) -> Iterator[None]:
        """Ray's and Optuna's output into the run folder's log (see `runner.quiet_console`), and Tune's settings for
        a search kept in a store."""
        with quiet_console(self.folder, library_output), storage.tune_settings(self.state.get("storage")):
            yield

    # ----- the search's life ---------------------------------------------------------------------------------------
    def __enter__(self) -> SearchRun:
        return self

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None) -> None:
        if err is None:
            return
        if isinstance(err, KeyboardInterrupt):
            self._close("KILLED")
            if isinstance(err, Interrupted):
                return
            raise Interrupted(self.uri if self.stored else str(self.folder)) from err
        self._close("FAILED")

    def stage(
        self,
        name: str,
        trainable: Any,
        *,
        epochs: int,
        param_space: Mapping[str, Any] | None = None,
        tune_config: tune.TuneConfig | None = None,
        callbacks: Sequence[Any] = (),
        groups: Mapping[str, dict[str, str]] | None = None,
        spec: SearchFile | None = None,
        unfinished: Callable[[Any], bool] | None = None,
    ) -> Any:
        """Runs (or continues) one Tune stage and returns its ResultGrid.

        The stage's Tune experiment is the folder `name` in the run folder (`SEARCH_STAGE`: the run folder itself).
        A snapshot Tune left there is restored (finished trials are not trained again, errored ones are retried);
        else a new Tuner is made of `trainable` (bound to `spec`'s base trial and resources), `param_space`,
        `tune_config` and `callbacks`, with the MLflow trial logger (trials nest under the parent, or under the
        run `groups` names for a trial's candidate) and retries from checkpoints.

        On the way out: done, the runs left RUNNING by trials lost in a driver crash are closed and the store is
        synced (the parent stays RUNNING for what follows); stopped (Ctrl-C reached Tune, or `unfinished(grid)`:
        by default a trial neither failed nor trained `epochs`), the unfinished trials' runs end KILLED until
        resume, the parent KILLED (`stopped` is then True) and the store is synced. An exception goes up to the
        search's own rule (`__exit__`).
        """
        spec = spec or self.spec
        where = self._stage_uri(name)
        under: list[str | None] = [str(g[PARENT_TAG]) for g in (groups or {}).values() if PARENT_TAG in g]
        if storage.restorable(where):
            storage.recover_checkpoints(where)
            # the param space again: Tune's snapshot of a sample_from does not resolve after a restore
            space = dict(param_space) if param_space is not None else None
            bound = runnable(spec, trainable)
            tuner = tune.Tuner.restore(where, trainable=bound, resume_errored=True, param_space=space)
        else:
            logger = self.runs.trial_logger(epochs, self.folder, groups)
            root = storage.tune_root(self.folder, self.state) if name == SEARCH_STAGE else self.uri
            tuner = tune.Tuner(
                runnable(spec, trainable),
                param_space=dict(param_space) if param_space is not None else None,
                tune_config=tune_config,
                run_config=run_config(spec, self.name if name == SEARCH_STAGE else name, root, [logger, *callbacks]),
            )
        grid: Any = tuner.fit()
        if unfinished is None:
            stopped = any(r.error is None and not trained_to_end(r.metrics or {}, epochs) for r in grid)
        else:
            stopped = unfinished(grid)
        if stop_signalled() or stopped:  # Tune returned early on SIGINT: its snapshot keeps them for `resume`
            self._close("KILLED", under)
        else:
            for parent in list(under) or [None]:  # trials lost in a driver crash and trained again: their first runs
                self.runs.close_orphans(parent)  # end LOST (grouped trials: the candidate runs stay open)
            self.save()
        return grid

    def finish(self, summary: Mapping[str, float] | None = None, files: Iterable[Path] = ()) -> None:
        """The search is over: the parent run gets `summary` and `files` and ends FINISHED; the store is synced."""
        self.runs.end("FINISHED", summary, files)
        self.status = "FINISHED"
        self.save()

    def record(self, summary: Mapping[str, float] | None = None, files: Iterable[Path] = ()) -> None:
        """Logs `summary` and `files` to the parent run (its status unchanged) and syncs the store."""
        self.runs.end(None, summary, files)
        self.save()

    def _close(self, status: str, under: Sequence[str | None] = ()) -> None:
        """The one rule for a search that stops here (KILLED: resumable; FAILED): the runs its trials left RUNNING
        end KILLED (state INTERRUPTED, so `resume` reopens and continues them), the parent ends `status` with the
        search file attached, and the store gets the folder's files."""
        self.status = status
        if "parent_run_id" not in self.state:  # never began: nothing in MLflow or the store
            return
        try:
            for parent in [*under, None]:
                self.runs.close_orphans(parent, state="INTERRUPTED")
            self.runs.end(status, artifacts=[self.folder / "search.yaml"])
        finally:
            self.save()

    # ----- files and records ---------------------------------------------------------------------------------------
    def save(self, *names: str) -> None:
        """Uploads the run folder's files `names` (default: every file at its top level) to the store; nothing for
        a local run folder."""
        storage.upload(self.folder, self.state, names or None)

    def log(self, logs: Sequence[RunLog], what: str) -> list[str] | None:
        """Writes records to MLflow (new runs nest under the parent); their run ids, or None when MLflow stayed
        unreachable (the writes wait in the outage queue)."""
        return self.runs.write(logs, what)

    def reopen_runs(self, run_ids: Iterable[str], what: str) -> None:
        """Sets runs of this search RUNNING again unless they finished (resume)."""
        self.runs.reopen_runs(run_ids, what)

    def tag_trial(self, trial_id: str, tags: Mapping[str, str], what: str) -> str | None:
        """Tags the MLflow run of one of this search's trials; its run id."""
        return self.runs.tag_trial(trial_id, tags, what)

    def copy_out(self, location: str, name: str, target: Path) -> bool:
        """Copies the file `name` of a checkpoint (local or in the store) to `target`; False when it has none."""
        return storage.copy_out(location, name, target)

    def fetch(self, location: str, names: Sequence[str], folder: Path) -> list[Path]:
        """Copies files of a checkpoint (local or in the store) into `folder`; those it found."""
        return storage.fetch(location, names, folder)

    def _stage_uri(self, name: str) -> str:
        return self.uri if name == SEARCH_STAGE else storage.join(self.uri, name)


def checkpoint_of(result: Any) -> str | None:
    """Where a Tune result's checkpoint lives (a local path or a store URI), or None."""
    return storage.result_checkpoint(result.checkpoint, result.metrics)


def runnable(spec: SearchFile, trainable: Any) -> Any:
    """The trainable with the base config bound and the trial's resources (search, supernet and confirmation)."""
    s = spec.search
    workers = trial_workers(s.resources_per_trial)
    resources = placement.ray_resources(worker_resources(s.resources_per_trial))
    if workers == 1 or trainable is not None:
        return tune.with_resources(tune.with_parameters(trainable or train_trial, base=spec.base), resources)
    group = WorkerGroup(workers, resources, s.worker_placement.upper(), s.max_failures, 60 * s.autoscaler_wait_min)
    # the trial's own process only drives Ray Train's worker group, whose placement group holds the resources
    return tune.with_resources(
        tune.with_parameters(group_trial, base=spec.base, group=group), {"CPU": placement.TOKEN_CPU}
    )


def trial_limits(spec: SearchFile, concurrent: int | None) -> dict[str, Any]:
    """Tune's limits for a stage's trials (`concurrent`: the stage's max_concurrent_trials). A worker group's trial
    reserves only a token (the group's placement group holds the rest), so Tune would start every trial at once:
    one at a time unless the file says how many groups fit. And its actor is not reused: it does no work of its
    own, and its thread outlives the trial while Train takes the group down (Tune's reset would fail and stall)."""
    if trial_workers(spec.search.resources_per_trial) == 1:
        return {"max_concurrent_trials": concurrent, "reuse_actors": True}
    return {"max_concurrent_trials": concurrent or 1, "reuse_actors": False}


def run_config(spec: SearchFile, name: str, storage_path: str, callbacks: list[Any]) -> tune.RunConfig:
    """Tune's run settings, the same for every stage: retries from the last checkpoint (search.max_failures), one
    checkpoint kept per trial, no console output of Tune's own, and a note of Ctrl-C (StopSignal)."""
    return tune.RunConfig(
        name=name,
        storage_path=str(storage_path),
        callbacks=[*callbacks, StopSignal()],
        failure_config=tune.FailureConfig(max_failures=spec.search.max_failures),
        # (a snapshot stored before Tune deleted the checkpoint it names is repaired on resume: recover_checkpoints)
        checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
        verbose=0,
    )


def new_run_dir(spec: SearchFile, storage_path: str | Path, name: str | None) -> tuple[Path, str | None]:
    """A new search's folder under `storage_path`: `name`, or the file's name and the time (made atomically, so two
    searches started in the same second get two folders). A name that exists is refused: resume that search.

    Returns (the run directory, None) for a local `storage_path`; for an object store URI, (this machine's working
    copy, the URI), after proving the store can be written (ValueError: one line, before anything is made). There a
    name is free when the store does not have it; the working copy is claimed for this process (workcopy.claim:
    released by `SearchRun.close`) and a stale one, which no live process holds, is cleared. A refusal names what
    holds the name: the run folder in the store, or the live process on this machine that holds the copy.
    """
    stem = Path(spec.source).stem
    if not storage.is_remote(storage_path):
        return unique_run_dir(Path(storage_path).expanduser().resolve(), stem, name, "--name", RESUME_HINT), None
    root = str(storage_path).rstrip("/")
    storage.check(root)

    def claim(candidate: str) -> bool:  # claimed here first, then free in the store: no search can slip in between
        try:
            copy = workcopy.claim(storage.local_copy(candidate))
        except workcopy.InUse as err:
            if name is None:
                return False
            raise ValueError(f"--name {name}: {err}; wait for it to end, or choose another --name") from None
        try:
            taken = storage.exists(storage.join(root, candidate))
        except BaseException:
            copy.release(remove=copy.made)
            raise
        if taken:  # a search of that name was kept there: a copy of it here stays as it was (resume clears it)
            copy.release(remove=copy.made)
            if name is not None:
                raise ValueError(f"--name {name}: {storage.join(root, name)} already exists; {RESUME_HINT}")
            return False
        copy.clear()
        return True

    if name is not None:
        claim(name)
        return storage.local_copy(name), root
    return storage.local_copy(unique_run_name(stem, claim)), root
