"""The search: a validated search file -> Optuna define-by-run space -> Ray Tune Tuner, tracked in MLflow.

Optuna hears the truth: trials that ASHA stops are PRUNED (with their intermediate values), failed trials FAIL,
and a configuration equal to one already trained is not trained again (its result is reused and counted).
No tensors: torch, timm and the model are imported only inside the trial function that Ray runs.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState
from ray import tune
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from pathsearch.config import SearchFile, set_dotted
from pathsearch.space import SearchSpace, lookup_value, sample_overrides

INFEASIBLE = "pathsearch.infeasible"


# ----- what each Ray trial runs ----------------------------------------------------------------------------
def train_trial(config: dict[str, Any], base: dict[str, Any]) -> None:
    """Ray Tune trainable: the base trial config plus this trial's overrides, trained by `fit`.

    The only Ray-aware code around `fit`: it turns report(metrics, checkpoint_dir) into `tune.report` and
    resumes from Tune's checkpoint when the trial is retried or restored.
    """
    import ray

    from pathsearch.config import load_trial_config
    from pathsearch.train import fit

    raw = copy.deepcopy(base)
    for key, value in config.get("overrides", {}).items():
        set_dotted(raw, key, value)
    cfg = load_trial_config(None, data=raw, source="trial config")
    cpus = int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1)) or 1

    def report(metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        checkpoint = tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        tune.report(metrics, checkpoint=checkpoint)

    work_dir = Path(os.getcwd()) / "checkpoints"
    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        fit(cfg, report, work_dir=work_dir, cpus=cpus)
    else:
        with checkpoint.as_directory() as folder:
            fit(cfg, report, checkpoint_dir=folder, work_dir=work_dir, cpus=cpus)


def define_space(trial: Any, space: SearchSpace, base: dict[str, Any]) -> dict[str, Any]:
    """Optuna define-by-run function (module level: Tune pickles it with the experiment state)."""
    overrides = sample_overrides(trial, space, base)
    return {"overrides": overrides, "optuna_trial": trial.number}


# ----- the searcher: OptunaSearch told the truth ------------------------------------------------------------
class PathOptunaSearch(OptunaSearch):
    """OptunaSearch that records ASHA-stopped trials as PRUNED, reuses results of repeated configurations and
    refuses infeasible ones (no kept path, caps) before training.

    Ray's OptunaSearch tells every early-stopped trial to Optuna as COMPLETE, which misleads TPE
    (FIELD-NOTES.md), and knows nothing of repeated binary masks; both need the searcher's own bookkeeping.
    """

    def __init__(
        self,
        *args: Any,
        final_epoch: int,
        num_paths: int,
        max_kept_paths: int | None,
        num_samples: int | None = None,
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        self.num_samples = num_samples
        self.started = 0
        self.final_epoch = final_epoch
        self.num_paths = num_paths
        self.max_kept_paths = max_kept_paths
        self.finished: dict[str, list[float]] = {}  # config key -> objective values of a COMPLETE trial
        self.trial_keys: dict[str, str] = {}
        self.reused = 0
        self.infeasible = 0
        self.pruned = 0

    # Ray documents Searcher.FINISHED (a str) as a valid return, but its annotation says dict | None.
    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:  # type: ignore[override]
        for _ in range(200):  # bounded: a space may hold only configurations already trained
            if self.num_samples is not None and self.started + self.reused >= self.num_samples:
                return Searcher.FINISHED  # reused results count towards num_samples
            config = super().suggest(trial_id)
            if config is None:
                return None
            key = json.dumps(config["overrides"], sort_keys=True)
            ot_trial = self._ot_trials.pop(trial_id)
            study = self.study()
            reason = self._infeasible(config["overrides"])
            if reason is not None:
                ot_trial.set_user_attr(INFEASIBLE, reason)
                study.tell(ot_trial, state=TrialState.FAIL)
                self.infeasible += 1
                continue
            if key in self.finished:  # trained before: reuse its result, don't train again
                ot_trial.set_user_attr("pathsearch.reused", True)
                values = self.finished[key]
                study.tell(ot_trial, values if len(values) > 1 else values[0])
                self.reused += 1
                continue
            self._ot_trials[trial_id] = ot_trial
            self.trial_keys[trial_id] = key
            self.started += 1
            return config
        return Searcher.FINISHED

    def _infeasible(self, overrides: Mapping[str, Any]) -> str | None:
        kept = self.num_paths - len(overrides.get("model.pruned", []))
        if "model.pruned" in overrides and kept < 1:
            return "prunes every path"
        if self.max_kept_paths is not None and "model.pruned" in overrides and kept > self.max_kept_paths:
            return f"keeps {kept} paths > max_kept_paths {self.max_kept_paths}"
        return None

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return
        ot_trial = self._ot_trials[trial_id]
        if result is not None and isinstance(self.metric, str):
            # Tune withholds a result that ends a trial (ASHA's stop, max_t) from on_trial_result: record it.
            step, value = result.get("training_iteration"), result.get(self.metric)
            reported = self.study().get_trials(deepcopy=False)[ot_trial.number].intermediate_values
            if isinstance(step, int) and isinstance(value, int | float) and step not in reported:
                ot_trial.report(float(value), step)
        stopped_early = not error and result is not None and int(result.get("epoch", 0)) < self.final_epoch
        if stopped_early:  # the trial is PRUNED, not COMPLETE
            self.study().tell(ot_trial, state=TrialState.PRUNED)
            self._completed_trials.add(trial_id)
            self.pruned += 1
            return
        super().on_trial_complete(trial_id, result=result, error=error)
        if not error and result is not None and trial_id in self.trial_keys:
            metrics = self.metric if isinstance(self.metric, list) else [self.metric]
            values = [result.get(m) for m in metrics]
            if all(isinstance(v, int | float) and math.isfinite(v) for v in values):
                self.finished[self.trial_keys[trial_id]] = [float(v) for v in values]  # type: ignore[arg-type]

    def study(self) -> optuna.Study:
        assert self._ot_study is not None, "the study is created when Tune sets the search properties"
        return self._ot_study


def make_sampler(name: str, seed: int) -> optuna.samplers.BaseSampler:
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=4)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed)
    return optuna.samplers.QMCSampler(seed=seed)


def baseline_point(space: SearchSpace, base: Mapping[str, Any]) -> dict[str, Any]:
    """Optuna params of the baseline: no path pruned, EnsembleScale init 1.0, everything else as in the base."""
    point: dict[str, Any] = {}
    for entry in space.entries:
        if entry.key == "model.pruned":
            names = ["prune.shortest"] if entry.by == "shortest" else None
            for name in names or _flag_names(space, entry):
                point[name] = 0 if name == "prune.shortest" else False
        elif entry.key == "model.ensemble_scale.init":
            for name in _flag_names(space, entry):
                point[name] = 1.0
        else:
            value = lookup_value({}, base, entry.key)
            if value is not None and all(lookup_value({}, base, k) == v for k, v in entry.when.items()):
                point[entry.key] = value
    return point


def _flag_names(space: SearchSpace, entry: Any) -> list[str]:
    return SearchSpace([entry], space.depth).param_names()


# ----- the driver ---------------------------------------------------------------------------------------------
@dataclass
class SearchResult:
    run_dir: Path
    experiment: str
    parent_run_id: str
    best: dict[str, Any] | None
    baseline: dict[str, Any] | None
    counts: dict[str, int] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)


def run_search(
    spec: SearchFile,
    storage_path: str | Path = "runs/search",
    tracking_uri: str | None = None,
    name: str | None = None,
    address: str | None = None,
    verbose: bool = True,
    trainable: Any = None,
) -> SearchResult:
    """Runs the search of a validated search file on a local Ray (or the cluster at `address`).

    `trainable(config, base)` defaults to `train_trial`; tests pass a torch-free toy with the same contract.
    """
    import ray
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from pathsearch.tracking import MlflowTrialLogger, default_tracking_uri, end_parent_run, start_parent_run

    s, t = spec.search, spec.trial.train
    name = name or f"{Path(spec.source).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    storage = Path(storage_path).expanduser().resolve()
    run_dir = storage / name
    uri = tracking_uri or spec.tracking.tracking_uri or default_tracking_uri()
    reports = math.ceil(t.epochs / t.eval_every)  # Tune's training_iteration counts reports
    base: dict[str, Any] = {k: spec.raw[k] for k in ("model", "data", "train") if k in spec.raw}
    experiment_id, parent = start_parent_run(
        uri, spec.tracking.experiment, name, {"search_file": spec.source, **_flat("search", s.__dict__)}
    )
    # Tune snapshots the experiment whenever a trial replaces its kept checkpoint; that is what we want.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    if not ray.is_initialized():
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # keeps a local Ray on 127.0.0.1
        if address:
            ray.init(address=address)
        else:
            ray.init(include_dashboard=False, configure_logging=False, log_to_driver=False)
    multi = len(s.metrics) > 1
    metric: Any = s.metrics if multi else s.metrics[0]
    mode: Any = s.modes if multi else s.modes[0]
    points = [baseline_point(spec.space, base), *s.enqueue]
    searcher = PathOptunaSearch(
        space=partial(define_space, space=spec.space, base=base),
        metric=metric,
        mode=mode,
        sampler=make_sampler(s.sampler, s.seed),
        points_to_evaluate=points,
        final_epoch=t.epochs,
        num_paths=spec.space.num_paths,
        max_kept_paths=s.max_kept_paths,
        num_samples=s.num_samples,
    )
    scheduler: Any = FIFOScheduler()
    if s.scheduler == "asha" and reports > 1:
        scheduler = ASHAScheduler(
            time_attr="training_iteration",
            max_t=reports,
            grace_period=min(s.grace_period, reports),
            reduction_factor=s.reduction_factor,
        )
    logger = MlflowTrialLogger(uri, experiment_id, parent, final_epoch=t.epochs)
    progress = ProgressLine(s.num_samples, s.metrics[0], s.modes[0], t.epochs, verbose)
    resources = {k.upper() if k in ("cpu", "gpu") else k: v for k, v in s.resources_per_trial.items()}
    runnable = tune.with_resources(tune.with_parameters(trainable or train_trial, base=base), resources)
    tuner = tune.Tuner(
        runnable,
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
        run_config=tune.RunConfig(
            name=name,
            storage_path=str(storage),
            callbacks=[logger, progress],
            failure_config=tune.FailureConfig(max_failures=s.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            verbose=0,
        ),
    )
    status, grid = "FAILED", None
    files: dict[str, Path] = {}
    best = baseline = None
    try:
        grid = tuner.fit()
        status = "FINISHED"
        best, baseline = _best_and_baseline(grid, s.metrics[0], s.modes[0], t.epochs)
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        counts = _study_counts(searcher.study(), searcher)
        run_dir.mkdir(parents=True, exist_ok=True)
        files["search_file"] = run_dir / "search.yaml"
        files["search_file"].write_text(spec.to_yaml())
        files["optuna_trials"] = run_dir / "optuna_trials.json"
        files["optuna_trials"].write_text(json.dumps(study_table(searcher.study()), indent=1))
        files.update(_plot_study(searcher.study(), run_dir))
        if best is not None and best.get("checkpoint"):
            src = Path(best["checkpoint"]) / "path_config.yaml"
            if src.is_file():
                files["best_path_config"] = Path(shutil.copy(src, run_dir / "best_path_config.yaml"))
        summary: dict[str, float] = {f"trials_{k}": v for k, v in counts.items()}
        if best is not None:
            summary[f"best_{s.metrics[0]}"] = best[s.metrics[0]]
        if baseline is not None:
            summary[f"baseline_{s.metrics[0]}"] = baseline[s.metrics[0]]
        end_parent_run(uri, parent, summary, list(files.values()), status)
    return SearchResult(run_dir, spec.tracking.experiment, parent, best, baseline, counts, files)


def _plot_study(study: optuna.Study, run_dir: Path) -> dict[str, Path]:
    """Optuna's optimisation-history and parameter-importance plots (matplotlib backend) as PNGs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    out: dict[str, Path] = {}
    if len(study.directions) > 1 or not any(t.state == TrialState.COMPLETE for t in study.trials):
        return out
    for label, plot in (
        ("optimization_history", ovm.plot_optimization_history),
        ("param_importances", ovm.plot_param_importances),
    ):
        try:
            plot(study)
        except (ValueError, RuntimeError) as err:  # e.g. importances need two completed trials and a varied param
            (run_dir / f"{label}.txt").write_text(f"not drawn: {err}\n")
            continue
        path = run_dir / f"{label}.png"
        plt.gcf().savefig(path, dpi=100, bbox_inches="tight")
        plt.close("all")
        out[label] = path
    return out


def study_table(study: optuna.Study) -> list[dict[str, Any]]:
    """Every Optuna trial as plain data: number, state, params, values, intermediate values, user attrs."""
    return [
        {
            "number": tr.number,
            "state": tr.state.name,
            "params": tr.params,
            "values": tr.values,
            "intermediate_values": {str(k): v for k, v in tr.intermediate_values.items()},
            "user_attrs": tr.user_attrs,
        }
        for tr in study.trials
    ]


def _study_counts(study: optuna.Study, searcher: PathOptunaSearch) -> dict[str, int]:
    states = [tr.state for tr in study.trials]
    return {
        "complete": sum(st == TrialState.COMPLETE for st in states) - searcher.reused,
        "pruned": sum(st == TrialState.PRUNED for st in states),
        "failed": sum(st == TrialState.FAIL for st in states) - searcher.infeasible,
        "reused": searcher.reused,
        "infeasible": searcher.infeasible,
    }


def _best_and_baseline(grid: Any, metric: str, mode: str, final_epoch: int) -> tuple[dict | None, dict | None]:
    rows = []
    for result in grid:
        if result.error is not None or not result.metrics:
            continue
        m = result.metrics
        config = result.config or {}
        rows.append(
            {
                "trial_id": m.get("trial_id"),
                "epoch": m.get("epoch"),
                metric: m.get(metric),
                "val_acc": m.get("val_acc"),
                "val_acc_std": m.get("val_acc_std"),
                "kept_paths": m.get("kept_paths"),
                "overrides": config.get("overrides", {}),
                "optuna_trial": config.get("optuna_trial"),
                "checkpoint": result.checkpoint.path if result.checkpoint is not None else None,
            }
        )
    complete = [r for r in rows if r["epoch"] == final_epoch and r[metric] is not None]
    baseline = next((r for r in complete if r["optuna_trial"] == 0), None)
    if not complete:
        return None, baseline
    best = (max if mode == "max" else min)(complete, key=lambda r: r[metric])
    return best, baseline


def _flat(prefix: str, data: Mapping[str, Any]) -> dict[str, Any]:
    return {f"{prefix}.{k}": v for k, v in data.items()}


class ProgressLine(tune.Callback):
    """One line per finished trial: done / running / pending / pruned / failed, best so far, elapsed, ETA."""

    def __init__(self, total: int, metric: str, mode: str, final_epoch: int, verbose: bool) -> None:
        self.total, self.metric, self.mode, self.final_epoch, self.verbose = total, metric, mode, final_epoch, verbose
        self.started = time.monotonic()
        self.best: float | None = None
        self.pruned = self.failed = self.done = 0

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        last = trial.last_result or {}
        if int(last.get("epoch", 0)) < self.final_epoch:
            self.pruned += 1
        else:
            value = last.get(self.metric)
            if value is not None and (self.best is None or (value > self.best) == (self.mode == "max")):
                self.best = value
        self.done += 1
        self._print(trials)

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self.failed += 1
        self.done += 1
        self._print(trials)

    def _print(self, trials: list[Any]) -> None:
        if not self.verbose:
            return
        running = sum(tr.status == "RUNNING" for tr in trials)
        pending = max(0, self.total - self.done - running)
        elapsed = time.monotonic() - self.started
        eta = elapsed / self.done * (self.total - self.done) if self.done else float("nan")
        best = "-" if self.best is None else f"{self.best:.4f}"
        print(
            f"[{elapsed:6.0f}s] trials done {self.done}/{self.total}  running {running}  pending {pending}  "
            f"pruned {self.pruned}  failed {self.failed}  best {self.metric} {best}  ETA {eta:.0f}s",
            flush=True,
        )
