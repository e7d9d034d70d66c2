"""A search kept in object storage against the same search kept in a local folder: wall time and bytes per trial.

Run: .venv/bin/python benchmarks/storage.py [--rounds 2] [--file search_spaces/digits_tiny.yaml] [--set key=value ...]
One process, one local Ray; the same search (the digits demo, as shipped, by default) runs with `--storage-path` a
local folder and `s3://...` on moto's S3 server on 127.0.0.1 (moto[server], the dev extra; tests/s3server.py),
alternating local / s3 / s3 / local ... so machine noise hits both. Prints each run's wall time, the median ratio
s3 / local (target <= 1.10), the CPU the S3 server itself took from the same cores, and what one trial costs the
store: the bytes it keeps (its last checkpoint) and about how many it wrote (every checkpoint, and Tune's
experiment snapshot, rewritten many times), with the PUT requests.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from s3server import S3Server  # noqa: E402  (tests/s3server.py: moto's server with credentials enforced)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--file", default=str(ROOT / "search_spaces" / "digits_tiny.yaml"))
    parser.add_argument("--rounds", type=int, default=2, help="pairs of runs (local and s3, order alternating)")
    parser.add_argument("--set", action="extend", nargs="+", default=[], help="overrides: --set a.b=1 c=x")
    args = parser.parse_args()
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    with tempfile.TemporaryDirectory() as tmp, S3Server(log=Path(tmp) / "moto.log") as s3:
        os.environ.update(s3.env)  # before Ray starts: its workers inherit the store's endpoint and credentials
        os.environ["PATHSEARCH_WORK_DIR"] = str(Path(tmp) / "work")
        import ray

        from pathsearch.config import load_search_file
        from pathsearch.ensemble.model import model_depth
        from pathsearch.search.driver import run_search

        spec = load_search_file(args.file, args.set, model_depth=model_depth)
        ray.init(include_dashboard=False, configure_logging=False, log_to_driver=False)
        walls: dict[str, list[float]] = {"local": [], "s3": []}
        server_cpu: dict[str, list[float]] = {"local": [], "s3": []}  # the S3 server runs on these same cores
        trials: dict[str, int] = {}
        for r in range(args.rounds):
            for kind in ("local", "s3") if r % 2 == 0 else ("s3", "local"):
                name = f"bench-{kind}-{r}"
                where = f"s3://{s3.bucket}/bench" if kind == "s3" else str(Path(tmp) / "runs")
                started, served = time.perf_counter(), cpu_seconds(s3.proc.pid)
                result = run_search(spec, where, f"sqlite:///{tmp}/mlflow.db", name=name, verbose=False)
                walls[kind].append(time.perf_counter() - started)
                server_cpu[kind].append(cpu_seconds(s3.proc.pid) - served)
                trained = sum(v for k, v in result.counts.items() if k in ("complete", "pruned", "failed"))
                if result.confirmation is not None:  # its trials: every configuration on every seed
                    trained += len(result.confirmation.candidates) * len(result.confirmation.seeds)
                trials[name] = trained
                print(
                    f"{name}: {walls[kind][-1]:.1f} s, {trials[name]} trials trained, the S3 server used "
                    f"{server_cpu[kind][-1]:.1f} CPU s",
                    flush=True,
                )
        ray.shutdown()
        ratio = statistics.median(s / loc for s, loc in zip(walls["s3"], walls["local"], strict=True))
        print(f"\n{args.file} (digits demo as shipped{' with ' + ' '.join(args.set) if args.set else ''})")
        print(f"wall time: local {fmt(walls['local'])}, s3 {fmt(walls['s3'])}")
        print(f"s3 / local: {ratio:.3f} (median of {args.rounds} paired ratios; target <= 1.10)")
        print(
            f"the S3 server itself used {statistics.median(server_cpu['s3']):.1f} CPU s per s3 run, on the same "
            f"{os.cpu_count()} cores as the trials (a cloud store's CPU is elsewhere)"
        )
        stored, written, puts = bytes_per_run(s3, Path(tmp) / "moto.log")
        for name in sorted(stored):
            n = max(1, trials.get(name, 1))
            print(
                f"{name}: {n} trials; stored {stored[name] / 1e6:.1f} MB ({stored[name] / n / 1e6:.2f} MB per trial), "
                f"written about {written[name] / 1e6:.1f} MB ({written[name] / n / 1e6:.2f} MB per trial) in "
                f"{puts[name]} PUT requests"
            )


def bytes_per_run(s3: S3Server, log: Path) -> tuple[dict[str, int], dict[str, int], dict[str, int]]:
    """Per run: bytes its objects hold now, an estimate of the bytes written, and its PUT requests, from moto's
    request log (which has no sizes): each PUT counted at the size of a kept object of the same file name in that
    run (a deleted checkpoint's files have the sizes of the kept checkpoint's; Tune's snapshot files grow, so
    counting them at their final size makes the estimate an upper bound)."""
    sizes: dict[str, int] = {}
    for page in s3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=s3.bucket, Prefix="bench/"):
        sizes.update({item["Key"]: item["Size"] for item in page.get("Contents", [])})
    put_counts: collections.Counter[str] = collections.Counter()
    pattern = re.compile(rf'"PUT /{s3.bucket}/(bench/[^ ?]+)')
    for line in log.read_text(errors="replace").splitlines():
        found = pattern.search(line)
        if found:
            put_counts[urllib_unquote(found.group(1))] += 1
    stored: dict[str, int] = collections.defaultdict(int)
    written: dict[str, int] = collections.defaultdict(int)
    puts: dict[str, int] = collections.defaultdict(int)
    size_of: dict[tuple[str, str], int] = {}  # (run, file name) -> largest kept object of that name
    for key, size in sizes.items():
        run = key.split("/")[1]
        if run:  # not the prefix's own folder marker
            stored[run] += size
            size_of[run, key.rsplit("/", 1)[-1]] = max(size, size_of.get((run, key.rsplit("/", 1)[-1]), 0))
    for key, count in put_counts.items():
        run = key.split("/")[1]
        if run:
            written[run] += count * size_of.get((run, key.rsplit("/", 1)[-1]), 0)
            puts[run] += count
    return stored, written, puts


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def urllib_unquote(text: str) -> str:
    from urllib.parse import unquote

    return unquote(text)


def fmt(values: list[float]) -> str:
    return ", ".join(f"{v:.1f} s" for v in values)


if __name__ == "__main__":
    main()
