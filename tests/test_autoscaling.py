"""Searches on a cluster whose autoscaler starts the workers: Ray's own autoscaler (v1, the cluster launcher's
default) with its fake node provider, in a network namespace of its own (tests/autoscaling.py). The head has no CPU
and the worker type `min_workers: 0`, as the shipped cluster files: nothing runs a trial until the autoscaler starts
a worker, and nothing but the search asks it to. Needs root (`ip netns`); skips otherwise.
"""

from __future__ import annotations

import json
import re
import sqlite3
import sys
import time
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from autoscaling import PY, ROOT, FakeAutoscalingCluster, can_run

pytestmark = pytest.mark.skipif(can_run() is not None, reason=str(can_run()))
WORKER = {"cpu1": {"resources": {"CPU": 1}, "max": 2}}
FAKE_WORKER_ID = re.compile(r"f{51}\d{5}")  # the fake provider's node ids: its head ...00000, workers from ...00001


@pytest.fixture(scope="module")
def cluster():
    started = time.monotonic()
    found = FakeAutoscalingCluster(WORKER).start()
    print(f"\nfake autoscaling cluster up in {time.monotonic() - started:.1f} s")
    try:
        yield found
    finally:
        found.stop()


def toy_file(folder: Path, **search) -> Path:
    """A toy search (tests/toy_search.py's torch-free trainable): 4 trials of 1 CPU, 2 at a time, then the best and
    the baseline confirmed on 2 paired seeds."""
    data = {
        "model": {"name": "vit_tiny_patch16_224", "kwargs": {"depth": 2}},
        "data": {"name": "synthetic"},
        "train": {"epochs": 3},
        "search": {
            "metric": "val_acc",
            "mode": "max",
            "num_samples": 4,
            "max_concurrent_trials": 2,
            "sampler": "random",
            "scheduler": "asha",
            "seed": 0,
            "max_failures": 0,
            "resources_per_trial": {"cpu": 1},
            "confirm": {"top_k": 1, "seeds": 2},
            **search,
        },
        # (the learning rate makes each sampled configuration new: a repeated one would reuse a result, not train)
        "space": {
            "model.pruned": {"by": "shortest", "low": 0, "high": 3},
            "train.lr": {"low": 1.0e-4, "high": 1.0e-2, "log": True},
        },
        "tracking": {"experiment": "auto"},
    }
    path = folder / "toy.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def runs_in(db: Path) -> list[tuple[str, str | None, str | None, str | None]]:
    """(status, kind, role, state tags) of every MLflow run in the SQLite store `db` (read as a table: no MLflow)."""
    tag = "LEFT JOIN tags {0} ON {0}.run_uuid = runs.run_uuid AND {0}.key = 'pathsearch.{0}'"
    joins = " ".join(tag.format(name) for name in ("kind", "role", "state"))
    with sqlite3.connect(db) as con:
        return con.execute(f"SELECT runs.status, kind.value, role.value, state.value FROM runs {joins}").fetchall()


def test_a_search_starts_its_workers_through_the_autoscaler_and_releases_its_request(cluster):
    assert [n["id"] for n in cluster.probe("nodes")] == ["f" * 51 + "00000"]  # the head alone: no worker yet
    folder = cluster.folder / "search"
    folder.mkdir()
    args = {
        "file": str(toy_file(folder)),
        "storage": str(folder / "runs"),
        "uri": f"sqlite:///{folder}/mlflow.db",
        "name": "auto",
        "address": cluster.address,
        "verbose": True,
    }
    started = time.monotonic()
    proc = cluster.run([PY, str(ROOT / "tests/toy_search.py"), "search", json.dumps(args)], timeout=400)
    took = time.monotonic() - started
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "pathsearch: waiting for the autoscaler: 2 trials of {CPU: 1}; up to 5 min" in out, out[-3000:]
    joined = re.search(r"a worker that holds a trial joined after (\d+) s", out)
    assert joined, out[-3000:]
    workers = [n for n in cluster.probe("nodes") if n["id"] != "f" * 51 + "00000"]
    assert 1 <= len(workers) <= 2 and all(FAKE_WORKER_ID.fullmatch(n["id"]) for n in workers), workers
    assert all(n["resources"]["CPU"] == 1 for n in workers)  # the worker type's, started by the autoscaler
    runs = runs_in(folder / "mlflow.db")
    trials = [run for run in runs if run[1:3] == (None, None)]
    seeds = [run for run in runs if run[2] == "confirmation_seed"]  # the best and the baseline on 2 seeds each
    assert len(trials) == 4 and len(seeds) == 4, runs
    # every trial trained to the end or was stopped by ASHA (KILLED, state PRUNED); nothing failed or was lost
    assert all(run[0] == "FINISHED" or (run[0] == "KILLED" and run[3] == "PRUNED") for run in trials), trials
    assert all(run[0] == "FINISHED" for run in runs if run not in trials), runs
    # the search's bundles are out of the cluster's request: the autoscaler may let the workers go
    assert cluster.probe("request") == {"sent": [], "entries": []}
    print(f"first worker after {joined.group(1)} s; search with confirmation {took:.0f} s; {len(workers)} workers")


def test_a_trial_the_autoscaler_never_delivers_exits_2_leaving_nothing(cluster):
    """Autoscaler v1 publishes no node types, so a trial larger than every worker type is found at the limit the
    user sets: one line, exit 2, no run folder, no MLflow store, no request left."""
    folder = cluster.folder / "never"
    folder.mkdir()
    cmd = [
        PY,
        "-m",
        "pathsearch.cli",
        "search",
        str(ROOT / "search_spaces/digits_tiny.yaml"),
        "--address",
        cluster.address,
        "--storage-path",
        str(folder / "runs"),
        "--tracking-uri",
        f"sqlite:///{folder}/m.db",
        "--set",
        "search.resources_per_trial={cpu: 4}",
        "search.autoscaler_wait_min=0.1",
    ]
    proc = cluster.run(cmd, timeout=300)
    # (Ray's core prints one warning of its own in a namespace without a route out: "Failed to determine local IP
    # via external connectivity"; pathsearch's own lines are what is checked)
    lines = [line for line in proc.stderr.strip().splitlines() if "network_util.cc" not in line]
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("pathsearch search: error: search.autoscaler_wait_min: 0.1 min"), (
        lines
    )
    assert "it launched nothing for them" in lines[0] and "node types could not be read" in lines[0], lines
    assert "2 trials of {CPU: 4}" in lines[0]  # the file's max_concurrent_trials: 2
    assert "waiting for the autoscaler: 2 trials of {CPU: 4}" in proc.stdout
    assert list(folder.iterdir()) == []  # no run folder, no MLflow store
    assert cluster.probe("request") == {"sent": [], "entries": []}


def test_a_trial_no_published_node_type_holds_is_refused_at_once(cluster):
    """Where the autoscaler publishes its node types (KubeRay's autoscaler v2 reports them into Ray's GCS; here they
    are written where it writes them), a trial none of them holds exits 2 at once, naming them, leaving nothing."""
    assert cluster.probe("publish", json.dumps({"cpu1": {"CPU": 1}})) == {"cpu1": {"CPU": 1}}
    folder = cluster.folder / "published"
    folder.mkdir()
    try:
        cmd = [PY, "-m", "pathsearch.cli", "search", str(ROOT / "search_spaces/digits_tiny.yaml"), "--address",
               cluster.address, "--storage-path", str(folder / "runs"), "--tracking-uri", f"sqlite:///{folder}/m.db",
               "--set", "search.resources_per_trial={cpu: 4}"]  # fmt: skip
        started = time.monotonic()
        proc = cluster.run(cmd, timeout=300)
        took = time.monotonic() - started
    finally:
        assert cluster.probe("unpublish") is True
    lines = [line for line in proc.stderr.strip().splitlines() if "network_util.cc" not in line]
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert lines == [
        "pathsearch search: error: search.resources_per_trial: no node type of the cluster's autoscaler can hold a "
        "trial: it asks CPU 4 (the most any node has: 1); its node types: cpu1 {CPU: 1} (ask for less, or add a node "
        "type that has it)"
    ]
    assert "waiting for the autoscaler" not in proc.stdout and took < 60  # at once: no wait for the limit
    assert list(folder.iterdir()) == []
    assert cluster.probe("request") == {"sent": [], "entries": []}


def test_searches_keep_each_others_requests_and_a_killed_drivers_is_cleared(cluster):
    """`request_resources` is one request per cluster, replaced by each call: each search's bundles are kept apart and
    the union sent, so one search releasing its own leaves the other's; a driver killed with kill -9 leaves an
    entry that the next pathsearch command on the cluster drops. The second asks for a trial of 2 workers: both
    workers' bundles and the Tune trial's token are in the request."""
    script = [PY, str(ROOT / "tests/cluster_state.py"), cluster.address]
    first = cluster.popen([*script, "ask", "first", "1"])
    second = cluster.popen([*script, "ask", "second", "0.5", "2"])
    try:
        for proc in (first, second):  # each prints the request once it has asked (after Ray's own lines, if any)
            assert proc.stdout is not None
            seen = []
            while not (seen and seen[-1].startswith("{")):
                seen.append(proc.stdout.readline())
                assert seen[-1], seen  # it ended before asking
        both = cluster.probe("request")
        assert both["entries"] == ["autoscaler_request/first", "autoscaler_request/second"]
        assert sorted(b["CPU"] for b in both["sent"]) == [0.01, 0.5, 0.5, 1.0]
        second.kill()  # a driver that ends without releasing (kill -9), while the first is still running
        second.wait(timeout=30)
        left = cluster.probe("release", "none-such")  # any command: the dead driver's entry goes once Ray knows
        deadline = time.monotonic() + 60
        while left["entries"] != ["autoscaler_request/first"] and time.monotonic() < deadline:
            time.sleep(1)
            left = cluster.probe("tidy")
        assert left == {"sent": [{"CPU": 1.0}], "entries": ["autoscaler_request/first"]}  # the live one kept
        assert cluster.probe("release", "first") == {"sent": [], "entries": []}
    finally:
        for proc in (first, second):
            proc.kill()
            proc.wait(timeout=30)


# ----- `pathsearch cluster check` on the autoscaling cluster ---------------------------------------------------------
def driver_running(cluster, script: str) -> bool:
    """Whether Ray still counts a driver whose command line holds `script` as running (the dashboard's job list)."""
    code = (
        "import json, os, urllib.request as u; r = u.Request(os.environ['DASHBOARD'] + '/api/jobs/', headers="
        "{'Authorization': 'Bearer ' + open(os.environ['RAY_AUTH_TOKEN_PATH']).read().strip()}); "
        "print(json.dumps([j for j in json.load(u.urlopen(r, timeout=10)) if j['type'] == 'DRIVER']))"
    )
    proc = cluster.run([PY, "-c", code], env={"DASHBOARD": cluster.dashboard}, timeout=60, check=True)
    jobs = json.loads(proc.stdout)
    return any(script in job["entrypoint"] and job["status"] == "RUNNING" for job in jobs)


def test_cluster_check_reports_autoscaler_v1_and_clears_a_killed_drivers_request(cluster):
    """`pathsearch cluster check` on a head with no CPU whose autoscaler (v1) starts the workers: exit 0, nothing
    failed, the autoscaler named. With no worker up (this test alone) every per-worker check is `not yet`; with the
    workers the searches above started (idle for 5 min) each of them is checked instead. A request left by a driver
    killed with kill -9 (one bundle no worker type holds, so the autoscaler starts nothing for it) is cleared by it."""
    asker = cluster.popen([PY, str(ROOT / "tests/cluster_state.py"), cluster.address, "ask", "killed", "64"])
    try:
        assert asker.stdout is not None
        seen = []
        while not (seen and seen[-1].startswith("{")):  # it has asked (after Ray's own lines, if any)
            seen.append(asker.stdout.readline())
            assert seen[-1], seen  # it ended before asking
        assert "autoscaler_request/killed" in json.loads(seen[-1])["entries"]
    finally:
        asker.kill()  # kill -9: nothing released
        asker.wait(timeout=30)
    deadline = time.monotonic() + 30
    while driver_running(cluster, "ask killed") and time.monotonic() < deadline:
        time.sleep(0.5)  # Ray marks the killed driver's job dead within a second or two
    check = [PY, "-m", "pathsearch.cli", "cluster", "check", cluster.dashboard]
    proc = cluster.run(check, timeout=300)
    lines = proc.stdout.splitlines()
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert not [line for line in lines if line.startswith("FAIL")], proc.stdout
    assert lines[-1].startswith("nothing failed"), lines
    assert any(line.startswith("ok       autoscaler: v1: node types not published by autoscaler v1") for line in lines)
    assert any(
        line.startswith("ok       autoscaler requests: cleared killed, left by a driver that died") for line in lines
    )
    assert cluster.probe("request") == {"sent": [], "entries": []}  # the dead driver's bundle is out of the request
    workers = [line for line in lines if line.startswith("ok       worker 127.0.0.1 (")]
    if "the head and no worker" in proc.stdout:
        waiting = [line.split(":")[0] for line in lines if line.startswith("not yet  workers'")]
        assert waiting == [
            "not yet  workers' Ray, Python, torch, timm and the shipped pathsearch",
            "not yet  workers' GPUs",
        ]
        assert all(line.endswith("no worker is up (the autoscaler starts them when a search asks)")
                   for line in lines if line.startswith("not yet  workers'"))  # fmt: skip
        assert not workers
    else:
        assert workers and all("torch " in line and "timm " in line for line in workers), proc.stdout
        assert not [line for line in lines if line.startswith("not yet  workers'")], proc.stdout
    print(f"cluster check on the autoscaling cluster ({len(workers)} worker(s) up):\n{proc.stdout}")
