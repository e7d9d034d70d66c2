"""`pathsearch ui`: MLflow's UI opened on the runs page (model-training view) of the latest search's experiment.
A local store is served by an `mlflow server` on 127.0.0.1 in a process session of its own, whose whole group is
stopped on SIGTERM, Ctrl-C or a hang-up; a tracking server (http/https) serves its own UI, so for one only the link
is printed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType
from typing import Any

STOP_TIMEOUT_S = 10.0  # how long the server's process group gets to exit after SIGTERM before SIGKILL
# SIGHUP too: in a session of its own the server no longer gets the hang-up of a closed terminal, so the UI passes it on
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGHUP") if hasattr(signal, name))


class UnknownExperiment(ValueError):
    """`--experiment` names no experiment of the store (the CLI exits 2)."""


def ui_command(tracking_uri: str | None, port: int) -> tuple[list[str], dict[str, Any]]:
    """`mlflow server` for one store on 127.0.0.1 with lean settings (one worker, no job execution)."""
    uri = tracking_uri or _default_tracking_uri()
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host", "127.0.0.1"]
    cmd += ["--port", str(port), "--workers", "1"]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    return cmd, env


def runs_url(base: str, experiment_id: str | None, view: str | None = None) -> str:
    """The UI's runs page of an experiment in the model-training view (MLflow 3 otherwise opens the GenAI one), in
    the saved `view` (sort order and columns) when there is one, or the experiments list when `experiment_id` is
    None. The UI routes after '#'."""
    base = base.rstrip("/")
    if experiment_id is None:
        return f"{base}/#/experiments"
    shared = f"&viewStateShareKey={view}" if view else ""
    return f"{base}/#/experiments/{experiment_id}/runs?workflowType=machine_learning{shared}"


def search_page(tracking_uri: str, base: str, experiment: str | None = None) -> tuple[str, str]:
    """(the page's URL on the UI at `base`, what it shows) for the UI to open: the runs page of `experiment`, else of
    the latest-started search's (running or ended) experiment, in the view that search saved; the experiments list
    when the store holds no search. Raises UnknownExperiment for an `experiment` the store does not have."""
    from pathsearch.tracking.runs import Store  # mlflow: only when a store is read

    store = Store(tracking_uri)
    store.check()  # a URI MLflow cannot open fails here, before any server starts
    if experiment is not None:
        experiment_id = store.find_experiment(experiment)
        if experiment_id is None:
            raise UnknownExperiment(f"no MLflow experiment named {experiment!r} in {tracking_uri}")
        run = store.latest_search([experiment_id])
        what = f"experiment {experiment!r}, " + (f"latest search {run.name}" if run is not None else "no search yet")
    else:
        run = store.latest_search()
        if run is None:
            return runs_url(base, None), "no search in this store yet: `pathsearch search` records one"
        experiment_id = run.experiment_id
        what = f"experiment {store.experiment_name(experiment_id)!r}, latest search {run.name}"
    view = store.view_key(experiment_id)
    if view is not None:
        what += "; runs best first by the search's metric (sort by Created for the nested view)"
    return runs_url(base, experiment_id, view), what


def serve(tracking_uri: str | None, port: int, experiment: str | None = None, verbose: bool = False) -> int:
    """Prints the UI's address on the latest search and, for a local store, serves it until the server exits or
    SIGTERM, SIGINT (Ctrl-C) or SIGHUP asks it to stop. Returns the server's exit code, or 0 after a requested
    stop (the server's whole process group is gone by then). MLflow's own output (start-up lines, uvicorn's log,
    its warnings) goes to a log file whose path is printed, or to the console with `verbose`."""
    if tracking_uri and tracking_uri.startswith(("http://", "https://")):
        return _point_at_server(tracking_uri, experiment)
    requested: list[int] = []

    def request_stop(signum: int, frame: FrameType | None) -> None:
        requested.append(signum)

    # from here on a signal only sets the flag: no KeyboardInterrupt half-way, no server left behind
    previous = {sig: signal.signal(sig, request_stop) for sig in STOP_SIGNALS}
    try:
        uri = tracking_uri or _default_tracking_uri()
        url, what = search_page(
            uri, f"http://127.0.0.1:{port}", experiment
        )  # before the server: an error starts nothing
        if requested:
            return 0
        cmd, env = ui_command(uri, port)
        log = None if verbose else Path(tempfile.mkstemp(prefix=f"pathsearch-ui-{port}-", suffix=".log")[1])
        with open(log or os.devnull, "w") as sink:
            output: dict[str, Any] = {} if log is None else {"stdout": sink, "stderr": subprocess.STDOUT}
            server = subprocess.Popen(cmd, env=env, start_new_session=True, **output)  # own session: its own group
        print(f"MLflow UI at {url}", flush=True)
        print(f"  {what}; serving {uri} (Ctrl-C stops it)", flush=True)
        if log is not None:
            print(f"  MLflow's own output: {log} (-v shows it here)", flush=True)
        try:
            while not requested and server.poll() is None:
                time.sleep(0.25)  # a signal sets `requested`; the sleep ends then or at the latest in 0.25 s
        finally:
            stop_group(server)
        code = server.returncode
        if code and not requested and log is not None:  # the server failed by itself: say why, from its log
            for line in log.read_text(errors="replace").strip().splitlines()[-5:]:
                print(f"  mlflow: {line}", file=sys.stderr)
        return 0 if requested else (code if code >= 0 else 128 - code)  # killed by signal N: 128 + N, as a shell
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def stop_group(server: subprocess.Popen[Any]) -> None:
    """SIGTERM to the server's whole process group (the `mlflow server` CLI and its uvicorn/gunicorn workers),
    waits up to STOP_TIMEOUT_S for every member to exit, then SIGKILL to what is left."""
    pgid = server.pid  # start_new_session: the server leads its own group
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while time.monotonic() < deadline:
            if server.poll() is not None and not group_members(pgid):
                return
            time.sleep(0.1)
    server.wait()


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of group `pgid`, read from /proc (Linux); elsewhere [pgid] while the group
    exists. Orphaned zombies count as gone: a container's PID 1 may never reap them."""
    proc = Path("/proc")
    if not (proc / "self" / "stat").is_file():
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return []
        except PermissionError:
            pass
        return [pgid]
    members = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # exited meanwhile
            continue
        state, _ppid, group = stat[stat.rindex(")") + 2 :].split()[:3]
        if state != "Z" and int(group) == pgid:
            members.append(int(entry.name))
    return members


def _default_tracking_uri() -> str:
    from pathsearch.tracking.runs import default_tracking_uri

    return default_tracking_uri()


def _point_at_server(tracking_uri: str, experiment: str | None) -> int:
    """A tracking server serves the UI itself (and `mlflow server` cannot use it as a store): print its link."""
    from pathsearch.tracking.outage import fail_fast

    try:
        with fail_fast():  # a server that is down answers in seconds, not after MLflow's 4 minutes of retries
            url, what = search_page(tracking_uri, tracking_uri, experiment)
    except UnknownExperiment:
        raise
    except Exception as err:  # unreachable, or not an MLflow server: the link to its UI is still the right one
        print(f"MLflow UI at {tracking_uri.rstrip('/')} (the tracking server serves it)")
        print(f"  it did not answer ({type(err).__name__}), so no search was looked up")
        return 0
    print(f"MLflow UI at {url} (the tracking server serves it)")
    print(f"  {what}")
    return 0
