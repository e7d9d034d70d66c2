"""Searches whose whole state lives in object storage: a real S3 HTTP server (moto's standalone server on
127.0.0.1, credentials enforced; tests/s3server.py), the real CLI and Ray, real MLflow stores.

- a search with `--storage-path s3://...` keeps Tune's experiment, the checkpoints, the Optuna journal and
  pathsearch's files in the bucket; kill -9 of the driver, then deleting its local working copy and Ray's temp dir,
  and `resume s3://...` completes it with every earlier trial and one FINISHED MLflow run per trial;
- real trials (timm, digits) with an MLflow server that stores artifacts in the same bucket; `export
  --with-weights` reads them back;
- bad storage input: exit 2, one line, before any trial, nothing made;
- the store is the truth, this machine's working copy a cache: a name is free when the store lacks it, a copy is
  claimed by one live process (refusals name the store, or the process and the copy), a finished search removes it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest

from pathsearch import storage

sys.path.insert(0, str(Path(__file__).parent))
from conftest import wait_until_healthy
from s3server import S3Server, free_port
from test_search import child_runs, resume_toy_search, toy_spec, toy_trial, wait_for_finished_runs

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
    assert not (work / "crash").exists()  # the working copy, made again from the bucket, removed once it finished
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

    from pathsearch.config.paths import PathConfig
    from pathsearch.ensemble.model import create_path_vit
    from pathsearch.search.searcher import study_journal

    env = {**os.environ, **s3.env, "PATHSEARCH_WORK_DIR": str(tmp_path / "work")}
    env.pop("RAY_ADDRESS", None)
    search = [*PATHSEARCH, "search", str(DIGITS), "--storage-path", "s3://pathsearch/real", "--name", "real"]
    search += ["--tracking-uri", mlflow_on_s3, "--set", "search.num_samples=2", "train.epochs=2", "train.eval_every=1"]
    search += ["model.kwargs.depth=2", "model.pruned=[]", "space.model.pruned.high=2", "search.confirm.enabled=false"]
    done = subprocess.run(search, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    # the summary says where the run lives; the finished search's working copy is removed, and not named
    assert "run directory: s3://pathsearch/real/real\n" in done.stdout, done.stdout
    assert "optuna_trials: s3://pathsearch/real/real/optuna_trials.json" in done.stdout, done.stdout
    assert str(tmp_path / "work") not in done.stdout and not (tmp_path / "work" / "real").exists()
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
    # `pathsearch resume` of the finished search: a fresh copy from the store, removed again; the summary (read
    # with the search file from the store) names the store
    done = subprocess.run([*PATHSEARCH, "resume", "s3://pathsearch/real/real"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0 and "run directory: s3://pathsearch/real/real\n" in done.stdout, done.stderr[-3000:]
    assert not (tmp_path / "work" / "real").exists()


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


# ----- the store is the truth, this machine's working copy only a cache --------------------------------------------
CHILD = """\
import json, sys
from pathsearch.search import run as searchrun
from pathsearch.config import load_search_file
spec = load_search_file(sys.argv[1])
print("ready", flush=True)
sys.stdin.readline()  # go
try:
    print(json.dumps({"claimed": str(searchrun.new_run_dir(spec, sys.argv[2], sys.argv[3])[0])}), flush=True)
except ValueError as err:
    print(json.dumps({"refused": str(err)}), flush=True)
sys.stdin.readline()  # holds its claim until told to end
"""


@pytest.fixture
def store_env(tmp_path, s3, monkeypatch):
    """The store's environment and a working-copy folder of the test's own; returns that folder."""
    for key, value in s3.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("PATHSEARCH_WORK_DIR", str(tmp_path / "work"))
    return tmp_path / "work"


def test_a_leftover_working_copy_does_not_block_a_name_the_store_lacks(tmp_path, store_env):
    """A finished search's copy left on this machine (no live process holds it, the store does not have the name)
    was refused as if the store had the name; it is cleared and claimed."""
    from pathsearch.search import run as searchrun
    from pathsearch.storage import workcopy

    spec = toy_spec(tmp_path, {"model.pruned": {"by": "path"}}, {})
    left = store_env / "again"
    (left / "trial_0" / "checkpoint_000001").mkdir(parents=True)
    (left / "pathsearch_state.json").write_text('{"name": "again", "parent_run_id": "an earlier search"}')
    (left / ".pathsearch-lock").write_text('{"pid": 1, "host": "here", "command": "a search that ended"}')
    run_dir, store = searchrun.new_run_dir(spec, "s3://pathsearch/leftover", "again")
    try:
        assert (run_dir, store) == (left.resolve(), "s3://pathsearch/leftover")
        assert [p.name for p in run_dir.iterdir()] == [".pathsearch-lock"]  # nothing of the earlier search
        assert json.loads((run_dir / ".pathsearch-lock").read_text())["pid"] == os.getpid()
    finally:
        workcopy.release(run_dir)


def test_a_name_the_store_has_is_refused_naming_the_store(tmp_path, s3, store_env):
    from pathsearch.search import run as searchrun
    from pathsearch.storage import workcopy

    spec = toy_spec(tmp_path, {"model.pruned": {"by": "path"}}, {})
    s3.client("s3").put_object(Bucket=s3.bucket, Key="taken/mine/pathsearch_state.json", Body=b"{}")
    (store_env / "mine").mkdir(parents=True)
    (store_env / "mine" / "search.yaml").write_text("kept")  # a copy of that search, kept: left as it is
    for root in ("s3://pathsearch/taken", "s3://pathsearch/taken/"):
        with pytest.raises(ValueError) as err:
            searchrun.new_run_dir(spec, root, "mine")
        assert str(err.value) == (
            "--name mine: s3://pathsearch/taken/mine already exists; continue that search with `pathsearch resume`"
        )
    assert (store_env / "mine" / "search.yaml").read_text() == "kept"
    assert workcopy.held((store_env / "mine").resolve()) is None  # no claim kept


def test_resume_while_a_live_process_holds_the_working_copy_is_refused_naming_it(tmp_path, s3, store_env):
    """A resume of a run kept in the store while another live process (here, a child that claimed the copy) holds
    this machine's working copy: refused with the copy and the process, the copy left as it is; once that process
    is gone, the resume claims the copy (and finds the run folder in the store)."""
    from pathsearch.search.run import SearchRun
    from pathsearch.storage import workcopy

    s3.client("s3").put_object(Bucket=s3.bucket, Key="held/busy/search.yaml", Body=b"in the store")
    copy = store_env / "busy"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from pathsearch.storage import workcopy; "
         f"workcopy.claim(__import__('pathlib').Path({str(copy)!r})); print('held', flush=True); sys.stdin.readline()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(ValueError) as err:
            SearchRun.open("s3://pathsearch/held/busy")
        assert str(err.value).startswith(f"s3://pathsearch/held/busy: this machine's working copy {copy.resolve()}")
        assert f"in use by process {holder.pid} (" in str(err.value) and str(err.value).endswith("wait for it to end")
        assert not (copy / "search.yaml").exists()  # nothing downloaded into a copy another process holds
    finally:
        holder.kill()
        holder.wait()
    with pytest.raises(ValueError, match="not a pathsearch run directory"):  # claimed now; the folder has no state
        SearchRun.open("s3://pathsearch/held/busy")
    assert workcopy.held(copy.resolve()) is None  # the refused open let go of its claim


def test_two_searches_of_one_name_in_two_processes_cannot_both_claim_it(tmp_path, s3, store_env):
    """Two processes claim one name at once: one gets the working copy; the other is refused with the path and the
    process that holds it, as is a third claim while the winner lives; once it is killed, the name is free again."""
    from pathsearch.search import run as searchrun
    from pathsearch.storage import workcopy

    spec = toy_spec(tmp_path, {"model.pruned": {"by": "path"}}, {})
    (tmp_path / "child.py").write_text(CHILD)
    cmd = [sys.executable, str(tmp_path / "child.py"), str(tmp_path / "toy.yaml"), "s3://pathsearch/race", "same"]
    children = [
        subprocess.Popen(cmd, env=dict(os.environ), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    try:
        assert [c.stdout.readline() for c in children] == ["ready\n", "ready\n"]
        for child in children:  # as near to the same moment as two processes get
            child.stdin.write("go\n")
            child.stdin.flush()
        said = [json.loads(c.stdout.readline()) for c in children]
        winners = [c for c, s in zip(children, said, strict=True) if "claimed" in s]
        assert len(winners) == 1, said
        (winner,) = winners
        copy = (store_env / "same").resolve()
        holder = f"this machine's working copy {copy} is in use by process {winner.pid} (child.py "
        loser = next(s["refused"] for s in said if "refused" in s)
        assert loser.startswith(f"--name same: {holder}"), loser
        assert loser.endswith("on this machine; wait for it to end, or choose another --name"), loser
        with pytest.raises(ValueError, match="in use by process") as err:
            searchrun.new_run_dir(spec, "s3://pathsearch/race", "same")
        assert holder in str(err.value)
        winner.kill()  # a killed process lets go of its claim by itself
        winner.wait()
        run_dir, _ = searchrun.new_run_dir(spec, "s3://pathsearch/race", "same")
        assert run_dir == copy
        workcopy.release(run_dir)
    finally:
        for child in children:
            child.kill()
            child.wait()


def test_two_claims_in_two_threads_of_one_process_cannot_both_succeed(tmp_path, store_env):
    from pathsearch.storage import workcopy

    start, done = threading.Barrier(2), threading.Barrier(2)
    outcomes: list[object] = []

    def attempt() -> None:
        start.wait()
        try:
            outcomes.append(workcopy.claim(store_env / "one"))
        except workcopy.InUse as err:
            outcomes.append(err)
        done.wait()  # both have tried before the winner lets go
        workcopy.release(store_env / "one")

    threads = [threading.Thread(target=attempt) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert sorted(type(o).__name__ for o in outcomes) == ["InUse", "WorkingCopy"], outcomes
    assert f"is in use by process {os.getpid()} (" in str(next(o for o in outcomes if isinstance(o, Exception)))


@pytest.fixture(scope="module")
def ray_with_store(s3):
    """A local Ray whose workers see the store's endpoint and credentials (set before it starts: they inherit
    them), as test_search's local_ray; stopped, and the environment restored, at the module's end."""
    import ray

    saved = dict(os.environ)
    os.environ.update(s3.env, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()
        os.environ.clear()
        os.environ.update(saved)


def test_a_finished_search_removes_its_working_copy_unless_kept(tmp_path, s3, ray_with_store, monkeypatch):
    """A finished search removes this machine's working copy once its last upload is done; `keep_copy` keeps it
    (a resumed one: test_killed_search_resumes_from_the_bucket_alone; the CLI's summary: test_real_search_...)."""
    from pathsearch.search.driver import run_search
    from pathsearch.storage import workcopy

    work = tmp_path / "work"
    monkeypatch.setenv("PATHSEARCH_WORK_DIR", str(work))
    spec = toy_spec(tmp_path, {"model.pruned": {"by": "path"}}, {"num_samples": 2})
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    gone = run_search(spec, "s3://pathsearch/done", uri, name="gone", verbose=False, trainable=toy_trial)
    assert gone.stored_at == "s3://pathsearch/done/gone" and not gone.interrupted
    assert not (work / "gone").exists()
    assert {"pathsearch_state.json", "optuna_trials.json"} <= {k.rsplit("/", 1)[-1] for k in s3.keys("done/gone/")}
    kept = run_search(spec, "s3://pathsearch/done", uri, name="kept", verbose=False, trainable=toy_trial,
                      keep_copy=True)  # fmt: skip
    assert (work / "kept" / "optuna_trials.json").is_file()
    assert kept.run_dir == (work / "kept").resolve() and workcopy.held(kept.run_dir) is None  # a cache no one holds
