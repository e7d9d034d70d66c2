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
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import yaml
from ray import tune

from pathsearch import storage
from pathsearch.config import SearchFile
from pathsearch.results import SearchResult
from pathsearch.runner import ProgressLine, run_config, runnable
from pathsearch.tracking.runs import NOTE_TAG, PARENT_TAG, ROLE_TAG, RunLog, SearchRuns
from pathsearch.verdict import (
    BASELINE,
    METHOD,
    Confirmation,
    make_verdict,
    mean_std,
    paired_difference,
    plot_confirmation,
    seeds_text,
)

CONFIRM_DIR = "confirm"  # the confirmation's Tune experiment, inside the search's run directory
PLAN_FILE = "confirm_plan.json"  # candidates, seeds and MLflow runs: what `resume` needs to continue
SUMMARY_FILE = "confirmation.yaml"
PLOT_FILE = "confirmation.png"
WINNER_TAG = "pathsearch.confirmed_run"  # on the parent: the winning configuration's MLflow run
VERDICT_TAG = "pathsearch.verdict"


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
    metric: str  # the val metric the winner is chosen by
    mode: str
    seeds: list[int]
    candidates: list[Candidate]
    search_metric: str  # what `search_value` measured (val_acc, or proxy_val_acc in a two-stage search)

    def save(self, path: Path) -> None:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=1))
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> Plan:
        data = json.loads(path.read_text())
        data["candidates"] = [Candidate(**c) for c in data["candidates"]]
        return cls(**data)


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
    from pathsearch.space import lookup_value

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
    from pathsearch.space import lookup_value

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


def param_space(plan: Plan) -> dict[str, Any]:
    """One trial per (seed, configuration), seed-major, each with the trial overrides below."""
    table = {c.label: c.overrides for c in plan.candidates}
    return {
        "seed": tune.grid_search(plan.seeds),
        "candidate": tune.grid_search([c.label for c in plan.candidates]),
        "overrides": tune.sample_from(partial(trial_overrides, table=table)),
        "optuna_trial": "confirm",
    }


def trial_overrides(config: dict[str, Any], table: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """A confirmation trial's overrides: its configuration, one seed, and the test split evaluated at the end.
    (Module level: Tune pickles it with the experiment state.)"""
    return {**table[config["candidate"]], "train.seed": config["seed"], "train.seeds": 1, "train.test": True}


# ----- running it as ordinary Ray trials ---------------------------------------------------------------------
def make_plan(
    spec: SearchFile, run_dir: Path, state: Mapping[str, Any], candidates: list[Candidate], search_metric: str
) -> Plan:
    """Saves the plan and creates one MLflow run per configuration (nested under the search's parent run); its
    seeds' runs nest under it. Written before any confirmation trial starts, so `resume` finds both."""
    metric, mode = selection_metric(spec)
    plan = Plan(metric, mode, confirm_seeds(spec), candidates, search_metric)
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
    ids = SearchRuns.of(state).write(logs, "creating the confirmation runs")
    if ids is None:
        raise ValueError(
            f"MLflow at {state['tracking_uri']} stayed unreachable: the confirmation did not start (resume it later)"
        )
    for c, run_id in zip(new, ids, strict=True):
        c.run_id = run_id
    plan.save(run_dir / PLAN_FILE)
    storage.upload(run_dir, state, [PLAN_FILE])  # a run kept in an object store: what `resume` needs, there now
    return plan


def make_confirm_tuner(
    spec: SearchFile, run_dir: Path, state: Mapping[str, Any], plan: Plan, trainable: Any, verbose: bool
) -> tune.Tuner:
    """One Tune trial per (seed, configuration), seed-major; FIFO, retried from checkpoints like search trials."""
    s, t = spec.search, spec.trial.train
    groups = {
        c.label: {PARENT_TAG: str(c.run_id), ROLE_TAG: "confirmation_seed", "pathsearch.candidate": c.label}
        for c in plan.candidates
    }
    total = len(plan.seeds) * len(plan.candidates)
    logger = SearchRuns.of(state).trial_logger(t.epochs, run_dir, groups)
    return tune.Tuner(
        runnable(spec, trainable),
        param_space=param_space(plan),
        tune_config=tune.TuneConfig(
            max_concurrent_trials=s.confirm.max_concurrent_trials or s.max_concurrent_trials,
            reuse_actors=True,
        ),
        run_config=run_config(
            spec,
            CONFIRM_DIR,
            storage.run_uri(run_dir, state),
            [logger, ProgressLine(total, plan.metric, plan.mode, t.epochs, verbose, "confirmation")],
        ),
    )


def restore_confirm_tuner(
    spec: SearchFile, run_dir: Path, state: Mapping[str, Any], plan: Plan, trainable: Any, verbose: bool
) -> tune.Tuner:
    """The confirmation's Tuner after an interruption: restored from Tune's snapshot (finished trials are not
    trained again), or new when the driver died before the first snapshot; its configuration runs reopened."""
    runs = [c.run_id for c in plan.candidates if c.run_id is not None]
    SearchRuns.of(state).reopen_runs(runs, "reopening the confirmation runs")
    folder = storage.join(storage.run_uri(run_dir, state), CONFIRM_DIR)
    if tune.Tuner.can_restore(folder):
        storage.recover_checkpoints(folder)
        # the param space again: Tune's snapshot of a sample_from does not resolve after a restore
        trainable = runnable(spec, trainable)
        return tune.Tuner.restore(folder, trainable=trainable, resume_errored=True, param_space=param_space(plan))
    return make_confirm_tuner(spec, run_dir, state, plan, trainable, verbose)


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
    plan_file = run_dir / PLAN_FILE
    status = "FAILED"
    try:
        if plan_file.is_file():
            plan = Plan.load(plan_file)
            tuner = restore_confirm_tuner(spec, run_dir, state, plan, trainable, verbose)
        else:
            if candidates is None:
                metric, mode = selection_metric(spec)
                candidates = choose_candidates(
                    result.rows, spec, spec.base, metric, mode, spec.search.confirm.top_k, result.baseline
                )
                search_metric = metric
            plan = make_plan(spec, run_dir, state, candidates, search_metric)
            tuner = make_confirm_tuner(spec, run_dir, state, plan, trainable, verbose)
        confirmation = run_confirmation(tuner, spec, run_dir, state, plan, verbose)
        if on_confirmed is not None and not confirmation.interrupted:
            confirmation.files.update(on_confirmed(confirmation))
        status = "KILLED" if confirmation.interrupted else "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        SearchRuns.of(state).end(status)
        storage.upload(run_dir, state)  # the verdict's files
    result.confirmation = confirmation
    result.interrupted = confirmation.interrupted
    result.files.update(confirmation.files)
    return result


def run_confirmation(
    tuner: Any, spec: SearchFile, run_dir: Path, state: Mapping[str, Any], plan: Plan, verbose: bool = True
) -> Confirmation:
    """Trains the plan's trials to the end, then picks the winner, measures it against the baseline and logs the
    verdict (MLflow parent and configuration runs, `confirmation.yaml`, `confirmation.png`). An interrupted
    confirmation (Ctrl-C) returns `interrupted=True`, its unfinished runs closed KILLED until `resume`."""
    runs = SearchRuns.of(state)
    final_epoch = spec.trial.train.epochs
    if verbose:
        print(
            f"confirmation: {len(plan.candidates)} configurations (the baseline and the top "
            f"{len(plan.candidates) - 1} by {plan.metric}) x {len(plan.seeds)} paired seeds {seeds_text(plan.seeds)}",
            flush=True,
        )
    grid = tuner.fit()
    per: dict[str, dict[int, dict[str, Any]]] = {c.label: {} for c in plan.candidates}
    unfinished = 0
    for result in grid:
        m, config = result.metrics or {}, result.config or {}
        label, seed = config.get("candidate"), config.get("seed")
        if label not in per or not isinstance(seed, int):
            continue
        if result.error is None and m.get("epoch") == final_epoch:
            values = {k: float(m[k]) for k in ("val_acc", "val_loss", "test_acc", "test_loss") if k in m}
            checkpoint = storage.checkpoint_location(result.checkpoint) if result.checkpoint is not None else None
            per[label][seed] = {**values, "trial_id": m.get("trial_id"), "checkpoint": checkpoint}
        elif result.error is None:
            unfinished += 1
    if unfinished:  # Tune returned early on SIGINT: the unfinished trials stay in its snapshot for `resume`
        for c in plan.candidates:
            runs.close_orphans(str(c.run_id), "INTERRUPTED")
        runs.close_orphans(state="INTERRUPTED")
        return Confirmation(plan.metric, plan.mode, plan.seeds, [], None, {}, "", interrupted=True)
    for c in plan.candidates:  # trials lost in a driver crash and trained again: their first runs end LOST
        runs.close_orphans(str(c.run_id))
    confirmation = summarise(plan, per, spec.base)
    confirmation.files = _write_files(confirmation, plan, per, run_dir)
    confirmation.search_metric = plan.search_metric
    _log(confirmation, plan, per, runs)
    return confirmation


# ----- statistics and the verdict ----------------------------------------------------------------------------


def summarise(
    plan: Plan, per: Mapping[str, Mapping[int, Mapping[str, Any]]], base: Mapping[str, Any] | None = None
) -> Confirmation:
    """Means and spreads per configuration, the winner (best mean val over the seeds every candidate finished),
    and the verdict: the winner's (or, when the baseline wins, the best challenger's) paired test difference."""
    complete = [s for s in plan.seeds if all(s in per[c.label] for c in plan.candidates)]
    rows = []
    for c in plan.candidates:
        seeds = per[c.label]
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
            values = [seeds[s][key] for s in complete if key in seeds[s]]
            row[f"{key}_mean"], row[f"{key}_std"] = mean_std(values)
        rows.append(row)
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


# ----- files and MLflow ----------------------------------------------------------------------------------------
def _write_files(
    c: Confirmation, plan: Plan, per: Mapping[str, Mapping[int, Mapping[str, Any]]], run_dir: Path
) -> dict[str, Path]:
    files = {"confirmation": run_dir / SUMMARY_FILE}
    summary = {
        "verdict": c.verdict,
        "winner": c.winner,
        "selected_by": f"mean {c.metric} over seeds ({c.mode})",
        "seeds": c.seeds,
        "method": METHOD,
        "difference": c.difference,
        "configurations": c.candidates,
    }
    files["confirmation"].write_text(yaml.safe_dump(_plain(summary), sort_keys=False))
    plot = plot_confirmation(c, run_dir / PLOT_FILE)
    if plot is not None:
        files["confirmation_plot"] = plot
    if c.winner is not None:
        seed = next((s for s in c.seeds if per[c.winner].get(s, {}).get("checkpoint")), None)
        if seed is not None and storage.copy_out(
            per[c.winner][seed]["checkpoint"], "path_config.yaml", run_dir / "best_path_config.yaml"
        ):
            files["best_path_config"] = run_dir / "best_path_config.yaml"
    return files


def _log(c: Confirmation, plan: Plan, per: Mapping[str, Mapping[int, Mapping[str, Any]]], runs: SearchRuns) -> None:
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
            if first is not None and storage.fetch(seeds[first]["checkpoint"], ["path_config.yaml"], folder):
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
        tags = {VERDICT_TAG: c.verdict[:5000], "pathsearch.confirmed_seeds": json.dumps(c.seeds)}
        if c.winner is not None:
            tags[WINNER_TAG] = str(c.candidate(c.winner)["run_id"])
        logs.append(RunLog(runs.parent_run_id, metrics=summary, tags=tags, artifacts=list(c.files.values())))
        runs.write(logs, "logging the confirmation")


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
