"""An MLflow server that goes down mid-search: the search goes on, and every reported result still reaches MLflow.

Real processes only: a real `mlflow server` on 127.0.0.1 (stopped with SIGTERM, restarted on the same store and
port), a real search driver process on a local Ray, and the real MLflow client to check what was logged.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from mlflow.tracking import MlflowClient
from ray import tune

from pathsearch.config.paths import PathConfig
from pathsearch.tracking.logger import PENDING_FILE, MlflowTrialLogger, send_pending
from pathsearch.tracking.outage import fail_fast
from pathsearch.ui import ui_command

sys.path.insert(0, str(Path(__file__).parent))
from test_search import child_runs, toy_spec  # tests/test_search.py


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    """start(port) runs `mlflow server` on tmp_path's SQLite store (artifacts under tmp_path) until /health answers;
    stop() sends SIGTERM to its process group. Every server started is stopped, whatever the test did."""
    procs: list[subprocess.Popen] = []

    def start(port: int) -> subprocess.Popen:
        cmd, env = ui_command(f"sqlite:///{tmp_path / 'mlflow.db'}", port)
        cmd += ["--artifacts-destination", str(tmp_path / "mlartifacts")]
        with open(tmp_path / "server.log", "a") as log:
            proc = subprocess.Popen(
                cmd, env=env, cwd=tmp_path, start_new_session=True, stdout=log, stderr=subprocess.STDOUT
            )
        procs.append(proc)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as answer:
                    if answer.status == 200:
                        return proc
            except OSError:
                time.sleep(0.3)
        raise AssertionError("mlflow server not healthy after 90 s")

    def stop(proc: subprocess.Popen) -> None:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    try:
        yield SimpleNamespace(start=start, stop=stop)
    finally:
        for proc in procs:
            stop(proc)


def test_search_survives_mlflow_outage_and_loses_nothing(tmp_path, mlflow_server):
    """4 trials x 6 epochs, 2 at a time; the server is stopped once a trial has logged, kept down while trials
    report, then restarted: the search completes and MLflow ends up with every result, exactly once."""
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = mlflow_server.start(port)
    toy_spec(tmp_path, {"model.pruned": {"by": "path"}}, {"num_samples": 4, "max_concurrent_trials": 2})
    search_file = tmp_path / "toy.yaml"
    data = yaml.safe_load(search_file.read_text())
    data["train"]["epochs"] = 6
    search_file.write_text(yaml.safe_dump(data))
    args = {"file": str(search_file), "storage": str(tmp_path / "runs"), "uri": uri, "name": "outage"}
    env = {
        **os.environ,
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "PATHSEARCH_TOY": json.dumps({"sleep": 2.0}),  # Ray workers inherit the driver's environment
        "PATHSEARCH_MLFLOW_FLUSH_TIMEOUT_S": "120",
    }
    out, err = tmp_path / "driver.out", tmp_path / "driver.err"
    with open(out, "w") as stdout, open(err, "w") as stderr:
        driver = subprocess.Popen(
            [sys.executable, str(Path(__file__).parent / "toy_search.py"), "search", json.dumps(args)],
            env=env, start_new_session=True, stdout=stdout, stderr=stderr,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        logged = False
        while not logged and time.monotonic() < deadline and driver.poll() is None:
            time.sleep(0.5)
            with fail_fast():
                experiment = MlflowClient(uri).get_experiment_by_name("toy")
                if experiment is not None:
                    _, _, children = child_runs(uri)
                    logged = any("val_acc" in c.data.metrics for c in children)
        assert logged, f"no trial logged a metric\n{err.read_text()[-3000:]}"
        mlflow_server.stop(server)  # down while trials go on reporting
        time.sleep(9)
        assert driver.poll() is None, err.read_text()[-3000:]  # the search did not crash while MLflow was down
        mlflow_server.start(port)  # same store, same port
        assert driver.wait(timeout=240) == 0, err.read_text()[-3000:]
    finally:
        subprocess.run(["pkill", "-9", "-s", str(driver.pid)], check=False)  # its local Ray, nothing else
    log = err.read_text()
    assert "unreachable: " in log and "operation(s) buffered, retrying" in log, log[-3000:]  # it really was down
    assert "reachable again" in log, log[-3000:]
    assert not (tmp_path / "runs" / "outage" / PENDING_FILE).exists()  # everything was sent, none saved for later

    client, parents, children = child_runs(uri)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert parents[0].data.metrics["trials_complete"] == 4
    trial_ids = [c.data.tags["pathsearch.trial_id"] for c in children]
    assert len(trial_ids) == 4 and len(set(trial_ids)) == 4  # one run per trial, none created twice
    for run in children:
        assert run.info.status == "FINISHED" and run.data.tags["pathsearch.state"] == "COMPLETE"
        history = client.get_metric_history(run.info.run_id, "val_acc")
        assert [m.step for m in history] == [1, 2, 3, 4, 5, 6]  # every report, none twice
        assert [m.step for m in client.get_metric_history(run.info.run_id, "epoch")] == [1, 2, 3, 4, 5, 6]
        assert "path_config.yaml" in [a.path for a in client.list_artifacts(run.info.run_id)]


def fake_trial(trial_id: str, checkpoint: Path, epochs: int) -> SimpleNamespace:
    """What the logger reads from a Tune trial."""
    checkpoint.mkdir(parents=True)
    PathConfig(model_name="toy", depth=2, pruned=["mlp.1"]).save(checkpoint / "path_config.yaml")
    return SimpleNamespace(
        trial_id=trial_id,
        config={"optuna_trial": 0, "overrides": {"model.pruned": ["mlp.1"]}},
        last_result={"epoch": epochs},
        checkpoint=tune.Checkpoint.from_directory(str(checkpoint)),  # Tune's own, on the local filesystem
    )


def test_logger_buffers_while_server_is_down_then_flush_sends_everything(tmp_path, mlflow_server, capsys):
    """Nothing listens on the port: the callbacks queue their operations and raise nothing; a flush past its
    deadline saves them to the run directory. A server then starts there: the queue restored from Tune's
    checkpoint state is flushed to it, and sending the saved copy again duplicates nothing."""
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    parent = "0" * 32  # a made-up parent run id: the test looks its children up by this tag
    logger = MlflowTrialLogger(uri, "0", parent, final_epoch=3, run_dir=tmp_path)  # "0": MLflow's Default experiment
    trials = [fake_trial(f"t{i}", tmp_path / f"checkpoint{i}", epochs=3) for i in range(2)]
    for trial in trials:
        logger.on_trial_start(0, trials, trial)
        for epoch in (1, 2, 3):
            logger.on_trial_result(0, trials, trial, {"val_acc": 0.1 * epoch, "epoch": epoch, "pid": 7})
            logger.on_step_end(0, trials)
        logger.on_trial_complete(0, trials, trial)
    assert [op["op"] for op in logger.pending] == ["start", "metrics", "metrics", "metrics", "artifacts", "end"] * 2
    assert pickle.loads(pickle.dumps(logger)).pending == logger.pending  # kept in the pickled callback
    assert not logger.flush(timeout_s=0)
    saved = json.loads((tmp_path / PENDING_FILE).read_text())
    assert saved["ops"] == logger.pending and saved["tracking_uri"] == uri
    warnings = capsys.readouterr().err
    assert warnings.count("operation(s) buffered, retrying") == 1  # one line per outage, not one per attempt
    assert "12 operation(s) not sent" in warnings

    mlflow_server.start(port)
    restored = MlflowTrialLogger(uri, "0", parent, final_epoch=3, run_dir=tmp_path)
    restored.set_state(logger.get_state())  # as Tune restores a callback after a driver crash
    assert restored.flush(timeout_s=60) and not restored.pending

    def check() -> None:
        client = MlflowClient(uri)
        runs = client.search_runs(["0"], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")
        assert sorted(r.data.tags["pathsearch.trial_id"] for r in runs) == ["t0", "t1"]
        for run in runs:
            assert run.info.status == "FINISHED" and run.data.tags["pathsearch.state"] == "COMPLETE"
            assert run.data.params["config.model.pruned"] == "['mlp.1']"
            assert [m.step for m in client.get_metric_history(run.info.run_id, "val_acc")] == [1, 2, 3]
            assert "pid" not in run.data.metrics
            assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["path_config.yaml"]

    check()
    assert send_pending(tmp_path / PENDING_FILE, timeout_s=30) == 0  # the same 12 operations, sent a second time
    assert not (tmp_path / PENDING_FILE).exists()
    check()  # still one run per trial and one history entry per report


def test_search_start_without_server_is_a_clear_error(monkeypatch):
    from pathsearch.tracking.runs import SearchRuns

    monkeypatch.setenv("PATHSEARCH_MLFLOW_START_TIMEOUT_S", "1")  # the default waits 30 s for a server still starting
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with pytest.raises(ValueError, match=f"no MLflow tracking server answers at {uri}"):
        SearchRuns.start(uri, "toy", "search", {})
