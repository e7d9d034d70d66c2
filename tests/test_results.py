"""What a search produced, computed from plain rows and a real Optuna study: Pareto front, best and baseline,
the trial counts, and new run folders that never collide."""

from __future__ import annotations

import optuna
import pytest
from optuna.trial import TrialState

from pathsearch.search.results import (
    INFEASIBLE,
    REUSED,
    best_and_baseline,
    pareto_front,
    pareto_rows,
    study_counts,
    trained_to_end,
)


def test_pareto_front_keeps_exactly_the_undominated_points():
    # (accuracy: max, kept paths: min). b dominates a; c and d trade off; e equals c (kept); f lacks a value.
    points = {"a": (0.80, 9), "b": (0.85, 9), "c": (0.83, 5), "d": (0.90, 13), "e": (0.83, 5), "f": None}
    front = pareto_front(list(points), lambda k: points[k], ["max", "min"])
    assert front == ["b", "c", "d", "e"]
    # the same points with the second objective maximised: d dominates everything but nothing dominates d
    assert pareto_front(list(points), lambda k: points[k], ["max", "max"]) == ["d"]


def test_pareto_rows_sorts_the_front_best_first_on_the_first_metric():
    rows = [{"val_acc": 0.8, "params": 5}, {"val_acc": 0.9, "params": 9}, {"val_acc": 0.7, "params": 9}, {"x": 1}]
    front = pareto_rows(rows, ["val_acc", "params"], ["max", "min"])
    assert [r["val_acc"] for r in front] == [0.9, 0.8]


@pytest.mark.parametrize(("mode", "best"), [("max", 3), ("min", 0)])
def test_best_and_baseline(mode, best):
    rows = [
        {"optuna_trial": 1, "val_loss": 0.9},
        {"optuna_trial": 0, "val_loss": 0.5},  # enqueued first: the baseline, wherever it lands in the rows
        {"optuna_trial": 3, "val_loss": 1.4},
        {"optuna_trial": 2},  # no score: never the best
    ]
    found, baseline = best_and_baseline(rows, "val_loss", mode)
    assert baseline is rows[1]
    assert found is not None and found["optuna_trial"] == best


def test_trained_to_end_is_the_final_epoch_and_nothing_earlier():
    assert trained_to_end({"epoch": 10}, 10) and not trained_to_end({"epoch": 9}, 10)
    assert not trained_to_end({}, 10) and not trained_to_end({"epoch": None}, 1)


def test_study_counts_separate_reused_and_infeasible_from_complete_and_failed():
    study = optuna.create_study(direction="maximize")
    for value, state, attrs in [
        (0.9, TrialState.COMPLETE, {}),
        (0.9, TrialState.COMPLETE, {REUSED: True}),
        (None, TrialState.FAIL, {INFEASIBLE: "prunes every path"}),
        (None, TrialState.FAIL, {}),
        (None, TrialState.PRUNED, {}),
        (0.5, TrialState.COMPLETE, {}),
    ]:
        trial = study.ask()
        for key, attr in attrs.items():
            trial.set_user_attr(key, attr)
        study.tell(trial, value, state=state) if value is not None else study.tell(trial, state=state)
    assert study_counts(study) == {"complete": 2, "pruned": 1, "failed": 1, "reused": 1, "infeasible": 1}


def test_two_searches_started_in_the_same_second_get_two_folders(tmp_path):
    from pathsearch.config import load_search_file
    from pathsearch.search.run import new_run_dir

    path = tmp_path / "demo.yaml"
    path.write_text(
        "model: {name: vit_tiny_patch16_224, kwargs: {depth: 2}}\nspace: {train.lr: {low: 0.001, high: 0.01}}\n"
    )
    spec = load_search_file(path)
    folders = [new_run_dir(spec, tmp_path / "runs", None)[0] for _ in range(3)]
    assert len(set(folders)) == 3 and all(f.is_dir() and f.name.startswith("demo-") for f in folders)
    with pytest.raises(ValueError, match="already exists"):
        new_run_dir(spec, tmp_path / "runs", folders[0].name)  # a name given twice is refused, not shared
