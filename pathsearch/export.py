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

from pathsearch.config.paths import PathConfig
from pathsearch.search.results import pareto_front
from pathsearch.tracking.runs import Run, Store
from pathsearch.tracking.tags import KIND_TAG, NOTE_TAG, ROLE_TAG, SEED_TAG, STATE_TAG, VERDICT_TAG, WINNER_TAG


@dataclass
class Exported:
    run_id: str  # the MLflow run whose PathConfig (and weights) were written
    metrics: dict[str, float]
    files: dict[str, Path]
    provenance: dict[str, Any] = field(default_factory=dict)
    registered: tuple[str, str] | None = None  # (registered model name, version) with `register`


def find_search(store: Store, experiment: str, run_id: str | None = None) -> Run:
    """The search's parent run: `run_id`, or the latest finished search of `experiment`."""
    experiment_id = store.find_experiment(experiment)
    if experiment_id is None:
        raise ValueError(f"no MLflow experiment named {experiment!r} in this tracking store")
    if run_id is not None:
        run = store.run(run_id)
        if run.tags.get(KIND_TAG) != "search":
            raise ValueError(f"run {run_id} is not a search's parent run (give the run id the search printed)")
        if run.experiment_id != experiment_id:  # its provenance would name the wrong experiment
            raise ValueError(
                f"--run-id {run_id}: that search belongs to another experiment than --experiment {experiment!r} "
                f"(id {run.experiment_id}, not {experiment_id}); give the experiment it ran in"
            )
        return run
    latest = store.latest_search([experiment_id], finished=True)
    if latest is None:
        raise ValueError(f"experiment {experiment!r} has no finished search")
    return latest


def completed_trial_runs(store: Store, search: Run) -> list[Run]:
    """The search's own trial runs that trained to the end (state COMPLETE): no supernet, proxy or confirmation."""
    query = f"tags.`{STATE_TAG}` = 'COMPLETE' and attributes.status = 'FINISHED'"
    return [r for r in store.children(search.run_id, search.experiment_id, query) if ROLE_TAG not in r.tags]


def pareto_runs(runs: list[Run], metrics: list[str], modes: list[str]) -> list[Run]:
    """Runs that no other run beats on every metric (and strictly on one)."""

    def values(run: Run) -> list[float] | None:
        return [run.metrics[m] for m in metrics] if all(m in run.metrics for m in metrics) else None

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
    register: str | None = None,
) -> Exported:
    """Writes a search's answer to `out`: the confirmed winner's PathConfig with its provenance (search, seeds, val
    and test mean and std, the verdict), or for a search without confirmation its best trial by `metric`.

    Args:
        run_id: the search's parent run (default: the latest finished search of `experiment`).
        seed: which confirmation seed's learned EnsembleScale values and weights (default: the first); "all" also
            writes `<out stem>_seed<S>.yaml` (and `.safetensors`) for every seed.
        register: also register the confirmed winner (that seed's weights) in MLflow's Model Registry as a new
            version of this registered model, tagged with its provenance and the verdict.
    """
    if register is not None and (not register.strip() or seed == "all"):
        why = "one seed's model is registered, not all" if seed == "all" else "a registered model needs a name"
        raise ValueError(f"--register {register!r}: {why}")
    store = Store(tracking_uri)
    search = find_search(store, experiment, run_id)
    winner = search.tags.get(WINNER_TAG)
    if winner is None:
        if seed is not None:
            raise ValueError(f"search {search.run_id} ran no confirmation: there are no seeds to choose from")
        if register is not None:
            raise ValueError(f"--register {register}: search {search.run_id} ran no confirmation: nothing confirmed")
        return _export_trial(store, search, Path(out), metric, mode, with_weights)
    config_run = store.run(winner)
    finished = store.children(winner, search.experiment_id, "attributes.status = 'FINISHED'")
    seed_runs = {int(r.tags[SEED_TAG]): r for r in finished if SEED_TAG in r.tags}
    if not seed_runs:
        raise ValueError(f"the confirmed configuration {winner} has no finished seed runs")
    if seed in (None, "all"):
        chosen = [min(seed_runs)] if seed is None else sorted(seed_runs)
    else:
        if int(seed) not in seed_runs:
            raise ValueError(f"--seed {seed}: the confirmed configuration was trained on seeds {sorted(seed_runs)}")
        chosen = [int(seed)]
    out = Path(out)
    m = config_run.metrics
    provenance: dict[str, Any] = {
        "confirmed": True,
        "search_run_id": search.run_id,
        "search_name": search.name,
        "experiment": store.experiment_name(search.experiment_id),
        "configuration_run_id": winner,
        "configuration": config_run.tags.get(NOTE_TAG, ""),
        "found_by": config_run.params.get("source", ""),
        "selected_by": "highest mean val score over the confirmation seeds (test was not used)",
        "seeds": sorted(seed_runs),
        **{f"{k}_{s}": m.get(f"{k}_{s}") for k in ("val_acc", "test_acc") for s in ("mean", "std")},
        "verdict": search.tags.get(VERDICT_TAG, ""),
        "exported_at": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    files: dict[str, Path] = {}
    written: list[dict[str, Any]] = []
    targets = [(chosen[0], out)]  # with seed "all", every seed also under its own name
    if seed == "all":
        targets += [(s, out.with_name(f"{out.stem}_seed{s}{out.suffix or '.yaml'}")) for s in chosen]
    for s, target in targets:
        run = seed_runs[s]
        info = {**provenance, "weights_seed": s, "seed_run_id": run.run_id}
        info.update({k: run.metrics.get(k) for k in ("val_acc", "test_acc")})
        written.append(info)
        suffix = "" if target == out else f"_seed{s}"
        files[f"path_config{suffix}"] = _write_config(store, run.run_id, target, info)
        if with_weights:
            weights = target.with_suffix(".safetensors")
            files[f"weights{suffix}"] = _download(store, run.run_id, "model_0.safetensors", weights)
    exported = Exported(seed_runs[chosen[0]].run_id, dict(m), files, written[0])
    if register is not None:
        exported.registered = (register, _register(store, register, search, seed_runs[chosen[0]], exported))
    return exported


def _register(store: Store, name: str, search: Run, seed_run: Run, exported: Exported) -> str:
    """The exported winner as a new version of registered model `name`; its version."""
    from pathsearch.tracking.registry import register_model

    p = exported.provenance
    keys = ("search_run_id", "search_name", "configuration_run_id", "configuration", "seed_run_id", "weights_seed",
            "seeds", "val_acc_mean", "val_acc_std", "test_acc_mean", "test_acc_std", "selected_by")  # fmt: skip
    tags = {f"pathsearch.{k}": str(p[k])[:5000] for k in keys if p.get(k) is not None}
    tags["pathsearch.verdict"] = str(p.get("verdict", ""))[:5000]
    with tempfile.TemporaryDirectory() as tmp:
        weights = exported.files.get("weights") or _download(
            store, seed_run.run_id, "model_0.safetensors", Path(tmp) / "model_0.safetensors"
        )
        config = exported.files["path_config"]
        return register_model(store.uri, name, search.experiment_id, seed_run.run_id, config, weights, tags,
                              description=str(p.get("verdict", "")))  # fmt: skip


def _export_trial(store: Store, search: Run, out: Path, metric: str, mode: str, with_weights: bool) -> Exported:
    runs = [r for r in completed_trial_runs(store, search) if metric in r.metrics]
    if not runs:
        raise ValueError(f"search {search.run_id} has no completed trial with metric {metric!r}")
    best = (max if mode == "max" else min)(runs, key=lambda r: r.metrics[metric])
    provenance = {
        "confirmed": False,
        "search_run_id": search.run_id,
        "search_name": search.name,
        "trial_run_id": best.run_id,
        "selected_by": f"{mode} {metric} of one seed on the split the search decided on (no confirmation)",
        metric: best.metrics[metric],
        "exported_at": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    files = {"path_config": _write_config(store, best.run_id, out, provenance)}
    if with_weights:
        files["weights"] = _download(store, best.run_id, "model_0.safetensors", out.with_suffix(".safetensors"))
    return Exported(best.run_id, dict(best.metrics), files, provenance)


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
    store = Store(tracking_uri)
    search = find_search(store, experiment, run_id)
    front = pareto_runs(completed_trial_runs(store, search), metrics, modes)
    if not front:
        raise ValueError(f"search {search.run_id} has no completed trial with metrics {metrics}")
    out = Path(out)
    exported, index = [], []
    for k, run in enumerate(sorted(front, key=lambda r: -r.metrics[metrics[0]])):
        target = out.with_name(f"{out.stem}_{k}{out.suffix or '.yaml'}")
        path = _download(store, run.run_id, "path_config.yaml", target)
        values = {m: run.metrics[m] for m in metrics}
        exported.append(Exported(run.run_id, values, {"path_config": path}))
        index.append({"run_id": run.run_id, "metrics": values, "path_config": str(path)})
    body = {"search_run_id": search.run_id, "metrics": metrics, "modes": modes, "front": index}
    _write_atomic(out, yaml.safe_dump(body, sort_keys=False))
    return exported


def _write_config(store: Store, run_id: str, target: Path, provenance: dict[str, Any]) -> Path:
    """The run's PathConfig with `provenance` added, written atomically to `target`."""
    with tempfile.TemporaryDirectory() as tmp:
        local = _download(store, run_id, "path_config.yaml", Path(tmp) / "path_config.yaml")
        config = PathConfig.load(local)
    config.provenance = provenance
    return config.save(target)


def _download(store: Store, run_id: str, name: str, target: Path) -> Path:
    with tempfile.TemporaryDirectory() as tmp:
        local = store.download(run_id, name, tmp)
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
