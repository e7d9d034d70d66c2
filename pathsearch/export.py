"""A search's answer -> PathConfig YAML (and weights), read only from MLflow, so it works from any machine that
reaches the tracking server. By default the latest finished search of the experiment; its confirmed winner when the
search ran a confirmation, else (saying so) its best single-seed trial. Never a maximum across searches.
No tensors: the files are copied as MLflow stores them.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from pathsearch.confirm import VERDICT_TAG, WINNER_TAG
from pathsearch.paths import PathConfig
from pathsearch.results import pareto_front
from pathsearch.tracking import ROLE_TAG, SEED_TAG, default_tracking_uri, download_artifact
from pathsearch.ui import latest_search


@dataclass
class Exported:
    run_id: str  # the MLflow run whose PathConfig (and weights) were written
    metrics: dict[str, float]
    files: dict[str, Path]
    provenance: dict[str, Any] = field(default_factory=dict)


def find_search(client: MlflowClient, experiment: str, run_id: str | None = None) -> Run:
    """The search's parent run: `run_id`, or the latest finished search of `experiment`."""
    if run_id is not None:
        try:
            run = client.get_run(run_id)
        except Exception as err:  # MLflow raises its own exception types for an unknown run id
            raise ValueError(f"no MLflow run {run_id!r}: {err}") from None
        if run.data.tags.get("pathsearch.kind") != "search":
            raise ValueError(f"run {run_id} is not a search's parent run (give the run id the search printed)")
        return run
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise ValueError(f"no MLflow experiment named {experiment!r} in this tracking store")
    latest = latest_search(client, [found.experiment_id], finished=True)
    if latest is None:
        raise ValueError(f"experiment {experiment!r} has no finished search")
    return latest


def completed_trial_runs(client: MlflowClient, search: Run) -> list[Run]:
    """The search's own trial runs that trained to the end (state COMPLETE): no supernet, proxy or confirmation."""
    query = (
        f"tags.`mlflow.parentRunId` = '{search.info.run_id}' and tags.`pathsearch.state` = 'COMPLETE' "
        "and attributes.status = 'FINISHED'"
    )
    runs = client.search_runs([search.info.experiment_id], filter_string=query, max_results=50000)
    return [r for r in runs if ROLE_TAG not in r.data.tags]


def pareto_runs(runs: list[Run], metrics: list[str], modes: list[str]) -> list[Run]:
    """Runs that no other run beats on every metric (and strictly on one)."""

    def values(run: Run) -> list[float] | None:
        return [run.data.metrics[m] for m in metrics] if all(m in run.data.metrics for m in metrics) else None

    return pareto_front(runs, values, modes)


def export_best(
    experiment: str,
    out: str | Path,
    tracking_uri: str | None = None,
    metric: str = "val_acc",
    mode: str = "max",
    with_weights: bool = False,
    run_id: str | None = None,
    seed: int | str | None = None,
) -> Exported:
    """Writes a search's answer to `out`: the confirmed winner's PathConfig with its provenance (search, seeds, val
    and test mean and std, the verdict), or for a search without confirmation its best trial by `metric`.

    Args:
        run_id: the search's parent run (default: the latest finished search of `experiment`).
        seed: which confirmation seed's learned EnsembleScale values and weights (default: the first); "all" also
            writes `<out stem>_seed<S>.yaml` (and `.safetensors`) for every seed.
    """
    uri = tracking_uri or default_tracking_uri()
    client = MlflowClient(uri)
    search = find_search(client, experiment, run_id)
    winner = search.data.tags.get(WINNER_TAG)
    if winner is None:
        if seed is not None:
            raise ValueError(f"search {search.info.run_id} ran no confirmation: there are no seeds to choose from")
        return _export_trial(client, search, Path(out), metric, mode, with_weights)
    config_run = client.get_run(winner)
    query = f"tags.`mlflow.parentRunId` = '{winner}' and attributes.status = 'FINISHED'"
    seed_runs = {
        int(r.data.tags[SEED_TAG]): r
        for r in client.search_runs([search.info.experiment_id], filter_string=query, max_results=1000)
        if SEED_TAG in r.data.tags
    }
    if not seed_runs:
        raise ValueError(f"the confirmed configuration {winner} has no finished seed runs")
    if seed in (None, "all"):
        chosen = [min(seed_runs)] if seed is None else sorted(seed_runs)
    else:
        if int(seed) not in seed_runs:
            raise ValueError(f"--seed {seed}: the confirmed configuration was trained on seeds {sorted(seed_runs)}")
        chosen = [int(seed)]
    out = Path(out)
    m = config_run.data.metrics
    provenance: dict[str, Any] = {
        "confirmed": True,
        "search_run_id": search.info.run_id,
        "search_name": search.info.run_name,
        "experiment": experiment,
        "configuration_run_id": winner,
        "configuration": config_run.data.tags.get("mlflow.note.content", ""),
        "found_by": config_run.data.params.get("source", ""),
        "selected_by": "highest mean val score over the confirmation seeds (test was not used)",
        "seeds": sorted(seed_runs),
        **{f"{k}_{s}": m.get(f"{k}_{s}") for k in ("val_acc", "test_acc") for s in ("mean", "std")},
        "verdict": search.data.tags.get(VERDICT_TAG, ""),
        "exported_at": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    files: dict[str, Path] = {}
    written: list[dict[str, Any]] = []
    targets = [(chosen[0], out)]  # with seed "all", every seed also under its own name
    if seed == "all":
        targets += [(s, out.with_name(f"{out.stem}_seed{s}{out.suffix or '.yaml'}")) for s in chosen]
    for s, target in targets:
        run = seed_runs[s]
        info = {**provenance, "weights_seed": s, "seed_run_id": run.info.run_id}
        info.update({k: run.data.metrics.get(k) for k in ("val_acc", "test_acc")})
        written.append(info)
        suffix = "" if target == out else f"_seed{s}"
        files[f"path_config{suffix}"] = _write_config(client, run.info.run_id, target, info)
        if with_weights:
            weights = target.with_suffix(".safetensors")
            files[f"weights{suffix}"] = _download(client, run.info.run_id, "model_0.safetensors", weights)
    return Exported(seed_runs[chosen[0]].info.run_id, dict(m), files, written[0])


def _export_trial(client: MlflowClient, search: Run, out: Path, metric: str, mode: str, with_weights: bool) -> Exported:
    runs = [r for r in completed_trial_runs(client, search) if metric in r.data.metrics]
    if not runs:
        raise ValueError(f"search {search.info.run_id} has no completed trial with metric {metric!r}")
    best = (max if mode == "max" else min)(runs, key=lambda r: r.data.metrics[metric])
    provenance = {
        "confirmed": False,
        "search_run_id": search.info.run_id,
        "search_name": search.info.run_name,
        "trial_run_id": best.info.run_id,
        "selected_by": f"{mode} {metric} of one seed on the split the search decided on (no confirmation)",
        metric: best.data.metrics[metric],
        "exported_at": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    files = {"path_config": _write_config(client, best.info.run_id, out, provenance)}
    if with_weights:
        files["weights"] = _download(client, best.info.run_id, "model_0.safetensors", out.with_suffix(".safetensors"))
    return Exported(best.info.run_id, dict(best.data.metrics), files, provenance)


def export_pareto(
    experiment: str,
    out: str | Path,
    metrics: list[str],
    modes: list[str],
    tracking_uri: str | None = None,
    run_id: str | None = None,
) -> list[Exported]:
    """Writes every Pareto-front configuration of one search (default: the latest finished one) as
    `<out stem>_<k>.yaml` plus an index `out` listing them."""
    client = MlflowClient(tracking_uri or default_tracking_uri())
    search = find_search(client, experiment, run_id)
    front = pareto_runs(completed_trial_runs(client, search), metrics, modes)
    if not front:
        raise ValueError(f"search {search.info.run_id} has no completed trial with metrics {metrics}")
    out = Path(out)
    exported, index = [], []
    for k, run in enumerate(sorted(front, key=lambda r: -r.data.metrics[metrics[0]])):
        target = out.with_name(f"{out.stem}_{k}{out.suffix or '.yaml'}")
        path = _download(client, run.info.run_id, "path_config.yaml", target)
        values = {m: run.data.metrics[m] for m in metrics}
        exported.append(Exported(run.info.run_id, values, {"path_config": path}))
        index.append({"run_id": run.info.run_id, "metrics": values, "path_config": str(path)})
    body = {"search_run_id": search.info.run_id, "metrics": metrics, "modes": modes, "front": index}
    _write_atomic(out, yaml.safe_dump(body, sort_keys=False))
    return exported


def _write_config(client: MlflowClient, run_id: str, target: Path, provenance: dict[str, Any]) -> Path:
    """The run's PathConfig with `provenance` added, written atomically to `target`."""
    with tempfile.TemporaryDirectory() as tmp:
        local = _download(client, run_id, "path_config.yaml", Path(tmp) / "path_config.yaml")
        config = PathConfig.load(local)
    config.provenance = provenance
    return config.save(target)


def _download(client: MlflowClient, run_id: str, name: str, target: Path) -> Path:
    with tempfile.TemporaryDirectory() as tmp:
        local = download_artifact(client, run_id, name, tmp)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".tmp")
        shutil.copyfile(local, partial)
        partial.replace(target)
    return target


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
