"""The full strategy (`search.strategy: full`): every sampled configuration is a Ray Tune trial, chosen by the
Optuna searcher (the baseline and `search.enqueue` first) and stopped early by ASHA; then, with `search.confirm`, the
top configurations are confirmed on paired seeds.

A strategy module gives search.py `run`, `check_resume` and `resume`. No tensors.
"""

from __future__ import annotations

import json
import math
from functools import partial
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.trial import TrialState
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

from pathsearch.config import SearchFile
from pathsearch.search.confirm import PLAN_FILE, confirm_search
from pathsearch.search.results import (
    EXHAUSTED,
    SearchResult,
    best_and_baseline,
    final_rows,
    pareto_rows,
    plot_study,
    study_counts,
    study_table,
)
from pathsearch.search.run import SEARCH_STAGE, SearchRun, trial_limits
from pathsearch.search.runner import ProgressLine
from pathsearch.search.searcher import (
    JOURNAL,
    PathOptunaSearch,
    baseline_point,
    define_space,
    make_sampler,
    restoring_into,
    study_storage,
)


def run(run: SearchRun, trainable: Any, verbose: bool) -> SearchResult:
    """Runs the search's trials, then (with `search.confirm`) the confirmation; returns what it found."""
    return _search_then_confirm(run, trainable, verbose)


def check_resume(run: SearchRun) -> None:
    """Raises ValueError when the search cannot be continued (before anything is reopened)."""
    confirming = run.spec.search.confirm.enabled and run.has(PLAN_FILE)
    if not confirming and not run.has_stage(SEARCH_STAGE):
        # (Tune snapshots at its first step, before any trial can report: nothing finished is lost)
        raise ValueError(
            f"{run.uri} has no Tune state to resume from (the search stopped before Tune's first snapshot, before "
            "any trial had a result): remove it and start the search again"
        )


def resume(run: SearchRun, trainable: Any, verbose: bool) -> SearchResult:
    """Continues the search: Tune restores its trials (errored ones too) and the searcher, the Optuna history
    continues from its journal; a search that was confirming continues its confirmation."""
    if run.spec.search.confirm.enabled and run.has(PLAN_FILE):  # the search was over
        return confirm_search(run, run.result(), trainable, verbose)
    with restoring_into(run.folder):  # Tune restores the searcher in fit(): its study is this run's journal
        return _search_then_confirm(run, trainable, verbose)


def _search_then_confirm(run: SearchRun, trainable: Any, verbose: bool) -> SearchResult:
    result = search_stage(run, trainable, verbose)
    if not run.spec.search.confirm.enabled or result.interrupted:
        return result
    return confirm_search(run, result, trainable, verbose)


def search_stage(run: SearchRun, trainable: Any = None, verbose: bool = True) -> SearchResult:
    """Runs (or continues) the search's Tune stage, then writes its results to the run folder and the parent run;
    the search ends there unless a confirmation follows."""
    spec = run.spec
    s, t = spec.search, spec.trial.train
    study = lambda: optuna.load_study(study_name=run.name, storage=study_storage(run.folder))  # noqa: E731
    grid = run.stage(
        SEARCH_STAGE,
        trainable,
        epochs=t.epochs,
        tune_config=tune_config(spec, run.folder, run.name, run.stored),
        callbacks=[ProgressLine(s.num_samples, s.metrics[0], s.modes[0], t.epochs, verbose)],
        # Tune ends a run on SIGINT (Ctrl-C) by returning, with the unfinished trials saved for a resume
        unfinished=lambda grid: interrupted(grid, study()),
    )
    rows = final_rows(grid, t.epochs)
    best, baseline = best_and_baseline(rows, s.metrics[0], s.modes[0])
    front = pareto_rows(rows, s.metrics, s.modes) if len(s.metrics) > 1 else []
    searched = study()
    if not run.stopped:  # the search is over: no Optuna trial may stay RUNNING (lost in a driver crash)
        for trial in searched.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            searched.set_user_attr(f"lost_trial_{trial.number}", True)
            searched.tell(trial.number, state=TrialState.FAIL)
    counts = study_counts(searched)
    files: dict[str, Path] = {"search_file": run.path("search.yaml"), "optuna_trials": run.path("optuna_trials.json")}
    files["optuna_trials"].write_text(json.dumps(study_table(searched), indent=1))
    files.update(plot_study(searched, run.folder))
    confirm = s.confirm.enabled
    source = best.get("checkpoint") if best is not None and (not confirm or run.stopped) else None  # else: the
    if source and run.copy_out(source, "path_config.yaml", run.path("best_path_config.yaml")):  # confirmed one
        files["best_path_config"] = run.path("best_path_config.yaml")
    if front:
        files["pareto_front"] = run.path("pareto_front.yaml")
        files["pareto_front"].write_text(yaml.safe_dump(front, sort_keys=False))
    summary: dict[str, float] = {f"trials_{k}": v for k, v in counts.items()}
    for label, row in (("best", best), ("baseline", baseline)):
        if row is not None:
            summary[f"{label}_{s.metrics[0]}"] = row[s.metrics[0]]
    if confirm or run.stopped:  # the parent stays open for the confirmation (or was ended KILLED by the stage)
        run.record(summary, files.values())
    else:
        run.finish(summary, files.values())
    result = run.result(best, baseline)
    result.counts, result.files, result.pareto, result.rows = counts, files, front, rows
    result.ended_early = searched.user_attrs.get(EXHAUSTED)
    return result


def interrupted(grid: Any, study: optuna.Study) -> bool:
    """True when a trial Tune knows is still RUNNING in Optuna: Tune returned early on SIGINT without telling
    the searcher. (RUNNING Optuna trials that no Tune trial knows were lost in a driver crash instead.)"""
    live = {(result.config or {}).get("optuna_trial") for result in grid}
    running = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
    return bool(live & running)


def tune_config(spec: SearchFile, folder: Path, name: str, stored: bool = False) -> tune.TuneConfig:
    """The search stage's settings: PathOptunaSearch (the baseline and `search.enqueue` first) and ASHA."""
    s, t = spec.search, spec.trial.train
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
        storage=study_storage(folder),  # on disk: the Optuna history survives a driver crash
        journal=str(folder / JOURNAL),
        snapshot_journal=stored,  # a run kept in an object store: the journal goes there too
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
    return tune.TuneConfig(
        search_alg=searcher,
        scheduler=scheduler,
        metric=None if multi else metric,
        mode=None if multi else mode,
        num_samples=s.num_samples,
        **trial_limits(spec, s.max_concurrent_trials),
        time_budget_s=s.time_budget_s,
    )
