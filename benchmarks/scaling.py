"""Trials per hour of the same search on the local cluster with 1 and then 2 worker nodes (1 CPU each).

Run (as root, in a network namespace so every node stays on 127.0.0.1):
    ip netns add bench && ip -n bench link set lo up
    ip netns exec bench .venv/bin/python benchmarks/scaling.py [--trials 8] [--set key=value ...]
    ip netns delete bench
Each round brings a cluster up with cluster/local.sh's code, submits the search through `pathsearch submit`'s
code (Jobs API, token auth) and times it by its MLflow parent run (driver start to end, trials included); the
sampler is `random` with a fixed seed, so both rounds train the same configurations. Target: 2 nodes >= 1.8x.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SEARCH = [
    "model.kwargs.depth=4", "train.epochs=30", "train.eval_every=5", "search.scheduler=none",
    "search.sampler=random", "search.max_concurrent_trials=2", "data.train_size=300",
]  # fmt: skip


def run_round(workers: int, trials: int, extra: list[str], folder: Path) -> dict[str, float]:
    from mlflow.tracking import MlflowClient

    from pathsearch.cluster.jobs import job_client, submit_search, wait_for_job
    from pathsearch.cluster.local import down, up

    state = up(folder, workers=workers)
    try:
        experiment = f"scaling_{workers}"
        overrides = [*SEARCH, f"search.num_samples={trials}", f"tracking.experiment={experiment}", *extra]
        job = submit_search(
            ROOT / "search_spaces/digits_tiny.yaml", state["dashboard"], state["tracking_uri"],
            state["storage_path"], overrides, name=experiment, check=False, say=lambda _: None,
        )  # fmt: skip
        status = wait_for_job(job_client(job.address), job.job_id, timeout_s=3600)
        if status != "SUCCEEDED":
            raise RuntimeError(f"the search on {workers} node(s) ended {status}")
        client = MlflowClient(state["tracking_uri"])
        exp = client.get_experiment_by_name(experiment)
        runs = client.search_runs([exp.experiment_id], max_results=1000)
        parent = next(r for r in runs if r.data.tags.get("pathsearch.kind") == "search")
        children = [r for r in runs if "mlflow.parentRunId" in r.data.tags and r.info.status == "FINISHED"]
        seconds = (parent.info.end_time - parent.info.start_time) / 1000
        per_trial = sum((r.info.end_time - r.info.start_time) / 1000 for r in children) / max(len(children), 1)
        return {"seconds": seconds, "finished": len(children), "per_trial_s": per_trial}
    finally:
        down(folder)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--set", action="append", default=[])
    args = parser.parse_args()
    results = {}
    for workers in (1, 2):
        with tempfile.TemporaryDirectory(prefix="psbench-") as tmp:
            started = time.perf_counter()
            results[workers] = run_round(workers, args.trials, args.set, Path(tmp))
            r = results[workers]
            rate = 3600 * r["finished"] / r["seconds"]
            print(
                f"{workers} worker node(s): {r['finished']:.0f} trials in {r['seconds']:.1f} s "
                f"({rate:.0f} trials/hour; {r['per_trial_s']:.1f} s per trial; round with cluster up/down "
                f"{time.perf_counter() - started:.0f} s)",
                flush=True,
            )
    rates = {w: results[w]["finished"] / results[w]["seconds"] for w in results}
    print(f"trials/hour, 2 nodes vs 1: {rates[2] / rates[1]:.2f}x (target >= 1.8x)")


if __name__ == "__main__":
    main()
