"""A real multi-node Ray cluster and an MLflow server on one machine, for trying the cluster flow and for tests.

`up` starts a Ray head (no CPUs: it runs only drivers), N worker nodes as separate `ray start` processes and an
MLflow tracking server (one worker, no job execution), all bound to 127.0.0.1 with token authentication on.
Each runs in its own session, recorded in DIR/cluster.json, so `down` stops exactly those processes and
nothing else of the user's (`ray stop` would stop every Ray on the machine). Imports no torch.
Usage: python -m pathsearch.cluster.local up|down|status [--dir DIR] [--workers N] ... (the repository's
cluster/local.sh runs it with the repository's virtual environment).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pathsearch.cluster.jobs import auth_headers, list_nodes, read_ray_token

# what the user typed: cluster/local.sh sets it; installed without the repository, the module is run directly
PROG = os.environ.get("PATHSEARCH_PROG", "python -m pathsearch.cluster.local")

STATE_FILE = "cluster.json"


def ensure_token() -> str:
    """The token the nodes and clients share: the user's existing one, else a new one written where the `ray`
    CLI looks (RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token), readable by the user only."""
    token, _ = read_ray_token()
    if token:
        return token
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token").expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_hex(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(token)
    return token


def _ray_command() -> list[str]:
    beside = Path(sys.executable).parent / "ray"  # the ray of this environment, not whichever is on PATH
    return [str(beside)] if beside.exists() else [shutil.which("ray") or "ray"]


def _start(name: str, cmd: list[str], env: dict[str, str], logs: Path) -> dict[str, Any]:
    log = logs / f"{name}.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    return {"name": name, "pid": proc.pid, "log": str(log), "command": cmd}


def session_pids(sid: int) -> list[int]:
    """The processes of session `sid` (every Ray process a node's `ray start` spawned shares its session)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getsid(int(entry)) == sid:
                    pids.append(int(entry))
            except (ProcessLookupError, PermissionError):
                continue
    return pids


def _alive(proc: dict[str, Any]) -> bool:
    return bool(session_pids(proc["pid"]))


def _stop_sessions(sids: Sequence[int], grace_s: float = 5.0) -> None:
    """SIGTERM every process of the sessions (Ray's own children included), all at once, then SIGKILL what is
    left after the grace period (Ray's processes ignored SIGTERM for longer than 6 s here; a local cluster has no
    state worth waiting for)."""

    def left() -> list[int]:
        return [pid for sid in sids for pid in session_pids(sid)]

    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        for pid in left():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while left() and time.monotonic() < deadline:
            time.sleep(0.2)
        if not left():
            return


def _wait_until(what: str, ready: Any, procs: Sequence[dict[str, Any]], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if ready():
            return
        for proc in procs:
            if not _alive(proc):
                tail = "".join(Path(proc["log"]).read_text(errors="replace").splitlines(True)[-15:])
                raise RuntimeError(f"{proc['name']} exited while waiting for {what}; end of {proc['log']}:\n{tail}")
        time.sleep(0.5)
    raise RuntimeError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def _http_ok(url: str, headers: dict[str, str] | None = None) -> bool:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=5) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def read_state(folder: str | Path) -> dict[str, Any] | None:
    path = Path(folder).expanduser().resolve() / STATE_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def up(
    folder: str | Path = "runs/cluster",
    workers: int = 2,
    cpus_per_worker: float = 1,
    host: str = "127.0.0.1",
    ray_port: int = 6380,
    dashboard_port: int = 8265,
    mlflow_port: int | None = 5000,
    backend_store_uri: str | None = None,
    timeout_s: float = 120,
    artifacts_destination: str | None = None,
) -> dict[str, Any]:
    """Starts the cluster and returns its state (also written to DIR/cluster.json). On failure, stops what it
    started before raising. Every process inherits this environment: an object store's endpoint and credentials
    (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...) set here reach the nodes and the MLflow server."""
    root = Path(folder).expanduser().resolve()
    state = read_state(root)
    if state and any(_alive(p) for p in state["processes"]):
        raise ValueError(f"a local cluster is already up in {root} (see {root / STATE_FILE}); `down` it first")
    logs = root / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    (root / "runs").mkdir(exist_ok=True)
    ensure_token()
    # Ray's temp dir holds unix sockets, whose paths must stay under ~100 characters: keep it short.
    temp = tempfile.mkdtemp(prefix="psray-", dir="/tmp")
    # `python` in a job's entrypoint (and Ray's workers) must be this environment's, on every node
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "RAY_AUTH_MODE": "token", "PATH": path}
    env.pop("RAY_ADDRESS", None)
    dashboard = f"http://{host}:{dashboard_port}"
    state = {
        "dir": str(root),
        "ray_address": f"{host}:{ray_port}",
        "dashboard": dashboard,
        "tracking_uri": f"http://{host}:{mlflow_port}" if mlflow_port else None,
        "storage_path": str(root / "runs"),
        "temp_dir": temp,
        "processes": [],
    }
    procs: list[dict[str, Any]] = state["processes"]

    def save() -> None:
        tmp = root / f"{STATE_FILE}.tmp"
        tmp.write_text(json.dumps(state, indent=1))
        tmp.replace(root / STATE_FILE)

    ray = _ray_command()
    common = ["--block", "--node-ip-address", host, "--disable-usage-stats"]
    try:
        head = [*ray, "start", "--head", "--port", str(ray_port), "--num-cpus", "0", "--temp-dir", temp]
        head += ["--dashboard-host", host, "--dashboard-port", str(dashboard_port), *common]
        procs.append(_start("head", head, env, logs))
        save()
        if mlflow_port:
            store = backend_store_uri or f"sqlite:///{root / 'mlflow.db'}"
            server = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", store]
            artifacts = artifacts_destination or str(root / "mlartifacts")  # e.g. s3://bucket/mlflow: served by it
            server += ["--artifacts-destination", artifacts, "--host", host]
            server += ["--port", str(mlflow_port), "--workers", "1"]
            procs.append(_start("mlflow", server, {**env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}, logs))
            state["backend_store_uri"], state["artifacts_destination"] = store, artifacts
            save()
        headers, _ = auth_headers()
        _wait_until("the Ray head", lambda: _http_ok(f"{dashboard}/api/version", headers), procs[:1], timeout_s)
        for k in range(1, workers + 1):
            # Its own temp dir: nodes sharing one would share runtime-env caches, and one node's cleanup
            # would delete a job's working_dir under another node's driver (seen here).
            cmd = [*ray, "start", "--address", state["ray_address"], "--num-cpus", f"{cpus_per_worker:g}", *common]
            cmd += ["--temp-dir", os.path.join(temp, f"w{k}")]
            procs.append(_start(f"worker-{k}", cmd, env, logs))
            save()
        joined = lambda: len(list_nodes(dashboard)) >= workers + 1  # noqa: E731
        _wait_until(f"{workers} worker node(s)", joined, procs, timeout_s)
        if mlflow_port:
            url = f"{state['tracking_uri']}/health"
            _wait_until("the MLflow server", lambda: _http_ok(url), procs, timeout_s)
    except BaseException:
        down(root)
        raise
    return state


def down(folder: str | Path = "runs/cluster") -> list[str]:
    """Stops the processes `up` started, and only those; keeps logs, runs and the MLflow store."""
    root = Path(folder).expanduser().resolve()
    state = read_state(root)
    if state is None:
        return []
    running = [proc for proc in reversed(state["processes"]) if _alive(proc)]
    _stop_sessions([proc["pid"] for proc in running])
    stopped = [proc["name"] for proc in running]
    shutil.rmtree(state.get("temp_dir") or "/nonexistent", ignore_errors=True)
    (root / STATE_FILE).unlink()
    return stopped


def status(folder: str | Path = "runs/cluster") -> tuple[bool, list[str]]:
    root = Path(folder).expanduser().resolve()
    state = read_state(root)
    if state is None:
        return False, [f"no local cluster in {root}"]
    lines, healthy = [], True
    for proc in state["processes"]:
        alive = _alive(proc)
        healthy &= alive
        lines.append(f"{proc['name']:<10} {'up' if alive else 'DOWN':<5} session {proc['pid']}  log {proc['log']}")
    try:
        nodes = list_nodes(state["dashboard"])
        lines.append(f"Ray: {len(nodes)} alive node(s), dashboard {state['dashboard']}")
    except ValueError as err:
        healthy = False
        lines.append(f"Ray: {err}")
    if state["tracking_uri"]:
        ok = _http_ok(f"{state['tracking_uri']}/health")
        healthy &= ok
        lines.append(f"MLflow: {state['tracking_uri']} {'healthy' if ok else 'NOT answering'}")
    return healthy, lines


def build_parser() -> argparse.ArgumentParser:
    """The command line of `cluster/local.sh` (tests parse the commands the docs show with it)."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("verb", choices=["up", "down", "status"])
    parser.add_argument("--dir", default="runs/cluster", help="state, logs, MLflow store and trial storage")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--cpus-per-worker", type=float, default=1)
    parser.add_argument("--host", default="127.0.0.1", help="address every process binds (default 127.0.0.1)")
    parser.add_argument("--ray-port", type=int, default=6380)
    parser.add_argument("--dashboard-port", type=int, default=8265)
    parser.add_argument("--mlflow-port", type=int, default=5000, help="0: no MLflow server")
    parser.add_argument("--backend-store-uri", default=None, help="MLflow store (default sqlite:///DIR/mlflow.db)")
    parser.add_argument(
        "--artifacts-destination",
        default=None,
        help="where the MLflow server keeps artifacts (default DIR/mlartifacts; s3://bucket/prefix with AWS_* set)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.verb == "up":
            state = up(
                args.dir, args.workers, args.cpus_per_worker, args.host, args.ray_port, args.dashboard_port,
                args.mlflow_port or None, args.backend_store_uri, artifacts_destination=args.artifacts_destination,
            )  # fmt: skip
            print(f"Ray head     {state['ray_address']}, dashboard {state['dashboard']}")
            print(f"workers      {args.workers} node(s) x {args.cpus_per_worker:g} CPU")
            if state["tracking_uri"]:
                where = f"store {state['backend_store_uri']}, artifacts {state['artifacts_destination']}"
                print(f"MLflow       {state['tracking_uri']} ({where})")
            print(f"storage      {state['storage_path']}")
            print("submit a search:")
            print(
                f"  pathsearch submit search_spaces/digits_tiny.yaml --address {state['dashboard']} "
                f"--tracking-uri {state['tracking_uri']} --storage-path {state['storage_path']} --wait"
            )
            print(f"stop it all: {PROG} down --dir {state['dir']}")
            return 0
        if args.verb == "down":
            stopped = down(args.dir)
            print(f"stopped: {', '.join(stopped) or 'nothing was running'}")
            return 0
        healthy, lines = status(args.dir)
        print("\n".join(lines))
        return 0 if healthy else 1
    except ValueError as err:
        print(f"{PROG} {args.verb}: error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:
        print(f"{PROG} {args.verb}: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
