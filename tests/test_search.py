"""The search on a real local Ray with a real MLflow store, checked with the real MLflow client.

Most tests use a torch-free toy trainable with fit's contract (fast); one drives the CLI as the README does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import ray
import yaml
from mlflow.tracking import MlflowClient

from pathsearch.config import load_search_file
from pathsearch.config.paths import PathConfig, path_names
from pathsearch.search.driver import run_search
from pathsearch.search.searcher import SAMPLERS, make_sampler

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
import toy_search  # noqa: E402  (tests/toy_search.py)

ray.cloudpickle.register_pickle_by_value(toy_search)  # workers need not import the tests folder
toy_trial = toy_search.toy_trial
noisy_toy_trial = toy_search.noisy_toy_trial


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
    spec = load_search_file(path)
    spec.raw["train"]["toy"] = dict(train or {})  # toy-only knobs (marker_dir, fail_k, sleep), after validation
    return spec


def child_runs(uri: str, experiment: str = "toy"):
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("pathsearch.kind") == "search"]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return client, parents, children


def wait_for_finished_runs(proc, state: Path, uri: str, count: int, timeout: float = 240) -> set[str]:
    """Polls MLflow (once the driver has created its store) until `count` trial runs are FINISHED."""
    import time

    finished: set[str] = set()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        time.sleep(1.0)
        if state.exists():
            _, _, children = child_runs(uri)
            finished = {c.data.tags["pathsearch.trial_id"] for c in children if c.info.status == "FINISHED"}
            if len(finished) >= count:
                break
    assert proc.poll() is None, "the search ended before it could be stopped"
    return finished


def resume_toy_search(driver: list[str], run_dir, env: dict) -> subprocess.CompletedProcess[str]:
    """`toy_search.py resume RUN_DIR` in its own session; afterwards kills what it may leave behind (Ray agents)."""
    resume = subprocess.Popen(
        [*driver, "resume", json.dumps({"run_dir": str(run_dir)})],
        env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        out, err = resume.communicate(timeout=600)
    finally:
        subprocess.run(["pkill", "-9", "-s", str(resume.pid)], check=False)
    return subprocess.CompletedProcess(resume.args, resume.returncode, out, err)


def study(result):
    return json.loads((result.run_dir / "optuna_trials.json").read_text())


def test_each_trial_gets_one_nested_run_with_params_metrics_artifacts(tmp_path, local_ray):
    spec = toy_spec(tmp_path, {"model.pruned": {"by": "path"}}, {"num_samples": 4})
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
    assert result.baseline["optuna_trial"] == 0 and result.baseline["overrides"] == {"model.pruned": []}
    assert result.baseline["val_acc"] == pytest.approx(0.5)  # the clean toy: 0.5 + 0.04 per pruned path
    # The clean toy's truth, not the search's max: the best trial is one that pruned the most paths (MLflow's params)
    pruned = [json.loads(c.data.params["config.model.pruned"].replace("'", '"')) for c in children]
    most = max(len(p) for p in pruned)
    assert most > 0, "only the baseline was trained: nothing to choose between"
    assert result.best is not None and len(result.best["overrides"]["model.pruned"]) == most
    assert result.best["val_acc"] == pytest.approx(0.5 + 0.04 * most) and result.best["kept_paths"] == 5 - most
    best_run = next(c for c in children if c.data.tags["pathsearch.trial_id"] == result.best["trial_id"])
    assert best_run.data.metrics["val_acc"] == pytest.approx(result.best["val_acc"])
    assert parents[0].data.metrics["best_val_acc"] == pytest.approx(0.5 + 0.04 * most)
    assert parents[0].data.metrics["baseline_val_acc"] == pytest.approx(0.5)
    assert PathConfig.load(result.run_dir / "best_path_config.yaml").pruned == result.best["overrides"]["model.pruned"]


def test_under_noise_the_best_is_the_top_scored_trial_and_every_store_agrees_on_each_value(tmp_path, local_ray):
    """The noisy toy (true optimum k = 2 shortest pruned; each configuration's val_acc carries seeded noise as large
    as the gaps): whatever the noise shows, the search's best is the trial that scored highest, its baseline is the
    enqueued base configuration, and Optuna, MLflow and the trainable agree on every trial's value."""
    space = {
        "model.pruned": {"by": "shortest", "low": 0, "high": 4},
        "train.lr": {"low": 1.0e-4, "high": 1.0e-2, "log": True},
    }
    spec = toy_spec(tmp_path, space, {"num_samples": 8, "sampler": "tpe", "max_concurrent_trials": 2})
    spec.raw["train"]["lr"] = 1.0e-3  # the base learning rate: the baseline trains it
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = run_search(spec, tmp_path / "runs", uri, name="noisy", verbose=False, trainable=noisy_toy_trial)
    noisy, names = toy_search.NOISY, path_names(2)

    def score(params: dict) -> float:  # what the noisy toy reports for the configuration of these Optuna params
        overrides = {"model.pruned": names[: params["prune.shortest"]], "train.lr": params["train.lr"]}
        return toy_search.toy_score(noisy, params["prune.shortest"], toy_search.noise_seed(noisy, 0, overrides), "val")

    trials = study(result)
    trained = [t for t in trials if t["state"] == "COMPLETE" and not t["user_attrs"].get("pathsearch.reused")]
    assert len(trained) == len(trials) - result.counts["reused"] and len(trained) >= 6
    for t in trials:  # Optuna holds the trainable's value of every trial (reused ones too)
        assert t["state"] == "COMPLETE" and t["values"] == [pytest.approx(score(t["params"]))]
    _, parents, children = child_runs(uri)
    runs = {int(c.data.tags["pathsearch.optuna_trial"]): c for c in children}
    assert len(children) == len(runs) and set(runs) == {t["number"] for t in trained}
    client = MlflowClient(uri)
    for t in trained:  # MLflow: the same final value, at the last epoch, and the same parameters
        run = runs[t["number"]]
        assert run.info.status == "FINISHED" and run.data.metrics["val_acc"] == pytest.approx(t["values"][0])
        assert [m.step for m in client.get_metric_history(run.info.run_id, "val_acc")] == [1, 2, 3, 4]
        assert run.data.params["prune.shortest"] == str(t["params"]["prune.shortest"])
        assert float(run.data.params["train.lr"]) == pytest.approx(t["params"]["train.lr"])
    # the noise matters: some trial scored above another whose configuration is truly better
    pairs = [(a, b) for a in trained for b in trained if a["values"][0] > b["values"][0]]
    means = noisy["means"]
    assert any(means[a["params"]["prune.shortest"]] < means[b["params"]["prune.shortest"]] for a, b in pairs)

    top = max(trained, key=lambda t: t["values"][0])  # values are distinct floats: no tie to break
    assert result.best is not None and result.best["optuna_trial"] == top["number"]
    assert result.best["val_acc"] == pytest.approx(top["values"][0])
    assert result.best["trial_id"] == runs[top["number"]].data.tags["pathsearch.trial_id"]
    assert result.best["overrides"]["model.pruned"] == names[: top["params"]["prune.shortest"]]
    assert PathConfig.load(result.run_dir / "best_path_config.yaml").pruned == result.best["overrides"]["model.pruned"]
    assert result.baseline is not None and result.baseline["optuna_trial"] == 0
    assert trials[0]["params"] == {"prune.shortest": 0, "train.lr": 1.0e-3}
    assert result.baseline["overrides"] == {"model.pruned": [], "train.lr": 1.0e-3}
    assert result.baseline["val_acc"] == pytest.approx(score(trials[0]["params"]))
    assert result.baseline["trial_id"] == runs[0].data.tags["pathsearch.trial_id"]
    assert parents[0].data.metrics["best_val_acc"] == pytest.approx(top["values"][0])
    assert parents[0].data.metrics["baseline_val_acc"] == pytest.approx(result.baseline["val_acc"])


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


def test_failing_trial_is_retried_then_recorded_as_failed(tmp_path, local_ray, capfd):
    """...and the console shows only the progress line counting the retry and the failure: the attempts'
    tracebacks go to the run directory's library log."""
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
    result = run_search(spec, tmp_path / "runs", uri, name="t4", verbose=True, trainable=toy_trial)
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err and "toy failure" not in out + err, err[-3000:]
    assert "retried 1" in out and "failed 1" in out.splitlines()[-1], out
    log = (result.run_dir / "library_output.log").read_text()
    assert log.count("RuntimeError: toy failure for k=1") == 2  # both attempts' tracebacks, in the log
    attempts = [m.name.split(".")[1] for m in markers.iterdir()]
    assert attempts.count("1") == 2  # first try + one retry (max_failures: 1)
    states = {tuple(t["params"].items()): t["state"] for t in study(result)}
    assert states[(("prune.shortest", 1),)] == "FAIL"
    assert states[(("prune.shortest", 0),)] == "COMPLETE"
    _, parents, children = child_runs(uri)
    assert sorted(c.info.status for c in children) == ["FAILED", "FINISHED"]
    assert parents[0].info.status == "FINISHED"
    # the failed run says why in MLflow: the error as a tag, every attempt's traceback as an artifact
    failed = next(c for c in children if c.info.status == "FAILED")
    assert failed.data.tags["pathsearch.error"] == "RuntimeError: toy failure for k=1"
    assert [f.path for f in MlflowClient(uri).list_artifacts(failed.info.run_id)] == ["error.txt"]
    error = MlflowClient(uri).download_artifacts(failed.info.run_id, "error.txt", str(tmp_path))
    assert Path(error).read_text().count("RuntimeError: toy failure for k=1") == 2


def test_driver_killed_then_resumed_keeps_one_run_per_trial(tmp_path):
    """kill -9 the search driver (its whole process group) mid-search, then resume: the search completes, every
    trial has exactly one MLflow run, none is left RUNNING, and trials finished before the kill are not rerun."""
    import subprocess
    import time

    markers = tmp_path / "markers"
    markers.mkdir()
    toy_spec(tmp_path, {"model.pruned": {"by": "path"}}, {"num_samples": 6})
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = {
        "file": str(tmp_path / "toy.yaml"), "storage": str(tmp_path / "runs"), "uri": uri, "name": "crash",
    }  # fmt: skip
    driver = [sys.executable, str(Path(__file__).parent / "toy_search.py")]
    knobs = json.dumps({"marker_dir": str(markers), "sleep": 0.75})  # Ray workers inherit the driver's environment
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "PATHSEARCH_TOY": knobs}
    proc = subprocess.Popen(
        [*driver, "search", json.dumps(args)], env=env, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    state = tmp_path / "runs" / "crash" / "pathsearch_state.json"  # written once the MLflow store exists
    try:
        finished_before = wait_for_finished_runs(proc, state, uri, 2)
        assert len(finished_before) >= 2
    finally:
        # kill -9 the driver and every process of its session (its local Ray included), nothing else
        subprocess.run(["pkill", "-9", "-s", str(proc.pid)], check=False)
        proc.wait()
    time.sleep(2)
    resume = resume_toy_search(driver, tmp_path / "runs" / "crash", env)
    assert resume.returncode == 0, resume.stderr[-3000:]
    _, parents, children = child_runs(uri)
    trial_ids = [c.data.tags["pathsearch.trial_id"] for c in children]
    study = json.loads((tmp_path / "runs" / "crash" / "optuna_trials.json").read_text())
    reused = sum(bool(t["user_attrs"].get("pathsearch.reused")) for t in study)
    assert len(trial_ids) == len(set(trial_ids))  # one run per trial, none duplicated
    assert all(r.info.status in ("FINISHED", "KILLED") for r in [*parents, *children])  # none left RUNNING
    assert parents[0].info.status == "FINISHED"
    finished = [c for c in children if c.info.status == "FINISHED"]
    # A trial that was running but not yet in Tune's last snapshot is lost with the driver: its run is closed
    # as KILLED/LOST and Tune trains that sample again as a new trial (at most max_concurrent_trials of them).
    lost = [c for c in children if c.data.tags.get("pathsearch.state") == "LOST"]
    assert len(lost) <= 1 and len(children) == len(finished) + len(lost)
    assert len(finished) + reused == 6 and len(finished) > len(finished_before)
    assert all(t["state"] != "RUNNING" for t in study)
    starts: dict[str, list[int]] = {}  # trial id -> epoch each attempt started from
    for marker in markers.iterdir():
        trial_id, _, start, _ = marker.name.split(".")
        starts.setdefault(trial_id, []).append(int(start))
    for trial_id in finished_before:  # trained once: a restore after the kill may only resume past the end
        assert sorted(starts[trial_id])[0] == 0 and all(s == 4 for s in sorted(starts[trial_id])[1:]), starts
    assert set(starts) == set(trial_ids)  # the others were started (or restored) after the kill


# The last version of the flat layout (pathsearch/runner.py, searcher.py, ...): Tune's snapshots of its searches
# name the trainable, the searcher and the callbacks by those modules
FLAT_LAYOUT = "b960fa1"


def test_a_search_the_flat_layout_started_and_lost_resumes_in_this_version(tmp_path):
    """A search run by the flat layout's code (that commit's pathsearch/ on PYTHONPATH) is killed -9 mid-search; this
    version resumes it: the snapshot's classes load under their old module names, the search finishes, one run per
    trial, none left RUNNING, no trial finished before the kill trained again."""
    import io
    import tarfile
    import time

    root = Path(__file__).resolve().parents[1]
    archive = subprocess.run(["git", "-C", str(root), "archive", FLAT_LAYOUT, "pathsearch"], capture_output=True)
    if archive.returncode != 0:
        pytest.skip(f"this clone lacks commit {FLAT_LAYOUT} (a shallow clone?): {archive.stderr.decode()[:200]}")
    old = tmp_path / "flat"
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(old, filter="data")
    assert (old / "pathsearch" / "runner.py").is_file() and not (old / "pathsearch" / "search").exists()
    markers = tmp_path / "markers"
    markers.mkdir()
    toy_spec(tmp_path, {"model.pruned": {"by": "path"}}, {"num_samples": 5})
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = {"file": str(tmp_path / "toy.yaml"), "storage": str(tmp_path / "runs"), "uri": uri, "name": "flat"}
    driver = [sys.executable, str(Path(__file__).parent / "toy_search.py")]
    knobs = json.dumps({"marker_dir": str(markers), "sleep": 0.75})
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "PATHSEARCH_TOY": knobs}
    flat_env = {**env, "PYTHONPATH": str(old)}  # ahead of this checkout's editable install, Ray's workers too
    proc = subprocess.Popen(
        [*driver, "search", json.dumps(args)], env=flat_env, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    run_dir = tmp_path / "runs" / "flat"
    try:
        finished_before = wait_for_finished_runs(proc, run_dir / "pathsearch_state.json", uri, 2)
    finally:
        subprocess.run(["pkill", "-9", "-s", str(proc.pid)], check=False)
        proc.wait()
    time.sleep(2)
    assert b"pathsearch.runner" in (run_dir / "tuner.pkl").read_bytes()  # the flat layout's names, pickled
    resume = resume_toy_search(driver, run_dir, env)
    assert resume.returncode == 0, resume.stderr[-3000:]
    _, parents, children = child_runs(uri)
    trial_ids = [c.data.tags["pathsearch.trial_id"] for c in children]
    assert len(trial_ids) == len(set(trial_ids)) and parents[0].info.status == "FINISHED"
    assert all(r.info.status in ("FINISHED", "KILLED") for r in [*parents, *children])
    starts: dict[str, list[int]] = {}
    for marker in markers.iterdir():
        trial_id, _, start, _ = marker.name.split(".")
        starts.setdefault(trial_id, []).append(int(start))
    for trial_id in finished_before:  # trained once: a restore may only resume past the end
        assert sorted(starts[trial_id])[0] == 0 and all(s == 4 for s in sorted(starts[trial_id])[1:]), starts


def test_resume_recovers_a_checkpoint_tune_deleted_before_its_snapshot_was_stored(tmp_path, local_ray):
    """Tune deletes a trial's older checkpoint as soon as it registers a newer one, before the snapshot that names
    the newer one is stored: a driver killed in between left a snapshot naming a deleted checkpoint, and the resumed
    trial failed on every retry (a confirmation lost a seed that way). Made here by hand: each trial's named
    checkpoint moved to the next index, as the newer one would be, and a half-written one after it, as a trial killed
    with the driver leaves (restoring that one, the newest, failed every retry). `recover_checkpoints` puts the
    registered one back, both trials finish from where they were (one mid-trial, one at its last epoch), and MLflow
    holds each epoch once."""
    from ray import tune

    from pathsearch import storage
    from pathsearch.tracking.logger import MlflowTrialLogger
    from pathsearch.tracking.runs import SEARCH_TAG

    markers = tmp_path / "markers"
    markers.mkdir()
    # first attempts fail: k = 1 after epoch 2 of 3, k = 2 after its last epoch
    base = {"train": {"epochs": 3, "toy": {"marker_dir": str(markers), "fail_after": {"1": 2, "2": 3}}}}
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment_id = client.create_experiment("recover")
    parent = client.create_run(experiment_id, tags={"pathsearch.kind": "search"}).info.run_id
    trainable = tune.with_parameters(toy_search.toy_trial, base=base)
    space = {"overrides": tune.grid_search([{"model.pruned": path_names(2)[:k]} for k in (1, 2)])}
    logger = MlflowTrialLogger(uri, experiment_id, parent, 3)
    keep_one = tune.CheckpointConfig(num_to_keep=1)  # as searches keep them
    run_config = tune.RunConfig(name="exp", storage_path=str(tmp_path), callbacks=[logger], checkpoint_config=keep_one)
    first = tune.Tuner(trainable, param_space=space, run_config=run_config).fit()
    assert all(r.error is not None for r in first) and len(first) == 2
    folder = str(tmp_path / "exp")
    named = {t.trial_id: Path(t.checkpoint.path) for t in tune.ExperimentAnalysis(folder).trials}
    for path in named.values():  # what the race leaves: the named checkpoint gone, the newer one beside it
        index = int(path.name.split("_")[1])
        path.rename(path.with_name(f"checkpoint_{index + 1:06d}"))
        half = path.with_name(f"checkpoint_{index + 2:06d}")  # and one its killed trial was still writing
        half.mkdir()
        (half / "path_config.yaml").write_text("{}")
    assert sorted(storage.recover_checkpoints(folder)) == sorted(named)
    assert all(path.is_dir() for path in named.values())
    second = tune.Tuner.restore(folder, trainable=trainable, resume_errored=True).fit()
    assert [r.error for r in second] == [None, None] and [r.metrics["epoch"] for r in second] == [3, 3]
    starts = sorted(m.name.split(".")[1:3] for m in markers.iterdir() if not m.name.startswith("failed"))
    assert starts == [["1", "0"], ["1", "2"], ["2", "0"], ["2", "3"]]  # (k, epoch each attempt started from)
    runs = client.search_runs([experiment_id], f"tags.`{SEARCH_TAG}` = '{parent}'")
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FINISHED"}
    for run in runs:  # k = 2 reported its last epoch again: not logged twice
        assert [m.step for m in client.get_metric_history(run.info.run_id, "val_acc")] == [1, 2, 3]


def test_a_trial_whose_actor_dies_before_it_starts_still_has_one_run(tmp_path, local_ray, capfd):
    """Tune retries (or fails) a trial whose actor died in its creation task without telling callbacks that it
    started: the retried trial has one run, FINISHED with its retry counted; the one that never starts has one run,
    FAILED, with its params. Before, neither had a run until it started, so a trial that never did was missing from
    MLflow, and each event said `MLflow refused ... no MLflow run for trial`."""
    from ray import tune

    from pathsearch.tracking.logger import MlflowTrialLogger
    from pathsearch.tracking.runs import RETRIES_TAG, SEARCH_TAG, STATE_TAG

    (tmp_path / "markers").mkdir()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment_id = client.create_experiment("creation")
    parent = client.create_run(experiment_id, tags={"pathsearch.kind": "search"}).info.run_id
    space = {"marker_dir": str(tmp_path / "markers"), "name": tune.grid_search(["once", "always"])}
    space["creation_failures"] = tune.sample_from(lambda spec: 1 if spec.config.name == "once" else 9)
    run_config = tune.RunConfig(
        name="exp", storage_path=str(tmp_path), callbacks=[MlflowTrialLogger(uri, experiment_id, parent, 2)],
        failure_config=tune.FailureConfig(max_failures=1), verbose=0,
    )  # fmt: skip
    grid = tune.Tuner(toy_search.DiesInCreation, param_space=space, run_config=run_config).fit()
    assert sorted(r.error is None for r in grid) == [False, True]
    runs = {r.data.params["name"]: r for r in client.search_runs([experiment_id], f"tags.`{SEARCH_TAG}` = '{parent}'")}
    assert sorted(runs) == ["always", "once"], runs.keys()
    assert runs["once"].info.status == "FINISHED" and runs["once"].data.tags[RETRIES_TAG] == "1"
    assert [m.step for m in client.get_metric_history(runs["once"].info.run_id, "val_acc")] == [1, 2]
    assert runs["always"].info.status == "FAILED" and runs["always"].data.tags[STATE_TAG] == "FAIL"
    assert runs["always"].data.tags[RETRIES_TAG] == "1"  # its one retry, before it failed for good
    assert "no MLflow run" not in capfd.readouterr().err


def test_a_trial_retried_after_its_last_epoch_logs_each_epoch_once(tmp_path, local_ray):
    """A trial that fails after reporting its last epoch is retried from that checkpoint (search.max_failures) and
    reports the epoch again (so that Tune hears its end): its run is FINISHED and holds each epoch once."""
    markers = tmp_path / "markers"
    markers.mkdir()
    spec = toy_spec(
        tmp_path,
        {"model.pruned": {"by": "shortest", "low": 0, "high": 1}},
        {"num_samples": 2, "max_failures": 1},
        train={"marker_dir": str(markers), "fail_after": {"1": 4}},  # k = 1: its first attempt fails after epoch 4
    )
    spec.search.enqueue = [{"prune.shortest": 1}]  # with the baseline (k = 0)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_search(spec, tmp_path / "runs", uri, name="retry", verbose=False, trainable=toy_trial)
    client, _, children = child_runs(uri)
    assert len(children) == 2 and {c.info.status for c in children} == {"FINISHED"}
    assert [c.data.tags.get("pathsearch.retries") for c in children].count("1") == 1  # k = 1 was retried
    starts = sorted(m.name.split(".")[1:3] for m in markers.iterdir() if not m.name.startswith("failed"))
    assert starts == [["0", "0"], ["1", "0"], ["1", "4"]]  # (k, epoch each attempt started from)
    for run in children:
        assert [m.step for m in client.get_metric_history(run.info.run_id, "val_acc")] == [1, 2, 3, 4]


def test_a_trial_the_study_already_ended_is_not_reported_again():
    """Optuna's journal is written when a trial ends, Tune's snapshot later: after a resume Tune may run a trial again
    (or hear its last epoch again) that the study already holds as COMPLETE. Reporting to it raised
    UpdateFinishedTrialError and ended the resumed search; the study keeps its first result."""
    from ray import tune

    from pathsearch.search.searcher import PathOptunaSearch

    searcher = PathOptunaSearch(
        space={"overrides": {"train.lr": tune.uniform(1e-3, 1e-2)}},
        metric="val_acc", mode="max", final_epoch=4, num_paths=5, max_kept_paths=None, num_samples=2,
    )  # fmt: skip
    assert "overrides" in searcher.suggest("t1")
    searcher.study().tell(0, 0.9)  # what the journal holds after a resume
    result = {"val_acc": 0.5, "training_iteration": 4, "epoch": 4}
    searcher.on_trial_result("t1", result)
    searcher.on_trial_complete("t1", result)
    (trial,) = searcher.study().trials
    assert trial.state == optuna.trial.TrialState.COMPLETE and trial.value == 0.9 and not trial.intermediate_values


def test_caps_reject_configurations_before_training(tmp_path, local_ray):
    # depth-2 digits ViT: 5 paths. Keep at most 3, so k < 2 shortest pruned is refused before any training.
    spec = toy_spec(tmp_path, {"model.pruned": {"by": "shortest", "low": 0, "high": 4}}, {"num_samples": 3})
    spec.search.max_kept_paths = 3
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = run_search(spec, tmp_path / "runs", uri, name="caps", verbose=False, trainable=toy_trial)
    _, _, children = child_runs(uri)
    assert children and all(c.data.metrics["kept_paths"] <= 3 for c in children)
    infeasible = [t for t in study(result) if "pathsearch.infeasible" in t["user_attrs"]]
    assert infeasible and all(t["state"] == "FAIL" for t in infeasible)
    assert result.counts["infeasible"] == len(infeasible)
    # the baseline keeps all 5 paths: it is refused too, and said so
    assert any("keeps 5 paths" in t["user_attrs"]["pathsearch.infeasible"] for t in infeasible)


def test_max_params_cap_counts_the_model_before_training(tmp_path, local_ray):
    spec = toy_spec(tmp_path, {"model.kwargs.embed_dim": {"choices": [32, 256]}}, {"num_samples": 3})
    spec.search.max_params = 200_000  # dim 32 fits, dim 256 does not
    spec.raw["model"]["kwargs"].update(num_heads=2)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = run_search(spec, tmp_path / "runs", uri, name="params", verbose=False, trainable=toy_trial)
    _, _, children = child_runs(uri)
    assert children and all(c.data.params["config.model.kwargs.embed_dim"] == "32" for c in children)
    refused = [t for t in study(result) if "pathsearch.infeasible" in t["user_attrs"]]
    assert refused and all("max_params 200000" in t["user_attrs"]["pathsearch.infeasible"] for t in refused)


def test_multi_objective_search_keeps_and_exports_the_pareto_front(tmp_path, local_ray):
    from pathsearch.export import export_pareto

    spec = toy_spec(
        tmp_path,
        {"model.pruned": {"by": "shortest", "low": 0, "high": 4}},
        {"metric": ["val_acc", "kept_paths"], "mode": ["max", "min"], "sampler": "nsga2", "num_samples": 5},
    )
    spec.search.enqueue = [{"prune.shortest": k} for k in (1, 2, 3, 4)]  # with the baseline: every k, once
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = run_search(spec, tmp_path / "runs", uri, name="pareto", verbose=False, trainable=noisy_toy_trial)
    # The noisy toy's own scores (true optimum k = 2, then seed noise) give the front: walking from the fewest kept
    # paths (k = 4) up, a configuration is on it when its val_acc beats every configuration that keeps fewer paths.
    noisy, names = toy_search.NOISY, path_names(2)
    val = {k: toy_search.toy_score(noisy, k, toy_search.noise_seed(noisy, 0, {"model.pruned": names[:k]}), "val")
           for k in range(5)}  # fmt: skip
    expected, beaten = [], float("-inf")
    for k in (4, 3, 2, 1, 0):
        if val[k] > beaten:
            expected.append(k)
            beaten = val[k]
    assert 1 < len(expected) < 5  # a real trade-off: neither one configuration nor all of them
    expected.reverse()  # best val_acc first, as the front is listed
    assert [len(r["overrides"]["model.pruned"]) for r in result.pareto] == expected
    assert [r["val_acc"] for r in result.pareto] == pytest.approx([val[k] for k in expected])
    assert [r["kept_paths"] for r in result.pareto] == [5 - k for k in expected]
    front = yaml.safe_load((result.run_dir / "pareto_front.yaml").read_text())
    assert [(f["trial_id"], f["overrides"]) for f in front] == [(r["trial_id"], r["overrides"]) for r in result.pareto]
    exported = export_pareto("toy", tmp_path / "front.yaml", ["val_acc", "kept_paths"], ["max", "min"], uri)
    assert [len(PathConfig.load(e.files["path_config"]).pruned) for e in exported] == expected
    assert [e.metrics for e in exported] == [{"val_acc": pytest.approx(val[k]), "kept_paths": 5 - k} for k in expected]


@pytest.mark.parametrize("name", SAMPLERS)
def test_every_sampler_pickles_and_samples_after_unpickling(name):
    """Tune pickles the searcher with its sampler (the Tuner's state, every snapshot): Optuna 5.1's NSGA-II holds a
    threading.Lock that plain pickling refuses ("cannot pickle '_thread.lock'")."""
    from ray import cloudpickle

    sampler = cloudpickle.loads(cloudpickle.dumps(make_sampler(name, seed=0)))
    directions = ["maximize", "minimize"] if name == "nsga2" else ["maximize"]
    study = optuna.create_study(directions=directions, sampler=sampler)
    study.optimize(lambda t: (t.suggest_float("x", 0, 1),) * len(directions), n_trials=6)
    assert len(study.trials) == 6 and all(t.state.name == "COMPLETE" for t in study.trials)


def test_ctrl_c_interrupts_cleanly_and_resume_finishes(tmp_path):
    """SIGINT to the driver mid-search: Tune stops, the parent and unfinished trial runs end KILLED (none left
    RUNNING); `resume` then reopens those runs and completes the search with one run per trial."""
    import signal
    import subprocess

    toy_spec(tmp_path, {"model.pruned": {"by": "path"}}, {"num_samples": 5})
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = {"file": str(tmp_path / "toy.yaml"), "storage": str(tmp_path / "runs"), "uri": uri, "name": "sigint"}
    driver = [sys.executable, str(Path(__file__).parent / "toy_search.py")]
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "PATHSEARCH_TOY": json.dumps({"sleep": 0.75})}
    console = tmp_path / "console.txt"
    with console.open("w") as out:
        proc = subprocess.Popen([*driver, "search", json.dumps(args)], env=env, start_new_session=True,
                                stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
    state = tmp_path / "runs" / "sigint" / "pathsearch_state.json"
    try:
        wait_for_finished_runs(proc, state, uri, 1)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 0
    finally:
        subprocess.run(["pkill", "-9", "-s", str(proc.pid)], check=False)
    # Tune's own advice (Tuner.restore) and any traceback stay in the library log; pathsearch says `resume`
    assert "Tuner.restore" not in console.read_text() and "Traceback" not in console.read_text()
    assert "Tuner.restore" in (state.parent / "library_output.log").read_text()
    _, parents, children = child_runs(uri)
    assert parents[0].info.status == "KILLED"
    assert all(c.info.status != "RUNNING" for c in children)
    assert len(children) < 5
    resume = resume_toy_search(driver, state.parent, env)
    assert resume.returncode == 0, resume.stderr[-3000:]
    _, parents, children = child_runs(uri)
    trial_ids = [c.data.tags["pathsearch.trial_id"] for c in children]
    assert len(trial_ids) == len(set(trial_ids))
    assert parents[0].info.status == "FINISHED"
    assert all(c.info.status == "FINISHED" for c in children)


def test_a_search_whose_every_suggestion_is_infeasible_ends_and_says_why(tmp_path, local_ray):
    """Every mask keeps more paths than max_kept_paths allows: the searcher refuses MAX_SKIPPED suggestions in a
    row, ends the search, and the result says why instead of ending silently with no trial."""
    from pathsearch.search.searcher import MAX_SKIPPED

    spec = toy_spec(tmp_path, {"model.pruned": {"by": "shortest", "low": 0, "high": 1}}, {"num_samples": 4})
    spec.search.max_kept_paths = 2  # 5 paths, at most 1 pruned: every configuration keeps 4 or 5
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = run_search(spec, tmp_path / "runs", uri, name="none", verbose=False, trainable=toy_trial)
    assert result.ended_early == f"{MAX_SKIPPED} suggestions in a row were already trained or infeasible"
    assert result.counts["complete"] == 0 and result.counts["infeasible"] >= MAX_SKIPPED
    assert result.best is None


def test_ray_saying_no_trial_can_start_becomes_one_pathsearch_line(tmp_path, capsys):
    """Ray's warning that no trial can start (a node lost mid-search on a cluster; a trial no node can hold at all is
    refused before the search starts, tests/test_validation.py) becomes one pathsearch line on the console, once,
    instead of a search that waits in silence; Ray's own words go to the library log."""
    import logging

    from pathsearch.search.runner import LIBRARY_LOG, quiet_console

    ray_logger = logging.getLogger("ray.tune.execution.insufficient_resources_manager")
    with quiet_console(tmp_path):
        for _ in range(2):
            ray_logger.warning("No trial is running and no new trial can be started ... asks for 64 CPUs")
    err = capsys.readouterr().err
    assert err.count("pathsearch: no trial can start") == 1 and "search.resources_per_trial" in err, err
    assert "asks for 64 CPUs" in (tmp_path / LIBRARY_LOG).read_text()  # Ray's own words, in the log


def test_resume_of_a_search_killed_before_tunes_first_snapshot_says_what_to_do(tmp_path):
    """Tune writes tuner.pkl (which Tuner.can_restore accepts) before its first snapshot: a driver killed in between
    left nothing to restore. `resume` says so and what to do, instead of failing inside Tune's restore."""
    from pathsearch.search import full
    from pathsearch.search.run import SearchRun

    spec = toy_spec(tmp_path, {"model.pruned": {"by": "path"}}, {})
    run_dir = tmp_path / "runs" / "early"
    run_dir.mkdir(parents=True)
    (run_dir / "tuner.pkl").write_bytes(b"")
    with pytest.raises(ValueError, match=r"before Tune's first snapshot.*remove it and start the search again"):
        full.check_resume(SearchRun(run_dir, spec, {"name": "early"}))
    (run_dir / "experiment_state-2026-12-06_00-00-00.json").write_text("{}")
    full.check_resume(SearchRun(run_dir, spec, {"name": "early"}))  # a snapshot: resumable
