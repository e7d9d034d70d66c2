"""The `space` section of a search file: what Optuna samples for each trial, define-by-run.

Entries are dotted keys into the base trial config with Optuna's vocabulary (`low`, `high`, `log`, `step`,
`choices`) and an optional condition (`when: {other.key: value}`), plus two path-specific entries:
`model.pruned` (how the path mask is searched) and `model.ensemble_scale.init` (per one / group / path).
Imports no torch, ray or mlflow; the sampling function takes any object with Optuna's `suggest_*` methods.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from pathsearch.config.paths import path_names

MASK_BY = ("path", "layer", "group", "shortest")
SCALE_BY = ("one", "group", "path")
DIST_KEYS = {"low", "high", "log", "step", "choices", "when"}


def parse_number(value: Any) -> int | float | None:
    """A YAML number, or None. PyYAML reads `1e-4` (no dot) as a string, so numeric strings count too."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return value
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


class TrialLike(Protocol):
    """The part of `optuna.Trial` that sampling uses."""

    def suggest_float(
        self, name: str, low: float, high: float, *, step: float | None = ..., log: bool = ...
    ) -> float: ...
    def suggest_int(self, name: str, low: int, high: int, *, step: int = ..., log: bool = ...) -> int: ...
    def suggest_categorical(self, name: str, choices: Any) -> Any: ...


@dataclass
class Dist:
    """One distribution: float/int range (low, high, log, step) or categorical (choices)."""

    low: float | None = None  # the range's lower end (integers with an integer `high`: Optuna's suggest_int)
    high: float | None = None  # the range's upper end, included
    log: bool = False  # sample the range on a log scale (needs low > 0; not with step)
    step: float | None = None  # sample the range on a grid low, low + step, ...
    choices: list[Any] | None = None  # values to choose from: numbers, strings, booleans or null (not with low/high)

    def sample(self, trial: TrialLike, name: str) -> Any:
        if self.choices is not None:
            return trial.suggest_categorical(name, self.choices)
        assert self.low is not None and self.high is not None
        if (
            isinstance(self.low, int)
            and isinstance(self.high, int)
            and (self.step is None or isinstance(self.step, int))
        ):
            return trial.suggest_int(name, self.low, self.high, step=int(self.step or 1), log=self.log)
        return trial.suggest_float(name, float(self.low), float(self.high), step=self.step, log=self.log)

    def excludes(self, value: Any) -> str | None:
        """Why `value` is not a point of this distribution (for an enqueued point such as the baseline), or None."""
        if self.choices is not None:
            if any(value == c and isinstance(value, bool) == isinstance(c, bool) for c in self.choices):
                return None
            return f"it is not one of the choices {self.choices}"
        number = parse_number(value)
        assert self.low is not None and self.high is not None
        if number is None:
            return f"the space samples numbers from {self.low} to {self.high}"
        if not self.low <= number <= self.high:
            return f"it is outside the range {self.low} to {self.high}"
        whole = isinstance(self.low, int) and isinstance(self.high, int) and not isinstance(self.step, float)
        if whole and number != int(number):
            return f"the space samples whole numbers from {self.low} to {self.high}"
        if self.step is not None:
            steps = (number - self.low) / self.step
            if abs(steps - round(steps)) > 1e-9:
                return f"it is not on the grid {self.low}, {self.low + self.step}, ... (step {self.step})"
        return None

    def extremes(self) -> list[Any]:
        """Points that validation probes: both ends of a range, as `sample` gives them (whole ends with a fractional
        step sample floats: 1.0, not 1), or every choice."""
        if self.choices is not None:
            return list(self.choices)
        whole = isinstance(self.low, int) and isinstance(self.high, int) and not isinstance(self.step, float)
        return [self.low, self.high] if whole else [float(self.low or 0), float(self.high or 0)]


@dataclass
class SpaceEntry:
    key: str  # dotted config key: `train.lr`, `model.pruned`, `model.ensemble_scale.init`, ...
    dist: Dist
    by: str | None = None  # how model.pruned or model.ensemble_scale.init is parametrised (their entries only)
    when: dict[str, Any] = field(default_factory=dict)  # sample only when these keys have these values: {key: value}


@dataclass
class SearchSpace:
    entries: list[SpaceEntry]
    depth: int

    @property
    def num_paths(self) -> int:
        return 2 * self.depth + 1

    def param_dists(self) -> dict[str, Dist]:
        """Every Optuna parameter name the space can sample, with its distribution."""
        return {name: entry.dist for entry in self.entries for name in _param_names(entry, self.depth)}

    def param_names(self) -> list[str]:
        """Every Optuna parameter name the space can sample (dotted; also MLflow's param names)."""
        names: list[str] = []
        for entry in self.entries:
            names += _param_names(entry, self.depth)
        return names


def parse_space(raw: Any, depth: int, source: str, problems: list[str]) -> SearchSpace:
    """Parses and checks a `space` section; appends one line per problem (file, key, what is wrong)."""
    entries: list[SpaceEntry] = []
    if raw is None:
        return SearchSpace(entries, depth)
    if not isinstance(raw, Mapping):
        problems.append(f"{source}: space: expected a mapping of dotted keys to distributions, got {raw!r}")
        return SearchSpace(entries, depth)
    for key, spec in raw.items():
        where = f"{source}: space.{key}"
        if not isinstance(spec, Mapping):
            problems.append(f"{where}: expected a mapping with low/high or choices, got {spec!r}")
            continue
        special = key in ("model.pruned", "model.ensemble_scale.init")
        allowed = DIST_KEYS | ({"by"} if special else set())
        unknown = sorted(set(spec) - allowed)
        if unknown:
            problems.append(f"{where}: unknown field(s) {unknown} (known: {', '.join(sorted(allowed))})")
            continue
        when = spec.get("when", {})
        when = {} if when is None else when  # `when:` written empty; 0, "" or [] are mistakes, not "no condition"
        if not isinstance(when, Mapping) or not all(isinstance(k, str) for k in when):
            problems.append(f"{where}.when: expected a mapping of dotted keys to values, got {when!r}")
            continue
        if key == "model.pruned":
            entry = _parse_mask(spec, depth, where, problems)
        else:
            by = spec.get("by", "one") if special else None
            if special and by not in SCALE_BY:
                problems.append(f"{where}.by: expected one of {', '.join(SCALE_BY)}, got {by!r}")
                continue
            dist = _parse_dist(spec, where, problems)
            if dist is None:
                continue
            if special:
                for value in dist.extremes():
                    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                        problems.append(f"{where}: EnsembleScale inits must be finite numbers, got {value!r}")
                        break
            entry = SpaceEntry(key, dist, by=by)
        if entry is not None:
            entry.when = dict(when)
            entries.append(entry)
    order = {e.key: i for i, e in enumerate(entries)}
    for entry in entries:
        for cond in entry.when:
            if cond == entry.key:
                problems.append(
                    f"{source}: space.{entry.key}.when: an entry cannot depend on itself, got {dict(entry.when)!r}"
                )
            elif order.get(cond, -1) > order[entry.key]:
                problems.append(
                    f"{source}: space.{entry.key}.when: {cond!r} must come before it in the file (conditions read "
                    f"values sampled earlier), got {dict(entry.when)!r}"
                )
    return SearchSpace(entries, depth)


def _parse_dist(spec: Mapping[str, Any], where: str, problems: list[str]) -> Dist | None:
    if "choices" in spec:
        choices = spec["choices"]
        if set(spec) & {"low", "high", "log", "step"}:
            problems.append(f"{where}: give either choices or low/high, not both, got {dict(spec)!r}")
            return None
        if not isinstance(choices, list) or not choices:
            problems.append(f"{where}.choices: expected a non-empty list, got {choices!r}")
            return None
        odd = [c for c in choices if c is not None and not isinstance(c, bool | int | float | str)]
        if odd:  # Optuna stores categorical choices as plain scalars only
            problems.append(f"{where}.choices: entries must be numbers, strings, booleans or null, got {odd[0]!r}")
            return None
        seen: list[Any] = []
        for choice in choices:
            if Dist(choices=seen).excludes(choice) is None:
                problems.append(f"{where}.choices: {choice!r} is listed twice (each choice once), got {choices!r}")
                return None
            seen.append(choice)
        return Dist(choices=list(choices))
    if "low" not in spec or "high" not in spec:
        problems.append(f"{where}: expected low and high (or choices), got {dict(spec)!r}")
        return None
    low, high = parse_number(spec["low"]), parse_number(spec["high"])
    log, step = spec.get("log", False), spec.get("step")
    bad = False
    for name, value in (("low", low), ("high", high)):
        if value is None or not math.isfinite(value):  # Optuna samples between finite ends only
            problems.append(f"{where}.{name}: expected a finite number, got {spec[name]!r}")
            bad = True
    if not isinstance(log, bool):
        problems.append(f"{where}.log: expected true or false, got {log!r}")
        bad = True
    if step is not None and not 0 < (parse_number(step) or 0) < math.inf:  # not nan either
        problems.append(f"{where}.step: expected a finite number > 0, got {step!r}")
        bad = True
    if bad:
        return None
    assert low is not None and high is not None
    if low > high:
        problems.append(f"{where}: low must be at most high, got low {low!r} > high {high!r}")
        return None
    if log and low <= 0:
        problems.append(f"{where}: log scale needs low > 0, got {low}")
        return None
    if log and step is not None:
        problems.append(f"{where}: Optuna does not combine log with step, got log: true, step: {step!r}")
        return None
    return Dist(low=low, high=high, log=log, step=parse_number(step) if step is not None else None)


def _parse_mask(spec: Mapping[str, Any], depth: int, where: str, problems: list[str]) -> SpaceEntry | None:
    by = spec.get("by")
    if by not in MASK_BY:
        problems.append(f"{where}.by: expected one of {', '.join(MASK_BY)}, got {by!r}")
        return None
    num_paths = 2 * depth + 1
    if by != "shortest":
        if set(spec) - {"by", "when"}:
            problems.append(f"{where}: by: {by} takes no distribution fields (each flag is keep/prune)")
            return None
        return SpaceEntry("model.pruned", Dist(choices=[False, True]), by=by)
    dist = _parse_dist({k: v for k, v in spec.items() if k not in ("by", "when")}, where, problems)
    if dist is None:
        return None
    if dist.step is not None and not isinstance(dist.step, int):
        problems.append(f"{where}.step: k counts paths, so the step must be a whole number, got {spec['step']!r}")
        return None
    values = dist.extremes()
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        problems.append(f"{where}: prune-the-k-shortest needs integer k, got {values}")
        return None
    if min(values) < 0:
        problems.append(f"{where}: k must be >= 0, got {min(values)}")
        return None
    if min(values) >= num_paths:
        problems.append(f"{where}: every point prunes all {num_paths} paths (k >= {num_paths}), got {min(values)!r}")
        return None
    if max(values) >= num_paths:
        problems.append(
            f"{where}: k up to {max(values)} would prune all {num_paths} paths; use k <= {num_paths - 1}, got high "
            f"{max(values)!r}"
        )
        return None
    return SpaceEntry("model.pruned", dist, by=by)


def _mask_flags(by: str, depth: int) -> list[tuple[str, list[int]]]:
    """(Optuna parameter name, path indices it prunes) for flag-style mask parametrisations."""
    if by == "path":
        return [(f"prune.{name}", [i]) for i, name in enumerate(path_names(depth))]
    if by == "layer":
        return [("prune.embed", [0])] + [
            (f"prune.layer.{layer}", [2 * layer - 1, 2 * layer]) for layer in range(1, depth + 1)
        ]
    return [
        ("prune.embed", [0]),
        ("prune.attn", [2 * layer - 1 for layer in range(1, depth + 1)]),
        ("prune.mlp", [2 * layer for layer in range(1, depth + 1)]),
    ]


def _scale_groups(by: str, depth: int) -> list[tuple[str, str]]:
    """(Optuna parameter name, path selector) for EnsembleScale-init parametrisations."""
    if by == "one":
        return [("ensemble_scale.init", "all")]
    if by == "group":
        return [(f"ensemble_scale.init.{g}", g) for g in ("embed", "attn", "mlp")]
    return [(f"ensemble_scale.init.{name}", name) for name in path_names(depth)]


def _param_names(entry: SpaceEntry, depth: int) -> list[str]:
    if entry.key == "model.pruned":
        return ["prune.shortest"] if entry.by == "shortest" else [n for n, _ in _mask_flags(entry.by or "path", depth)]
    if entry.key == "model.ensemble_scale.init":
        return [n for n, _ in _scale_groups(entry.by or "one", depth)]
    return [entry.key]


def sample_overrides(trial: TrialLike, space: SearchSpace, base: Mapping[str, Any]) -> dict[str, Any]:
    """Samples one configuration (define-by-run): returns {dotted config key: value} overrides.

    `base` is the plain-dict base config; `when` conditions read sampled values first, then the base.
    """
    chosen: dict[str, Any] = {}
    for entry in space.entries:
        if not all(lookup_value(chosen, base, key) == value for key, value in entry.when.items()):
            continue
        if entry.key == "model.pruned":
            chosen[entry.key] = _sample_mask(trial, entry, space.depth)
        elif entry.key == "model.ensemble_scale.init":
            init = {
                selector: entry.dist.sample(trial, name)
                for name, selector in _scale_groups(entry.by or "one", space.depth)
            }
            chosen[entry.key] = init.get("all", init)
        else:
            chosen[entry.key] = entry.dist.sample(trial, entry.key)
    return chosen


def _sample_mask(trial: TrialLike, entry: SpaceEntry, depth: int) -> list[str]:
    names = path_names(depth)
    if entry.by == "shortest":
        k = entry.dist.sample(trial, "prune.shortest")
        return names[:k]
    pruned: set[int] = set()
    for name, indices in _mask_flags(entry.by or "path", depth):
        if trial.suggest_categorical(name, [False, True]):
            pruned.update(indices)
    return [names[i] for i in sorted(pruned)]


def lookup_value(chosen: Mapping[str, Any], base: Mapping[str, Any], key: str) -> Any:
    """A sampled value by key, else the base config's value at that dotted key (None when absent)."""
    if key in chosen:
        return chosen[key]
    node: Any = base
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node
