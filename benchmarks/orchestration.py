"""Share of trial slot time spent in the trial function (training, evaluation, checkpoints) on the demo search.

Run: .venv/bin/python benchmarks/orchestration.py [--file search_spaces/digits_tiny.yaml] [--set key=value ...]
Slot time = max_concurrent_trials x the search's wall time (ray.init excluded, printed apart). The rest is set-up,
scheduling and logging. Target >= 85% (measured here: a plain Ray Tune run with fresh actors spent 27% training).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--file", default=str(ROOT / "search_spaces" / "digits_tiny.yaml"))
    parser.add_argument("--set", action="append", default=[])
    args = parser.parse_args()
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    from pathsearch.config import load_search_file
    from pathsearch.ensemble.model import model_depth
    from pathsearch.search.driver import run_search

    spec = load_search_file(args.file, args.set, model_depth=model_depth)
    started = time.perf_counter()
    ray.init(include_dashboard=False, configure_logging=False, log_to_driver=False)
    ray_init = time.perf_counter() - started
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        result = run_search(spec, Path(tmp) / "runs", f"sqlite:///{tmp}/mlflow.db", name="bench", verbose=False)
        wall = time.perf_counter() - started
        in_trials = 0.0
        trials = 0
        for result_file in (Path(tmp) / "runs" / "bench").glob("*/result.json"):
            lines = result_file.read_text().strip().splitlines()
            if lines:
                in_trials += json.loads(lines[-1])["time_total_s"]
                trials += 1
    slots = spec.search.max_concurrent_trials or int(ray.cluster_resources().get("CPU", 1))
    ray.shutdown()
    print(f"{args.file}: {trials} trials ({', '.join(f'{k} {v}' for k, v in result.counts.items())}), {slots} slots")
    print(f"ray.init {ray_init:.1f} s (once per search, not in the share); search wall time {wall:.1f} s")
    print(f"time inside trial functions {in_trials:.1f} s of {slots * wall:.1f} slot-seconds")
    print(f"share of slot time in trials: {in_trials / (slots * wall):.1%}")


if __name__ == "__main__":
    main()
