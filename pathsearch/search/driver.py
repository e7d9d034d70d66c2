"""Runs and resumes searches: a validated search file, its SearchRun (searchrun.py), Ray, and the strategy that
`search.strategy` names. Nothing else lives here.

A strategy is a module with `run(run, trainable, verbose)`, `check_resume(run)` and `resume(run, trainable,
verbose)` (see full.py); adding one is a module and a line in STRATEGIES (and its name in the config's `strategy`
choices).
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any

from pathsearch.cluster import placement
from pathsearch.config import SearchFile, trial_workers
from pathsearch.search import full, oneshot
from pathsearch.search.confirm import check_plan, extend_plan
from pathsearch.search.results import SearchResult
from pathsearch.search.run import Interrupted, SearchRun
from pathsearch.search.runner import init_ray, shutdown_ray

__all__ = ["STRATEGIES", "Interrupted", "resume_search", "run_search"]

STRATEGIES: dict[str, ModuleType] = {"full": full, "two_stage": oneshot}


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
    (otherwise it goes to `library_output.log` in the run directory). A search kept in an object store removes this
    machine's working copy when it finishes, unless `keep_copy`: the result's `stored_at` holds its files.
    """
    strategy = STRATEGIES[spec.search.strategy]
    run = SearchRun.claim(spec, storage_path, name)
    try:
        with run.console(library_output):
            ours = False
            try:  # until the search has started, a stop leaves nothing: no run folder, no MLflow run, no Ray of ours
                ours = init_ray(address, dashboard=grouped(spec))
                place = _place(spec, run.name, address)
                try:
                    run.begin(tracking_uri)
                except BaseException:
                    place.release()
                    raise
            except BaseException:
                if ours:
                    shutdown_ray()
                run.discard()
                raise
            try:
                with run:  # every way out of the strategy: the run's one rule
                    return strategy.run(run, trainable, verbose)
            finally:
                place.release()  # the autoscaler may let the workers go
    finally:
        run.close(keep_copy)


def resume_search(
    run_dir: str | Path,
    address: str | None = None,
    trainable: Any = None,
    verbose: bool = True,
    library_output: bool = False,
    keep_copy: bool = False,
    max_seeds: int | None = None,
) -> SearchResult:
    """Continues an interrupted search from its run directory: finished trials are not trained again and keep their
    MLflow runs; the strategy continues where it stopped (its search, or its confirmation). A run folder in an object
    store is resumed in a fresh working copy, removed when the search finishes unless `keep_copy`. `max_seeds`
    extends a finished sequential confirmation that left challengers undecided (confirm.extend_plan)."""
    run = SearchRun.open(run_dir)
    try:
        strategy = STRATEGIES[run.spec.search.strategy]
        check_plan(run)
        strategy.check_resume(run)
        if max_seeds is not None:
            extend_plan(run, max_seeds)
        run.reopen()
        with run.console(library_output):
            ours = init_ray(address, dashboard=grouped(run.spec))
            try:
                place = _place(run.spec, run.name, address)
            except BaseException:
                if ours:
                    shutdown_ray()
                raise
            try:
                with run:
                    return strategy.resume(run, trainable, verbose)
            finally:
                place.release()
    finally:
        run.close(keep_copy)


def grouped(spec: SearchFile) -> bool:
    """Whether the search's trials are data-parallel worker groups (Ray Train)."""
    return trial_workers(spec.search.resources_per_trial) > 1


def _place(spec: SearchFile, name: str, address: str | None) -> placement.Placement:
    """The cluster can hold the search's trials (asking its autoscaler for them where it has one), or ValueError."""
    demand = demand_of(spec, name)
    return placement.prepare(demand, address, spec.search.autoscaler_wait_min, say=lambda line: print(line, flush=True))


def demand_of(spec: SearchFile, name: str) -> placement.Demand:
    """The search file's demand: its trial's resources (and a two_stage search's supernet trial's), as many at once
    as max_concurrent_trials allows. Unset, that is all num_samples for trials of one process, but one trial for
    worker groups (workers > 1): Tune sees only a group's token, so it is capped to max_concurrent_trials or 1
    (the cap Tune is given too), and a request for every group at once would start nodes for trials that wait."""
    s = spec.search
    workers = trial_workers(s.resources_per_trial)
    shapes = [placement.ray_resources(s.resources_per_trial)]
    if s.strategy == "two_stage" and s.two_stage.supernet_cpus is not None:
        shapes.append(placement.ray_resources({**s.resources_per_trial, "cpu": s.two_stage.supernet_cpus}))
    unset = s.num_samples if workers == 1 else 1
    return placement.Demand(name, shapes, min(s.max_concurrent_trials or unset, s.num_samples), workers)
