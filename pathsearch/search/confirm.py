"""The confirmation stage: a search's best configurations and the baseline trained again on paired seeds.

After a search, the `top_k` distinct configurations with the best val score, plus the baseline, are trained again
as ordinary Ray trials (parallel, retried, resumable) on the same fresh seeds: seed s gives every configuration the
same initialisation, data order and augmentation draws. Only these trials read the test split. The winner is the
best mean val score over seeds (never test); the verdict is the winner's paired difference from the baseline in
test accuracy with a 95% confidence interval from the paired t distribution over seeds (verdict.py computes it).
Orchestration: imports no torch, timm or model code.
"""

from __future__ import annotations

import json
import math
import statistics
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import yaml
from ray import tune

from pathsearch.config import SearchFile
from pathsearch.search.results import SearchResult
from pathsearch.search.run import SearchRun, checkpoint_of, trial_limits
from pathsearch.search.runner import RoundLine
from pathsearch.search.sequential import (
    BEATS,
    IDENTICAL,
    NO_GAIN,
    WORSE,
    Decision,
    Design,
    assess,
    seeds_to_decide,
)
from pathsearch.search.verdict import (
    BASELINE,
    METHOD,
    Confirmation,
    make_verdict,
    mean_std,
    method_of,
    paired_difference,
    plot_confirmation,
    plot_rounds,
    pts,
    seeds_text,
    sequential_verdict,
)
from pathsearch.tracking.runs import NOTE_TAG, PARENT_TAG, ROLE_TAG, RunLog
from pathsearch.tracking.tags import VERDICT_TAG, WINNER_TAG

CONFIRM_DIR = "confirm"  # the confirmation's Tune experiment, inside the search's run directory
PLAN_FILE = "confirm_plan.json"  # candidates, seeds and MLflow runs: what `resume` needs to continue
DESIGN_FILE = "confirmation_design.json"  # on the parent run: a sequential confirmation's design and boundaries
SUMMARY_FILE = "confirmation.yaml"
PLOT_FILE = "confirmation.png"
ROUNDS_PLOT_FILE = "confirmation_rounds.png"  # a sequential confirmation's intervals, round by round


@dataclass
class Candidate:
    """One configuration to confirm: its overrides of the base trial and where it came from."""

    label: str  # "baseline", "top 1", "top 2", ...
    overrides: dict[str, Any]
    search_value: float | None = None  # its single-seed score in the search (a proxy score in two_stage)
    source: str = ""  # e.g. "search trial 3b2c1_00004"
    run_id: str | None = None  # its MLflow run (one per configuration), created with the plan


@dataclass
class Plan:
    """The confirmation as far as it is decided: its configurations, its rounds of paired seeds (one, unless it is
    sequential) and the results of the rounds that finished. Saved before each round starts and after it ends:
    `resume` continues from it."""

    metric: str  # the val metric the winner is chosen by
    mode: str
    seeds: list[int]  # every seed planned so far (the rounds' seeds, in order)
    candidates: list[Candidate]
    search_metric: str  # what `search_value` measured (val_acc, or proxy_val_acc in a two-stage search)
    design: dict[str, Any] | None = None  # a sequential confirmation's Design (search.sequential); None: fixed
    rounds: list[dict[str, Any]] = field(default_factory=list)  # {"seeds", "labels", "done"} each
    results: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)  # label -> seed -> finished values
    looks: list[dict[str, dict[str, Any]]] = field(default_factory=list)  # per finished round: label -> Decision

    def save(self, path: Path) -> None:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=1))
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> Plan:
        data = json.loads(path.read_text())
        data["candidates"] = [Candidate(**c) for c in data["candidates"]]
        plan = cls(**data)
        if not plan.rounds:  # a plan saved before rounds existed: one round of every seed and configuration
            plan.rounds = [{"seeds": plan.seeds, "labels": [c.label for c in plan.candidates], "done": False}]
        return plan

    def sequential(self) -> Design | None:
        return Design(**self.design) if self.design is not None else None

    def per_seed(self) -> dict[str, dict[int, dict[str, Any]]]:
        """Finished trials' values by configuration and seed (JSON keeps the seeds as strings)."""
        return {c.label: {int(s): v for s, v in self.results.get(c.label, {}).items()} for c in self.candidates}


# ----- which configurations, on which seeds -------------------------------------------------------------------
def selection_metric(spec: SearchFile) -> tuple[str, str]:
    """The val metric that ranks candidates and picks the winner: the search's first metric when it is a val
    metric, else val_acc (a cost metric such as kept_paths says nothing about which configuration is better)."""
    metric, mode = spec.search.metrics[0], spec.search.modes[0]
    return (metric, mode) if metric in ("val_acc", "val_loss") else ("val_acc", "max")


def confirm_seeds(spec: SearchFile) -> list[int]:
    """Fresh seeds: by default the ones after those the search's trials trained with."""
    c, t = spec.search.confirm, spec.trial.train
    first = c.first_seed if c.first_seed is not None else t.seed + t.seeds
    return [first + i for i in range(c.seeds)]


def baseline_overrides(spec: SearchFile) -> dict[str, Any]:
    """The baseline: no path pruned and EnsembleScale init 1.0 where the space searches them, all else the base."""
    keys = {entry.key for entry in spec.space.entries}
    neutral = {"model.pruned": [], "model.ensemble_scale.init": 1.0}
    return {k: v for k, v in neutral.items() if k in keys}


def config_key(overrides: Mapping[str, Any], base: Mapping[str, Any], keys: Sequence[str]) -> str:
    """Identity of a configuration: the effective value of every key any candidate sets (a sampled value equal to
    the base's is the same configuration as not setting it)."""
    from pathsearch.config.space import lookup_value

    return json.dumps({k: lookup_value(overrides, base, k) for k in sorted(keys)}, sort_keys=True, default=str)


def choose_candidates(
    rows: Sequence[Mapping[str, Any]],
    spec: SearchFile,
    base: Mapping[str, Any],
    value_key: str,
    mode: str,
    top_k: int,
    baseline_row: Mapping[str, Any] | None = None,
) -> list[Candidate]:
    """The baseline plus the `top_k` distinct configurations of `rows` (each with `overrides` and `value_key`),
    best first. `rows` are completed search trials (or scored proxy configurations): never test scores."""
    baseline = baseline_overrides(spec)
    keys = sorted({k for row in rows for k in row["overrides"]} | set(baseline))
    taken = {config_key(baseline, base, keys)}
    scored = [r for r in rows if isinstance(r.get(value_key), int | float) and math.isfinite(r[value_key])]
    scored.sort(key=lambda r: r[value_key], reverse=mode == "max")
    value = baseline_row.get(value_key) if baseline_row is not None else None
    out = [Candidate(BASELINE, baseline, value, _source(baseline_row) if baseline_row else "the base configuration")]
    for row in scored:
        key = config_key(row["overrides"], base, keys)
        if key in taken:
            continue
        taken.add(key)
        out.append(Candidate(f"top {len(out)}", dict(row["overrides"]), float(row[value_key]), _source(row)))
        if len(out) > top_k:
            break
    return out


def _source(row: Mapping[str, Any]) -> str:
    if row.get("trial_id") is not None:
        return f"search trial {row['trial_id']}"
    if row.get("number") is not None:
        return f"proxy trial {row['number']}"
    return "search"


def describe(overrides: Mapping[str, Any], base: Mapping[str, Any] | None = None) -> str:
    """A configuration in plain words, e.g. 'prune embed, attn.1, mlp.1; EnsembleScale init 0.1; lr 0.0012';
    with `base`, only what differs from it."""
    from pathsearch.config.space import lookup_value

    parts = []
    for key, value in overrides.items():
        if base is not None and lookup_value({}, base, key) == value:
            continue
        if key == "model.pruned":
            if value:
                parts.append("prune " + ", ".join(value))
            else:
                parts.append("no path pruned")
        elif key == "model.ensemble_scale.init":
            init = value if not isinstance(value, Mapping) else ", ".join(f"{k} {_num(v)}" for k, v in value.items())
            parts.append(f"EnsembleScale init {_num(init) if not isinstance(value, Mapping) else init}")
        else:
            parts.append(f"{key.split('.')[-1]} {_num(value)}")
    return "; ".join(parts) or "as the base configuration"


def plain_words(candidate: Candidate, base: Mapping[str, Any] | None) -> str:
    """The baseline in full (what 'baseline' means here), any other configuration by what differs from the base."""
    return describe(candidate.overrides, None if candidate.label == BASELINE else base)


def _num(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def param_space(plan: Plan, round_: int = 0) -> dict[str, Any]:
    """One trial per (seed, configuration) of a round, seed-major, each with the trial overrides below."""
    table = {c.label: c.overrides for c in plan.candidates}
    this = plan.rounds[round_]
    return {
        "seed": tune.grid_search(list(this["seeds"])),
        "candidate": tune.grid_search(list(this["labels"])),
        "overrides": tune.sample_from(partial(trial_overrides, table=table)),
        "optuna_trial": "confirm",
    }


def trial_overrides(config: dict[str, Any], table: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """A confirmation trial's overrides: its configuration, one seed, and the test split evaluated at the end.
    (Module level: Tune pickles it with the experiment state.)"""
    return {**table[config["candidate"]], "train.seed": config["seed"], "train.seeds": 1, "train.test": True}


# ----- running it as ordinary Ray trials ---------------------------------------------------------------------
def make_plan(spec: SearchFile, run: SearchRun, candidates: list[Candidate], search_metric: str) -> Plan:
    """Saves the plan and creates one MLflow run per configuration (nested under the search's parent run); its
    seeds' runs nest under it. Written before any confirmation trial starts, so `resume` finds both."""
    metric, mode = selection_metric(spec)
    plan = Plan(metric, mode, confirm_seeds(spec), candidates, search_metric)
    plan.rounds = [{"seeds": list(plan.seeds), "labels": [c.label for c in candidates], "done": False}]
    conf = spec.search.confirm
    if conf.max_seeds is not None:
        challengers = max(1, len(candidates) - 1)
        design = Design.exact(conf.seeds, conf.step, conf.max_seeds, conf.min_effect, conf.alpha, challengers)
        plan.design = asdict(design)
    new = [c for c in plan.candidates if c.run_id is None]
    logs = [
        RunLog(
            name=f"confirm {c.label}",
            tags={ROLE_TAG: "confirmation", "pathsearch.candidate": c.label, NOTE_TAG: plain_words(c, spec.base)},
            params={
                **{f"config.{k}": v for k, v in sorted(c.overrides.items())},
                "source": c.source,
                "seeds": plan.seeds,
            },
        )
        for c in new
    ]
    if plan.design is not None:  # the boundaries every round will be judged by, on the parent from the start
        text = json.dumps(plan.design, indent=1)
        logs.append(RunLog(run.parent_run_id, texts={DESIGN_FILE: text}))
    ids = run.log(logs, "creating the confirmation runs")
    if ids is None:
        raise ValueError(
            f"MLflow at {run.state['tracking_uri']} stayed unreachable: the confirmation did not start (resume it "
            "later)"
        )
    for c, run_id in zip(new, ids[: len(new)], strict=True):  # (the design's record, if any, comes after them)
        c.run_id = run_id
    plan.save(run.path(PLAN_FILE))
    run.save(PLAN_FILE)  # a run kept in an object store: what `resume` needs, there now
    return plan


def round_dir(round_: int) -> str:
    """A round's Tune experiment inside the run directory: `confirm` for the first, `confirm-round2`, ... after."""
    return CONFIRM_DIR if round_ == 0 else f"{CONFIRM_DIR}-round{round_ + 1}"


def run_round(run: SearchRun, plan: Plan, trainable: Any, verbose: bool, round_: int) -> Any:
    """One round as a Tune stage: one trial per (seed, configuration), seed-major; FIFO, retried from checkpoints
    like search trials; restored from Tune's snapshot when an interrupted driver left one."""
    s, t = run.spec.search, run.spec.trial.train
    groups = {
        c.label: {PARENT_TAG: str(c.run_id), ROLE_TAG: "confirmation_seed", "pathsearch.candidate": c.label}
        for c in plan.candidates
    }
    this = plan.rounds[round_]
    total = len(this["seeds"]) * len(this["labels"])
    label = "confirmation" if plan.design is None else f"round {round_ + 1}"
    covered = f"{len(this['labels'])} configurations x seeds {seeds_text(this['seeds']).strip('()')}"
    after = sum(len(r["seeds"]) for r in plan.rounds[: round_ + 1])  # paired seeds of the open ones after it
    planned = plan.sequential()
    budget = f" of at most {planned.looks()[-1]}" if planned is not None else ""
    decided = sum(d["state"] is not None for looked in plan.looks for d in looked.values())
    status = f"{after}{budget} seeds after it; {decided} of {len(plan.candidates) - 1} challengers decided before it"
    line = RoundLine(total, t.epochs, verbose, label, covered, status)
    return run.stage(
        round_dir(round_),
        trainable,
        epochs=t.epochs,
        param_space=param_space(plan, round_),
        tune_config=tune.TuneConfig(
            **trial_limits(run.spec, s.confirm.max_concurrent_trials or s.max_concurrent_trials)
        ),
        callbacks=[line],
        groups=groups,
    )


def confirm_search(
    run: SearchRun,
    result: SearchResult,
    trainable: Any = None,
    verbose: bool = True,
    candidates: list[Any] | None = None,
    search_metric: str = "val_acc",
    on_confirmed: Any = None,
) -> SearchResult:
    """The confirmation stage after a finished search (full or two_stage): plans it from the search's completed
    trials (or the given candidates), or continues the plan a `resume` found, then ends the search.
    `on_confirmed(confirmation) -> files` runs before the search ends (two_stage logs its ranking quality there)."""
    spec = run.spec
    if run.has(PLAN_FILE):
        plan = Plan.load(run.path(PLAN_FILE))
        run.reopen_runs([c.run_id for c in plan.candidates if c.run_id is not None], "reopening the confirmation runs")
    else:
        if candidates is None:
            metric, mode = selection_metric(spec)
            candidates = choose_candidates(
                result.rows, spec, spec.base, metric, mode, spec.search.confirm.top_k, result.baseline
            )
            search_metric = metric
        plan = make_plan(spec, run, candidates, search_metric)
    confirmation = run_confirmation(run, plan, trainable, verbose)
    if not confirmation.interrupted:
        if on_confirmed is not None:
            confirmation.files.update(on_confirmed(confirmation))
        run.finish()
    result.confirmation = confirmation
    result.interrupted = confirmation.interrupted
    result.files.update(confirmation.files)
    return result


def run_confirmation(run: SearchRun, plan: Plan, trainable: Any = None, verbose: bool = True) -> Confirmation:
    """Trains the plan's rounds to the end (a sequential confirmation adds rounds until every challenger is decided
    or the budget is spent), then picks the winner, measures it against the baseline and logs the verdict (MLflow
    parent and configuration runs, `confirmation.yaml`, `confirmation.png`). An interrupted confirmation (Ctrl-C)
    returns `interrupted=True`, its unfinished runs closed KILLED until `resume`."""
    spec = run.spec
    design = plan.sequential()
    if verbose:
        _say_plan(plan, design)
    while not all(r["done"] for r in plan.rounds):
        k = next(i for i, r in enumerate(plan.rounds) if not r["done"])
        grid = run_round(run, plan, trainable, verbose, k)
        if run.stopped:  # Tune returned early on SIGINT: its snapshot keeps the unfinished trials for `resume`
            return Confirmation(plan.metric, plan.mode, plan.seeds, [], None, {}, "", interrupted=True)
        for label, seeds in _collect(grid, plan.rounds[k], spec.trial.train.epochs).items():
            plan.results.setdefault(label, {}).update({str(seed): values for seed, values in seeds.items()})
        plan.rounds[k]["done"] = True
        if design is not None:
            looked = look(plan, design, k)
            plan.looks.append({label: asdict(d) for label, d in looked.items()})
            _log_round(plan, design, k, looked, run, verbose)
            following = next_round(plan, design, k, looked)
            if following is not None:
                plan.rounds.append(following)
                plan.seeds = sorted({*plan.seeds, *following["seeds"]})
        plan.save(run.path(PLAN_FILE))  # the round's results and the next round: what `resume` continues from
        run.save(PLAN_FILE)
    per = plan.per_seed()
    confirmation = summarise(plan, per, spec.base) if design is None else summarise_sequential(plan, per, spec.base)
    confirmation.files = _write_files(confirmation, plan, per, run)
    confirmation.search_metric = plan.search_metric
    _log(confirmation, plan, per, run)
    return confirmation


def _say_plan(plan: Plan, design: Design | None) -> None:
    others = len(plan.candidates) - 1
    head = f"confirmation: {len(plan.candidates)} configurations (the baseline and the top {others} by {plan.metric})"
    if design is None:
        print(f"{head} x {len(plan.seeds)} paired seeds {seeds_text(plan.seeds)}", flush=True)
        return
    rule = f"alpha {design.alpha:g} over every round and challenger"
    if design.rule == "exact" and design.split is not None:
        split = design.split
        rule = (
            f"bars computed for this design: a wrong 'beats' at most {split['beats']:g}, a wrong 'worse' at most "
            f"{split['worse']:g}, {split['reserve']:g} kept for one extension"
        )
    print(
        f"{head}, sequential: {design.seeds} paired seeds, then {design.step} more per round for the baseline and "
        f"the undecided, up to {design.max_seeds}; decided when it beats the baseline, is worse, or gains less than "
        f"min_effect {pts(design.min_effect, 2)} points ({rule})",
        flush=True,
    )


def _collect(grid: Any, this: Mapping[str, Any], final_epoch: int) -> dict[str, dict[int, dict[str, Any]]]:
    """A finished round's trials: label -> seed -> values and checkpoint."""
    finished: dict[str, dict[int, dict[str, Any]]] = {label: {} for label in this["labels"]}
    for result in grid:
        m, config = result.metrics or {}, result.config or {}
        label, seed = config.get("candidate"), config.get("seed")
        if label not in finished or not isinstance(seed, int):
            continue
        if result.error is None and m.get("epoch") == final_epoch:
            values = {k: float(m[k]) for k in ("val_acc", "val_loss", "test_acc", "test_loss") if k in m}
            finished[label][seed] = {**values, "trial_id": m.get("trial_id"), "checkpoint": checkpoint_of(result)}
    return finished


# ----- a sequential confirmation's rounds ------------------------------------------------------------------------
def look(plan: Plan, design: Design, round_: int) -> dict[str, Decision]:
    """Each challenger of round `round_` judged on every paired seed it and the baseline finished so far."""
    per = plan.per_seed()
    base = per[BASELINE]
    out = {}
    for label in plan.rounds[round_]["labels"]:
        if label == BASELINE:
            continue
        seeds = [s for s in plan.seeds if s in per[label] and s in base]
        diffs = [per[label][s]["test_acc"] - base[s]["test_acc"] for s in seeds]
        # the same trained model, not a tie: every value it reported equal (losses are not equal by chance)
        same = all(per[label][s].get(k) == base[s].get(k) for s in seeds for k in ("test_loss", "val_loss", "val_acc"))
        out[label] = assess(diffs, design, round_, identical=same)
    return out


def next_round(plan: Plan, design: Design, round_: int, looked: Mapping[str, Decision]) -> dict[str, Any] | None:
    """The baseline and the challengers still undecided, on the next look's new seeds; None when none is left or
    the budget is spent."""
    undecided = [label for label, d in looked.items() if not d.decided]
    looks = design.looks()
    if not undecided or round_ + 1 >= len(looks):
        return None
    first = max(plan.seeds) + 1
    seeds = list(range(first, first + looks[round_ + 1] - looks[round_]))
    return {"seeds": seeds, "labels": [BASELINE, *undecided], "done": False}


def extend_plan(run: SearchRun, max_seeds: int) -> None:
    """Adds rounds, up to `max_seeds` paired seeds, for the challengers a finished sequential confirmation left
    undecided (Design.extend: the reserve of alpha pays for them, so the whole confirmation keeps its error at
    alpha); `resume` then trains them. ValueError (nothing written) when there is nothing it may extend."""
    where = f"{run.uri}: --max-seeds {max_seeds}"
    if not run.has(PLAN_FILE):
        raise ValueError(f"{where}: the search has no confirmation to extend")
    plan = Plan.load(run.path(PLAN_FILE))
    design = plan.sequential()
    if design is None:
        raise ValueError(f"{where}: its confirmation is not sequential (search.confirm.max_seeds is not set)")
    if not all(r["done"] for r in plan.rounds) or not plan.looks:
        raise ValueError(f"{where}: the confirmation has not finished: resume it first, then extend what it leaves")
    undecided = [label for label, d in plan.looks[-1].items() if d["state"] is None]
    if not undecided:
        raise ValueError(f"{where}: every challenger was decided: there is nothing to extend")
    try:
        grown = design.extend(max_seeds)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None
    looks = grown.looks()
    k = len(plan.rounds)
    first = max(plan.seeds) + 1
    seeds = list(range(first, first + looks[k] - looks[k - 1]))
    plan.design = asdict(grown)
    plan.rounds.append({"seeds": seeds, "labels": [BASELINE, *undecided], "done": False})
    plan.seeds = sorted({*plan.seeds, *seeds})
    plan.save(run.path(PLAN_FILE))
    run.save(PLAN_FILE)


def check_plan(run: SearchRun) -> None:
    """ValueError when the search file's sequential confirmation differs from the one its plan was made with (a
    changed design would judge the rounds by boundaries computed for another): extend with `--max-seeds`
    instead of changing max_seeds."""
    saved = json.loads(run.path(PLAN_FILE).read_text()).get("design") if run.has(PLAN_FILE) else None
    c = run.spec.search.confirm
    if saved is None or c.max_seeds is None:
        return
    design = Design(**saved)
    planned = {"seeds": design.seeds, "step": design.step, "alpha": design.alpha, "min_effect": design.min_effect}
    planned["max_seeds"] = design.extended_from if design.extended_from is not None else design.max_seeds
    changed = [f"{key} {getattr(c, key)!r} (planned {value!r})" for key, value in planned.items()
               if getattr(c, key) != value]  # fmt: skip
    if changed:
        raise ValueError(
            f"{run.uri}: search.confirm changed since its confirmation was planned: {', '.join(changed)}; put it "
            "back (more seeds for an undecided confirmation: `pathsearch resume RUN --max-seeds N`)"
        )


def _log_round(
    plan: Plan, design: Design, round_: int, looked: Mapping[str, Decision], run: SearchRun, verbose: bool
) -> None:
    """One console line per round, and each challenger's interval on its configuration run at step = round."""
    run_of = {c.label: c.run_id for c in plan.candidates}
    logs = [
        RunLog(
            run_of[label],
            metrics={"seq_diff_mean": d.mean, "seq_ci_low": d.low, "seq_ci_high": d.high, "seq_seeds": d.n},
            step=round_ + 1,
        )
        for label, d in looked.items()
    ]
    run.log(logs, f"logging round {round_ + 1} of the confirmation")
    if verbose:
        parts = [f"{label} {_interval_text(d)} {_state_text(d.state)}" for label, d in looked.items()]
        print(f"round {round_ + 1}: {'; '.join(parts)}{_bars_text(design, round_)}", flush=True)


def _bars_text(design: Design, look: int) -> str:
    """The bars of an exact design at one look, in plain words: an early look needs a larger effect."""
    if design.rule != "exact":
        return ""
    beats = design.beats[look]
    if not math.isfinite(beats):
        return " (at this look nothing can beat the baseline yet: almost all of alpha is kept for later looks)"
    later = "later looks ask less" if look + 1 < len(design.looks()) else "the last look of this design"
    return (
        f" (at this look a challenger beats the baseline when its mean gain exceeds {beats:.2f} standard errors, and "
        f"is worse below -{design.worse[look]:.2f}; {later})"
    )


def _interval_text(d: Decision) -> str:
    if not math.isfinite(d.low):
        return f"{pts(d.mean)} (no interval yet, {d.n} seeds)"
    return f"{pts(d.mean)} ({pts(d.low)} to {pts(d.high)}, {d.n} seeds)"


def _state_text(state: str | None) -> str:
    stops = {BEATS: "beats the baseline", WORSE: "worse: stops", NO_GAIN: "no gain worth having: stops"}
    stops[IDENTICAL] = "identical to the baseline on every seed: stops"
    return stops.get(str(state), "undecided")


# ----- statistics and the verdict ----------------------------------------------------------------------------


def summarise(
    plan: Plan, per: Mapping[str, Mapping[int, Mapping[str, Any]]], base: Mapping[str, Any] | None = None
) -> Confirmation:
    """Means and spreads per configuration, the winner (best mean val over the seeds every candidate finished),
    and the verdict: the winner's (or, when the baseline wins, the best challenger's) paired test difference."""
    complete = [s for s in plan.seeds if all(s in per[c.label] for c in plan.candidates)]
    rows = [_row(plan, c, per[c.label], complete, base) for c in plan.candidates]
    key = f"{plan.metric}_mean"
    ranked = [r for r in rows if math.isfinite(r[key])]
    ranked.sort(key=lambda r: r[key], reverse=plan.mode == "max")
    for rank, row in enumerate(ranked, start=1):
        row["rank"] = rank
    winner = ranked[0]["label"] if ranked else None
    base = next(r for r in rows if r["label"] == BASELINE)
    challenger = winner if winner != BASELINE else next((r["label"] for r in ranked if r["label"] != BASELINE), None)
    difference: dict[str, Any] = {}
    if challenger is not None and complete:
        other = next(r for r in rows if r["label"] == challenger)
        a = [per[challenger][s]["test_acc"] for s in complete]
        b = [per[BASELINE][s]["test_acc"] for s in complete]
        difference = {"of": challenger, "metric": "test_acc", "method": METHOD, **paired_difference(a, b)}
        difference["val"] = paired_difference(
            [per[challenger][s]["val_acc"] for s in complete], [per[BASELINE][s]["val_acc"] for s in complete]
        )
        difference["description"] = other["description"]
    verdict = make_verdict(winner, difference, len(plan.seeds), len(complete), base)
    return Confirmation(plan.metric, plan.mode, complete, rows, winner, difference, verdict)


def summarise_sequential(
    plan: Plan, per: Mapping[str, Mapping[int, Mapping[str, Any]]], base: Mapping[str, Any] | None = None
) -> Confirmation:
    """A sequential confirmation's means and spreads (each configuration over the seeds it trained: a decided
    challenger stopped early), the winner (the best paired val difference from the baseline over each challenger's
    own seeds; test plays no part) and the verdict from each challenger's last look."""
    design = plan.sequential()
    assert design is not None
    baseline = per[BASELINE]
    sign = 1.0 if plan.mode == "max" else -1.0
    rows = []
    for c in plan.candidates:
        seeds = per[c.label]
        own = [s for s in plan.seeds if s in seeds]
        row = _row(plan, c, seeds, own, base)
        paired = [s for s in own if s in baseline and plan.metric in seeds[s] and plan.metric in baseline[s]]
        gain = [sign * (seeds[s][plan.metric] - baseline[s][plan.metric]) for s in paired]
        row[f"{plan.metric}_paired_gain"] = statistics.fmean(gain) if gain else math.nan
        rows.append(row)
    key = f"{plan.metric}_paired_gain"
    ranked = sorted((r for r in rows if math.isfinite(r[key])), key=lambda r: r[key], reverse=True)
    for rank, row in enumerate(ranked, start=1):
        row["rank"] = rank
    winner = ranked[0]["label"] if ranked else None
    challenger = winner if winner != BASELINE else next((r["label"] for r in ranked if r["label"] != BASELINE), None)
    last: dict[str, dict[str, Any]] = {}
    for round_ in plan.looks:  # each challenger's last look: the one that decided it, or the final round
        last.update({label: dict(d) for label, d in round_.items()})
    for d in last.values():
        if d["state"] is None:
            d["to_decide"] = seeds_to_decide(Decision.of(d), design)
    descriptions = {r["label"]: r["description"] for r in rows}
    difference: dict[str, Any] = {}
    if challenger is not None and challenger in last:
        d = last[challenger]
        shared = [s for s in plan.seeds if s in per[challenger] and s in baseline]
        wins = sum(per[challenger][s]["test_acc"] > baseline[s]["test_acc"] for s in shared)
        difference = {
            "of": challenger,
            "metric": "test_acc",
            "method": method_of(asdict(design)),
            "mean": d["mean"],
            "ci_low": d["low"],
            "ci_high": d["high"],
            "p_value": math.nan,
            "n": d["n"],
            "wins": wins,
            "state": d["state"],
            "level": d["level"],
            "min_effect": design.min_effect,
            "to_decide": d.get("to_decide"),
            "description": descriptions[challenger],
        }
    verdict = sequential_verdict(winner, challenger, last, descriptions, asdict(design), len(baseline), len(plan.looks))
    return Confirmation(
        plan.metric,
        plan.mode,
        sorted(baseline),
        rows,
        winner,
        difference,
        verdict,
        design=asdict(design),
        rounds=[{label: dict(d) for label, d in round_.items()} for round_ in plan.looks],
    )


def _row(
    plan: Plan, c: Candidate, seeds: Mapping[int, Mapping[str, Any]], counted: Sequence[int], base: Any
) -> dict[str, Any]:
    """One configuration's line of the summary: what it is, its per-seed values, means and spreads over `counted`."""
    row: dict[str, Any] = {
        "label": c.label,
        "description": plain_words(c, base),
        "overrides": c.overrides,
        "source": c.source,
        "run_id": c.run_id,
        f"search_{plan.search_metric}": c.search_value,
        "seeds_finished": sorted(seeds),
        "per_seed": {int(s): {k: v for k, v in seeds[s].items() if k != "checkpoint"} for s in sorted(seeds)},
    }
    for key in ("val_acc", "val_loss", "test_acc", "test_loss"):
        values = [seeds[s][key] for s in counted if key in seeds[s]]
        row[f"{key}_mean"], row[f"{key}_std"] = mean_std(values)
    return row


# ----- files and MLflow ----------------------------------------------------------------------------------------
def _write_files(
    c: Confirmation, plan: Plan, per: Mapping[str, Mapping[int, Mapping[str, Any]]], run: SearchRun
) -> dict[str, Path]:
    run_dir = run.folder
    files = {"confirmation": run_dir / SUMMARY_FILE}
    selected = f"mean {c.metric} over seeds ({c.mode})"
    if c.design is not None:
        selected = f"mean paired {c.metric} difference from the baseline over each configuration's seeds ({c.mode})"
    summary = {
        "verdict": c.verdict,
        "winner": c.winner,
        "selected_by": selected,
        "seeds": c.seeds,
        "method": method_of(c.design),
        "difference": c.difference,
        "configurations": c.candidates,
    }
    if c.design is not None:
        summary["sequential"] = {"design": c.design, "rounds": c.rounds}
    files["confirmation"].write_text(yaml.safe_dump(_plain(summary), sort_keys=False))
    plot = plot_confirmation(c, run_dir / PLOT_FILE)
    if plot is not None:
        files["confirmation_plot"] = plot
    rounds = plot_rounds(c, run_dir / ROUNDS_PLOT_FILE)
    if rounds is not None:
        files["confirmation_rounds"] = rounds
    if c.winner is not None:
        seed = next((s for s in c.seeds if per[c.winner].get(s, {}).get("checkpoint")), None)
        if seed is not None and run.copy_out(
            per[c.winner][seed]["checkpoint"], "path_config.yaml", run_dir / "best_path_config.yaml"
        ):
            files["best_path_config"] = run_dir / "best_path_config.yaml"
    return files


def _log(c: Confirmation, plan: Plan, per: Mapping[str, Mapping[int, Mapping[str, Any]]], run: SearchRun) -> None:
    """Each configuration's run gets its means, spreads and PathConfig, then ends; the parent gets the verdict."""
    stats = ("val_acc", "val_loss", "test_acc", "test_loss")
    logs = []
    with tempfile.TemporaryDirectory() as tmp:
        for row in c.candidates:
            values = {f"{k}_{s}": row[f"{k}_{s}"] for k in stats for s in ("mean", "std")}
            values["seeds_finished"] = len(row["seeds_finished"])
            if row.get(f"search_{plan.search_metric}") is not None:
                values[f"search_{plan.search_metric}"] = row[f"search_{plan.search_metric}"]
            log = RunLog(row["run_id"], metrics=values, status="FINISHED")
            log.tags = {"pathsearch.confirmed_rank": str(row.get("rank", ""))}
            seeds = per[row["label"]]
            first = next((s for s in c.seeds if s in seeds and seeds[s].get("checkpoint")), None)
            folder = Path(tmp) / row["label"].replace(" ", "_")
            folder.mkdir()
            if first is not None and run.fetch(seeds[first]["checkpoint"], ["path_config.yaml"], folder):
                log.artifacts.append(folder / "path_config.yaml")
                log.tags["pathsearch.path_config_seed"] = str(first)  # learned EnsembleScale values differ by seed
            logs.append(log)
        summary: dict[str, float] = {}
        d = c.difference
        if c.winner is not None:
            for prefix, label in (("confirmed", c.winner), ("baseline", BASELINE)):
                row = c.candidate(label)
                summary.update({f"{prefix}_{k}_{s}": row[f"{k}_{s}"] for k in stats for s in ("mean", "std")})
            found = c.candidate(c.winner).get(f"search_{plan.search_metric}")
            if found is not None:
                summary[f"confirmed_search_{plan.search_metric}"] = found
        if d:
            summary.update(
                confirmed_test_acc_diff=d["mean"],
                confirmed_test_acc_diff_ci_low=d["ci_low"],
                confirmed_test_acc_diff_ci_high=d["ci_high"],
                confirmed_test_acc_diff_p_value=d["p_value"],
                confirmed_wins_fraction=d["wins"] / max(d["n"], 1),
            )
        if c.design is not None:  # what the sequential confirmation spent: rounds and trained (configuration, seed)s
            summary["confirmed_rounds"] = len(c.rounds)
            summary["confirmed_trials"] = sum(len(row["seeds_finished"]) for row in c.candidates)
        tags = {VERDICT_TAG: c.verdict[:5000], "pathsearch.confirmed_seeds": json.dumps(c.seeds)}
        if c.winner is not None:
            tags[WINNER_TAG] = str(c.candidate(c.winner)["run_id"])
        logs.append(RunLog(run.parent_run_id, metrics=summary, tags=tags, artifacts=list(c.files.values())))
        run.log(logs, "logging the confirmation")


def _plain(value: Any) -> Any:
    """Floats, ints, strings, lists and dicts only (NaN kept as .nan), for YAML."""
    if isinstance(value, Mapping):
        return {str(k) if not isinstance(k, int) else k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, bool | int | str) or value is None:
        return value
    if isinstance(value, float):
        return value
    return str(value)
