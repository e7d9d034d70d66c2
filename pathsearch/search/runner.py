"""What every Tune stage runs on: the trainable Ray runs (a thin adapter around `fit`) and the device it claims,
Ray's start, the quiet console, the note of Ctrl-C, and the progress line. A search's life (its folder, store, MLflow
parent and stages) is searchrun.py's.

No tensors: torch and the model are imported only inside the trial function that Ray runs.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ray import tune

from pathsearch.search.results import trained_to_end

# The flat layout's trainable was pathsearch.runner.train_trial (pathsearch/__init__.py's MOVED maps that module
# here): Tune's snapshots of searches started before the layer packages name it so.
from pathsearch.trial.trainable import train_trial as train_trial

LIBRARY_LOG = "library_output.log"  # in the run directory: Ray's and Optuna's own output, unless --verbose
# Library warnings that mean the search cannot go on as asked: the quiet console says them in a line of its own
PROBLEMS = {
    "ray.tune.execution.insufficient_resources_manager": (
        "no trial can start: no Ray node has the resources a trial asks for (search.resources_per_trial); the "
        "search waits until one does (Ray's message is in {log})"
    ),
}


class ProblemLine(logging.Handler):
    """Prints one pathsearch line, once per kind, for a library warning listed in PROBLEMS."""

    def __init__(self, log: Path) -> None:
        super().__init__(logging.WARNING)
        self.log = log
        self.said: set[str] = set()

    def emit(self, record: logging.LogRecord) -> None:
        kind = next((name for name in PROBLEMS if record.name.startswith(name)), None)
        if kind is not None and kind not in self.said:
            self.said.add(kind)
            print(f"pathsearch: {PROBLEMS[kind].format(log=self.log)}", file=sys.stderr, flush=True)


@contextmanager
def quiet_console(run_dir: Path, library_output: bool = False) -> Iterator[None]:
    """Keeps Ray's and Optuna's own output (log records, Python warnings, Tune's tables and hints, tracebacks of
    trial attempts Tune retries, its advice on Ctrl-C) out of the console and in `run_dir/library_output.log`;
    pathsearch's progress line and summary still print. With `library_output` it changes nothing."""
    if library_output:
        yield
        return
    handler = logging.FileHandler(run_dir / LIBRARY_LOG)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    problems = ProblemLine(run_dir / LIBRARY_LOG)
    loggers = [logging.getLogger(name) for name in ("ray", "optuna", "mlflow", "alembic", "py.warnings")]
    saved = [(lg, list(lg.handlers), lg.propagate) for lg in loggers]
    # Tune's current console reporter prints its experiment table and hints with print() whatever the verbosity;
    # its older one prints nothing at verbose=0 (Tune's documented switch between the two)
    old_output = os.environ.get("RAY_AIR_NEW_OUTPUT")
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    for lg in loggers:
        lg.handlers, lg.propagate = [handler, problems], False
    logging.captureWarnings(True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")  # each distinct warning once, into the log
            yield
    finally:
        logging.captureWarnings(False)
        for lg, handlers, propagate in saved:
            lg.handlers, lg.propagate = handlers, propagate
        handler.close()
        if old_output is None:
            os.environ.pop("RAY_AIR_NEW_OUTPUT", None)
        else:
            os.environ["RAY_AIR_NEW_OUTPUT"] = old_output


OWN_API: dict[str, str] = {}  # the dashboard address init_ray set for the local Ray it started


def init_ray(address: str | None, dashboard: bool = False, num_cpus: int | None = None) -> bool:
    """Ray on this machine (on 127.0.0.1, `num_cpus` logical CPUs (default: its cores), worker output kept out of
    the console; the dashboard only with `dashboard`), or the cluster at `address`; nothing when Ray is already up.
    True when this call started it (or connected to it).

    The dashboard is for data-parallel trials: when Tune stops one (ASHA), Ray Train's placement-group cleaner asks
    the dashboard's state API whether the trial's controller still lives, and removes the group's placement group
    when it does not; without it the stopped group's resources stay taken until the search ends. The cleaner finds
    the API by RAY_API_SERVER_ADDRESS, set here to this Ray's dashboard before Ray starts its processes (else it
    looks for a Ray on this machine and gives up when it finds two: a second search, or tests side by side)."""
    import ray

    # Tune snapshots the experiment whenever a trial replaces its kept checkpoint; that is what we want.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    if address:
        check_answers(address)
    if ray.is_initialized():
        return False
    if address:  # an existing cluster (`auto` inside a Ray job): its nodes keep the addresses they registered
        ray.init(address=address)
    else:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # keeps a local Ray on 127.0.0.1
        options: dict[str, Any] = {"num_cpus": num_cpus}
        if dashboard:
            port = free_port()
            OWN_API["address"] = os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"  # to Ray's processes
            options.update(dashboard_host="127.0.0.1", dashboard_port=port)
        ray.init(include_dashboard=dashboard, log_to_driver=False, **options)  # logging: quiet_console decides
    return True


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def check_answers(address: str, timeout_s: float = 5.0) -> None:
    """ValueError (one line) when nothing answers at a Ray head's HOST:PORT: `ray.init` would retry there for minutes
    before it failed. `auto` and client (`ray://`) addresses are Ray's to resolve."""
    if address == "auto" or "://" in address:
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"--address {address}: expected the Ray head's HOST:PORT (default port 6379), or auto")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as err:
        raise ValueError(
            f"--address {address}: no Ray cluster answers there ({err.strerror or err}); give the head's HOST:PORT "
            "(`ray start --head` prints it; default port 6379)"
        ) from None


def shutdown_ray() -> None:
    """Disconnects from Ray (and stops a local one this process started); the dashboard address `init_ray` gave
    Ray's processes goes with it (it would override the address of a later job submission from this process)."""
    import ray

    ray.shutdown()
    if os.environ.get("RAY_API_SERVER_ADDRESS") == OWN_API.get("address"):
        os.environ.pop("RAY_API_SERVER_ADDRESS", None)


_STOPPED = threading.Event()


class StopSignal(tune.Callback):
    """Notes that Ctrl-C (SIGINT; `pathsearch stop` sends it to a cluster job's driver) reached the driver while a
    Tuner ran. Tune's own handler ends the run by returning, as a finished run does, and says so only in its log;
    whether trials were left unfinished cannot tell it either (a trial still pending when the signal came has no
    result to look at). Tune installs its handler before it sets up its callbacks, so this one goes in front of it
    there and passes the signal on."""

    def setup(self, stop: Any = None, num_samples: Any = None, total_num_samples: Any = None, **info: Any) -> None:
        _STOPPED.clear()
        if threading.current_thread() is not threading.main_thread():
            return  # signals reach the main thread only; Tune catches none elsewhere either
        theirs = signal.getsignal(signal.SIGINT)

        def note(signum: int, frame: Any) -> None:
            _STOPPED.set()
            if callable(theirs):
                theirs(signum, frame)
            elif theirs == signal.SIG_DFL:
                raise KeyboardInterrupt

        signal.signal(signal.SIGINT, note)


def stop_signalled() -> bool:
    """True when the last Tuner's run ended because of Ctrl-C (see StopSignal)."""
    return _STOPPED.is_set()


class ProgressLine(tune.Callback):
    """One line per finished trial (and per retried attempt): done / running / pending / pruned / failed / retried,
    best so far, elapsed, ETA."""

    def __init__(
        self, total: int, metric: str, mode: str, final_epoch: int, verbose: bool, label: str = "trials"
    ) -> None:
        self.total, self.metric, self.mode, self.final_epoch, self.verbose = total, metric, mode, final_epoch, verbose
        self.label = label
        self.started = time.monotonic()
        self.best: float | None = None
        self.pruned = self.failed = self.done = self.retried = 0

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        last = trial.last_result or {}
        if not trained_to_end(last, self.final_epoch):
            self.pruned += 1
        else:
            value = last.get(self.metric)
            if value is not None and (self.best is None or (value > self.best) == (self.mode == "max")):
                self.best = value
        self.done += 1
        self._print(trials)

    def on_trial_recover(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        """A failed attempt Tune retries from the trial's last checkpoint (its traceback is in the library log)."""
        self.retried += 1
        self._print(trials)

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self.failed += 1
        self.done += 1
        self._print(trials)

    def _print(self, trials: list[Any]) -> None:
        if not self.verbose:
            return
        # (Tune may hold one more trial than the search samples, and a trial it restores may be counted as it
        # finishes again: what is left to do bounds what can be running)
        running = min(sum(tr.status == "RUNNING" for tr in trials), max(0, self.total - self.done))
        pending = max(0, self.total - self.done - running)
        elapsed = time.monotonic() - self.started
        eta = elapsed / self.done * (self.total - self.done) if self.done else float("nan")
        best = "-" if self.best is None else f"{self.best:.4f}"
        retried = f"  retried {self.retried}" if self.retried else ""
        print(
            f"[{elapsed:6.0f}s] {self.label} done {self.done}/{self.total}  running {running}  pending {pending}  "
            f"pruned {self.pruned}  failed {self.failed}{retried}  best {self.metric} {best}  ETA {eta:.0f}s",
            flush=True,
        )


class RoundLine(ProgressLine):
    """A confirmation round's line per finished trial: the round's (configuration, seed) trials done of planned,
    the seeds they cover and how many challengers were decided before it."""

    def __init__(self, total: int, final_epoch: int, verbose: bool, label: str, seeds: str, decided: str) -> None:
        super().__init__(total, "val_acc", "max", final_epoch, verbose, label)
        self.seeds, self.decided = seeds, decided

    def _print(self, trials: list[Any]) -> None:
        if not self.verbose:
            return
        running = min(sum(tr.status == "RUNNING" for tr in trials), max(0, self.total - self.done))
        elapsed = time.monotonic() - self.started
        eta = elapsed / self.done * (self.total - self.done) if self.done else float("nan")
        failed = f", failed {self.failed}" if self.failed else ""
        retried = f", retried {self.retried}" if self.retried else ""
        print(
            f"[{elapsed:6.0f}s] {self.label}: {self.done}/{self.total} trials done ({self.seeds}), running "
            f"{running}{failed}{retried}; {self.decided}; ETA {eta:.0f}s",
            flush=True,
        )
