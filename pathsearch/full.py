"""The full strategy (`search.strategy: full`): every sampled configuration is a Ray Tune trial, chosen by the
Optuna searcher (the baseline and `search.enqueue` first) and stopped early by ASHA; then, with `search.confirm`, the
top configurations are confirmed on paired seeds.

A strategy module gives search.py `run`, `check_resume` and `resume`. No tensors.
"""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path
from typing import Any

from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

from pathsearch import storage
from pathsearch.config import SearchFile
from pathsearch.confirm import PLAN_FILE, confirm_search
from pathsearch.results import SearchResult
from pathsearch.runner import ProgressLine, fit_and_finish, run_config, runnable
from pathsearch.searcher import (
    JOURNAL,
    PathOptunaSearch,
    baseline_point,
    define_space,
    make_sampler,
    restoring_into,
    study_storage,
)
from pathsearch.tracking.runs import SearchRuns


def run(spec: SearchFile, run_dir: Path, state: dict[str, Any], trainable: Any, verbose: bool) -> SearchResult:
    """Runs the search's trials, then (with `search.confirm`) the confirmation; returns what it found."""
    return _search_then_confirm(
        make_tuner(spec, run_dir, state, trainable, verbose), spec, run_dir, state, trainable, verbose
    )


def check_resume(spec: SearchFile, run_dir: Path, state: dict[str, Any]) -> None:
    """Raises ValueError when the search cannot be continued (before anything is reopened)."""
    confirming = spec.search.confirm.enabled and (run_dir / PLAN_FILE).is_file()
    where = storage.run_uri(run_dir, state)
    if not confirming and not storage.restorable(where):
        # (Tune snapshots at its first step, before any trial can report: nothing finished is lost)
        raise ValueError(
            f"{where} has no Tune state to resume from (the search stopped before Tune's first snapshot, before any "
            "trial had a result): remove it and start the search again"
        )


def resume(spec: SearchFile, run_dir: Path, state: dict[str, Any], trainable: Any, verbose: bool) -> SearchResult:
    """Continues the search: Tune restores its trials (errored ones too) and the searcher, the Optuna history
    continues from its journal; a search that was confirming continues its confirmation."""
    if spec.search.confirm.enabled and (run_dir / PLAN_FILE).is_file():  # the search was over
        result = SearchResult(run_dir, spec.tracking.experiment, state["parent_run_id"], None, None)
        return confirm_search(spec, run_dir, state, result, trainable, verbose)
    where = storage.run_uri(run_dir, state)
    storage.recover_checkpoints(where)
    tuner = tune.Tuner.restore(where, trainable=runnable(spec, trainable), resume_errored=True)
    with restoring_into(run_dir):  # Tune restores the searcher in fit(): its study is this run's journal
        return _search_then_confirm(tuner, spec, run_dir, state, trainable, verbose)


def _search_then_confirm(
    tuner: tune.Tuner, spec: SearchFile, run_dir: Path, state: dict[str, Any], trainable: Any, verbose: bool
) -> SearchResult:
    confirm = spec.search.confirm.enabled
    result = fit_and_finish(tuner, spec, run_dir, state, end=not confirm)
    if not confirm or result.interrupted:
        return result
    return confirm_search(spec, run_dir, state, result, trainable, verbose)


def make_tuner(
    spec: SearchFile, run_dir: Path, state: dict[str, Any], trainable: Any = None, verbose: bool = True
) -> tune.Tuner:
    """The search's Tuner: PathOptunaSearch (the baseline and `search.enqueue` first), ASHA, the MLflow logger."""
    s, t = spec.search, spec.trial.train
    name = state["name"]
    reports = math.ceil(t.epochs / t.eval_every)  # Tune's training_iteration counts reports
    base = spec.base
    multi = len(s.metrics) > 1
    metric: Any = s.metrics if multi else s.metrics[0]
    mode: Any = s.modes if multi else s.modes[0]
    searcher = PathOptunaSearch(
        space=partial(define_space, space=spec.space, base=base),
        metric=metric,
        mode=mode,
        sampler=make_sampler(s.sampler, s.seed),
        points_to_evaluate=[baseline_point(spec.space, base), *s.enqueue],
        storage=study_storage(run_dir),  # on disk: the Optuna history survives a driver crash
        journal=str(run_dir / JOURNAL),
        snapshot_journal=bool(state.get("storage")),  # a run kept in an object store: the journal goes there too
        study_name=name,
        final_epoch=t.epochs,
        num_paths=spec.space.num_paths,
        max_kept_paths=s.max_kept_paths,
        max_params=s.max_params,
        num_samples=s.num_samples,
        base=base,
    )
    scheduler: Any = FIFOScheduler()
    if s.scheduler == "asha" and reports > 1:
        scheduler = ASHAScheduler(
            time_attr="training_iteration",
            max_t=reports,
            grace_period=min(s.grace_period, reports),
            reduction_factor=s.reduction_factor,
        )
    return tune.Tuner(
        runnable(spec, trainable),
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            scheduler=scheduler,
            metric=None if multi else metric,
            mode=None if multi else mode,
            num_samples=s.num_samples,
            max_concurrent_trials=s.max_concurrent_trials,
            reuse_actors=True,
            time_budget_s=s.time_budget_s,
        ),
        run_config=run_config(
            spec,
            name,
            storage.tune_root(run_dir, state),
            [
                SearchRuns.of(state).trial_logger(t.epochs, run_dir),
                ProgressLine(s.num_samples, s.metrics[0], s.modes[0], t.epochs, verbose),
            ],
        ),
    )
