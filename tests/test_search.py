"""The search on a real local Ray with a real MLflow store, checked with the real MLflow client.

Most tests use a torch-free toy trainable with fit's contract (fast); one drives the CLI as the README does.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import ray
import yaml
from mlflow.tracking import MlflowClient
from ray import tune

from pathsearch.config import load_search_file
from pathsearch.paths import PathConfig, path_names
from pathsearch.search import run_search

ROOT = Path(__file__).resolve().parents[1]
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers need not import this test module


def toy_trial(config: dict, base: dict) -> None:
    """fit's contract without torch: per-epoch metrics and a checkpoint holding a real PathConfig YAML."""
    overrides = config["overrides"]
    pruned = overrides.get("model.pruned", [])
    marker_dir = Path(base["train"]["marker_dir"]) if "marker_dir" in base["train"] else None
    if marker_dir is not None:  # count attempts per configuration (retries)
        marker = marker_dir / f"{len(pruned)}-{os.getpid()}-{len(list(marker_dir.iterdir()))}"
        marker.write_text("attempt")
        if len(pruned) == int(base["train"].get("fail_k", -1)):
            raise RuntimeError(f"toy failure for k={len(pruned)}")
    epochs = base["train"]["epochs"]
    level = 0.5 + 0.04 * len(pruned)
    ckpt_root = Path(os.getcwd()) / "toy"
    for epoch in range(1, epochs + 1):
        folder = ckpt_root / f"c{epoch}"
        folder.mkdir(parents=True, exist_ok=True)
        PathConfig(model_name="toy", depth=2, pruned=list(pruned)).save(folder / "path_config.yaml")
        metrics = {"val_acc": level * epoch / epochs, "epoch": epoch, "kept_paths": 5 - len(pruned), "train_loss": 1.0}
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(str(folder)))


@pytest.fixture(scope="module")
def local_ray():
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # keep the local Ray on 127.0.0.1
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    yield
    ray.shutdown()


def toy_spec(tmp_path: Path, space: dict, search: dict, train: dict | None = None):
    data = {
        "model": {"name": "vit_tiny_patch16_224", "kwargs": {"depth": 2}},
        "data": {"name": "synthetic"},
        "train": {"epochs": 4},
        "search": {
            "metric": "val_acc",
            "mode": "max",
            "num_samples": 4,
            "max_concurrent_trials": 1,
            "sampler": "random",
            "scheduler": "none",
            "seed": 0,
            "max_failures": 0,
            **search,
        },
        "space": space,
        "tracking": {"experiment": "toy"},
    }
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump(data))
    # `marker_dir`/`fail_k` are toy-only knobs: add them after validation
    spec = load_search_file(path)
    spec.raw["train"].update({k: v for k, v in (train or {}).items() if k in ("marker_dir", "fail_k")})
    return spec


def child_runs(uri: str, experiment: str = "toy"):
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("pathsearch.kind") == "search"]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return client, parents, children


def study(result):
    return json.loads((result.run_dir / "optuna_trials.json").read_text())


def test_each_trial_gets_one_nested_run_with_params_metrics_artifacts(tmp_path, local_ray):
    spec = toy_spec(tmp_path, {"model.pruned": {"by": "path"}}, {"num_samples": 4})
    spec.raw["train"].pop("marker_dir", None)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = run_search(spec, tmp_path / "runs", uri, name="t1", verbose=False, trainable=toy_trial)
    client, parents, children = child_runs(uri)
    assert len(parents) == 1 and len(children) == 4
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    assert len({c.data.tags["pathsearch.trial_id"] for c in children}) == 4
    for run in children:
        assert run.info.status == "FINISHED" and run.data.tags["pathsearch.state"] == "COMPLETE"
        assert {f"prune.{n}" for n in path_names(2)} <= set(run.data.params)
        history = client.get_metric_history(run.info.run_id, "val_acc")
        assert [m.step for m in history] == [1, 2, 3, 4]
        assert "path_config.yaml" in [a.path for a in client.list_artifacts(run.info.run_id)]
    assert parents[0].info.status == "FINISHED"
    assert parents[0].data.metrics["trials_complete"] == 4
    parent_artifacts = {a.path for a in client.list_artifacts(parents[0].info.run_id)}
    assert {"search.yaml", "optuna_trials.json", "best_path_config.yaml"} <= parent_artifacts
    # baseline enqueued first: no path pruned
    first = study(result)[0]
    assert first["params"] and not any(first["params"].values())
    assert result.baseline is not None and result.baseline["kept_paths"] == 5
    assert result.best is not None and result.best["val_acc"] >= result.baseline["val_acc"]


def test_asha_stopped_trials_are_pruned_in_optuna_and_killed_in_mlflow(tmp_path, local_ray):
    space = {
        "model.pruned": {"by": "shortest", "low": 0, "high": 4},
        "train.lr": {"low": 1.0e-4, "high": 1.0e-2, "log": True},
    }
    spec = toy_spec(
        tmp_path, space, {"num_samples": 8, "scheduler": "asha", "grace_period": 1, "reduction_factor": 2.0}
    )
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = run_search(spec, tmp_path / "runs", uri, name="t2", verbose=False, trainable=toy_trial)
    trials = study(result)
    pruned = [t for t in trials if t["state"] == "PRUNED"]
    assert pruned, "ASHA stopped no trial"
    for t in pruned:  # Optuna keeps the last intermediate value as a pruned trial's value
        assert t["intermediate_values"]
        assert t["values"] == [t["intermediate_values"][max(t["intermediate_values"], key=int)]]
    assert not [
        t for t in trials if t["state"] == "COMPLETE" and len(t["intermediate_values"]) < 4 and not t["user_attrs"]
    ]
    _, _, children = child_runs(uri)
    killed = [c for c in children if c.info.status == "KILLED"]
    assert len(killed) == len(pruned)
    assert all(c.data.tags["pathsearch.state"] == "PRUNED" and c.data.metrics["epoch"] < 4 for c in killed)
    assert all(c.info.status != "RUNNING" for c in children)


def test_repeated_configuration_is_not_trained_again(tmp_path, local_ray):
    spec = toy_spec(tmp_path, {"model.pruned": {"by": "shortest", "low": 0, "high": 2}}, {"num_samples": 6})
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = run_search(spec, tmp_path / "runs", uri, name="t3", verbose=False, trainable=toy_trial)
    _, _, children = child_runs(uri)
    trained = [json.loads(c.data.params["config.model.pruned"].replace("'", '"')) for c in children]
    assert len(trained) == len({tuple(t) for t in trained}) <= 3  # each mask trained once
    assert result.counts["reused"] >= 1
    assert len(trained) + result.counts["reused"] == 6  # reused results count towards num_samples
    reused = [t for t in study(result) if t["user_attrs"].get("pathsearch.reused")]
    assert reused and all(t["state"] == "COMPLETE" and t["values"] for t in reused)


def test_failing_trial_is_retried_then_recorded_as_failed(tmp_path, local_ray):
    markers = tmp_path / "markers"
    markers.mkdir()
    spec = toy_spec(
        tmp_path,
        {"model.pruned": {"by": "shortest", "low": 0, "high": 1}},
        {"num_samples": 2, "max_failures": 1, "sampler": "tpe"},
        train={"marker_dir": str(markers), "fail_k": 1},
    )
    spec.search.enqueue = [{"prune.shortest": 1}]  # make sure the failing configuration is tried
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = run_search(spec, tmp_path / "runs", uri, name="t4", verbose=False, trainable=toy_trial)
    attempts = [m.name.split("-")[0] for m in markers.iterdir()]
    assert attempts.count("1") == 2  # first try + one retry (max_failures: 1)
    states = {tuple(t["params"].items()): t["state"] for t in study(result)}
    assert states[(("prune.shortest", 1),)] == "FAIL"
    assert states[(("prune.shortest", 0),)] == "COMPLETE"
    _, parents, children = child_runs(uri)
    assert sorted(c.info.status for c in children) == ["FAILED", "FINISHED"]
    assert parents[0].info.status == "FINISHED"


def test_readme_flow_search_then_export_reproduces_the_trial(tmp_path):
    """`pathsearch search` on a small digits file through the CLI, then `pathsearch export --with-weights`."""
    import subprocess

    import torch
    from safetensors.torch import load_file
    from torch.utils.data import DataLoader

    from pathsearch.data import load_digits_split
    from pathsearch.model import create_path_vit

    small = [
        "train.epochs=3", "train.eval_every=1", "train.warmup_epochs=0", "data.train_size=200",
        "model.kwargs.depth=2", "search.num_samples=3", "search.scheduler=none", "space.model.pruned.high=3",
    ]  # fmt: skip
    sets = [a for s in small for a in ("--set", s)]
    cli = [sys.executable, "-m", "pathsearch.cli"]
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    spec = str(ROOT / "search_spaces" / "digits_tiny.yaml")
    result = subprocess.run(
        [*cli, "search", spec, *sets, "--storage-path", "runs"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "baseline" in result.stdout and "best_path_config:" in result.stdout
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client, parents, children = child_runs(uri, "digits_tiny")
    assert len(parents) == 1 and len(children) == 3
    assert all(r.info.status == "FINISHED" for r in [*parents, *children])
    assert all(len(client.get_metric_history(c.info.run_id, "val_acc")) == 3 for c in children)

    out = tmp_path / "best.yaml"
    exported = subprocess.run(
        [*cli, "export", "--experiment", "digits_tiny", "--out", str(out), "--with-weights"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert exported.returncode == 0, exported.stderr
    best_run = max(children, key=lambda r: r.data.metrics["val_acc"])
    model = create_path_vit(path_config=PathConfig.load(out))
    model.load_state_dict(load_file(str(out.with_suffix(".safetensors"))))
    model.eval()
    split = load_digits_split(200, seed=0)
    correct = 0
    with torch.no_grad():
        for x, y in DataLoader(split.val, batch_size=256):
            correct += (model(x).argmax(-1) == y).sum().item()
    assert correct / len(split.val) == pytest.approx(best_run.data.metrics["val_acc"], abs=1e-9)
