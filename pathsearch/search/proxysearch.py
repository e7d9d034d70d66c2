"""Stage 1's search of the two-stage strategy, run as a Ray task where the supernet trained: Optuna samples path
configurations and each is scored from the supernet's cached validation features (proxy.py), tens of thousands of
them. Imports torch and the model only inside `proxy_search`; never MLflow.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from typing import Any

import optuna
from optuna.trial import TrialState

from pathsearch import storage
from pathsearch.config.paths import path_names, resolve_scale_init
from pathsearch.config.space import SearchSpace, sample_overrides
from pathsearch.search.searcher import make_sampler
from pathsearch.trial.trainable import claim_device


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

    from pathsearch.trial.proxy import ProxyScorer

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
