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
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from ray import tune

from pathsearch.config import SearchFile
from pathsearch.search.confirm import choose_candidates, confirm_search
from pathsearch.search.proxysearch import proxy_search
from pathsearch.search.results import SearchResult
from pathsearch.search.run import SearchRun, checkpoint_of
from pathsearch.search.searcher import baseline_point
from pathsearch.tracking.runs import ROLE_TAG, RunLog

STAGE1_FILE = "oneshot_stage1.json"  # in the run directory: what stage 2 and `resume` need from stage 1
SUPERNET_DIR = "supernet"  # the supernet's Tune experiment, inside the search's run directory


# ----- the two-stage search ----------------------------------------------------------------------------------------
def run(run: SearchRun, trainable: Any, verbose: bool) -> SearchResult:
    """Runs a two-stage search: supernet trial, proxy search of the path entries, then the top-k trained for real.

    One MLflow parent run holds everything: the supernet's trial run, the stage-1 summary table, one child run per
    top-k proxy configuration, the confirmation's runs and the rank correlations. Returns the confirmation's result
    (its winner is what `pathsearch export` returns).
    """
    return _stages(run, trainable, verbose)


def _stages(run: SearchRun, trainable: Any, verbose: bool) -> SearchResult:
    if not run.has(STAGE1_FILE):
        supernet = train_supernet(run, trainable)
        if supernet is None:  # Ctrl-C: Tune kept the unfinished trial for `resume`
            return run.result()
        if verbose:
            done = f"supernet trained in {supernet['seconds']:.0f} s ({_metrics_line(supernet['metrics'])})"
            print(f"stage 1: {done}", flush=True)
        stage1 = _proxy_search_remote(run.spec, supernet)
        _record_stage1(run, supernet, stage1, verbose)
    return _confirm_two_stage(run, trainable, verbose)


def check_resume(run: SearchRun) -> None:
    """Every two-stage search can be resumed: stage 1 from the supernet's last checkpoint, stage 2 from its plan."""


def resume(run: SearchRun, trainable: Any, verbose: bool) -> SearchResult:
    """Continues an interrupted two-stage search: an unfinished stage 1 continues its supernet trial from its last
    checkpoint (Tune's snapshot; finished epochs are not trained again, the RNG states come back with it; a driver
    killed before Tune's first snapshot left none: the supernet starts anew) and scores the same configurations; a
    finished one goes on to its confirmation."""
    return _stages(run, trainable, verbose)


def _confirm_two_stage(run: SearchRun, trainable: Any, verbose: bool) -> SearchResult:
    """Stage 2: the baseline, `search.enqueue` and the proxy's top-k confirmed on paired seeds; then how well the
    proxy ranked them against their confirmed mean val scores."""
    spec = run.spec
    stage1 = json.loads(run.path(STAGE1_FILE).read_text())
    metric, mode = stage1["metric"], spec.search.modes[0]
    key = f"proxy_{metric}"
    points, top = stage1["points"], stage1["top"]
    is_baseline = bool(points) and points[0]["params"] == baseline_point(spec.space, spec.base)
    baseline = points[0] if is_baseline else None
    rows = [*(points[1:] if is_baseline else points), *top]
    candidates = choose_candidates(rows, spec, spec.base, key, mode, len(rows), baseline)

    def ranking(confirmation: Any) -> dict[str, Path]:
        return _log_ranking(confirmation, stage1, run, verbose)

    return confirm_search(run, run.result(), trainable, verbose, candidates, key, ranking)


def train_supernet(run: SearchRun, trainable: Any = None) -> dict[str, Any] | None:
    """Stage 1's training: the base trial with `train.supernet.enabled`, as one Ray trial logged under the parent run
    (tagged `pathsearch.role: supernet`, so `export` never returns it), in the stage `supernet`. None when Ctrl-C
    stopped it."""
    spec = run.spec
    s, two = spec.search, spec.search.two_stage
    epochs = two.supernet_epochs or spec.trial.train.epochs
    cpus = two.supernet_cpus or s.resources_per_trial.get("cpu", 1.0)
    resources = {**s.resources_per_trial, "cpu": cpus}
    one = dataclasses.replace(spec, search=dataclasses.replace(s, resources_per_trial=resources))
    grid = run.stage(
        SUPERNET_DIR,
        trainable,
        epochs=epochs,
        spec=one,
        param_space={
            "overrides": {"train.supernet.enabled": True, "train.epochs": epochs},
            "optuna_trial": "supernet",
        },
        tune_config=tune.TuneConfig(num_samples=1),
    )
    if run.stopped:
        return None
    result = grid[0]
    metrics = result.metrics or {}
    if result.error is not None or checkpoint_of(result) is None:
        raise RuntimeError(f"the supernet trial did not train to the end ({result.error or 'no final checkpoint'})")
    trial_id = str(metrics["trial_id"])
    tags = {ROLE_TAG: "supernet", "mlflow.runName": f"supernet {trial_id}"}
    return {
        "trial_id": trial_id,
        "run_id": run.tag_trial(trial_id, tags, "tagging the supernet run"),
        "checkpoint": checkpoint_of(result),
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
    # (proxy_search by its module-level name: tests may swap in a torch-free toy)
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


def _record_stage1(run: SearchRun, supernet: dict[str, Any], stage1: dict[str, Any], verbose: bool) -> None:
    """Stage 1 in files and MLflow: every evaluation in one table (not one run each), the top-k as child runs."""
    spec, run_dir = run.spec, run.folder
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
    logs = [RunLog(run.parent_run_id, metrics=summary, artifacts=[table, top_file])]
    logs += [_proxy_run(rank, row) for rank, row in enumerate(top, start=1)]
    ids = run.log(logs, "logging stage 1")
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
    run.save()  # stage 1's files: a resume continues from them
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


def _log_ranking(confirmation: Any, stage1: Mapping[str, Any], run: SearchRun, verbose: bool) -> dict[str, Path]:
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
    run_dir = run.folder
    path = run_dir / "rank_correlation.yaml"
    path.write_text(yaml.safe_dump({"metric": metric, **ranking, "configurations": rows}, sort_keys=False))
    logs = [RunLog(run.parent_run_id, metrics={f"proxy_{k}": v for k, v in ranking.items()})]
    logs += [
        RunLog(row["proxy_run"], metrics={f"confirmed_{metric}_mean": row[f"confirmed_{metric}_mean"]})
        for row in rows
        if row["proxy_run"]
    ]
    run.log(logs, "logging the ranking quality")
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
