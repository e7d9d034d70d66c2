"""What a search produced, as plain data: the final row of every trial that trained to the end, the best and the
baseline, the Pareto front, the Optuna study as a table with its counts, and Optuna's plots. `export` uses the
Pareto rule too. Imports no torch; of pathsearch only `storage` (where a checkpoint lives); Optuna only inside the
functions that read a study, so `export` and the trial logger load no Optuna.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from pathsearch.storage import result_checkpoint

if TYPE_CHECKING:
    import optuna

T = TypeVar("T")
INFEASIBLE = "pathsearch.infeasible"  # Optuna user attrs: refused before training (why), reused result (True)
REUSED = "pathsearch.reused"
EXHAUSTED = "pathsearch.exhausted"  # Optuna study attr: why the searcher ended the search before num_samples


def trained_to_end(metrics: Mapping[str, Any], final_epoch: int) -> bool:
    """Whether a trial's last result is from its final epoch. A trial that ended before it was stopped early by the
    scheduler (ASHA): PRUNED in Optuna, KILLED in MLflow, left out of the results."""
    return int(metrics.get("epoch", 0) or 0) >= final_epoch


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
    confirmation: Any = None  # pathsearch.search.verdict.Confirmation, when search.confirm is on and it finished
    rows: list[dict[str, Any]] = field(default_factory=list)  # the final result of every trial that trained to the end
    ended_early: str | None = None  # why the searcher ended the search before num_samples trials, if it did
    stored_at: str | None = None  # the run folder's URI when it is kept in an object store (run_dir: a working copy)


METRIC_KEYS = ("val_acc", "val_acc_std", "val_loss", "val_acc_full", "train_loss", "kept_paths", "params", "epoch")


def final_rows(grid: Any, final_epoch: int) -> list[dict[str, Any]]:
    """The last result of every trial that trained to the end, with its config and checkpoint."""
    rows = []
    for result in grid:
        m, config = result.metrics or {}, result.config or {}
        if result.error is not None or not trained_to_end(m, final_epoch):
            continue
        rows.append(
            {
                **{k: v for k, v in m.items() if k in METRIC_KEYS},
                "trial_id": m.get("trial_id"),
                "optuna_trial": config.get("optuna_trial"),
                "overrides": config.get("overrides", {}),
                "checkpoint": result_checkpoint(result.checkpoint, m),
            }
        )
    return rows


def best_and_baseline(rows: list[dict[str, Any]], metric: str, mode: str) -> tuple[dict | None, dict | None]:
    scored = [r for r in rows if r.get(metric) is not None]
    baseline = next((r for r in scored if r["optuna_trial"] == 0), None)  # enqueued first
    if not scored:
        return None, baseline
    return (max if mode == "max" else min)(scored, key=lambda r: r[metric]), baseline


def pareto_front(items: Sequence[T], values: Callable[[T], Sequence[float] | None], modes: Sequence[str]) -> list[T]:
    """The items no other item matches or beats on every objective (and beats on one), in input order; `values`
    gives an item's objective values (None: the item lacks one and is left out). Search rows and export's MLflow
    runs both use it."""
    signs = [1 if mode == "max" else -1 for mode in modes]
    scored = []
    for item in items:
        v = values(item)
        if v is not None:
            scored.append((item, [s * x for s, x in zip(signs, v, strict=True)]))
    return [
        item
        for item, v in scored
        if not any(all(a >= b for a, b in zip(w, v, strict=True)) and w != v for _, w in scored)
    ]


def pareto_rows(rows: list[dict[str, Any]], metrics: list[str], modes: list[str]) -> list[dict[str, Any]]:
    """The search's Pareto front over its final rows, best first on the first metric."""
    front = pareto_front(rows, lambda r: [r[m] for m in metrics] if all(m in r for m in metrics) else None, modes)
    return sorted(front, key=lambda r: -(1 if modes[0] == "max" else -1) * r[metrics[0]])


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


def study_counts(study: optuna.Study) -> dict[str, int]:
    from optuna.trial import TrialState

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


def plot_study(study: optuna.Study, run_dir: Path) -> dict[str, Path]:
    """Optuna's optimisation-history and parameter-importance plots (matplotlib backend) as PNGs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.exceptions import ExperimentalWarning
    from optuna.trial import TrialState
    from optuna.visualization import matplotlib as ovm

    out: dict[str, Path] = {}
    if len(study.directions) > 1 or not any(t.state == TrialState.COMPLETE for t in study.trials):
        return out
    for label, plot in (
        ("optimization_history", ovm.plot_optimization_history),
        ("param_importances", ovm.plot_param_importances),
    ):
        with warnings.catch_warnings(record=True) as caught:
            # Optuna marks its matplotlib plots experimental (a warning per call, not a problem of this search);
            # anything else it warns about is written beside the plot, where the plot is read
            warnings.simplefilter("always")
            warnings.filterwarnings("ignore", category=ExperimentalWarning)
            try:
                plot(study)
            except (ValueError, RuntimeError) as err:  # e.g. importances need two completed trials, a varied param
                (run_dir / f"{label}.txt").write_text(f"not drawn: {err}\n")
                continue
        if caught:
            notes = sorted({f"{w.category.__name__}: {w.message}" for w in caught})
            (run_dir / f"{label}.txt").write_text("".join(f"{note}\n" for note in notes))
        path = run_dir / f"{label}.png"
        plt.gcf().savefig(path, dpi=100, bbox_inches="tight")
        plt.close("all")
        out[label] = path
    return out
