"""The Optuna searcher inside Ray Tune: the define-by-run space, the samplers, the baseline point, and an
OptunaSearch that tells Optuna the truth.

Trials that ASHA stops are PRUNED (with their intermediate values), failed trials FAIL, a configuration equal to
one already trained is not trained again (its result is reused and counted), and infeasible ones (no kept path,
caps) are refused before training. No tensors: the parameter-count cap imports the model lazily.
"""

from __future__ import annotations

import json
import math
import shutil
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from pathsearch.config.datasets import SHAPES
from pathsearch.config.space import SearchSpace, lookup_value, sample_overrides
from pathsearch.search.results import EXHAUSTED, INFEASIBLE, REUSED, trained_to_end

SAMPLERS = ("tpe", "nsga2", "random", "gp", "qmc")
JOURNAL = "optuna_journal.log"  # in the run directory: the study's full history
MAX_SKIPPED = 200  # suggestions in a row that may be reused or infeasible before the search ends


def define_space(trial: Any, space: SearchSpace, base: dict[str, Any]) -> dict[str, Any]:
    """Optuna define-by-run function (module level: Tune pickles it with the experiment state)."""
    overrides = sample_overrides(trial, space, base)
    return {"overrides": overrides, "optuna_trial": trial.number}


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
        journal: str | None = None,
        snapshot_journal: bool = False,
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        self.journal = journal  # the study's journal file (its storage), rebound on restore (see `restore`)
        self.snapshot_journal = snapshot_journal  # copy it into each of Tune's experiment snapshots
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
        for _ in range(MAX_SKIPPED):  # bounded: a space may hold only configurations already trained
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
        # the search ends here: say why in the study, where the driver reads it (results.study_counts)
        self.study().set_user_attr(EXHAUSTED, f"{MAX_SKIPPED} suggestions in a row were already trained or infeasible")
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
        from pathsearch.ensemble.model import model_params  # lazily: the driver needs torch only for this cap

        model, data = self.base["model"], self.base.get("data", {})
        kwargs = {
            **_data_kwargs(data.get("name", "")),  # what `fit` takes from the dataset, unless set
            **model.get("kwargs", {}),
            **{k[len("model.kwargs.") :]: v for k, v in overrides.items() if k.startswith("model.kwargs.")},
        }
        name = overrides.get("model.name", model.get("name", "vit_tiny_patch16_224"))
        key = json.dumps([name, kwargs], sort_keys=True, default=str)
        if key not in self._param_cache:
            self._param_cache[key] = model_params(name, kwargs)
        return self._param_cache[key]

    def _told(self, trial_id: str) -> bool:
        """True when the study already holds this trial's end: Tune restored it from a snapshot older than the study
        (the journal is written at once, the snapshot later), and it reports or ends again."""
        ot_trial = self._ot_trials.get(trial_id)
        return ot_trial is not None and self.study().get_trials(deepcopy=False)[ot_trial.number].state.is_finished()

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        # a trial this searcher's snapshot does not know (Tune's experiment snapshot in a store was newer than the
        # searcher's when the driver was killed): Optuna has no trial to hear it, as on_trial_complete also skips it
        if trial_id in self._ot_trials and not self._told(trial_id):
            super().on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return
        if self._told(trial_id):
            self._completed_trials.add(trial_id)
            return
        ot_trial = self._ot_trials[trial_id]
        if result is not None and isinstance(self.metric, str):
            # Tune withholds a result that ends a trial (ASHA's stop, max_t) from on_trial_result: record it.
            step, value = result.get("training_iteration"), result.get(self.metric)
            reported = self.study().get_trials(deepcopy=False)[ot_trial.number].intermediate_values
            if isinstance(step, int) and isinstance(value, int | float) and step not in reported:
                ot_trial.report(float(value), step)
        stopped_early = not error and result is not None and not trained_to_end(result, self.final_epoch)
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

    # ----- snapshots: Tune calls save() at each experiment snapshot and restore() when a search is resumed ------
    def save(self, checkpoint_path: str) -> None:
        """The searcher into Tune's snapshot folder; for a run kept in an object store, its Optuna journal too.

        How the study reaches the store: the journal (a file Optuna appends to) is copied into the folder Tune
        uploads as one snapshot, beside the searcher state that refers to its trials, so the store always holds a
        journal at least as new as the searcher it restores. Optuna's RDB storage on the tracking server's
        database was the other way; it would tie a search to a SQL server that a file store or a laptop has not.
        (Not for a local run: Tune's snapshot folder is copied into the run directory, over the live journal.)
        """
        super().save(checkpoint_path)
        if self.snapshot_journal and self.journal and Path(self.journal).is_file():
            shutil.copy(self.journal, Path(checkpoint_path).parent / JOURNAL)

    def restore(self, checkpoint_path: str) -> None:
        """Tune's saved searcher; its study (pickled with the journal's path where the search started) is opened
        again on the journal of the run directory being resumed, which may be another folder on another machine."""
        super().restore(checkpoint_path)
        if _RESTORING_INTO:
            self.rebind(_RESTORING_INTO[-1] / JOURNAL)

    def rebind(self, journal: Path) -> None:
        storage = study_journal(journal)
        study = optuna.load_study(study_name=self._study_name, storage=storage, sampler=self._sampler)
        self._storage, self.journal = storage, str(journal)
        self._ot_study = study  # type: ignore[assignment]  # Ray annotates it None (set in set_search_properties)
        self._ot_trials = {tid: optuna.Trial(study, t._trial_id) for tid, t in self._ot_trials.items()}

    def study(self) -> optuna.Study:
        assert self._ot_study is not None, "the study is created when Tune sets the search properties"
        return self._ot_study


def _data_kwargs(name: str) -> dict[str, int]:
    """num_classes / in_chans / img_size that fit() takes from a built-in dataset (none from an image folder, whose
    classes are counted at run time)."""
    chans, size, classes = SHAPES.get(name, (0, 0, None))
    return {} if classes is None else {"num_classes": classes, "in_chans": chans, "img_size": size}


def make_sampler(name: str, seed: int) -> optuna.samplers.BaseSampler:
    """The Optuna sampler `search.sampler` names (the config refuses other names before this runs)."""
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=4)
    if name == "nsga2":
        return PicklableNSGAIISampler(seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed)
    if name == "qmc":
        return optuna.samplers.QMCSampler(seed=seed)
    raise ValueError(f"unknown sampler {name!r} (known: {', '.join(SAMPLERS)})")


class PicklableNSGAIISampler(optuna.samplers.NSGAIISampler):
    """NSGA-II that pickles: Optuna 5.1's genetic samplers hold a threading.Lock (`_thread_lock`) and define no
    __getstate__, and Tune pickles the searcher with its sampler (when the Tuner is made, and at every experiment
    snapshot). The lock is left out and made anew."""

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_thread_lock", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._thread_lock = threading.Lock()


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


def study_storage(run_dir: Path) -> Any:
    """The search's Optuna study storage: a journal file in the run directory, so that the history survives a
    driver crash and `resume` continues it."""
    return study_journal(run_dir / JOURNAL)


def study_journal(path: Path) -> Any:
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    return JournalStorage(JournalFileBackend(str(path)))


_RESTORING_INTO: list[Path] = []  # the run directory whose search Tune is restoring (see PathOptunaSearch.restore)


@contextmanager
def restoring_into(run_dir: Path) -> Iterator[None]:
    """While a resumed search's Tuner restores its searcher: the study is reopened on `run_dir`'s journal."""
    _RESTORING_INTO.append(run_dir)
    try:
        yield
    finally:
        _RESTORING_INTO.pop()
