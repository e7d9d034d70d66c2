"""MLflow requests and logging time per reported result: pathsearch's driver-side logger vs Ray's
MLflowLoggerCallback, on the same results of the same Tune run, against an `mlflow server` on 127.0.0.1.

Run: .venv/bin/python benchmarks/mlflow_logging.py [--trials 4] [--reports 10]
Target: >= 10x fewer requests per result than Ray's callback.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any, ClassVar

REQUESTS = {"count": 0}


def toy(config: dict[str, Any]) -> None:
    from ray import tune

    for epoch in range(1, config["reports"] + 1):
        tune.report({"val_acc": 0.5 + 0.01 * epoch, "val_loss": 1.0 / epoch, "train_loss": 1.0, "epoch": epoch,
                     "kept_paths": 13, "params": 302986, "images_per_s": 1000.0, "val_acc_full": 0.5})  # fmt: skip


def timed(cls: type) -> type:
    """A subclass whose on_trial_result hook counts MLflow HTTP requests and seconds spent."""

    class Timed(cls):  # type: ignore[misc, valid-type]
        stats: ClassVar[dict[str, float]] = {"requests": 0, "seconds": 0.0, "results": 0}

        def on_trial_result(self, *args: Any, **kwargs: Any) -> None:
            before, start = REQUESTS["count"], time.perf_counter()
            super().on_trial_result(*args, **kwargs)
            self.stats["seconds"] += time.perf_counter() - start
            self.stats["requests"] += REQUESTS["count"] - before
            self.stats["results"] += 1

    return Timed


def count_requests() -> None:
    """Counts every REST call the MLflow client makes (the calls still go to the server)."""
    import mlflow.utils.rest_utils as rest

    original = rest.http_request

    def counting(*args: Any, **kwargs: Any) -> Any:
        REQUESTS["count"] += 1
        return original(*args, **kwargs)

    rest.http_request = counting


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--reports", type=int, default=10)
    args = parser.parse_args()
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        server = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{tmp}/store.db",
             "--artifacts-destination", f"{tmp}/artifacts", "--host", "127.0.0.1", "--port", str(port),
             "--workers", "1"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        try:
            uri = f"http://127.0.0.1:{port}"
            for _ in range(120):
                try:
                    urllib.request.urlopen(f"{uri}/health", timeout=1)
                    break
                except OSError:
                    time.sleep(0.5)
            run(uri, Path(tmp), args.trials, args.reports)
        finally:
            server.terminate()
            server.wait(timeout=30)


def run(uri: str, tmp: Path, trials: int, reports: int) -> None:
    import ray
    from ray import tune
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    from pathsearch.tracking.logger import MlflowTrialLogger
    from pathsearch.tracking.runs import SearchRuns

    count_requests()
    runs = SearchRuns.start(uri, "pathsearch-bench", "bench", {})
    ours = timed(MlflowTrialLogger)(uri, runs.experiment_id, runs.parent_run_id, final_epoch=reports)
    theirs = timed(MLflowLoggerCallback)(tracking_uri=uri, experiment_name="ray-bench", save_artifact=False)
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    tune.Tuner(
        toy,
        param_space={"reports": reports, "trial": tune.grid_search(list(range(trials)))},
        run_config=tune.RunConfig(storage_path=str(tmp / "runs"), callbacks=[ours, theirs], verbose=0),
    ).fit()
    ray.shutdown()
    print(f"mlflow server on {uri}; {trials} trials x {reports} results, both loggers on the same results")
    for label, stats in (("pathsearch MlflowTrialLogger", ours.stats), ("Ray MLflowLoggerCallback", theirs.stats)):
        n = max(stats["results"], 1)
        print(f"{label:<30} {stats['requests'] / n:6.1f} requests/result  {1000 * stats['seconds'] / n:7.1f} ms/result")
    ratio = (theirs.stats["requests"] / max(theirs.stats["results"], 1)) / max(
        ours.stats["requests"] / max(ours.stats["results"], 1), 1e-9
    )
    print(f"request ratio (Ray / pathsearch): {ratio:.1f}x")


if __name__ == "__main__":
    main()
