"""Runs and resumes searches: a validated search file, a new run directory and MLflow parent run, Ray, and the
strategy that `search.strategy` names. Nothing else lives here.

A strategy is a module with `run`, `check_resume` and `resume` (see full.py); adding one is a module and a line in
STRATEGIES (and its name in the config's `strategy` choices).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from types import ModuleType
from typing import Any

from pathsearch import full, oneshot, placement, storage, workcopy
from pathsearch.config import SearchFile
from pathsearch.results import SearchResult
from pathsearch.runner import (
    init_ray,
    load_run,
    new_run_dir,
    quiet_console,
    shutdown_ray,
    start_search,
)
from pathsearch.tracking.runs import SearchRuns

STRATEGIES: dict[str, ModuleType] = {"full": full, "two_stage": oneshot}


class Interrupted(KeyboardInterrupt):
    """Ctrl-C stopped a started search outside Tune's own handling of it; `run_dir` is what `resume` continues."""

    def __init__(self, run_dir: str) -> None:
        super().__init__(run_dir)
        self.run_dir = run_dir


def run_search(
    spec: SearchFile,
    storage_path: str | Path = "runs/search",
    tracking_uri: str | None = None,
    name: str | None = None,
    address: str | None = None,
    verbose: bool = True,
    trainable: Any = None,
    library_output: bool = False,
    keep_copy: bool = False,
) -> SearchResult:
    """Runs the search of a validated search file on a local Ray (or the cluster at `address`).

    `trainable(config, base)` defaults to `runner.train_trial`; tests pass a torch-free toy with the same contract.
    `verbose` prints pathsearch's progress; `library_output` lets Ray's and Optuna's own console output through
    (otherwise it goes to `ray.log` in the run directory). A search kept in an object store removes this machine's
    working copy when it finishes, unless `keep_copy` (see `_end_claim`): the result's `stored_at` holds its files.
    """
    strategy = STRATEGIES[spec.search.strategy]
    local = None if storage.is_remote(storage_path) else Path(storage_path).expanduser().resolve()
    made = next((p for p in reversed([local, *local.parents]) if not p.exists()), None) if local else None
    run_dir, store = new_run_dir(spec, storage_path, name)
    finished = False
    try:
        with quiet_console(run_dir, library_output), storage.tune_settings(store):
            ours = False
            try:  # until the search has started, a stop leaves nothing: no run folder, no MLflow run, no Ray of ours
                ours = init_ray(address)
                place = _place(spec, run_dir.name, address)
                try:
                    state = start_search(spec, run_dir, tracking_uri, store)
                except BaseException:
                    place.release()
                    raise
            except BaseException:
                if ours:
                    shutdown_ray()
                shutil.rmtree(made or run_dir, ignore_errors=True)  # with the folders above it that it made
                raise
            try:
                result = _located(strategy.run(spec, run_dir, state, trainable, verbose), run_dir, state)
            except KeyboardInterrupt as err:  # Ctrl-C outside Tune's runs: the search stops where it was
                raise Interrupted(storage.run_uri(run_dir, state) if state.get("storage") else str(run_dir)) from err
            finally:
                place.release()  # the autoscaler may let the workers go
        finished = not result.interrupted
        return result
    finally:
        _end_claim(run_dir, finished, keep_copy)


def resume_search(
    run_dir: str | Path,
    address: str | None = None,
    trainable: Any = None,
    verbose: bool = True,
    library_output: bool = False,
    keep_copy: bool = False,
) -> SearchResult:
    """Continues an interrupted search from its run directory: finished trials are not trained again and keep their
    MLflow runs; the strategy continues where it stopped (its search, or its confirmation). A run folder in an object
    store is resumed in a fresh working copy, removed when the search finishes unless `keep_copy`."""
    working_copy = storage.local_copy(storage.name_of(str(run_dir))) if storage.is_remote(run_dir) else None
    finished = False
    try:
        run_dir, state, spec = load_run(run_dir)  # claims the working copy (storage.download_run)
        strategy = STRATEGIES[spec.search.strategy]
        strategy.check_resume(spec, run_dir, state)
        SearchRuns.of(state).reopen()
        with quiet_console(run_dir, library_output), storage.tune_settings(state.get("storage")):
            ours = init_ray(address)
            try:
                place = _place(spec, state["name"], address)
            except BaseException:
                if ours:
                    shutdown_ray()
                raise
            try:
                result = _located(strategy.resume(spec, run_dir, state, trainable, verbose), run_dir, state)
            except KeyboardInterrupt as err:
                raise Interrupted(storage.run_uri(run_dir, state) if state.get("storage") else str(run_dir)) from err
            finally:
                place.release()
        finished = not result.interrupted
        return result
    finally:
        if working_copy is not None:
            _end_claim(working_copy, finished, keep_copy)


def _end_claim(run_dir: Path, finished: bool, keep_copy: bool) -> None:
    """Ends this process's claim on the working copy of a search kept in a store (nothing for a local run folder).
    A finished search has uploaded its last file (an upload that fails raises), so its copy is removed unless
    `keep_copy`; an interrupted or failed search keeps it, a cache that `resume` starts afresh from the store."""
    workcopy.release(run_dir, remove=finished and not keep_copy)


def _place(spec: SearchFile, name: str, address: str | None) -> placement.Placement:
    """The cluster can hold the search's trials (asking its autoscaler for them where it has one), or ValueError."""
    demand = placement.demand_of(spec, name)
    return placement.prepare(demand, address, spec.search.autoscaler_wait_min, say=lambda line: print(line, flush=True))


def _located(result: SearchResult, run_dir: Path, state: dict[str, Any]) -> SearchResult:
    result.stored_at = storage.run_uri(run_dir, state) if state.get("storage") else None
    return result
