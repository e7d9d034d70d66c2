"""`pathsearch fit-scales`: fits a trained run's EnsembleScale (and optionally its path mask) on a held-out part of
its validation split, and logs the result as a child run beside the original.

Orchestration (MLflow): torch and the model are imported only inside the function that does the tensor work.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import Any

import yaml

from pathsearch.config import load_trial_config, read_yaml
from pathsearch.config.paths import path_names
from pathsearch.tracking.runs import PARENT_TAG, ROLE_TAG, SEARCH_TAG, RunLog, Store


@dataclasses.dataclass
class FitScalesResult:
    run_id: str  # the new child run
    source_run_id: str
    metrics: dict[str, float]
    factors: dict[str, float]  # per path, multiplying the source run's EnsembleScale
    pruned: list[str]
    files: dict[str, Path]


def fit_scales_run(
    run_id: str,
    tracking_uri: str | None = None,
    search_file: str | Path | None = None,
    out_dir: str | Path | None = None,
    fit_fraction: float = 0.5,
    steps: int = 300,
    lr: float = 0.05,
    prune: bool = False,
    seed: int = 0,
    device: Any = None,
) -> FitScalesResult:
    """Fits per-path EnsembleScale factors (and with `prune` a path mask) of a trained MLflow run on a held-out part
    of its validation split, reports the accuracy change on the rest, and logs the result as a new child run of
    that run (PathConfig and weights with the fitted values, metrics before and after).

    The data settings come from `search_file`, else from the run's search (its parent's `search.yaml`) with the
    run's own `config.data.*` parameters applied.
    """
    given = read_yaml(search_file) if search_file is not None else None  # bad input first, before any work
    from pathsearch.trial.proxy import fit_scales_of_files  # tensors: only this verb needs them

    store = Store(tracking_uri)
    source = store.run(run_id)
    out = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="pathsearch-fit-scales-"))
    with tempfile.TemporaryDirectory() as tmp:
        path_config = store.download(run_id, "path_config.yaml", tmp)
        weights = store.download(run_id, "model_0.safetensors", tmp)
        if search_file is None:
            # the search's parent run holds search.yaml (a confirmation seed's run nests one level deeper)
            parent = source.tags.get(SEARCH_TAG, source.tags.get(PARENT_TAG))
            if parent is None:
                raise ValueError(f"run {run_id} belongs to no search: give the search file its data came from")
            search_file = store.download(parent, "search.yaml", tmp)
        raw = given if given is not None else read_yaml(search_file)
        sections: dict[str, Any] = {k: raw[k] for k in ("model", "data", "train") if k in raw}
        data = dict(sections.get("data") or {})
        for key, text in source.params.items():  # the trial's own data settings, if the search varied them
            if key.startswith("config.data."):
                data[key[len("config.data.") :]] = yaml.safe_load(text)
        cfg = load_trial_config(None, data={**sections, "data": data}, source=str(search_file))
        fit, files = fit_scales_of_files(path_config, weights, cfg, out, fit_fraction, steps, lr, prune, seed, device)
    names = path_names(len(fit.keep) // 2)
    factors = dict(zip(names, fit.factors, strict=True))
    pruned = [n for n, k in zip(names, fit.keep, strict=True) if not k]

    settings = dict(source_run_id=run_id, fit_fraction=fit_fraction, steps=steps, lr=lr, prune=prune, seed=seed)
    child = RunLog(
        name=f"fit-scales of {source.name or run_id}",
        tags={PARENT_TAG: run_id, ROLE_TAG: "fit_scales", "pathsearch.source_run": run_id},
        params={**settings, "pruned": pruned, **{f"factor.{n}": f"{f:.6g}" for n, f in factors.items()}},
        metrics=dict(fit.metrics),
        artifacts=list(files.values()),
        status="FINISHED",
        experiment_id=source.experiment_id,
    )
    ids = store.write([child], "logging the fit-scales run")
    if ids is None:
        raise RuntimeError(f"MLflow at {store.uri} stayed unreachable: the fitted files are in {out}")
    child_id = ids[0]
    return FitScalesResult(child_id, run_id, fit.metrics, factors, pruned, files)
