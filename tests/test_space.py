"""The search space: parsing, validation (`pathsearch validate`) and define-by-run sampling with real Optuna."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

import optuna
import pytest
import yaml

from pathsearch import cli
from pathsearch.config import load_search_file
from pathsearch.config.paths import path_names
from pathsearch.config.space import parse_space, sample_overrides
from pathsearch.config.typed import ConfigError
from pathsearch.ensemble.model import model_depth

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "search_spaces" / "digits_tiny.yaml"
BASE = yaml.safe_load(DIGITS.read_text())


def write(tmp_path: Path, data: dict, name: str = "s.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def sample_many(spec, n=60, sampler=None):
    study = optuna.create_study(sampler=sampler or optuna.samplers.RandomSampler(seed=0))
    base = {k: spec.raw.get(k) for k in ("model", "data", "train")}
    out = []
    for _ in range(n):
        trial = study.ask()
        out.append(sample_overrides(trial, spec.space, base))
        study.tell(trial, 0.0)
    return out


@pytest.mark.parametrize("by", ["path", "layer", "group", "shortest"])
def test_mask_parametrisations_sample_valid_masks(tmp_path, by):
    data = {**BASE, "space": {"model.pruned": {"by": by} if by != "shortest" else {"by": by, "low": 0, "high": 12}}}
    spec = load_search_file(write(tmp_path, data), model_depth=model_depth)
    names = path_names(6)
    seen = set()
    for overrides in sample_many(spec):
        pruned = overrides["model.pruned"]
        assert set(pruned) <= set(names) and pruned == sorted(pruned, key=names.index)
        seen.add(tuple(pruned))
        if by == "layer":  # both paths of a layer go together
            for layer in range(1, 7):
                assert (f"attn.{layer}" in pruned) == (f"mlp.{layer}" in pruned)
        if by == "group":
            assert {n.split(".")[0] for n in pruned} <= {"embed", "attn", "mlp"}
            attn = [n for n in pruned if n.startswith("attn")]
            assert len(attn) in (0, 6)
        if by == "shortest":
            assert pruned == names[: len(pruned)]
    assert len(seen) > 3
    expected = {"path": 13, "layer": 7, "group": 3, "shortest": 1}[by]
    assert len(spec.space.param_names()) == expected


@pytest.mark.parametrize("by,count", [("one", 1), ("group", 3), ("path", 13)])
def test_scale_init_parametrisations(tmp_path, by, count):
    data = {**BASE, "space": {"model.ensemble_scale.init": {"by": by, "low": 0.01, "high": 1.0, "log": True}}}
    spec = load_search_file(write(tmp_path, data), model_depth=model_depth)
    for overrides in sample_many(spec, n=10):
        init = overrides["model.ensemble_scale.init"]
        values = [init] if by == "one" else list(init.values())
        assert len(values) == count and all(0.01 <= v <= 1.0 for v in values)


def test_conditional_entry_is_sampled_only_when_its_condition_holds(tmp_path):
    spec = load_search_file(DIGITS, model_depth=model_depth)
    samples = sample_many(spec, n=40)
    for overrides in samples:
        has_t = "model.distill.temperature" in overrides
        assert has_t == (overrides["model.distill.alpha"] == 0.5)
    assert any("model.distill.temperature" in o for o in samples)
    assert any("model.distill.temperature" not in o for o in samples)


def test_tpe_runs_define_by_run_over_the_shipped_space():
    """TPE past its random start samples only legal configurations of digits_tiny's space: the k shortest paths
    pruned, values inside their ranges and choices, the temperature exactly when alpha is 0.5, each override the
    very value Optuna recorded (so TPE models what was trained)."""
    spec = load_search_file(DIGITS, model_depth=model_depth)
    base = {k: spec.raw.get(k) for k in ("model", "data", "train")}
    names = path_names(6)
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0, n_startup_trials=5))
    for _ in range(15):
        trial = study.ask()
        o = sample_overrides(trial, spec.space, base)
        p = trial.params
        conditional = {"model.distill.temperature"} if o["model.distill.alpha"] == 0.5 else set()
        assert set(o) == {"model.pruned", "model.ensemble_scale.init", "model.distill.alpha", "train.lr"} | conditional
        assert set(p) == {"prune.shortest", "ensemble_scale.init", "model.distill.alpha", "train.lr"} | conditional
        assert 0 <= p["prune.shortest"] <= 6 and o["model.pruned"] == names[: p["prune.shortest"]]
        assert o["model.ensemble_scale.init"] == p["ensemble_scale.init"] and 0.01 <= p["ensemble_scale.init"] <= 1.0
        assert o["model.distill.alpha"] == p["model.distill.alpha"] in (0.0, 0.5)
        assert o["train.lr"] == p["train.lr"] and 5.0e-4 <= p["train.lr"] <= 2.0e-3
        if conditional:
            assert o["model.distill.temperature"] == p["model.distill.temperature"] in (1.0, 2.0, 4.0)
        study.tell(trial, len(o["model.pruned"]) + 1000 * o["train.lr"])  # an objective TPE can model
    assert len(study.trials) == 15 and all(t.state.name == "COMPLETE" for t in study.trials)


def test_random_samples_follow_each_entrys_distribution():
    """400 random draws of digits_tiny's space: each choice about equally often, log ranges uniform in log space."""
    spec = load_search_file(DIGITS, model_depth=model_depth)
    samples = sample_many(spec, n=400)
    counts = Counter(len(o["model.pruned"]) for o in samples)
    assert set(counts) == set(range(7)) and all(30 <= c <= 90 for c in counts.values()), counts  # 57 expected
    on = [o for o in samples if o["model.distill.alpha"] == 0.5]
    assert 160 <= len(on) <= 240 and all(o["model.distill.alpha"] == 0.0 for o in samples if o not in on)
    temperatures = Counter(o["model.distill.temperature"] for o in on)
    assert set(temperatures) == {1.0, 2.0, 4.0} and min(temperatures.values()) >= len(on) / 3 - 25, temperatures
    # log-uniform: half of the draws below the geometric middle (a uniform draw: 1/3 for lr, 1/11 for the init)
    below = sum(o["train.lr"] < 1.0e-3 for o in samples), sum(o["model.ensemble_scale.init"] < 0.1 for o in samples)
    assert all(160 <= b <= 240 for b in below), below
    assert all(5.0e-4 <= o["train.lr"] <= 2.0e-3 and 0.01 <= o["model.ensemble_scale.init"] <= 1.0 for o in samples)


# ----- validation: a table of malformed files, each must name its key and exit 2 ------------------------------
def patched(**sections):
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in BASE.items()}
    for key, value in sections.items():
        section, _, sub = key.partition("__")
        if sub:
            data[section] = {**(data.get(section) or {}), sub.replace("__", "."): value}
        else:
            data[section] = value
    return data


MALFORMED = [
    ("unknown top-level section", patched(serach={"num_samples": 3}), "serach: unknown section"),
    ("unknown train key", patched(train__epoch=3), "train.epoch: unknown key"),
    ("wrong type", patched(train__epochs="ten"), "train.epochs: expected int"),
    ("negative lr", patched(train__lr=-0.1), "train.lr: must be a finite number > 0"),
    ("unknown dataset", patched(data__name="svhn"), "data.name: expected one of"),
    ("missing dataset root", patched(data={"name": "imagefolder", "root": "/nonexistent/x"}), "data.root"),
    ("unknown timm model", patched(model__name="vit_nope_patch1"), "model.name: unknown timm model"),
    ("non-ViT timm model", patched(model__name="resnet18"), "model.name: timm model 'resnet18'"),
    ("unknown metric", patched(search__metric="accuracy"), "search.metric: unknown metric"),
    ("mode mismatch", patched(search__metric=["val_acc", "kept_paths"], search__scheduler="none"), "search.mode"),
    ("bad sampler", patched(search__sampler="annealing"), "search.sampler: expected one of"),
    ("zero samples", patched(search__num_samples=0), "search.num_samples: must be >= 1"),
    (
        "asha with two metrics",
        patched(search__metric=["val_acc", "params"], search__mode=["max", "min"]),
        "search.scheduler",
    ),
    (
        "low > high",
        patched(space={"train.lr": {"low": 0.1, "high": 0.01}}),
        "space.train.lr: low must be at most high, got low 0.1 > high 0.01",
    ),
    (
        "empty choices",
        patched(space={"train.opt": {"choices": []}}),
        "space.train.opt.choices: expected a non-empty list",
    ),
    (
        "unknown space key",
        patched(space={"train.learning_rate": {"low": 0.1, "high": 1.0}}),
        "space.train.learning_rate: no such key",
    ),
    (
        "space value of wrong type",
        patched(space={"train.epochs": {"low": 0.5, "high": 2.5}}),
        "space.train.epochs: value 0.5 is invalid",
    ),
    (
        "space value out of range",
        patched(space={"train.lr": {"low": 0.0, "high": 1.0}}),
        "space.train.lr: value 0.0 is invalid",
    ),
    (
        "every point prunes all",
        patched(space={"model.pruned": {"by": "shortest", "low": 13, "high": 20}}),
        "every point prunes all 13 paths",
    ),
    (
        "k prunes all",
        patched(space={"model.pruned": {"by": "shortest", "low": 0, "high": 13}}),
        "would prune all 13 paths",
    ),
    ("bad mask parametrisation", patched(space={"model.pruned": {"by": "random"}}), "space.model.pruned.by"),
    (
        "log with low 0",
        patched(space={"train.weight_decay": {"low": 0.0, "high": 0.1, "log": True}}),
        "log scale needs low > 0",
    ),
    (
        "nan scale init",
        patched(space={"model.ensemble_scale.init": {"choices": [0.1, ".nan"]}}),
        "space.model.ensemble_scale.init",
    ),
    (
        "unknown distribution field",
        patched(space={"train.lr": {"low": 0.001, "hi": 0.01}}),
        "space.train.lr: unknown field",
    ),
    ("unknown pruned path", patched(model__pruned=["attn.9"]), "'attn.9'"),
    ("nan ensemble scale init", patched(model__ensemble_scale={"init": ".nan"}), "model.ensemble_scale.init"),
    ("tracking typo", patched(tracking={"experimnt": "x"}), "tracking.experimnt: unknown key"),
    ("list choices", patched(space={"model.distill.students": {"choices": [[3], [5]]}}), "entries must be numbers"),
]


@pytest.mark.parametrize("data,needle", [(d, n) for _, d, n in MALFORMED], ids=[m[0] for m in MALFORMED])
def test_malformed_search_file_exits_2_naming_the_key(tmp_path, data, needle, capsys, monkeypatch):
    path = write(tmp_path, data)
    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    code = cli.main(["validate", str(path)])  # the CLI's entry point, in process (the suite stays fast)
    err = capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert lines and all(str(path) in line for line in lines), err
    assert any(needle in line for line in lines), err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written


def test_malformed_file_exit_code_through_the_console_script(tmp_path):
    path = write(tmp_path, patched(train__epochs=0))
    script = Path(sys.executable).parent / "pathsearch"
    result = subprocess.run([str(script), "validate", str(path)], capture_output=True, text=True)
    assert result.returncode == 2
    assert f"{path}: train.epochs: must be >= 1, got 0" in result.stderr


def test_validate_lists_every_problem_at_once(tmp_path):
    data = patched(train__epochs=0, data__batch_size=0, search__metric="acc", space={"train.lr": {"low": 2, "high": 1}})
    with pytest.raises(ConfigError) as info:
        load_search_file(write(tmp_path, data), model_depth=model_depth)
    keys = ["train.epochs", "data.batch_size", "search.metric", "space.train.lr"]
    assert all(any(k in p for p in info.value.problems) for k in keys), info.value.problems


def test_validate_prints_the_resolved_file():
    result = subprocess.run(
        [sys.executable, "-m", "pathsearch.cli", "validate", str(DIGITS), "--set", "search.num_samples=4"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    resolved = yaml.safe_load(result.stdout)
    assert resolved["search"]["num_samples"] == 4 and resolved["train"]["epochs"] == 40
    assert "prune.shortest" in result.stdout


def test_search_on_an_invalid_file_exits_2_and_writes_nothing(tmp_path, capsys, monkeypatch):
    path = write(tmp_path, patched(search__metric="accuracy", train__lr=-1.0))
    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    code = cli.main(["search", str(path), "--storage-path", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert code == 2
    assert "search.metric: unknown metric" in err and "train.lr" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no run folder, no MLflow store


BAD_BASELINE = """\
model:
  name: vit_tiny_patch16_224
  kwargs: {img_size: 8, patch_size: 2, in_chans: 1, embed_dim: 32, depth: 2, num_heads: 2}
  distill: {alpha: 0.5, temperature: 2.0, students: [3]}
data: {name: digits}
train: {epochs: 1, lr: 1.0e-2}
search: {num_samples: 2}
space:
  model.distill.temperature: {choices: [1.0, 4.0]}
  train.lr: {low: 1.0e-4, high: 1.0e-3, log: true}
  model.ensemble_scale.init: {low: 0.01, high: 0.5}
  model.pruned: {by: shortest, low: 1, high: 3}
  train.epochs: {choices: [2, 3], when: {model.distill.alpha: 0.5}}
  train.warmup_epochs: {choices: [0.0, 1.0], when: {model.distill.temperature: 4.0}}
"""


@pytest.mark.parametrize("verb", ["validate", "search"])
def test_a_baseline_outside_its_space_is_refused_before_anything_is_written(tmp_path, monkeypatch, capsys, verb):
    """The baseline is trained first, as a point of the space: a base value that is not one stopped `search` after it
    had made a run folder and an MLflow run, with a message that named nothing ("'2.0' not in (1.0, 4.0).")."""
    from pathsearch.cli import main

    path = tmp_path / "bad.yaml"
    path.write_text(BAD_BASELINE)
    monkeypatch.chdir(tmp_path)
    assert main([verb, str(path)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    expected = {  # key: (the baseline's value, why)
        "model.distill.temperature": ("2.0", "it is not one of the choices [1.0, 4.0]"),
        "train.lr": ("0.01", "it is outside the range 0.0001 to 0.001"),
        "model.ensemble_scale.init": ("1.0", "it is outside the range 0.01 to 0.5"),
        "model.pruned": ("0", "it is outside the range 1 to 3"),
        "train.epochs": ("1", "it is not one of the choices [2, 3]"),  # its condition holds for the base
    }  # train.warmup_epochs: its condition does not hold for the baseline (temperature 2.0), which does not set it
    assert len(lines) == len(expected), lines
    for line, (key, (value, why)) in zip(lines, expected.items(), strict=True):
        assert line.startswith(f"pathsearch {verb}: error: {path}: space.{key}: the baseline ("), line
        assert f"is trained first as a point of the space, but {why}" in line and line.endswith(f"got {value}"), line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]  # no run folder, no MLflow store


def test_a_choice_listed_twice_is_refused():
    problems: list[str] = []
    parse_space({"train.lr": {"choices": [1.0, 4.0, 4.0]}}, 2, "f.yaml", problems)
    assert problems == ["f.yaml: space.train.lr.choices: 4.0 is listed twice (each choice once), got [1.0, 4.0, 4.0]"]
    problems = []
    parse_space({"x.flag": {"choices": [1, True]}}, 2, "f.yaml", problems)  # 1 and True are two choices for Optuna
    assert problems == []


def test_enqueued_points_must_be_parameters_and_points_of_the_space(tmp_path, monkeypatch, capsys):
    from pathsearch.cli import main

    path = tmp_path / "enqueue.yaml"
    path.write_text(
        BAD_BASELINE.replace("temperature: 2.0", "temperature: 1.0").replace("lr: 1.0e-2", "lr: 1.0e-3")
        .replace("{low: 0.01, high: 0.5}", "{low: 0.01, high: 1.0}").replace("low: 1, high: 3", "low: 0, high: 3")
        .replace("{choices: [2, 3]", "{choices: [1, 3]")
        .replace("search: {num_samples: 2}",
                 "search: {num_samples: 2, enqueue: [{prune.shortest: 4, train.lr: 1.0e-3}, {prune.embed: true}]}")
    )  # fmt: skip
    monkeypatch.chdir(tmp_path)
    assert main(["validate", str(path)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [
        f"pathsearch validate: error: {path}: search.enqueue[0].prune.shortest: an enqueued point must be a point of "
        "the space, but it is outside the range 0 to 3, got 4",
        f"pathsearch validate: error: {path}: search.enqueue[1].prune.embed: not a parameter of the space (its "
        "parameters: model.distill.temperature, train.lr, ensemble_scale.init, prune.shortest, train.epochs, "
        "train.warmup_epochs)",
    ], lines


@pytest.mark.parametrize(
    ("raw", "wanted"),
    [
        ({"train.lr": {"low": 0.1, "high": 1.0, "when": {"train.lr": 0.5}}},
         "space.train.lr.when: an entry cannot depend on itself, got {'train.lr': 0.5}"),
        ({"train.lr": {"low": 0.1, "high": 1.0, "when": {"train.epochs": 3}}, "train.epochs": {"choices": [3, 4]}},
         "space.train.lr.when: 'train.epochs' must come before it in the file (conditions read values sampled "
         "earlier), got {'train.epochs': 3}"),
        ({"train.lr": {"low": 0.1, "high": 1.0, "choices": [0.5]}},
         "space.train.lr: give either choices or low/high, not both, got {'low': 0.1, 'high': 1.0, 'choices': [0.5]}"),
        ({"train.lr": {"low": 0.1, "high": 1.0, "log": True, "step": 0.1}},
         "space.train.lr: Optuna does not combine log with step, got log: true, step: 0.1"),
    ],
)  # fmt: skip
def test_every_space_problem_names_file_key_and_value(raw, wanted):
    problems: list[str] = []
    parse_space(raw, 2, "f.yaml", problems)
    assert problems == [f"f.yaml: {wanted}"]
