"""Every key of a search file at its boundaries: 0, a negative number, NaN, infinity, huge numbers (1e30, 2**70),
empty values ("", [], {}), a string where a number goes and a list where a scalar goes, each given as an override of
search_spaces/digits_tiny.yaml. Each must either be refused by validation (a ConfigError whose every problem is one
line naming the file, and whose lines name the key and the value) or carry through a trial's set-up (the data,
each seed's model, optimiser, schedule and loaders, as `fit` makes them) and one training step.

The keys are the sections, the reference's keys (pathsearch.reference.schema_keys: every key
docs/reference/search-file.md lists), the common timm ViT keyword arguments under model.kwargs, and the fields of a
space entry. Validation runs in this process through pathsearch.preflight.load_search, what every verb runs; the
set-up (pathsearch.trial.train.set_up_trial, fit's own) runs once per distinct trial configuration that validation
accepted, on the CPU.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from pathsearch.config.typed import ConfigError, to_dict
from pathsearch.preflight import load_search
from pathsearch.reference import schema_keys
from pathsearch.trial.train import set_up_trial, train_step

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "search_spaces" / "digits_tiny.yaml"

# Each boundary as the text after `--set KEY=` (read as YAML, as the CLI reads it), and the value it stands for.
BOUNDARIES: dict[str, Any] = {
    "0": 0,
    "-1": -1,
    ".nan": math.nan,
    ".inf": math.inf,
    "1.0e+30": 1e30,
    str(2**70): 2**70,
    "": "",
    "[]": [],
    "{}": {},
    "x": "x",  # a string where a number (or a name) goes
    "[1]": [1],  # a list where a scalar goes
}
VIT_KWARGS = ("depth", "embed_dim", "num_heads", "patch_size", "mlp_ratio", "img_size")
SPACE_FIELDS = ("low", "high", "log", "step", "choices", "when")  # of the small file's two space entries
KEYS = [
    *("model", "data", "train", "search", "space", "tracking"),  # the sections themselves
    *(key.name for key in schema_keys()),
    *(f"model.kwargs.{name}" for name in VIT_KWARGS),
    *(f"space.model.pruned.{name}" for name in ("by", *SPACE_FIELDS)),
    *(f"space.train.lr.{name}" for name in SPACE_FIELDS),
]
# A smaller file than the demo's, so that each case validates (and trains) in milliseconds: a depth-1 ViT of width 8
# and two space entries, a path entry and a number. The key under test is set after these.
SMALL = [
    "model.kwargs.depth=1",
    "model.kwargs.embed_dim=8",
    "model.distill.students=[1]",
    "space={model.pruned: {by: shortest, low: 0, high: 2}, train.lr: {low: 5.0e-4, high: 2.0e-3}}",
]


def named(key: str, line: str) -> bool:
    """Whether a problem line names `key`: the key itself, or for a space entry's field the entry."""
    if f"{key}:" in line or f"{key}." in line or f"{key} " in line:
        return True
    return key.startswith("space.") and f"{key.rsplit('.', 1)[0]}" in line


def shown(value: Any, line: str) -> bool:
    """Whether a problem line ends by showing `value` (`..., got VALUE`, VALUE maybe inside what it is part of): as
    Python writes it, as the number it became, or a path made of it."""
    forms = [repr(value)]
    if isinstance(value, int | float) and not isinstance(value, bool):
        forms.append(repr(float(value)))
    if isinstance(value, str) and value:
        forms.append(value)
    got = line.rpartition("got ")[2]
    return "got " in line and any(form in got for form in forms)


def validate(key: str, text: str) -> tuple[Any, list[str]]:
    """(the search file as validated, or None, and what is wrong with the way it was refused or crashed)."""
    value = BOUNDARIES[text]
    try:
        return load_search(DIGITS, [*SMALL, f"{key}={text}"]), []
    except ConfigError as err:
        problems = err.problems
    except Exception as err:  # validation itself failed: the hole this test is for
        said = " ".join(str(err).split())[:300]
        return None, [f"{key}={text}: validation crashed: {type(err).__name__}: {said}"]
    wrong = []
    for line in problems:
        if "\n" in line or not line.startswith(f"{DIGITS}:"):
            wrong.append(f"{key}={text}: a problem line that is not one line naming the file: {line!r}")
    if not any(named(key, line) and shown(value, line) for line in problems):
        wrong.append(f"{key}={text}: no problem line names the key and the value {value!r}: {problems}")
    return None, wrong


_SET_UP: dict[str, str | None] = {}  # a trial configuration (JSON) -> what went wrong in its set-up and step


def set_up_and_step(spec: Any) -> str | None:
    """What went wrong in the set-up and first training step of the search file's base trial (None: nothing),
    once per distinct trial configuration."""
    cfg = spec.trial
    key = json.dumps(to_dict(cfg), sort_keys=True, default=repr)
    if key not in _SET_UP:
        try:
            _, mixup, runs, val_loader = set_up_trial(cfg, torch.device("cpu"))
            images, targets = next(iter(runs[0].train_loader))
            loss = train_step(runs[0], cfg, images, targets, amp=False, mixup=mixup)
            next(iter(val_loader))
            _SET_UP[key] = None if math.isfinite(loss.item()) else f"the first training loss is {loss.item()}"
        except Exception as err:
            _SET_UP[key] = f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"
    return _SET_UP[key]


def test_the_keys_are_the_references_and_the_small_file_is_valid():
    assert "model.kwargs" in KEYS and "search.confirm.alpha" in KEYS and "tracking.experiment" in KEYS
    assert set_up_and_step(load_search(DIGITS, SMALL)) is None


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: the suite runs two test files side by side on two cores, where more threads than cores
    made these tiny steps tens of times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("key", KEYS)
def test_each_boundary_is_refused_in_lines_naming_it_or_trains(key):
    holes = []
    for text in BOUNDARIES:
        spec, wrong = validate(key, text)
        holes += wrong
        if spec is not None and (failed := set_up_and_step(spec)):
            holes.append(
                f"{key}={text}: accepted by validation, then the trial's set-up or first step failed: {failed}"
            )
    assert not holes, "\n".join(holes)


# What no boundary value shows: a budget the baseline does not fit, a batch just over the split, a step that samples
# fractions of a whole key, a model each of whose sizes is in range, names. (case: overrides, what the line says)
FOUND = {
    "a path budget below the baseline's paths": (["search.max_kept_paths=2"], "search.max_kept_paths: every search"),
    "a mixed batch larger than the training split": (
        ["data.batch_size=301", "data.mixup=0.8"],
        "data.batch_size: must be at most 300",
    ),
    "a fractional step on a whole key": (
        ["space.model.kwargs.depth={low: 1, high: 3, step: 0.5}"],
        "space.model.kwargs.depth: value 1.0 is invalid",
    ),
    "a model no process holds": (["model.kwargs.embed_dim=65536", "model.kwargs.depth=8"], "model.kwargs: the model"),
    "a schedule that ends above its start": (["train.min_lr=0.01"], "train.min_lr: must be at most train.lr"),
    "an experiment name with spaces around it": (["tracking.experiment=' digits'"], "tracking.experiment: must not"),
    "an experiment name of two lines": (['tracking.experiment="a\\nb"'], "tracking.experiment: must be one line"),
    "a space condition that is not a mapping": (["space.model.pruned.when=0"], "space.model.pruned.when: expected"),
}


@pytest.mark.parametrize("case", list(FOUND))
def test_what_no_boundary_value_shows_is_refused_in_one_line(case):
    overrides, says = FOUND[case]
    with pytest.raises(ConfigError) as info:
        load_search(DIGITS, [*SMALL, *overrides])
    assert all("\n" not in line and line.startswith(f"{DIGITS}: ") for line in info.value.problems)
    assert any(says in line and "got " in line for line in info.value.problems), info.value.problems


def test_experiment_names_mlflow_takes_are_accepted():
    """A slash or inner spaces: MLflow takes them (Databricks names experiments by workspace path)."""
    for name in ("/Users/me/digits", "digits tiny"):
        assert load_search(DIGITS, [*SMALL, f"tracking.experiment={name}"]).tracking.experiment == name
