"""`pathsearch ui` opens on the latest search's runs page, and stops its MLflow server on SIGTERM and Ctrl-C.

Real parts only: a real MLflow SQLite store written by the product's own `SearchRuns.start` plus trial runs tagged as
the trial logger tags them, the real `pathsearch ui` process with its real `mlflow server`, and a real headless
Chromium (Debian package `chromium`) rendering MLflow's JavaScript UI. Processes are found in /proc (Linux).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pathsearch.tracking.runs import SEARCH_TAG, TRIAL_TAG, SearchRuns

PARENT = "digits_tiny-ui-search"
TRIALS = ("trial 7f3a1_00000", "trial 7f3a1_00001")
URL_LINE = re.compile(r"^MLflow UI at (http://127\.0\.0\.1:\d+/\S*)", re.M)

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="finds processes in /proc (Linux)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_store(folder: Path) -> tuple[str, str, str, list[str]]:
    """A store with an older search in another experiment, then the latest search with two trial runs nested under
    it exactly as MlflowTrialLogger nests them. Returns (uri, experiment id, parent run id, trial run ids)."""
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    SearchRuns.start(uri, "older_experiment", "an-older-search", {})
    time.sleep(0.01)  # start times in ms: the searches must not tie
    runs = SearchRuns.start(uri, "digits_tiny", PARENT, {"num_samples": 2})
    experiment_id, parent = runs.experiment_id, runs.parent_run_id
    client = MlflowClient(uri)
    trial_ids = []
    for k, name in enumerate(TRIALS):
        tags = {"mlflow.parentRunId": parent, SEARCH_TAG: parent, TRIAL_TAG: name.split()[1]}
        run = client.create_run(experiment_id, run_name=name, tags=tags)
        client.log_metric(run.info.run_id, "val_acc", 0.5 + 0.1 * k, step=1)
        client.log_metric(run.info.run_id, "kept_paths", 7 - k, step=1)
        client.set_terminated(run.info.run_id)
        trial_ids.append(run.info.run_id)
    client.set_terminated(parent)
    return uri, experiment_id, parent, trial_ids


class UI:
    """`pathsearch ui` as a user starts it, its output in files (a full pipe would block the server)."""

    def __init__(self, folder: Path, uri: str, *extra: str) -> None:
        self.port = free_port()
        self.out, self.err = folder / f"ui-{self.port}.out", folder / f"ui-{self.port}.err"
        cmd = [sys.executable, "-m", "pathsearch.cli", "ui", "--tracking-uri", uri, "--port", str(self.port), *extra]
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=err, cwd=folder, start_new_session=True)
        self.server: list[int] = []  # the server's processes and sessions, once it answers
        self.server_sessions: list[int] = []

    def url(self, timeout_s: float = 60) -> str:
        """The printed URL, once the server it names answers /health."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.output()
            found = URL_LINE.search(self.out.read_text())
            if found:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as answer:
                        if answer.status == 200:
                            self.server = descendants_of(self.proc.pid)
                            self.server_sessions = sorted({live_processes()[p][1] for p in self.server})
                            return found.group(1)
                except OSError:
                    pass
            time.sleep(0.2)
        raise AssertionError(f"no URL or no healthy server after {timeout_s} s\n{self.output()}")

    def output(self) -> str:
        return f"stdout:\n{self.out.read_text()}\nstderr:\n{self.err.read_text()[-3000:]}"

    def stop(self) -> None:  # whatever a test did: nothing outlives it
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        for pid in sessions(self.server_sessions):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def live_processes() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, session id) of every process that is not a zombie."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            state, ppid, _group, session = stat[stat.rindex(")") + 2 :].split()[:4]
            if state != "Z":
                found[int(entry.name)] = (int(ppid), int(session))
    return found


def descendants_of(pid: int) -> list[int]:
    procs = live_processes()
    found, frontier = [], [pid]
    while frontier:
        children = [p for p, (ppid, _) in procs.items() if ppid in frontier]
        found += children
        frontier = children
    return found


def sessions(sids: list[int]) -> list[int]:
    return [p for p, (_, sid) in live_processes().items() if sid in sids]


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a client's TIME_WAIT is not a server
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def render(url: str, profile: Path) -> str:
    """The DOM Chromium renders for `url` after MLflow's JavaScript has run (a fresh profile: no saved UI state)."""
    cmd = [
        "chromium", "--headless=new", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}",
        "--window-size=1600,1000", "--virtual-time-budget=15000", "--dump-dom", url,
    ]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=True).stdout


def column_index(dom: str, column: str) -> int:
    """Where a runs-table column is shown: its header cell's aria-colindex (the DOM order is not the shown one)."""
    cell = re.search(r'<div[^>]*col-id="' + re.escape(column) + r'"[^>]*>', dom)
    assert cell, f"no header cell for {column}"
    index = re.search(r'aria-colindex="(\d+)"', cell.group(0))
    assert index, cell.group(0)
    return int(index.group(1))


def test_ui_opens_on_the_latest_search_runs_in_a_real_browser_and_stops_on_sigterm(tmp_path):
    """One server for both checks (each start costs 10-20 s): the page first, then SIGTERM."""
    uri, experiment_id, parent, trials = make_store(tmp_path)
    ui = UI(tmp_path, uri)
    try:
        url = ui.url()
        base = f"http://127.0.0.1:{ui.port}"
        nested = f"{base}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
        assert url == f"{nested}&viewStateShareKey=pathsearch", ui.output()  # the view the search saved
        assert f"experiment 'digits_tiny', latest search {PARENT}" in ui.out.read_text()
        # meanwhile, against this server: a tracking server serves its own UI, so the same deep link, nothing started
        point = [sys.executable, "-m", "pathsearch.cli", "ui", "--tracking-uri", base]
        pointing = {
            experiment: subprocess.Popen([*point, *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for extra, experiment in (((), "digits_tiny"), (("--experiment", "older_experiment"), "older_experiment"))
        }
        # ... and an unknown --experiment on the store itself: exit 2, no server started on its port
        unknown_port = free_port()
        on_store = [sys.executable, "-m", "pathsearch.cli", "ui", "--tracking-uri", uri, "--port", str(unknown_port)]
        unknown = subprocess.Popen(
            [*on_store, "--experiment", "nope"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )

        if shutil.which("chromium") is not None:
            # the page as `pathsearch ui` opens it: every trial a row, best val_acc first, with the columns a person
            # compares trials by (ag-grid names a column by its key: metrics.`val_acc`; MLflow shows a metric's column
            # only where some run has it: no test_acc here, where no run read test)
            shown = render(url, tmp_path / "chrome-view")
            assert "share key" not in shown, "MLflow could not read the saved view"
            for column in ("metrics.`val_acc`", "metrics.`kept_paths`", "attributes.`Dataset`"):
                assert f'col-id="{column}"' in shown, column
            # the metrics first (MLflow puts its attribute columns before them); ag-grid numbers the shown order
            assert column_index(shown, "metrics.`val_acc`") < column_index(shown, "attributes.`Dataset`")
            rows = [shown.index(f'href="#/experiments/{experiment_id}/runs/{run_id}"') for run_id in trials]
            assert rows[1] < rows[0], "the better trial (val_acc 0.6) comes first"
            dom = render(nested, tmp_path / "chrome")
            # the model-training view (its sidebar: Runs, Models, Traces, Model registry), not the GenAI one (Overview,
            # Observability, ...), which MLflow 3 shows without ?workflowType=machine_learning
            text = re.sub(r"<[^>]+>", " ", dom)
            assert "Model registry" in text and "Observability" not in text
            at = dom.index(f'href="#/experiments/{experiment_id}/runs/{parent}"')  # the parent run's row links to it
            assert f">{PARENT}</span>" in dom[at : at + 300]
            # MLflow nests child runs under a collapsed parent row with an expander button ("+") in its name cell
            name_cell = dom[dom.rindex('col-id="attributes.`Run Name`"', 0, at) : at]
            assert "runnamecellrenderer" in name_cell and "<button" in name_cell, "no expander: no child runs found"
            assert "an-older-search" not in dom  # the other experiment's search
            # Sorted by anything but start time, MLflow lists child runs flat: the same page shows both trials then
            flat = render(f"{nested}&orderByKey=attributes.run_name&orderByAsc=true", tmp_path / "chrome")
            for name, run_id in zip(TRIALS, trials, strict=True):
                assert f'href="#/experiments/{experiment_id}/runs/{run_id}"' in flat and f">{name}</span>" in flat

        for experiment, proc in pointing.items():
            out, err = proc.communicate(timeout=60)
            assert proc.returncode == 0, err
            found_id = MlflowClient(uri).get_experiment_by_name(experiment).experiment_id
            link = f"{base}/#/experiments/{found_id}/runs?workflowType=machine_learning&viewStateShareKey=pathsearch"
            assert f"MLflow UI at {link} (the tracking server serves it)" in out
        out, err = unknown.communicate(timeout=60)
        assert unknown.returncode == 2 and "pathsearch ui: error: no MLflow experiment named 'nope'" in err, err
        assert out == "" and port_is_free(unknown_port)

        assert_stops_cleanly(ui, signal.SIGTERM)
    finally:
        ui.stop()
    if shutil.which("chromium") is None:  # after the checks that need no browser (SIGTERM too), which did run
        pytest.skip("the page was not rendered: needs a headless browser (apt-get install chromium)")


def assert_stops_cleanly(ui: UI, sig: int) -> None:
    """`sig` to `pathsearch ui` alone (as a terminal's Ctrl-C or a process manager's SIGTERM reaches it): it exits 0
    without a traceback, leaving no `mlflow server` or uvicorn worker behind and the port free."""
    server, server_sessions = ui.server, ui.server_sessions
    assert len(server) >= 2, "expected `mlflow server` and its uvicorn worker"
    assert server_sessions == [server[0]] and server[0] != ui.proc.pid  # a session of their own, the server's
    started = time.monotonic()
    os.kill(ui.proc.pid, sig)
    assert ui.proc.wait(timeout=30) == 0, ui.output()
    took = time.monotonic() - started
    assert not sessions(server_sessions), f"left running: {sessions(server_sessions)}"
    assert not set(server) & set(live_processes())
    assert port_is_free(ui.port)
    assert ui.err.read_text() == "", ui.output()  # quiet: MLflow's and uvicorn's lines go to the log it names
    lines = ui.out.read_text().splitlines()
    assert lines[0].startswith("MLflow UI at ") and all(line.startswith("  ") for line in lines[1:]), lines
    log = Path(re.search(r"MLflow's own output: (\S+) \(-v shows it here\)", ui.out.read_text()).group(1))
    assert "Finished server process" in log.read_text()  # uvicorn shut down on SIGTERM, not SIGKILLed
    assert took < 25, f"stopping took {took:.1f} s"  # 3-6 s measured on 2 busy cores


def test_ctrl_c_stops_the_ui_and_its_whole_server(tmp_path):
    """SIGINT as Ctrl-C sends it. An empty store: the UI opens on the experiments list, saying there is no search."""
    ui = UI(tmp_path, f"sqlite:///{tmp_path / 'empty.db'}")
    try:
        assert ui.url() == f"http://127.0.0.1:{ui.port}/#/experiments"
        assert "no search in this store yet" in ui.out.read_text()
        assert_stops_cleanly(ui, signal.SIGINT)
    finally:
        ui.stop()
