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
import yaml
from optuna.trial import TrialState
from ray import tune
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from pathsearch.config import SearchFile, set_dotted
from pathsearch.space import SearchSpace, lookup_value, sample_overrides
from pathsearch.tracking import end_parent_run

INFEASIBLE = "pathsearch.infeasible"  # Optuna user attrs
REUSED = "pathsearch.reused"


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
    context = ray.get_runtime_context()
    cpus = int(context.get_assigned_resources().get("CPU", 1)) or 1
    node_id = context.get_node_id()  # MLflow tags the run with it: which node trained (and retrained) a trial

    def report(metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        checkpoint = tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        tune.report({**metrics, "node_id": node_id}, checkpoint=checkpoint)

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
    (it then models truncated scores as final ones), and knows nothing of repeated binary masks; both need the
    searcher's own bookkeeping.
    """

    def __init__(
        self,
        *args: Any,
        final_epoch: int,
        num_paths: int,
        max_kept_paths: int | None,
        num_samples: int | None = None,
        max_params: int | None = None,
        base: dict[str, Any] | None = None,
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        self.max_params = max_params
        self.base = base or {"model": {}}
        self._param_cache: dict[str, int] = {}
        self.num_samples = num_samples
        self.started = 0
        self.final_epoch = final_epoch
        self.num_paths = num_paths
        self.max_kept_paths = max_kept_paths
        self.finished: dict[str, list[float]] = {}  # config key -> objective values of a COMPLETE trial
        self.trial_keys: dict[str, str] = {}
        self.reused = 0  # counts towards num_samples

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
                continue
            if key in self.finished:  # trained before: reuse its result, don't train again
                ot_trial.set_user_attr(REUSED, True)
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
        kept = self.num_paths - len(overrides.get("model.pruned", self.base["model"].get("pruned", [])))
        if kept < 1:
            return "prunes every path"
        if self.max_kept_paths is not None and kept > self.max_kept_paths:
            return f"keeps {kept} paths > max_kept_paths {self.max_kept_paths}"
        if self.max_params is not None:
            params = self._params(overrides)
            if params > self.max_params:
                return f"{params} parameters > max_params {self.max_params}"
        return None

    def _params(self, overrides: Mapping[str, Any]) -> int:
        """Parameter count for the sampled model settings (meta device, cached per distinct setting)."""
        from pathsearch.model import model_params  # lazily: the driver needs torch only for this cap

        model, data = self.base["model"], self.base.get("data", {})
        kwargs = {
            **DATA_SHAPES.get(data.get("name", ""), {}),  # what `fit` takes from the dataset, unless set
            **model.get("kwargs", {}),
            **{k[len("model.kwargs.") :]: v for k, v in overrides.items() if k.startswith("model.kwargs.")},
        }
        name = overrides.get("model.name", model.get("name", "vit_tiny_patch16_224"))
        key = json.dumps([name, kwargs], sort_keys=True, default=str)
        if key not in self._param_cache:
            self._param_cache[key] = model_params(name, kwargs)
        return self._param_cache[key]

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


# num_classes / in_chans / img_size that fit() takes from the built-in datasets (imagefolder: counted at run time)
DATA_SHAPES: dict[str, dict[str, int]] = {
    "digits": {"num_classes": 10, "in_chans": 1, "img_size": 8},
    "synthetic": {"num_classes": 4, "in_chans": 1, "img_size": 8},
    "cifar10": {"num_classes": 10, "img_size": 32},
    "cifar100": {"num_classes": 100, "img_size": 32},
}


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
        names = SearchSpace([entry], space.depth).param_names()
        if entry.key == "model.pruned":  # prune nothing: k = 0, or every flag off
            point.update({name: 0 if name == "prune.shortest" else False for name in names})
        elif entry.key == "model.ensemble_scale.init":
            point.update(dict.fromkeys(names, 1.0))
        else:
            value = lookup_value({}, base, entry.key)
            if value is not None and all(lookup_value({}, base, k) == v for k, v in entry.when.items()):
                point[entry.key] = value
    return point


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
    pareto: list[dict[str, Any]] = field(default_factory=list)
    interrupted: bool = False
    confirmation: Any = None  # pathsearch.confirm.Confirmation, when search.confirm is on and it finished
    rows: list[dict[str, Any]] = field(default_factory=list)  # the final result of every trial that trained to the end


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
    if spec.search.strategy == "two_stage":  # one-shot path search: supernet, proxy scores, top-k trained
        from pathsearch.oneshot import run_two_stage

        return run_two_stage(spec, storage_path, tracking_uri, name, address, verbose, trainable)
    run_dir, state = start_search(spec, storage_path, tracking_uri, name)
    _init_ray(address)
    confirm = spec.search.confirm.enabled
    result = _fit_and_finish(make_tuner(spec, run_dir, state, trainable, verbose), spec, run_dir, state, not confirm)
    if not confirm or result.interrupted:
        return result
    return confirm_search(spec, run_dir, state, result, trainable, verbose)


def confirm_search(
    spec: SearchFile,
    run_dir: Path,
    state: dict[str, Any],
    result: SearchResult,
    trainable: Any = None,
    verbose: bool = True,
    candidates: list[Any] | None = None,
    search_metric: str = "val_acc",
    on_confirmed: Any = None,
) -> SearchResult:
    """The confirmation stage after a finished search (full or two_stage): plans it from the search's completed
    trials (or the given candidates), or continues the plan a `resume` found, then ends the parent run.
    `on_confirmed(confirmation) -> files` runs before the parent ends (two_stage logs its ranking quality there)."""
    from pathsearch import confirm

    plan_file = run_dir / confirm.PLAN_FILE
    status = "FAILED"
    try:
        if plan_file.is_file():
            plan = confirm.Plan.load(plan_file)
            tuner = confirm.restore_confirm_tuner(spec, run_dir, state, plan, trainable, verbose)
        else:
            if candidates is None:
                metric, mode = confirm.selection_metric(spec)
                candidates = confirm.choose_candidates(
                    result.rows, spec, spec.base, metric, mode, spec.search.confirm.top_k, result.baseline
                )
                search_metric = metric
            plan = confirm.make_plan(spec, run_dir, state, candidates, search_metric)
            tuner = confirm.make_confirm_tuner(spec, run_dir, state, plan, trainable, verbose)
        confirmation = confirm.run_confirmation(tuner, spec, run_dir, state, plan, verbose)
        if on_confirmed is not None and not confirmation.interrupted:
            confirmation.files.update(on_confirmed(confirmation))
        status = "KILLED" if confirmation.interrupted else "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        end_parent_run(state["tracking_uri"], state["parent_run_id"], {}, [], status)
    result.confirmation = confirmation
    result.interrupted = confirmation.interrupted
    result.files.update(confirmation.files)
    return result


def start_search(
    spec: SearchFile, storage_path: str | Path, tracking_uri: str | None, name: str | None
) -> tuple[Path, dict[str, Any]]:
    """A new search's run directory (resolved file, state file) and MLflow parent run; returns (run_dir, state)."""
    from mlflow.tracking import MlflowClient

    from pathsearch.tracking import default_tracking_uri, start_parent_run

    s = spec.search
    name = name or f"{Path(spec.source).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = Path(storage_path).expanduser().resolve() / name
    if run_dir.exists():
        raise ValueError(f"{run_dir} already exists: choose another --name, or `pathsearch resume {run_dir}`")
    uri = tracking_uri or spec.tracking.tracking_uri or default_tracking_uri()
    experiment_id, parent = start_parent_run(
        uri, spec.tracking.experiment, name, {"search_file": spec.source, **_flat("search", s.__dict__)}
    )
    run_dir.mkdir(parents=True)
    (run_dir / "search.yaml").write_text(spec.to_yaml())
    MlflowClient(uri).log_artifact(parent, str(run_dir / "search.yaml"))  # from the start: fit-scales, the UI
    state = {"name": name, "tracking_uri": uri, "experiment_id": experiment_id, "parent_run_id": parent}
    (run_dir / STATE_FILE).write_text(json.dumps(state, indent=1))
    return run_dir, state


def make_tuner(
    spec: SearchFile, run_dir: Path, state: dict[str, Any], trainable: Any = None, verbose: bool = True
) -> tune.Tuner:
    """The search's Tuner: PathOptunaSearch (the baseline and `search.enqueue` first), ASHA, the MLflow logger."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from pathsearch.tracking import MlflowTrialLogger

    s, t = spec.search, spec.trial.train
    name, uri = state["name"], state["tracking_uri"]
    experiment_id, parent = state["experiment_id"], state["parent_run_id"]
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
        storage=_journal(run_dir),  # on disk: the Optuna history survives a driver crash
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
        run_config=tune.RunConfig(
            name=name,
            storage_path=str(run_dir.parent),
            callbacks=[
                MlflowTrialLogger(uri, experiment_id, parent, final_epoch=t.epochs, run_dir=run_dir),
                ProgressLine(s.num_samples, s.metrics[0], s.modes[0], t.epochs, verbose),
            ],
            failure_config=tune.FailureConfig(max_failures=s.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            verbose=0,
        ),
    )


def resume_search(run_dir: str | Path, address: str | None = None, trainable: Any = None) -> SearchResult:
    """Continues an interrupted search: Tune restores its trials (errored ones too) and the searcher, the Optuna
    history continues from its journal, finished trials are not trained again and keep their MLflow runs. A search
    that was confirming continues its confirmation; a two-stage search continues its stage 2 (the confirmation)."""
    from mlflow.tracking import MlflowClient

    from pathsearch.config import load_search_file
    from pathsearch.confirm import PLAN_FILE

    run_dir = Path(run_dir).expanduser().resolve()
    state_file = run_dir / STATE_FILE
    if not state_file.is_file():
        raise ValueError(f"{run_dir} is not a pathsearch run directory (no {STATE_FILE})")
    state = json.loads(state_file.read_text())
    spec = load_search_file(run_dir / "search.yaml")
    confirm = spec.search.confirm.enabled
    confirming = confirm and (run_dir / PLAN_FILE).is_file()  # the search was over: continue its confirmation
    full = spec.search.strategy == "full"
    if full and not confirming and not tune.Tuner.can_restore(str(run_dir)):
        raise ValueError(f"{run_dir} has no Tune state to resume from (the search stopped before its first snapshot)")
    if not full:
        from pathsearch.oneshot import STAGE1_FILE

        if not (run_dir / STAGE1_FILE).is_file():
            raise ValueError(f"{run_dir}: stage 1 (supernet and proxy search) did not finish: start the search again")
    MlflowClient(state["tracking_uri"]).update_run(state["parent_run_id"], status="RUNNING")
    _init_ray(address)
    if not full:  # two_stage: stage 1 is done (it is not resumable); continue the confirmation
        from pathsearch.oneshot import resume_two_stage

        return resume_two_stage(spec, run_dir, state, trainable)
    if confirming:
        result = SearchResult(run_dir, spec.tracking.experiment, state["parent_run_id"], None, None)
        return confirm_search(spec, run_dir, state, result, trainable)
    tuner = tune.Tuner.restore(str(run_dir), trainable=runnable(spec, trainable), resume_errored=True)
    result = _fit_and_finish(tuner, spec, run_dir, state, not confirm)
    if not confirm or result.interrupted:
        return result
    return confirm_search(spec, run_dir, state, result, trainable)


def _fit_and_finish(
    tuner: Any, spec: SearchFile, run_dir: Path, state: dict[str, Any], end: bool = True
) -> SearchResult:
    """Runs (or continues) the search's Tuner, then writes its results to the run directory and the parent run,
    and ends the parent unless `end` is False and the search finished (a confirmation stage follows)."""
    from pathsearch.tracking import close_orphan_runs

    s, t = spec.search, spec.trial.train
    status = "FAILED"
    files: dict[str, Path] = {"search_file": run_dir / "search.yaml"}
    best = baseline = None
    front: list[dict[str, Any]] = []
    rows: list[dict[str, Any]] = []
    try:
        grid = tuner.fit()
        # Tune ends a run on SIGINT (Ctrl-C) by returning, with the unfinished trials saved for a resume.
        status = (
            "KILLED"
            if _interrupted(grid, optuna.load_study(study_name=state["name"], storage=_journal(run_dir)))
            else "FINISHED"
        )
        rows = _final_rows(grid, t.epochs)
        best, baseline = _best_and_baseline(rows, s.metrics[0], s.modes[0])
        if len(s.metrics) > 1:
            front = pareto_rows(rows, s.metrics, s.modes)
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        study = optuna.load_study(study_name=state["name"], storage=_journal(run_dir))
        if status != "KILLED":  # the search is over: nothing may stay RUNNING
            for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                study.set_user_attr(f"lost_trial_{trial.number}", True)
                study.tell(trial.number, state=TrialState.FAIL)
            close_orphan_runs(state["tracking_uri"], state["experiment_id"], state["parent_run_id"])
        else:  # interrupted: runs of unfinished trials end KILLED; `resume` reopens and continues them
            close_orphan_runs(state["tracking_uri"], state["experiment_id"], state["parent_run_id"], "INTERRUPTED")
        counts = _study_counts(study)
        files["optuna_trials"] = run_dir / "optuna_trials.json"
        files["optuna_trials"].write_text(json.dumps(study_table(study), indent=1))
        files.update(_plot_study(study, run_dir))
        if best is not None and best.get("checkpoint") and (end or status != "FINISHED"):  # else: the confirmed one
            src = Path(best["checkpoint"]) / "path_config.yaml"
            if src.is_file():
                files["best_path_config"] = Path(shutil.copy(src, run_dir / "best_path_config.yaml"))
        if front:
            files["pareto_front"] = run_dir / "pareto_front.yaml"
            files["pareto_front"].write_text(yaml.safe_dump(front, sort_keys=False))
        summary: dict[str, float] = {f"trials_{k}": v for k, v in counts.items()}
        for label, row in (("best", best), ("baseline", baseline)):
            if row is not None:
                summary[f"{label}_{s.metrics[0]}"] = row[s.metrics[0]]
        final = status if end or status != "FINISHED" else None  # None: the parent stays open for the confirmation
        end_parent_run(state["tracking_uri"], state["parent_run_id"], summary, list(files.values()), final)
    result = SearchResult(run_dir, spec.tracking.experiment, state["parent_run_id"], best, baseline, counts, files)
    result.pareto = front
    result.rows = rows
    result.interrupted = status == "KILLED"
    return result


STATE_FILE = "pathsearch_state.json"


def runnable(spec: SearchFile, trainable: Any) -> Any:
    """The trainable with the base config bound and the trial's resources (search, supernet and confirmation)."""
    resources = {k.upper() if k in ("cpu", "gpu") else k: v for k, v in spec.search.resources_per_trial.items()}
    return tune.with_resources(tune.with_parameters(trainable or train_trial, base=spec.base), resources)


def _journal(run_dir: Path) -> Any:
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    return JournalStorage(JournalFileBackend(str(run_dir / "optuna_journal.log")))


def _init_ray(address: str | None) -> None:
    import ray

    # Tune snapshots the experiment whenever a trial replaces its kept checkpoint; that is what we want.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    if ray.is_initialized():
        return
    if address:  # an existing cluster (`auto` inside a Ray job): its nodes keep the addresses they registered
        ray.init(address=address)
    else:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # keeps a local Ray on 127.0.0.1
        ray.init(include_dashboard=False, configure_logging=False, log_to_driver=False)


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


def _study_counts(study: optuna.Study) -> dict[str, int]:
    trials = study.get_trials(deepcopy=False)
    reused = sum(bool(tr.user_attrs.get(REUSED)) for tr in trials)
    infeasible = sum(INFEASIBLE in tr.user_attrs for tr in trials)
    return {
        "complete": sum(tr.state == TrialState.COMPLETE for tr in trials) - reused,
        "pruned": sum(tr.state == TrialState.PRUNED for tr in trials),
        "failed": sum(tr.state == TrialState.FAIL for tr in trials) - infeasible,
        "reused": reused,
        "infeasible": infeasible,
    }


def _interrupted(grid: Any, study: optuna.Study) -> bool:
    """True when a trial Tune knows is still RUNNING in Optuna: Tune returned early on SIGINT without telling
    the searcher. (RUNNING Optuna trials that no Tune trial knows were lost in a driver crash instead.)"""
    live = {(result.config or {}).get("optuna_trial") for result in grid}
    running = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
    return bool(live & running)


def _final_rows(grid: Any, final_epoch: int) -> list[dict[str, Any]]:
    """The last result of every trial that trained to the end, with its config and checkpoint."""
    rows = []
    for result in grid:
        m, config = result.metrics or {}, result.config or {}
        if result.error is not None or m.get("epoch") != final_epoch:
            continue
        rows.append(
            {
                **{k: v for k, v in m.items() if k in METRIC_KEYS},
                "trial_id": m.get("trial_id"),
                "optuna_trial": config.get("optuna_trial"),
                "overrides": config.get("overrides", {}),
                "checkpoint": result.checkpoint.path if result.checkpoint is not None else None,
            }
        )
    return rows


METRIC_KEYS = ("val_acc", "val_acc_std", "val_loss", "val_acc_full", "train_loss", "kept_paths", "params", "epoch")


def _best_and_baseline(rows: list[dict[str, Any]], metric: str, mode: str) -> tuple[dict | None, dict | None]:
    scored = [r for r in rows if r.get(metric) is not None]
    baseline = next((r for r in scored if r["optuna_trial"] == 0), None)  # enqueued first
    if not scored:
        return None, baseline
    return (max if mode == "max" else min)(scored, key=lambda r: r[metric]), baseline


def pareto_rows(rows: list[dict[str, Any]], metrics: list[str], modes: list[str]) -> list[dict[str, Any]]:
    """Rows no other row matches or beats on every metric (and beats on one)."""
    signs = [1 if mode == "max" else -1 for mode in modes]
    scored = [
        (r, [s * r[m] for s, m in zip(signs, metrics, strict=True)]) for r in rows if all(m in r for m in metrics)
    ]
    front = [
        r for r, v in scored if not any(all(a >= b for a, b in zip(w, v, strict=True)) and w != v for _, w in scored)
    ]
    return sorted(front, key=lambda r: -signs[0] * r[metrics[0]])


def _flat(prefix: str, data: Mapping[str, Any]) -> dict[str, Any]:
    return {f"{prefix}.{k}": v for k, v in data.items()}


class ProgressLine(tune.Callback):
    """One line per finished trial: done / running / pending / pruned / failed, best so far, elapsed, ETA."""

    def __init__(
        self, total: int, metric: str, mode: str, final_epoch: int, verbose: bool, label: str = "trials"
    ) -> None:
        self.total, self.metric, self.mode, self.final_epoch, self.verbose = total, metric, mode, final_epoch, verbose
        self.label = label
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
            f"[{elapsed:6.0f}s] {self.label} done {self.done}/{self.total}  running {running}  pending {pending}  "
            f"pruned {self.pruned}  failed {self.failed}  best {self.metric} {best}  ETA {eta:.0f}s",
            flush=True,
        )
