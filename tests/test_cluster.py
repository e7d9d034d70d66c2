"""A real multi-node Ray cluster on this machine: cluster/local.sh starts a head, two worker nodes and an MLflow
server inside a network namespace that has only `lo`, so every address is 127.0.0.1 and no traffic leaves it
(outside one, Ray turns a loopback node address into the machine's own). Searches go through `pathsearch
submit` (Ray's Jobs API, token auth on); MLflow is read with the real client from inside the namespace
(tests/cluster_probe.py). Needs root for `ip netns`; skips otherwise.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from pathsearch.cluster.jobs import check_reachable_by_form, read_ray_token
from pathsearch.config.paths import PathConfig

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
NODES = [{"node_ip": "10.0.0.1"}, {"node_ip": "10.0.0.2"}]
# a small real search: depth-2 ViTs on digits, 4 trials, 2 at a time (one per worker node)
SMALL = [
    "--set", "model.kwargs.depth=2", "--set", "model.pruned=[]", "--set", "space.model.pruned.high=2",
    "--set", "train.epochs=6", "--set", "train.eval_every=1", "--set", "train.warmup_epochs=1",
    "--set", "data.train_size=200", "--set", "search.num_samples=4", "--set", "search.scheduler=none",
    "--set", "search.confirm.enabled=false",
]  # fmt: skip
# the confirmation on the cluster: the best configuration and the baseline on 2 paired seeds each (4 more trials; one
# round: the file's sequential budget switched off)
CONFIRM = ["--set", "search.confirm.enabled=true", "--set", "search.confirm.top_k=1", "--set", "search.confirm.seeds=2",
           "--set", "search.confirm.max_seeds=null"]  # fmt: skip

needs_netns = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None,
    reason="a multi-node cluster on loopback needs a network namespace (`ip netns`, root)",
)


# ----- checks made before anything is submitted (no cluster needed) ------------------------------------------
def test_local_store_or_relative_path_is_refused_on_a_multinode_cluster():
    problems = check_reachable_by_form("sqlite:///mlflow.db", "runs", NODES)
    assert len(problems) == 2
    assert "--tracking-uri sqlite:///mlflow.db: a local MLflow store" in problems[0]
    assert "--storage-path runs: a relative path" in problems[1]
    loopback = check_reachable_by_form("http://127.0.0.1:5000", "/shared/runs", NODES)
    assert loopback == [loopback[0]] and "spans 2 hosts" in loopback[0]


def test_server_and_shared_path_pass_the_form_checks():
    assert check_reachable_by_form("http://mlflow.internal:5000", "/nfs/runs", NODES) == []
    head_only = [{"node_ip": "10.0.0.1"}]
    assert check_reachable_by_form("sqlite:////shared/mlflow.db", "/shared/runs", head_only) == []
    assert "relative path names a store" in check_reachable_by_form("sqlite:///mlflow.db", "/s/runs", head_only)[0]
    one_host = [{"node_ip": "127.0.0.1"}] * 3  # cluster/local.sh: nodes share this machine's loopback and disk
    assert check_reachable_by_form("http://127.0.0.1:5000", "/tmp/runs", one_host) == []
    assert check_reachable_by_form("http://m:5000", "s3://bucket/runs", NODES) == []  # every node reads the store
    unknown = check_reachable_by_form("http://m:5000", "nosuch://bucket/runs", NODES)
    assert len(unknown) == 1 and "pyarrow cannot open nosuch:// URIs" in unknown[0]
    secret = check_reachable_by_form("http://m:5000", "s3://bucket/runs?secret_key=hush", NODES)
    assert len(secret) == 1 and "credentials in the URI" in secret[0] and "hush" not in secret[0]


def test_token_is_read_the_way_the_ray_cli_reads_it(tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    assert read_ray_token() == (None, str(tmp_path / ".ray" / "auth_token"))
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("from-home\n")
    assert read_ray_token()[0] == "from-home"
    (tmp_path / "t").write_text("from-path")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "t"))
    assert read_ray_token() == ("from-path", f"RAY_AUTH_TOKEN_PATH={tmp_path / 't'}")
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert read_ray_token() == ("from-env", "RAY_AUTH_TOKEN")


def test_submit_without_cluster_or_tracking_uri_exits_2():
    cmd = [PY, "-m", "pathsearch.cli", "submit", str(ROOT / "search_spaces/digits_tiny.yaml")]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2 and "no cluster given: pass --address" in proc.stderr
    proc = subprocess.run([*cmd, "--address", "http://127.0.0.1:1"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--tracking-uri is required" in proc.stderr


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_cluster_check_of_an_address_that_is_not_ray_fails_in_one_line_and_a_bad_flag_exits_2(tmp_path):
    """`pathsearch cluster check` of an HTTP server that is not Ray's dashboard, or of a port nothing listens on: a
    FAIL line and the first fix, exit 1, at once (the subprocess timeout guards against a hang); a flag that every
    verb refuses (credentials in a storage URI) exits 2 before anything is asked."""
    server = subprocess.Popen([PY, "-u", "-m", "http.server", "0", "--bind", "127.0.0.1", "--directory", str(tmp_path)],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)  # fmt: skip
    try:
        assert server.stdout is not None
        port = re.search(r"port (\d+)", server.stdout.readline())[1]  # "Serving HTTP on 127.0.0.1 port N ..."
        check = [PY, "-m", "pathsearch.cli", "cluster", "check"]
        proc = subprocess.run([*check, f"http://127.0.0.1:{port}"], capture_output=True, text=True, timeout=60)
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert proc.stdout.splitlines() == [
        f"FAIL     dashboard: http://127.0.0.1:{port} is not a Ray dashboard: GET /api/v0/nodes answered HTTP 404 "
        "(not found)",
        "first fix: give the Ray dashboard's address, http://HEAD:8265 (`ray dashboard CLUSTER.yaml` or `kubectl "
        "port-forward` forwards it)",
    ]
    nothing = subprocess.run([*check, f"http://127.0.0.1:{closed_port()}"], capture_output=True, text=True, timeout=60)
    assert nothing.returncode == 1 and nothing.stdout.startswith("FAIL     dashboard: no Ray dashboard at"), nothing
    secret = "s3://bucket/runs?secret_key=hush"
    bad = subprocess.run([*check, "http://127.0.0.1:1", "--storage-path", secret], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stdout == "", bad
    assert bad.stderr.startswith("pathsearch cluster: error: --storage-path") and "hush" not in bad.stderr


# ----- the cluster --------------------------------------------------------------------------------------------
class Namespace:
    """Runs commands inside the test's network namespace, with the cluster's token."""

    def __init__(self, name: str, env: dict[str, str]) -> None:
        self.name, self.env = name, env

    def run(self, args: list[str], timeout: float = 300, env: dict[str, str] | None = None, check: bool = False):
        proc = subprocess.run(
            ["ip", "netns", "exec", self.name, *args],
            capture_output=True, text=True, timeout=timeout, env={**self.env, **(env or {})}, cwd=ROOT,
        )  # fmt: skip
        if check and proc.returncode != 0:
            raise AssertionError(f"{args} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        return proc

    def popen(self, args: list[str]) -> subprocess.Popen:
        return subprocess.Popen(
            ["ip", "netns", "exec", self.name, *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=self.env, cwd=ROOT,
        )  # fmt: skip

    def runs(self, uri: str, experiment: str) -> list[dict]:
        proc = self.run([PY, str(ROOT / "tests/cluster_probe.py"), uri, experiment], timeout=120, check=True)
        return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def cluster():
    """Head (0 CPUs) + 2 worker nodes (1 CPU each) + MLflow server on SQLite, in a fresh network namespace."""
    name = f"pstest{os.getpid()}"
    folder = Path(tempfile.mkdtemp(prefix="pscluster-", dir="/tmp"))
    token = folder / "auth_token"
    token.write_text(os.urandom(32).hex())
    token.chmod(0o600)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["RAY_AUTH_TOKEN_PATH"] = str(token)
    env["PATHSEARCH_WORK_DIR"] = str(folder / "work")  # the drivers' working copies of runs kept in S3
    subprocess.run(["ip", "netns", "add", name], check=True)
    subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
    ns = Namespace(name, env)
    s3 = None
    try:
        if shutil.which("moto_server", path=str(Path(PY).parent)):  # an S3 server in the namespace (dev extra)
            s3 = ns.popen([PY, str(ROOT / "tests/s3server.py"), "serve", "5002"])
            line = s3.stdout.readline()
            assert line.startswith("{"), line + s3.stdout.read()[-3000:]
            env.update(json.loads(line))  # every node and the MLflow server get the store's endpoint and key
        up = [str(ROOT / "cluster/local.sh"), "up", "--dir", str(folder), "--workers", "2"]
        up += ["--artifacts-destination", "s3://pathsearch/mlflow"] if s3 else []  # MLflow's artifacts in S3 too
        ns.run(up, timeout=240, check=True)
        state = json.loads((folder / "cluster.json").read_text())
        yield ns, state
    finally:
        down = ns.run([str(ROOT / "cluster/local.sh"), "down", "--dir", str(folder)], timeout=120)
        if s3 is not None:
            s3.terminate()
            s3.wait(timeout=30)
        subprocess.run(["ip", "netns", "delete", name])
        shutil.rmtree(folder, ignore_errors=True)
        assert down.returncode == 0, down.stderr


def submit(
    ns: Namespace, state: dict, experiment: str, *extra: str, uri: str | None = None, background=False, store=None
):
    """`pathsearch submit --wait` of the small search; in the background (skipping the preflight job, which the
    foreground submissions run), the test watches it meanwhile."""
    args = [PY, "-m", "pathsearch.cli", "submit", str(ROOT / "search_spaces/digits_tiny.yaml"), "--wait"]
    args += ["--no-check"] if background else []
    args += ["--address", state["dashboard"], "--tracking-uri", uri or state["tracking_uri"]]
    args += ["--storage-path", store or state["storage_path"], "--name", experiment, *SMALL]
    args += ["--set", f"tracking.experiment={experiment}", *extra]
    return ns.popen(args) if background else ns.run(args, timeout=600)


def check_search_runs(runs: list[dict], trials: int, epochs: int = 6) -> list[dict]:
    """One FINISHED parent; exactly one finished run per trial with its whole metric history."""
    parents = [r for r in runs if r["kind"] == "search"]
    children = [r for r in runs if r["parent"] and r["role"] is None]  # the search's own trials
    assert len(parents) == 1 and parents[0]["status"] == "FINISHED"
    assert len(children) == trials
    assert len({r["trial_id"] for r in children}) == trials  # no trial has two runs
    assert all(r["parent"] == parents[0]["run_id"] for r in children)
    assert {r["status"] for r in children} == {"FINISHED"}
    for run in children:
        assert run["val_acc_steps"] == list(range(1, epochs + 1)), run  # each epoch once: nothing lost or repeated
    return children


@needs_netns
def test_local_cluster_has_a_head_two_workers_and_mlflow(cluster):
    ns, state = cluster
    proc = ns.run([str(ROOT / "cluster/local.sh"), "status", "--dir", state["dir"]], check=True)
    assert "Ray: 3 alive node(s)" in proc.stdout and "healthy" in proc.stdout
    assert [p["name"] for p in state["processes"]] == ["head", "mlflow", "worker-1", "worker-2"]


@needs_netns
@pytest.mark.parametrize("token", ["wrong", None])
def test_wrong_or_missing_token_is_a_clear_error(cluster, token, tmp_path):
    ns, state = cluster
    missing = {"RAY_AUTH_TOKEN_PATH": str(tmp_path / "none"), "HOME": "/nonexistent"}
    env = {"RAY_AUTH_TOKEN": token} if token else missing
    proc = ns.run(
        [PY, "-m", "pathsearch.cli", "status", "no-such-job", "--address", state["dashboard"]], env=env, timeout=60
    )
    assert proc.returncode == 2, proc.stderr
    expected = "refused the token from RAY_AUTH_TOKEN" if token else "asks for a token and none was found"
    assert expected in proc.stderr and "Traceback" not in proc.stderr


@needs_netns
def test_preflight_finds_what_the_nodes_cannot_reach(cluster):
    ns, state = cluster
    proc = submit(ns, state, "unreachable", uri="http://127.0.0.1:5999")  # nothing listens there
    assert proc.returncode == 2, proc.stdout + proc.stderr
    unreachable = [line for line in proc.stderr.splitlines() if "cannot reach --tracking-uri" in line]
    assert len(unreachable) == 3, proc.stderr  # the head and both workers said so
    jobs = ns.run([PY, "-m", "pathsearch.cli", "status", "unreachable", "--address", state["dashboard"]])
    assert jobs.returncode == 2 and "no job 'unreachable'" in jobs.stderr  # the search itself was not submitted


@needs_netns
def test_cluster_check_passes_on_the_cluster_and_names_the_worker_that_cannot_reach_the_tracking_uri(cluster):
    """`pathsearch cluster check` with the tracking URI and storage path a search there uses: exit 0, both workers
    listed with their torch and timm, each node reaching MLflow's /health and seeing the file the driver wrote into
    the storage path. With a tracking URI nothing listens on and a storage path the driver cannot write: exit 1, a
    FAIL naming each worker and the URI it could not reach, one naming the head and the path (the workers' storage
    checks then wait: `not yet`), and the first fix last."""
    ns, state = cluster
    check = [PY, "-m", "pathsearch.cli", "cluster", "check", state["dashboard"]]
    check += ["--storage-path", state["storage_path"]]
    good = ns.run([*check, "--tracking-uri", state["tracking_uri"]], timeout=300)
    lines = good.stdout.splitlines()
    assert good.returncode == 0, good.stdout + good.stderr[-3000:]
    assert lines[-1] == f"nothing failed: a search can be submitted to {state['dashboard']}", lines
    assert "ok       autoscaler: none: a search runs on the live nodes" in good.stdout
    assert "ok       nodes: 3 alive, the head and 2 workers; CPU 2, GPU 0 in all" in lines
    software = [line for line in lines if re.match(r"ok +worker 127\.0\.0\.1 \(\w{8}\) \{CPU: 1,", line)]
    assert len(software) == 2, good.stdout
    assert all(re.search(r"torch \d[^,]*, timm \d", line) and "the shipped pathsearch imports" in line
               for line in software)  # fmt: skip
    reached = [line for line in lines if f"reaches --tracking-uri {state['tracking_uri']} (/health answered)" in line]
    seen = [line for line in lines if f" --storage-path {state['storage_path']} (" in line]
    assert len(reached) == 3 and len(seen) == 3, good.stdout  # the head and both workers
    # nothing listens on that port; /proc takes no folder (as a read-only mount would not)
    check[-1] = "/proc/pathsearch/runs"
    bad = ns.run([*check, "--tracking-uri", "http://127.0.0.1:5999"], timeout=300)
    lines = bad.stdout.splitlines()
    assert bad.returncode == 1, bad.stdout + bad.stderr[-3000:]
    head = r"FAIL +head 127\.0\.0\.1 \(\w{8}\), the driver's node, cannot write --storage-path /proc/pathsearch/runs: "
    assert len([line for line in lines if re.match(head, line)]) == 1, bad.stdout
    waiting = [line for line in lines if line.startswith("not yet  worker ")]
    assert len(waiting) == 2 and all(line.endswith("the driver's node could not write it") for line in waiting)
    refused = r"FAIL +worker 127\.0\.0\.1 \(\w{8}\) cannot reach --tracking-uri http://127\.0\.0\.1:5999: .*refused"
    unreachable = [line for line in lines if re.fullmatch(refused, line)]
    assert len(unreachable) == 2, bad.stdout
    assert lines[-1].startswith("first fix: give a --tracking-uri every node reaches: "), lines
    print(f"cluster check on the local cluster:\n{good.stdout}\nwith what the nodes cannot reach:\n{bad.stdout}")


@pytest.fixture
def postgres_mlflow(cluster):
    """An MLflow server backed by Debian's PostgreSQL, both inside the namespace; stopped after the test."""
    ns, _ = cluster
    bins = sorted(Path("/usr/lib/postgresql").glob("*/bin"))
    if not bins or shutil.which("runuser") is None:
        pytest.skip("PostgreSQL server binaries not installed (Debian package postgresql)")
    bindir = bins[-1]
    folder = Path(tempfile.mkdtemp(prefix="pspg-", dir="/tmp"))
    shutil.chown(folder, "postgres")
    as_pg = ["runuser", "-u", "postgres", "--"]
    ns.run([*as_pg, str(bindir / "initdb"), "-D", str(folder / "data"), "--auth=trust", "-U", "postgres"], check=True)
    data = str(folder / "data")
    postgres = ns.popen([*as_pg, str(bindir / "postgres"), "-D", data, "-k", str(folder), "-p", "5432",
                         "-c", "listen_addresses=127.0.0.1"])  # fmt: skip
    server = None
    try:
        for _ in range(60):
            if ns.run([str(bindir / "pg_isready"), "-h", "127.0.0.1", "-p", "5432"]).returncode == 0:
                break
            time.sleep(0.5)
        ns.run([*as_pg, str(bindir / "createdb"), "-h", "127.0.0.1", "mlflow"], check=True)
        store = "postgresql://postgres@127.0.0.1:5432/mlflow"
        server = ns.popen(
            [PY, "-m", "mlflow", "server", "--backend-store-uri", store, "--artifacts-destination",
             str(folder / "artifacts"), "--host", "127.0.0.1", "--port", "5001", "--workers", "1"]
        )  # fmt: skip
        health = [PY, "-c", "import urllib.request as u; u.urlopen('http://127.0.0.1:5001/health', timeout=2)"]
        for _ in range(120):
            if ns.run(health, timeout=30).returncode == 0:
                break
            assert server.poll() is None, server.stdout.read()[-3000:]
            time.sleep(0.5)
        yield "http://127.0.0.1:5001"
    finally:
        for proc in (server, postgres):
            if proc is not None:
                proc.terminate()
                proc.wait(timeout=60)
        shutil.rmtree(folder, ignore_errors=True)


@needs_netns
def test_multinode_search_on_postgresql_logs_one_run_per_trial_confirms_and_exports(cluster, postgres_mlflow):
    """The search and its confirmation on two worker nodes, tracked by an MLflow server on PostgreSQL (the other
    cluster tests use the local cluster's SQLite-backed server)."""
    ns, state = cluster
    uri, experiment = postgres_mlflow, "multinode"
    proc = submit(ns, state, experiment, *CONFIRM, uri=uri)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert f"job {experiment}: SUCCEEDED" in proc.stdout
    runs = ns.runs(uri, experiment)
    children = check_search_runs(runs, trials=4)
    assert len({r["node_id"] for r in children}) == 2  # the trials ran on both worker nodes
    assert "verdict: " in proc.stdout  # confirmation trials are ordinary Ray trials on the cluster too
    seeds = [r for r in runs if r["role"] == "confirmation_seed"]
    assert sorted(r["seed"] for r in seeds) == ["1", "1", "2", "2"]
    assert {r["status"] for r in seeds} == {"FINISHED"} and all("test_acc" in r["metrics"] for r in seeds)
    assert len({r["node_id"] for r in seeds}) == 2
    out = Path(state["dir"]) / "best.yaml"
    ns.run(
        [PY, "-m", "pathsearch.cli", "export", "--experiment", experiment, "--tracking-uri", uri, "--out", str(out)],
        check=True,
    )
    assert PathConfig.load(out).depth == 2
    again = submit(ns, state, experiment, "--no-check", uri=uri)  # a second job of the same name: refused first
    assert again.returncode == 2 and f"a job named '{experiment}' already exists" in again.stderr


def wait_for_running_trials(ns: Namespace, uri: str, experiment: str, job, count: int, steps: int) -> list[dict]:
    """Polls MLflow until `count` trial runs are RUNNING with at least `steps` evaluations each."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        running = [r for r in ns.runs(uri, experiment) if r["parent"] and r["status"] == "RUNNING"]
        if len(running) >= count and all(len(r["val_acc_steps"]) >= steps for r in running):
            return running
        assert job.poll() is None, job.stdout.read()[-4000:]
        time.sleep(1)
    raise AssertionError(f"{count} trial(s) never ran at once")


def wait_for_busy_trials(run_dir: Path, job, count: int, epochs: int) -> None:
    """Waits until `count` trials of the search in `run_dir` (on the cluster's shared disk) have stored a checkpoint
    and still have at least two of their `epochs` to go: read from the disk at once, where a look at MLflow is a new
    process that sees an epoch seconds late (on a quiet machine the search once ended between two such looks)."""
    deadline = time.monotonic() + 300
    while True:
        latest = [max((int(c.name.split("_")[-1]) for c in t.glob("checkpoint_*")), default=None)
                  for t in run_dir.glob("train_trial_*")]  # fmt: skip
        if sum(1 for n in latest if n is not None and n <= epochs - 3) >= count:
            return
        assert job.poll() is None, job.stdout.read()[-4000:]
        assert time.monotonic() < deadline, f"{count} trial(s) never trained at once"
        time.sleep(0.2)


def wait_for_checkpoint(run_dir: Path, job) -> None:
    """Waits until a trial of the search in `run_dir` (on the cluster's shared disk) has stored its first
    checkpoint: seen at once, where MLflow shows an epoch only seconds later (each look is a new process)."""
    deadline = time.monotonic() + 300
    while not any(run_dir.glob("*/checkpoint_*")):
        assert job.poll() is None, job.stdout.read()[-4000:]
        assert time.monotonic() < deadline, "no trial stored a checkpoint"
        time.sleep(0.2)


@needs_netns
def test_stopped_search_closes_its_runs_and_resumes_on_the_cluster(cluster):
    ns, state = cluster
    experiment = "stopped"
    # 16 epochs (about 1 s each): the stop lands with most of both trials to go, also on a loaded machine (with 12
    # epochs, waiting for an epoch in MLflow, the trials had once ended before the stop reached the driver)
    extra = ["--set", "train.epochs=16", "--set", "data.train_size=600", "--set", "search.num_samples=2"]
    job = submit(ns, state, experiment, *extra, background=True)
    wait_for_checkpoint(Path(state["storage_path"]) / experiment, job)
    stop = ns.run([PY, "-m", "pathsearch.cli", "stop", experiment, "--address", state["dashboard"]], check=True)
    assert f"job {experiment}: STOPPED" in stop.stdout
    output, _ = job.communicate(timeout=120)
    assert job.returncode == 3, output[-3000:]  # --wait exits 3 for a stopped job
    runs = ns.runs(state["tracking_uri"], experiment)
    seen = [(r["parent"], r["status"], r["state"], r["val_acc_steps"]) for r in runs]
    assert runs and not [r for r in runs if r["status"] == "RUNNING"], seen  # nothing left RUNNING
    interrupted = [r for r in runs if r["parent"] and r["state"] == "INTERRUPTED"]
    assert interrupted and {r["status"] for r in interrupted} == {"KILLED"}, (seen, output[-3000:])
    run_dir = f"{state['storage_path']}/{experiment}"
    resume = [PY, "-m", "pathsearch.cli", "submit", "--resume", run_dir, "--address", state["dashboard"], "--wait"]
    proc = ns.run(resume, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    runs = ns.runs(state["tracking_uri"], experiment)
    children = [r for r in runs if r["parent"]]
    assert len(children) == 2 and {r["status"] for r in children} == {"FINISHED"}  # the interrupted ones too
    for run in children:  # every epoch logged across the stop; only the one in flight at the stop may repeat:
        # Tune snapshots the experiment before it stops the trials, so a result that arrives while they stop is
        # logged but its checkpoint is not the one resumed from (seen once in CI here: flaky if asserted exact)
        steps = run["val_acc_steps"]
        assert sorted(set(steps)) == list(range(1, 17)) and len(steps) - len(set(steps)) <= 1, run


needs_s3 = pytest.mark.skipif(
    shutil.which("moto_server", path=str(Path(PY).parent)) is None, reason="needs moto[server] (the dev extra)"
)


@needs_netns
@needs_s3
def test_search_kept_in_s3_survives_its_killed_driver_and_resumes_from_the_bucket(cluster):
    """No shared disk: trials, checkpoints, the journal and pathsearch's files in S3 (moto's server in the
    namespace), MLflow's artifacts there too. kill -9 of the job's driver, its working copy deleted, then
    `submit --resume s3://...`: one FINISHED run per trial, every epoch logged; `export --with-weights` reads the
    weights back from MLflow's artifacts in the bucket."""
    from safetensors.torch import load_file

    from pathsearch.ensemble.model import create_path_vit

    ns, state = cluster
    experiment, store = "s3search", "s3://pathsearch/cluster"
    missing = submit(ns, state, "nobucket", store="s3://no-such-bucket/runs")  # the preflight asks the store first
    assert missing.returncode == 2 and "the bucket 'no-such-bucket' does not exist" in missing.stderr, missing.stderr
    extra = ["--set", "train.epochs=12", "--set", "data.train_size=600", "--set", "search.num_samples=2"]
    job = submit(ns, state, experiment, *extra, background=True, store=store)
    # both trials past their first checkpoints: each is in a snapshot in the bucket, with a checkpoint to resume
    wait_for_running_trials(ns, state["tracking_uri"], experiment, job, count=2, steps=2)
    drivers = subprocess.run(["pgrep", "-f", f"pathsearch.cli search search.yaml .*--name {experiment}"],
                             capture_output=True, text=True).stdout.split()  # fmt: skip
    assert 1 <= len(drivers) <= 2, drivers  # the job's shell and its python, or the python alone
    for pid in drivers:
        os.kill(int(pid), 9)
    output, _ = job.communicate(timeout=120)
    assert job.returncode == 1, output[-3000:]  # --wait exits 1 for a failed job
    work = Path(state["dir"]) / "work" / experiment
    assert (work / "pathsearch_state.json").is_file()
    shutil.rmtree(work)  # the head's copy is gone, as with a replaced head node: only the bucket holds the run
    keys = json.loads(ns.run([PY, str(ROOT / "tests/s3server.py"), "keys", f"cluster/{experiment}/"]).stdout)
    assert {f"cluster/{experiment}/{f}" for f in ("optuna_journal.log", "pathsearch_state.json", "tuner.pkl")} <= set(
        keys
    ) and any("/checkpoint_" in k for k in keys), keys
    resume = [PY, "-m", "pathsearch.cli", "submit", "--resume", f"{store}/{experiment}", "--address"]
    proc = ns.run([*resume, state["dashboard"], "--wait"], timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    runs = ns.runs(state["tracking_uri"], experiment)
    children = [r for r in runs if r["parent"] and r["role"] is None]
    finished = [r for r in children if r["status"] == "FINISHED"]
    seen = [(r["trial_id"], r["status"], r["state"], r["val_acc_steps"]) for r in children]
    if len(finished) != 2:  # printed whole (an assert's message is cut short): what the resumed job said
        print(f"runs: {seen}\nthe resumed job's output:\n{proc.stdout[-8000:]}\n{proc.stderr[-3000:]}")
    assert len(finished) == 2 and len({r["trial_id"] for r in children}) == len(children), seen
    assert all(r["state"] == "LOST" for r in children if r["status"] != "FINISHED"), seen  # never in a snapshot
    for run in finished:  # every epoch logged across the kill (the ones after the last snapshot, again)
        assert sorted(set(run["val_acc_steps"])) == list(range(1, 13)), run
    out = Path(state["dir"]) / "s3best.yaml"
    export = [PY, "-m", "pathsearch.cli", "export", "--experiment", experiment, "--out", str(out), "--with-weights"]
    ns.run([*export, "--tracking-uri", state["tracking_uri"]], check=True)
    mlflow_keys = json.loads(ns.run([PY, str(ROOT / "tests/s3server.py"), "keys", "mlflow/"]).stdout)
    assert any(k.endswith("/model_0.safetensors") for k in mlflow_keys)  # the server keeps artifacts in S3
    model = create_path_vit(path_config=PathConfig.load(out))
    model.load_state_dict(load_file(str(out.with_suffix(".safetensors"))))


@needs_netns
def test_killed_worker_node_trials_resume_from_checkpoints(cluster):
    """Runs last: it takes a worker node away. Its raylet is killed by pid while both nodes train."""
    ns, state = cluster
    experiment = "node_failure"
    # 1200 training and 500 validation images, 10 epochs (about 0.7 s each on a quiet machine, 2 s loaded): both nodes
    # are seen busy with epochs still to go. Watched in MLflow (a new process per look, epochs seen seconds late) the
    # kill once landed as the first trials ended, and on a quiet machine the search once ended unseen: the disk is read
    sizes = ["--set", "data.train_size=1200", "--set", "data.val_size=500"]
    job = submit(ns, state, experiment, "--set", "train.epochs=10", *sizes, background=True)
    worker = next(p for p in state["processes"] if p["name"] == "worker-1")
    # two trials past their first checkpoints: both worker nodes are busy (the head has no CPU)
    wait_for_busy_trials(Path(state["storage_path"]) / experiment, job, count=2, epochs=10)
    raylets = [pid for pid in session_pids(worker["pid"]) if Path(f"/proc/{pid}/comm").read_text().strip() == "raylet"]
    assert len(raylets) == 1
    os.kill(raylets[0], 9)
    output, _ = job.communicate(timeout=600)
    assert job.returncode == 0, output[-5000:]
    runs = ns.runs(state["tracking_uri"], experiment)
    try:
        children = check_search_runs(runs, trials=4, epochs=10)
    except AssertionError as err:  # what the search said, and every run MLflow holds, is what tells why
        table = "\n".join(
            f"{r['run_id']} parent={r['parent']} role={r['role']} trial={r['trial_id']} {r['status']} {r['state']} "
            f"retries={r['retries']} node={r['node_id']} epochs={r['val_acc_steps']}"
            for r in runs
        )
        raise AssertionError(f"{err}\nMLflow's runs:\n{table}\nthe job's output:\n{output[-6000:]}") from err
    retried = [r for r in children if r["retries"] > 0]
    assert retried, "no trial was retried: the kill did not hit a running trial"
    # Ray's line from the retried attempt: it continued from one of its own checkpoints, not from the start
    restored = re.findall(r"Restored on \S+ from checkpoint: .*?/train_trial_(\w+?)_[^/]*/checkpoint_\d+", output)
    assert {r["trial_id"] for r in retried} & set(restored), (restored, output[-6000:])
    status = ns.run([str(ROOT / "cluster/local.sh"), "status", "--dir", state["dir"]])
    assert status.returncode == 1 and "worker-1   DOWN" in status.stdout


def session_pids(sid: int) -> list[int]:
    from pathsearch.cluster.local import session_pids as pids

    return pids(sid)
