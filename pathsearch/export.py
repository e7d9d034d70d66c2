"""Best trial(s) -> PathConfig YAML (and weights), read only from MLflow, so it works from any machine that
reaches the tracking server. No tensors: the files are copied as MLflow stores them.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from pathsearch.tracking import default_tracking_uri


@dataclass
class Exported:
    run_id: str
    metrics: dict[str, float]
    files: dict[str, Path]


def completed_trial_runs(client: MlflowClient, experiment: str) -> list[Run]:
    """Child runs of trials that trained to the end (state COMPLETE), across every search of the experiment."""
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise ValueError(f"no MLflow experiment named {experiment!r} in this tracking store")
    query = "tags.`pathsearch.state` = 'COMPLETE' and attributes.status = 'FINISHED'"
    runs = client.search_runs([found.experiment_id], filter_string=query, max_results=50000)
    # A two-stage search's supernet trained as a trial, but it is the proxy's model, not a configuration to export.
    return [r for r in runs if r.data.tags.get("pathsearch.role") != "supernet"]


def pareto_front(runs: list[Run], metrics: list[str], modes: list[str]) -> list[Run]:
    """Runs that no other run beats on every metric (and strictly on one)."""

    def vector(run: Run) -> list[float]:
        return [run.data.metrics[m] * (1 if mode == "max" else -1) for m, mode in zip(metrics, modes, strict=True)]

    scored = [(r, vector(r)) for r in runs if all(m in r.data.metrics for m in metrics)]
    front = []
    for run, v in scored:
        dominated = any(all(a >= b for a, b in zip(w, v, strict=True)) and w != v for _, w in scored)
        if not dominated:
            front.append(run)
    return front


def export_best(
    experiment: str,
    out: str | Path,
    tracking_uri: str | None = None,
    metric: str = "val_acc",
    mode: str = "max",
    with_weights: bool = False,
) -> Exported:
    """Writes the best completed trial's PathConfig to `out` (and its weights next to it, `.safetensors`)."""
    client = MlflowClient(tracking_uri or default_tracking_uri())
    runs = [r for r in completed_trial_runs(client, experiment) if metric in r.data.metrics]
    if not runs:
        raise ValueError(f"experiment {experiment!r} has no completed trial with metric {metric!r}")
    best = (max if mode == "max" else min)(runs, key=lambda r: r.data.metrics[metric])
    out = Path(out)
    files = {"path_config": _download(client, best.info.run_id, "path_config.yaml", out)}
    if with_weights:
        files["weights"] = _download(client, best.info.run_id, "model_0.safetensors", out.with_suffix(".safetensors"))
    return Exported(best.info.run_id, dict(best.data.metrics), files)


def export_pareto(
    experiment: str, out: str | Path, metrics: list[str], modes: list[str], tracking_uri: str | None = None
) -> list[Exported]:
    """Writes every Pareto-front configuration as `<out stem>_<k>.yaml` plus an index `out` listing them."""
    client = MlflowClient(tracking_uri or default_tracking_uri())
    front = pareto_front(completed_trial_runs(client, experiment), metrics, modes)
    if not front:
        raise ValueError(f"experiment {experiment!r} has no completed trial with metrics {metrics}")
    out = Path(out)
    exported, index = [], []
    for k, run in enumerate(sorted(front, key=lambda r: -r.data.metrics[metrics[0]])):
        target = out.with_name(f"{out.stem}_{k}{out.suffix or '.yaml'}")
        path = _download(client, run.info.run_id, "path_config.yaml", target)
        values = {m: run.data.metrics[m] for m in metrics}
        exported.append(Exported(run.info.run_id, values, {"path_config": path}))
        index.append({"run_id": run.info.run_id, "metrics": values, "path_config": str(path)})
    _write_atomic(out, yaml.safe_dump({"metrics": metrics, "modes": modes, "front": index}, sort_keys=False))
    return exported


def _download(client: MlflowClient, run_id: str, name: str, target: Path) -> Path:
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = client.download_artifacts(run_id, name, tmp)
        except Exception as err:  # MLflow raises several types for a missing artifact
            raise ValueError(f"run {run_id} has no artifact {name!r}: {err}") from None
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
