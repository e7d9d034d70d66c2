"""The two-stage strategy (`search.strategy: two_stage`): one-shot path search, then confirmation.

Stage 1 trains one path supernet as a Ray trial (tracked like any trial), then a Ray task caches its pooled
per-path validation features once and lets Optuna score tens of thousands of path configurations from them
(README, "One-shot path search"). Stage 2 is the confirmation (confirm.py): the top-k, the baseline and `search.enqueue`
trained on paired seeds; the ranking quality (Kendall tau, Spearman rho of proxy scores vs confirmed mean val
scores, with p-values) goes to MLflow.
Orchestration: torch and the model are imported only inside the functions that run the tensor work.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.trial import TrialState
from ray import tune

from pathsearch import storage
from pathsearch.config import SearchFile
from pathsearch.confirm import choose_candidates, confirm_search
from pathsearch.paths import path_names, resolve_scale_init
from pathsearch.results import SearchResult
from pathsearch.runner import claim_device, run_config, runnable, stop_signalled
from pathsearch.searcher import baseline_point, make_sampler
from pathsearch.space import SearchSpace, sample_overrides
from pathsearch.tracking.runs import ROLE_TAG, RunLog, SearchRuns

STAGE1_FILE = "oneshot_stage1.json"  # in the run directory: what stage 2 and `resume` need from stage 1
SUPERNET_DIR = "supernet"  # the supernet's Tune experiment, inside the search's run directory


# ----- the two-stage search ----------------------------------------------------------------------------------------
def run(spec: SearchFile, run_dir: Path, state: dict[str, Any], trainable: Any, verbose: bool) -> SearchResult:
    """Runs a two-stage search: supernet trial, proxy search of the path entries, then the top-k trained for real.

    One MLflow parent run holds everything: the supernet's trial run, the stage-1 summary table, one child run per
    top-k proxy configuration, the confirmation's runs and the rank correlations. Returns the confirmation's result
    (its winner is what `pathsearch export` returns).
    """
    return _stages(spec, run_dir, state, trainable, verbose)


def check_resume(spec: SearchFile, run_dir: Path, state: dict[str, Any]) -> None:
    """Every two-stage search can be resumed: stage 1 from the supernet's last checkpoint, stage 2 from its plan."""


def resume(spec: SearchFile, run_dir: Path, state: dict[str, Any], trainable: Any, verbose: bool) -> SearchResult:
    """Continues an interrupted two-stage search: an unfinished stage 1 continues its supernet trial from its last
    checkpoint (Tune's snapshot; finished epochs are not trained again, the RNG states come back with it) and
    scores the same configurations; a finished one goes on to its confirmation."""
    return _stages(spec, run_dir, state, trainable, verbose, resuming=True)


def _stages(
    spec: SearchFile, run_dir: Path, state: dict[str, Any], trainable: Any, verbose: bool, resuming: bool = False
) -> SearchResult:
    if not (run_dir / STAGE1_FILE).is_file():
        try:
            supernet = train_supernet(spec, run_dir, state, trainable, resuming)
            if supernet is None:  # Ctrl-C: Tune kept the unfinished trial for `resume`
                runs = SearchRuns.of(state)
                runs.close_orphans(state="INTERRUPTED")
                runs.end("KILLED", artifacts=[run_dir / "search.yaml"])
                storage.upload(run_dir, state)
                result = SearchResult(run_dir, spec.tracking.experiment, state["parent_run_id"], None, None)
                result.interrupted = True
                return result
            if verbose:
                done = f"supernet trained in {supernet['seconds']:.0f} s ({_metrics_line(supernet['metrics'])})"
                print(f"stage 1: {done}", flush=True)
            stage1 = _proxy_search_remote(spec, supernet)
            _record_stage1(spec, run_dir, state, supernet, stage1, verbose)
        except BaseException as err:  # nothing may stay RUNNING; Ctrl-C ends the parent KILLED
            status = "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED"
            SearchRuns.of(state).end(status, artifacts=[run_dir / "search.yaml"])
            raise
    return _confirm_two_stage(spec, run_dir, state, trainable, verbose)


def _confirm_two_stage(
    spec: SearchFile, run_dir: Path, state: dict[str, Any], trainable: Any, verbose: bool
) -> SearchResult:
    """Stage 2: the baseline, `search.enqueue` and the proxy's top-k confirmed on paired seeds; then how well the
    proxy ranked them against their confirmed mean val scores."""
    stage1 = json.loads((run_dir / STAGE1_FILE).read_text())
    metric, mode = stage1["metric"], spec.search.modes[0]
    key = f"proxy_{metric}"
    points, top = stage1["points"], stage1["top"]
    is_baseline = bool(points) and points[0]["params"] == baseline_point(spec.space, spec.base)
    baseline = points[0] if is_baseline else None
    rows = [*(points[1:] if is_baseline else points), *top]
    candidates = choose_candidates(rows, spec, spec.base, key, mode, len(rows), baseline)
    result = SearchResult(run_dir, spec.tracking.experiment, state["parent_run_id"], None, None)

    def ranking(confirmation: Any) -> dict[str, Path]:
        return _log_ranking(confirmation, stage1, run_dir, state, verbose)

    return confirm_search(spec, run_dir, state, result, trainable, verbose, candidates, key, ranking)


def train_supernet(
    spec: SearchFile, run_dir: Path, state: dict[str, Any], trainable: Any = None, resuming: bool = False
) -> dict[str, Any] | None:
    """Stage 1's training: the base trial with `train.supernet.enabled`, as one Ray trial logged under the parent run
    (tagged `pathsearch.role: supernet`, so `export` never returns it). Its Tune experiment is `run_dir/supernet`;
    `resuming` restores it from Tune's snapshot, when there is one (a driver killed before Tune's first snapshot
    left none: the supernet starts anew). None when Ctrl-C stopped it."""
    s, two = spec.search, spec.search.two_stage
    epochs = two.supernet_epochs or spec.trial.train.epochs
    cpus = two.supernet_cpus or s.resources_per_trial.get("cpu", 1.0)
    resources = {**s.resources_per_trial, "cpu": cpus}
    one = dataclasses.replace(spec, search=dataclasses.replace(s, resources_per_trial=resources))
    runs = SearchRuns.of(state)
    folder = storage.join(storage.run_uri(run_dir, state), SUPERNET_DIR)
    if resuming and storage.restorable(folder):
        storage.recover_checkpoints(folder)
        tuner = tune.Tuner.restore(folder, trainable=runnable(one, trainable), resume_errored=True)
    else:
        tuner = tune.Tuner(
            runnable(one, trainable),
            param_space={
                "overrides": {"train.supernet.enabled": True, "train.epochs": epochs},
                "optuna_trial": "supernet",
            },
            tune_config=tune.TuneConfig(num_samples=1),
            run_config=run_config(
                spec, SUPERNET_DIR, storage.run_uri(run_dir, state), [runs.trial_logger(epochs, run_dir)]
            ),
        )
    result = tuner.fit()[0]
    metrics = result.metrics or {}
    if stop_signalled() or (result.error is None and metrics.get("epoch") != epochs):
        return None
    if result.error is not None or result.checkpoint is None:
        raise RuntimeError(f"the supernet trial did not train to the end ({result.error or 'no final checkpoint'})")
    trial_id = str(metrics["trial_id"])
    tags = {ROLE_TAG: "supernet", "mlflow.runName": f"supernet {trial_id}"}
    return {
        "trial_id": trial_id,
        "run_id": runs.tag_trial(trial_id, tags, "tagging the supernet run"),
        "checkpoint": storage.checkpoint_location(result.checkpoint),
        "metrics": {k: v for k, v in metrics.items() if k in ("val_acc", "val_loss", "val_acc_full", "train_loss")},
        "seconds": float(metrics.get("time_total_s", 0.0)),
        "cpus": float(cpus),
    }


def _proxy_search_remote(spec: SearchFile, supernet: dict[str, Any]) -> dict[str, Any]:
    """`proxy_search` as a Ray task with the supernet trial's resources: the driver stays free of torch, and on a
    cluster the work runs on a worker node (the checkpoint lives in the shared storage path)."""
    import ray

    s, two = spec.search, spec.search.two_stage
    base = spec.base
    gpus = float(s.resources_per_trial.get("gpu", 0.0))  # the supernet trial's GPU share: scoring runs there too
    task = ray.remote(proxy_search).options(num_cpus=supernet["cpus"], num_gpus=gpus, max_retries=s.max_failures)
    return dict(
        ray.get(
            task.remote(
                supernet["checkpoint"],
                spec.space,
                base,
                points=[baseline_point(spec.space, base), *s.enqueue],
                metric=s.metrics[0],
                mode=s.modes[0],
                trials=two.proxy_trials,
                sampler=two.proxy_sampler,
                batch=two.proxy_batch,
                top_k=two.top_k,
                seed=s.seed,
                base_pruned=list(spec.trial.model.pruned),
                base_init=spec.trial.model.ensemble_scale.init,
                max_kept_paths=s.max_kept_paths,
                threads=max(1, int(supernet["cpus"])),
            )
        )
    )


def proxy_search(
    checkpoint_dir: str,
    space: SearchSpace,
    base: dict[str, Any],
    points: Sequence[Mapping[str, Any]] = (),
    metric: str = "val_acc",
    mode: str = "max",
    trials: int = 20000,
    sampler: str = "random",
    batch: int = 256,
    top_k: int = 4,
    seed: int = 0,
    base_pruned: Sequence[str] = (),
    base_init: float | Mapping[str, float] = 1.0,
    max_kept_paths: int | None = None,
    threads: int | None = None,
) -> dict[str, Any]:
    """Stage 1's search: Optuna samples the path entries of `space` (define-by-run, the same parameter names as the
    trials), each configuration is scored from the supernet's cached validation features, `trials` in all.

    A sampled `model.ensemble_scale.init` becomes per-path factors (candidate init / base init) on the supernet's
    learned EnsembleScale. `points` (baseline, enqueued configurations) are scored first. Returns every evaluation
    (`rows`), the scored `points` and the `top` k distinct other configurations, best first, each with the
    PathConfig it scored, and timings.
    """
    import ray
    import torch

    from pathsearch.proxy import ProxyScorer

    device = claim_device(ray.get_runtime_context().get_assigned_resources())[0]
    if threads:
        torch.set_num_threads(threads)
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # one INFO line per trial would be tens of thousands
    try:
        with storage.local_folder(checkpoint_dir) as folder:  # a copy, when the supernet is kept in a store
            scorer = ProxyScorer.from_checkpoint(str(folder), device=device)
        depth = scorer.model.depth
        if depth != space.depth:
            raise ValueError(f"the supernet has depth {depth}, the search space was parsed for depth {space.depth}")
        init = resolve_scale_init(base_init, depth)
        direction = optuna.study.StudyDirection.MAXIMIZE if mode == "max" else optuna.study.StudyDirection.MINIMIZE
        study = optuna.create_study(direction=direction, sampler=_sampler(sampler, seed, trials))
        for point in points:
            study.enqueue_trial(dict(point))
        rows: list[dict[str, Any]] = []
        started = time.perf_counter()
        while len(rows) < trials:
            asked = [study.ask() for _ in range(min(batch, trials - len(rows)))]
            configs = [sample_overrides(trial, space, base) for trial in asked]
            weights = [config_weights(c, depth, base_pruned, init) for c in configs]
            ok = [i for i, (keep, _) in enumerate(weights) if 1 <= sum(keep) <= (max_kept_paths or len(keep))]
            scores = None
            if ok:
                masks = torch.tensor([weights[i][0] for i in ok], dtype=torch.bool)  # (k, P)
                factors = torch.tensor([weights[i][1] for i in ok], dtype=torch.float64)  # (k, P)
                scores = scorer.score(masks, factors)
            position = {i: j for j, i in enumerate(ok)}
            for i, (trial, overrides) in enumerate(zip(asked, configs, strict=True)):
                row: dict[str, Any] = {
                    "number": trial.number,
                    "params": dict(trial.params),
                    "overrides": overrides,
                    "key": json.dumps(overrides, sort_keys=True),  # as PathOptunaSearch tells configurations apart
                    "kept_paths": sum(weights[i][0]),
                }
                if scores is None or i not in position:
                    study.tell(trial, state=TrialState.FAIL)
                    row["state"] = "INFEASIBLE"
                else:
                    acc, loss = float(scores.acc[position[i]]), float(scores.loss[position[i]])
                    study.tell(trial, acc if metric == "val_acc" else loss)
                    row.update(state="COMPLETE", proxy_val_acc=acc, proxy_val_loss=loss)
                rows.append(row)
        seconds = time.perf_counter() - started
    finally:
        optuna.logging.set_verbosity(verbosity)
    ranked = rank_rows(rows, metric, mode)
    point_rows = [r for r in rows[: len(points)] if r["state"] == "COMPLETE"]
    taken = {r["key"] for r in point_rows}
    top = [r for r in ranked if r["key"] not in taken][:top_k]
    for row in [*point_rows, *top]:
        keep, scale_factors = config_weights(row["overrides"], depth, base_pruned, init)
        row["path_config"] = scorer.path_config(keep, scale_factors).to_dict()
    return {
        "rows": rows,
        "points": point_rows,
        "top": top,
        "seconds": seconds,
        "cache_seconds": scorer.seconds,
        "num_images": int(scorer.features.labels.shape[0]),
        "distinct": len(ranked),
    }


def _sampler(name: str, seed: int, trials: int) -> optuna.samplers.BaseSampler:
    if name == "tpe":  # a tenth of the budget at random first, as TPE needs a spread of observations
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(1000, max(10, trials // 10)))
    return make_sampler(name, seed)


def config_weights(
    overrides: Mapping[str, Any], depth: int, base_pruned: Sequence[str], base_init: Sequence[float]
) -> tuple[list[bool], list[float]]:
    """(path mask, per-path EnsembleScale factors) of a sampled configuration for the proxy scorer.

    The factors re-weight the supernet's learned EnsembleScale as the candidate's init re-weights the base init
    (1 where the candidate does not set it): the supernet was trained from the base init.
    """
    pruned = set(overrides.get("model.pruned", base_pruned))
    keep = [name not in pruned for name in path_names(depth)]
    init = overrides.get("model.ensemble_scale.init")
    if init is None:
        return keep, [1.0] * len(keep)
    wanted = resolve_scale_init(init, depth)
    return keep, [w / b if b else w for w, b in zip(wanted, base_init, strict=True)]


def rank_rows(rows: Sequence[dict[str, Any]], metric: str, mode: str) -> list[dict[str, Any]]:
    """Distinct scored configurations, best first: by the proxy metric, then the other proxy score (accuracy ties
    are common on a small validation set), then the order they were sampled in."""
    sign = -1.0 if mode == "max" else 1.0
    other = "proxy_val_loss" if metric == "val_acc" else "proxy_val_acc"
    other_sign = 1.0 if other == "proxy_val_loss" else -1.0
    distinct: dict[str, dict[str, Any]] = {}
    for row in rows:
        if row["state"] == "COMPLETE":
            distinct.setdefault(row["key"], row)
    return sorted(distinct.values(), key=lambda r: (sign * r[f"proxy_{metric}"], other_sign * r[other], r["number"]))


def _record_stage1(
    spec: SearchFile,
    run_dir: Path,
    state: dict[str, Any],
    supernet: dict[str, Any],
    stage1: dict[str, Any],
    verbose: bool,
) -> None:
    """Stage 1 in files and MLflow: every evaluation in one table (not one run each), the top-k as child runs."""
    rows, top, points = stage1["rows"], stage1["top"], stage1["points"]
    table = run_dir / "proxy_scores.csv"
    _write_table(table, rows)
    top_file = run_dir / "proxy_top.yaml"
    ranked = [{"rank": k, **_public(row)} for k, row in enumerate(top, start=1)]
    top_file.write_text(yaml.safe_dump({"points": [_public(r) for r in points], "top": ranked}, sort_keys=False))
    scored = sum(r["state"] == "COMPLETE" for r in rows)
    summary = {
        "proxy_evaluations": float(scored),
        "proxy_infeasible": float(len(rows) - scored),
        "proxy_distinct_configurations": float(stage1["distinct"]),
        "proxy_seconds": stage1["seconds"],
        "proxy_evaluations_per_s": len(rows) / max(stage1["seconds"], 1e-9),
        "proxy_cache_seconds": stage1["cache_seconds"],
        "supernet_seconds": supernet["seconds"],
        **{f"supernet_{k}": float(v) for k, v in supernet["metrics"].items()},
    }
    metric = spec.search.metrics[0]
    logs = [RunLog(state["parent_run_id"], metrics=summary, artifacts=[table, top_file])]
    logs += [_proxy_run(rank, row) for rank, row in enumerate(top, start=1)]
    ids = SearchRuns.of(state).write(logs, "logging stage 1")
    proxy_runs = {row["key"]: run_id for row, run_id in zip(top, ids[1:], strict=True)} if ids else {}
    proxy = {k: stage1[k] for k in ("seconds", "cache_seconds", "num_images", "distinct")}
    record = {
        "metric": metric,
        "supernet": supernet,
        "proxy": {**proxy, "evaluations": len(rows)},
        "points": points,
        "top": top,
        "proxy_runs": proxy_runs,
    }
    (run_dir / STAGE1_FILE).write_text(json.dumps(record, indent=1))
    storage.upload(run_dir, state)  # stage 1's files: a resume continues from them
    if verbose:
        per_s = len(rows) / max(stage1["seconds"], 1e-9)
        print(
            f"stage 1: {len(rows)} configurations scored in {stage1['seconds']:.1f} s ({per_s:,.0f}/s, "
            f"{stage1['distinct']} distinct) from {stage1['num_images']} cached validation images "
            f"(cached in {stage1['cache_seconds']:.1f} s)",
            flush=True,
        )
        for rank, row in enumerate(top, start=1):
            print(f"  proxy top {rank}: {metric} {row[f'proxy_{metric}']:.4f}  {row['overrides']}", flush=True)
        print(f"stage 2: training the baseline, {len(spec.search.enqueue)} enqueued and the top {len(top)}", flush=True)


def _proxy_run(rank: int, row: Mapping[str, Any]) -> RunLog:
    """A finished child run for one top-k proxy configuration: the same params as its stage-2 trial, proxy metrics,
    and the PathConfig it was scored with (the supernet's weights under that mask and EnsembleScale)."""
    params: dict[str, Any] = dict(sorted(row["params"].items()))
    params.update({f"config.{k}": v for k, v in sorted(row["overrides"].items())})
    params["optuna_trial"] = str(row["number"])
    metrics = {f"proxy_{m}": float(row[f"proxy_{m}"]) for m in ("val_acc", "val_loss")}
    metrics.update(kept_paths=float(row["kept_paths"]), proxy_rank=float(rank))
    return RunLog(
        name=f"proxy top {rank}",
        tags={ROLE_TAG: "proxy", "pathsearch.proxy_rank": str(rank)},
        params=params,
        metrics=metrics,
        texts={"path_config.yaml": yaml.safe_dump(row["path_config"], sort_keys=False)},
        status="FINISHED",
    )


def _log_ranking(
    confirmation: Any, stage1: Mapping[str, Any], run_dir: Path, state: Mapping[str, Any], verbose: bool
) -> dict[str, Path]:
    """Kendall tau and Spearman rho (with p-values) of the proxy scores against the confirmed mean val scores, on
    the parent run; each proxy run gets its configuration's confirmed mean beside its proxy score."""
    metric = stage1["metric"]
    proxy_runs = stage1["proxy_runs"]
    rows = []
    for c in confirmation.candidates:
        value, confirmed = c.get(f"search_proxy_{metric}"), c.get(f"{metric}_mean")
        if value is None or confirmed is None or not math.isfinite(confirmed):
            continue
        rows.append(
            {
                "label": c["label"],
                "overrides": c["overrides"],
                f"proxy_{metric}": value,
                f"confirmed_{metric}_mean": confirmed,
                f"confirmed_{metric}_std": c.get(f"{metric}_std"),
                "proxy_run": proxy_runs.get(json.dumps(c["overrides"], sort_keys=True)),
            }
        )
    ranking = rank_correlation([r[f"proxy_{metric}"] for r in rows], [r[f"confirmed_{metric}_mean"] for r in rows])
    path = run_dir / "rank_correlation.yaml"
    path.write_text(yaml.safe_dump({"metric": metric, **ranking, "configurations": rows}, sort_keys=False))
    logs = [RunLog(state["parent_run_id"], metrics={f"proxy_{k}": v for k, v in ranking.items()})]
    logs += [
        RunLog(row["proxy_run"], metrics={f"confirmed_{metric}_mean": row[f"confirmed_{metric}_mean"]})
        for row in rows
        if row["proxy_run"]
    ]
    SearchRuns.of(state).write(logs, "logging the ranking quality")
    if verbose:
        print(
            f"ranking quality over {int(ranking['ranked_configurations'])} confirmed configurations (proxy vs mean "
            f"{metric} over seeds): Kendall tau {ranking['kendall_tau']:.3f} (p {ranking['kendall_p_value']:.3g}), "
            f"Spearman rho {ranking['spearman_rho']:.3f} (p {ranking['spearman_p_value']:.3g})",
            flush=True,
        )
    files = {"proxy_scores": "proxy_scores.csv", "proxy_top": "proxy_top.yaml", "rank_correlation": path.name}
    return {label: run_dir / name for label, name in files.items()}


def rank_correlation(proxy: Sequence[float], trained: Sequence[float]) -> dict[str, float]:
    """Kendall tau (tau-b: ties allowed) and Spearman rho between two score lists, with their two-sided p-values;
    NaN with fewer than 2 pairs or a constant list."""
    import warnings

    from scipy.stats import kendalltau, spearmanr

    nan = float("nan")
    out = {"kendall_tau": nan, "kendall_p_value": nan, "spearman_rho": nan, "spearman_p_value": nan}
    if len(proxy) >= 2:
        with warnings.catch_warnings():  # a constant input warns and returns NaN, which is the answer
            warnings.simplefilter("ignore")
            tau, rho = kendalltau(proxy, trained), spearmanr(proxy, trained)
        out = {
            "kendall_tau": float(tau.statistic),
            "kendall_p_value": float(tau.pvalue),
            "spearman_rho": float(rho.statistic),
            "spearman_p_value": float(rho.pvalue),
        }
    return {**out, "ranked_configurations": float(len(proxy))}


def _public(row: Mapping[str, Any]) -> dict[str, Any]:
    """A stage-1 row without its lookup key, for YAML files."""
    return {k: v for k, v in row.items() if k != "key"}


def _write_table(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """Every stage-1 evaluation as one CSV row: trial number, state, proxy scores, kept paths and each parameter."""
    names = sorted({k for row in rows for k in row["params"]})
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["number", "state", "proxy_val_acc", "proxy_val_loss", "kept_paths", *names])
        for row in rows:
            head = [row["number"], row["state"], row.get("proxy_val_acc", ""), row.get("proxy_val_loss", "")]
            writer.writerow([*head, row["kept_paths"], *(row["params"].get(n, "") for n in names)])


def _metrics_line(metrics: Mapping[str, Any]) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, int | float))
