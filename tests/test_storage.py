"""Searches whose whole state lives in object storage: a real S3 HTTP server (moto's standalone server on
127.0.0.1, credentials enforced; tests/s3server.py), the real CLI and Ray, real MLflow stores.

- a search with `--storage-path s3://...` keeps Tune's experiment, the checkpoints, the Optuna journal and
  pathsearch's files in the bucket; kill -9 of the driver, then deleting its local working copy and Ray's temp dir,
  and `resume s3://...` completes it with every earlier trial and one FINISHED MLflow run per trial;
- real trials (timm, digits) with an MLflow server that stores artifacts in the same bucket; `export
  --with-weights` reads them back;
- bad storage input: exit 2, one line, before any trial, nothing made.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from pathsearch import storage

sys.path.insert(0, str(Path(__file__).parent))
from conftest import wait_until_healthy
from s3server import S3Server, free_port
from test_search import child_runs, resume_toy_search, toy_spec, wait_for_finished_runs

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "search_spaces" / "digits_tiny.yaml"
PATHSEARCH = [sys.executable, "-m", "pathsearch.cli"]

pytestmark = pytest.mark.skipif(shutil.which("moto_server", path=str(Path(sys.executable).parent)) is None,
                                reason="needs moto[server] (the dev extra)")  # fmt: skip


@pytest.fixture(scope="module")
def s3():
    with S3Server() as server:
        yield server


def short_temp() -> str:
    """A short folder for Ray's temp dir (its socket paths must stay under 107 bytes)."""
    return tempfile.mkdtemp(prefix="rt-", dir="/tmp")


# ----- URIs ----------------------------------------------------------------------------------------------------
def test_uris_keep_their_query_and_local_paths_are_not_remote():
    uri = "s3://bucket/runs?endpoint_override=127.0.0.1:9000&scheme=http"
    assert storage.join(uri, "search-1", "checkpoint_000001") == (
        "s3://bucket/runs/search-1/checkpoint_000001?endpoint_override=127.0.0.1:9000&scheme=http"
    )
    assert storage.parent_of(storage.join(uri, "search-1")) == uri
    assert storage.name_of(storage.join(uri, "search-1")) == "search-1"
    assert storage.is_remote("s3://b/p") and storage.is_remote("gs://b/p")
    assert not storage.is_remote("/tmp/runs") and not storage.is_remote("runs") and not storage.is_remote("file:///x")
    with pytest.raises(ValueError, match="credentials in the URI"):
        storage.filesystem("s3://bucket/runs?access_key=AKIA&secret_key=hush")
    for uri in ("s3://AKIA:" + "hush@bucket/runs", "s3://AKIA:" + "hu/sh+x@bucket/runs"):  # a real secret has / and +
        with pytest.raises(ValueError, match="credentials in the URI") as err:
            storage.filesystem(uri)
        assert "hush" not in str(err.value) and "hu/sh" not in str(err.value) and "AKIA" not in str(err.value)


# ----- the whole search in the bucket, resumed from there alone ------------------------------------------------
def test_killed_search_resumes_from_the_bucket_alone(tmp_path, s3):
    """kill -9 the driver mid-search, delete its working copy and Ray's temp dir, `resume s3://...`: the search
    completes from what the bucket holds; finished trials are not trained again; one FINISHED run per trial."""
    markers = tmp_path / "markers"
    markers.mkdir()
    toy_spec(tmp_path, {"model.pruned": {"by": "path"}}, {"num_samples": 6})
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    work, ray_tmp = tmp_path / "work", short_temp()
    args = {"file": str(tmp_path / "toy.yaml"), "storage": "s3://pathsearch/killed", "uri": uri, "name": "crash"}
    driver = [sys.executable, str(Path(__file__).parent / "toy_search.py")]
    knobs = json.dumps({"marker_dir": str(markers), "sleep": 0.75})
    env = {**os.environ, **s3.env, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "PATHSEARCH_TOY": knobs}
    env.update(PATHSEARCH_WORK_DIR=str(work), RAY_TMPDIR=ray_tmp)
    proc = subprocess.Popen(
        [*driver, "search", json.dumps(args)], env=env, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        finished_before = wait_for_finished_runs(proc, work / "crash" / "pathsearch_state.json", uri, 2)
        assert len(finished_before) >= 2
    finally:
        subprocess.run(["pkill", "-9", "-s", str(proc.pid)], check=False)
        proc.wait()
    keys = s3.keys("killed/crash/")
    names = {k.rsplit("/", 1)[-1] for k in keys}
    assert {"pathsearch_state.json", "search.yaml", "optuna_journal.log", "tuner.pkl"} <= names, sorted(names)
    assert any(n.startswith("experiment_state-") for n in names)
    checkpoints = {k.rsplit("/", 2)[-2] for k in keys if "/checkpoint_" in k}
    assert checkpoints and all(k.rsplit("/", 1)[-1] != "toy.pkl" for k in keys)
    # nothing of the run is left on this machine: the working copy and Ray's temp dir (sessions, Tune's staging)
    assert list(Path(ray_tmp).glob("ray/session_*")), "the driver's Ray did not use RAY_TMPDIR"
    shutil.rmtree(work)
    shutil.rmtree(ray_tmp, ignore_errors=True)
    env["RAY_TMPDIR"] = short_temp()
    try:
        resume = resume_toy_search(driver, "s3://pathsearch/killed/crash", env)
    finally:
        shutil.rmtree(env["RAY_TMPDIR"], ignore_errors=True)
    assert resume.returncode == 0, resume.stderr[-3000:]
    _, parents, children = child_runs(uri)
    trial_ids = [c.data.tags["pathsearch.trial_id"] for c in children]
    assert len(trial_ids) == len(set(trial_ids))  # one run per trial
    assert parents[0].info.status == "FINISHED"
    finished = [c for c in children if c.info.status == "FINISHED"]
    lost = [c for c in children if c.data.tags.get("pathsearch.state") == "LOST"]
    assert len(lost) <= 1 and len(children) == len(finished) + len(lost)
    # the study's full history, read back from the bucket: every trial of before the kill, none left RUNNING
    study = json.loads(s3.read("killed/crash/optuna_trials.json").decode())
    reused = sum(bool(t["user_attrs"].get("pathsearch.reused")) for t in study)
    assert len(finished) + reused == 6 and all(t["state"] != "RUNNING" for t in study)
    assert finished_before <= {c.data.tags["pathsearch.trial_id"] for c in finished}
    starts: dict[str, list[int]] = {}
    for marker in markers.iterdir():
        trial_id, _, start, _ = marker.name.split(".")
        starts.setdefault(trial_id, []).append(int(start))
    for trial_id in finished_before:  # trained once, from epoch 0; a restore may only resume past the end
        assert sorted(starts[trial_id])[0] == 0 and all(s == 4 for s in sorted(starts[trial_id])[1:]), starts
    assert (work / "crash" / "pathsearch_state.json").is_file()  # the working copy, made again from the bucket
    for key in s3.keys("killed/crash/"):  # the store's address is recorded (resume needs it), its keys nowhere
        if "/checkpoint_" not in key:
            body = s3.read(key)
            assert s3.secret.encode() not in body and s3.key.encode() not in body, key


# ----- real trials, MLflow's artifacts in the same bucket, export --with-weights ------------------------------
@pytest.fixture
def mlflow_on_s3(tmp_path, s3):
    """`mlflow server` on 127.0.0.1 with its artifacts in s3://pathsearch/mlflow (served through the server)."""
    port = free_port()
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    cmd += ["--artifacts-destination", "s3://pathsearch/mlflow", "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--workers", "1"]
    env = {**os.environ, **s3.env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with open(tmp_path / "mlflow.log", "w") as log:
        proc = subprocess.Popen(
            cmd, env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        wait_until_healthy(proc, f"http://127.0.0.1:{port}", tmp_path / "mlflow.log")
        yield f"http://127.0.0.1:{port}"
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)


def test_real_search_in_the_bucket_and_export_with_weights_from_mlflow_artifacts_there(tmp_path, s3, mlflow_on_s3):
    import optuna
    from safetensors.torch import load_file

    from pathsearch.model import create_path_vit
    from pathsearch.paths import PathConfig
    from pathsearch.searcher import study_journal

    env = {**os.environ, **s3.env, "PATHSEARCH_WORK_DIR": str(tmp_path / "work")}
    env.pop("RAY_ADDRESS", None)
    search = [*PATHSEARCH, "search", str(DIGITS), "--storage-path", "s3://pathsearch/real", "--name", "real"]
    search += ["--tracking-uri", mlflow_on_s3, "--set", "search.num_samples=2", "train.epochs=2", "train.eval_every=1"]
    search += ["model.kwargs.depth=2", "model.pruned=[]", "space.model.pruned.high=2", "search.confirm.enabled=false"]
    done = subprocess.run(search, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "s3://pathsearch/real/real" in done.stdout  # the summary says where the run lives
    keys = s3.keys("real/real/")
    names = {k.rsplit("/", 1)[-1] for k in keys}
    assert {"optuna_journal.log", "optuna_trials.json", "pathsearch_state.json", "tuner.pkl"} <= names, names
    assert any(n.startswith("experiment_state-") for n in names)
    (tmp_path / "journal.log").write_bytes(s3.read("real/real/optuna_journal.log"))  # the study, from the bucket
    study = optuna.load_study(study_name="real", storage=study_journal(tmp_path / "journal.log"))
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
    assert any(k.endswith("/model_0.safetensors") and "/checkpoint_" in k for k in keys)
    assert not any(k.endswith((".pt", ".pth")) or ("/checkpoint_" in k and k.endswith(".pkl")) for k in keys)
    assert any(k.startswith("mlflow/") and k.endswith("model_0.safetensors") for k in s3.keys("mlflow/"))
    assert not (tmp_path / "mlartifacts").exists() and not (tmp_path / "mlruns").exists()
    out = tmp_path / "best.yaml"
    export = [*PATHSEARCH, "export", "--experiment", "digits_tiny", "--out", str(out), "--with-weights"]
    done = subprocess.run([*export, "--tracking-uri", mlflow_on_s3], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    config = PathConfig.load(out)
    weights = load_file(str(out.with_suffix(".safetensors")))
    model = create_path_vit(path_config=config)  # the exported configuration rebuilds the model in one call
    model.load_state_dict(weights)  # strict: every weight of the trial's model, from MLflow's artifacts in S3
    assert config.depth == 2


# ----- bad storage input: one line, exit 2, before any trial ---------------------------------------------------
@pytest.mark.parametrize(
    "case",
    ["unreachable endpoint", "missing bucket", "wrong credentials", "unknown scheme", "credentials in the URI"],
)
def test_bad_storage_exits_2_with_one_line_before_any_trial(case, tmp_path, s3):
    env = {**os.environ, **s3.env, "PATHSEARCH_WORK_DIR": str(tmp_path / "work")}
    env.update(PATHSEARCH_MLFLOW_START_TIMEOUT_S="2", PATHSEARCH_STORAGE_TIMEOUT_S="20")
    target, expect = "s3://pathsearch/bad", ""
    if case == "unreachable endpoint":
        env["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{free_port()}"
        expect = "cannot write there"
    elif case == "missing bucket":
        target, expect = "s3://no-such-bucket/runs", "the bucket 'no-such-bucket' does not exist"
    elif case == "wrong credentials":
        env["AWS_SECRET_ACCESS_KEY"] = "not-the-secret"
        expect = "cannot write there"
    elif case == "unknown scheme":
        target, expect = "nosuch://bucket/runs", "pyarrow cannot open nosuch:// URIs"
    else:
        target, expect = "s3://" + f"{s3.key}:{s3.secret}" + "@pathsearch/bad", "credentials in the URI"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cmd = [*PATHSEARCH, "search", str(DIGITS), "--storage-path", target, "--tracking-uri", uri]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert expect in lines[0] and "Traceback" not in done.stderr, lines[0]
    assert f"--storage-path {target.split('@')[0].split('://')[0]}" in lines[0] and s3.secret not in done.stderr
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "work").exists()  # nothing made
    assert s3.keys("bad/") == []


def test_resume_of_a_run_the_bucket_does_not_hold_exits_2(tmp_path, s3):
    env = {**os.environ, **s3.env, "PATHSEARCH_WORK_DIR": str(tmp_path / "work")}
    done = subprocess.run([*PATHSEARCH, "resume", "s3://pathsearch/nothing/here"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "s3://pathsearch/nothing/here: no such run folder in the store" in done.stderr
    assert not (tmp_path / "work").exists()


def test_a_tuner_folder_without_a_snapshot_is_not_restored(tmp_path):
    """A driver killed between creating a round's Tuner and Tune's first snapshot leaves tuner.pkl alone, which
    Tune's can_restore accepts; restoring it failed ("No experiment snapshot file"), so the round starts anew."""
    from ray import tune

    from pathsearch.storage import restorable

    (tmp_path / "tuner.pkl").write_bytes(b"")
    assert tune.Tuner.can_restore(str(tmp_path)) and not restorable(str(tmp_path))
    (tmp_path / "experiment_state-2026-12-06_00-00-00.json").write_text("{}")
    assert restorable(str(tmp_path))
