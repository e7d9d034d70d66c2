"""Data-parallel scaling of one trial: `fit` on 1 worker against N workers (one process each, one global batch
split over them, DistributedDataParallel averaging the gradients), as a `workers: N` trial trains under Ray Train.

Run:
    .venv/bin/python benchmarks/workers.py [--workers 1 2] [--repeats 3] [--json] [--quick] [--set key=value ...]
    PYTHONPATH=. python3 benchmarks/workers.py --device cuda --workers 2 4 8     # one GPU per worker (NCCL)
CPU (the default): gloo on 127.0.0.1, each worker 1 thread (fit's `cpus=1`); the trial is a ViT of depth 6,
embed_dim 64 on 16x16 synthetic images in patches of 2 (65 tokens), global batch 128, 1,024 training images: a step
is about 0.4 s of compute on one core, against about a millisecond for gloo to all-reduce its 1.2 MB of gradients.
Beside each N-worker run, the same trial on 1 worker with N threads (`cpus=N`): data parallelism against intra-op
threads on the same cores. GPU: NCCL, rank r on cuda:r, bf16 autocast as the trial config says (train.amp), ViT-S
at 32x32 in patches of 4 on synthetic data, global batch 512; worker counts above the GPUs visible are skipped.
Each run is a fresh process group; its figure is fit's own `images_per_s` per epoch (the group's training
throughput: evaluation, checkpoints and start-up excluded), the first epoch a warm-up. The runs of a repeat are
paired (1 worker, N workers, N threads, in alternating order), and each speed-up is the mean of the per-repeat
ratios with a 95% t interval: the machine may be shared, so a ratio within one repeat is what can be trusted.
`--quick`: a tiny trial, one repeat, in seconds (tests/test_benchmarks.py runs it); its figures mean nothing.
Imports only torch, timm, numpy, scipy (and what pathsearch's tensor modules import): never ray, optuna or mlflow.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import socket
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the GPU machine runs the checkout without installing it

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from scipy import stats  # noqa: E402

from pathsearch.config import load_trial_config  # noqa: E402
from pathsearch.trial.train import fit  # noqa: E402

# Imported once, by the forkserver the workers fork from, not by each worker (seconds each). Not "__main__": Python
# 3.11's forkserver never receives the main module's path, so preloading it imports nothing
PRELOAD = ["torch", "torch.distributed", "timm", "scipy.stats", "pathsearch.trial.train"]
WARMUP_EPOCHS = 1  # skipped: the first steps allocate, and DDP builds its buckets
# The trial of each mode as config overrides; a global batch divides the training set (no partial last batch)
CPU_TRIAL = [
    "data.name=synthetic", "data.train_size=1024", "data.val_size=128", "data.batch_size=128",
    "model.kwargs.img_size=16", "model.kwargs.patch_size=2", "model.kwargs.depth=6", "model.kwargs.embed_dim=64",
    "model.kwargs.num_heads=4", "train.epochs=4", "train.eval_every=1",
]  # fmt: skip
GPU_TRIAL = [
    "data.name=synthetic", "data.train_size=32768", "data.val_size=1024", "data.batch_size=512",
    "model.name=vit_small_patch16_224", "model.kwargs.img_size=32", "model.kwargs.patch_size=4",
    "train.epochs=4", "train.eval_every=1",
]  # fmt: skip
QUICK_TRIAL = [
    "data.name=synthetic", "data.train_size=128", "data.val_size=32", "data.batch_size=32",
    "model.kwargs.img_size=8", "model.kwargs.patch_size=4", "model.kwargs.depth=2", "model.kwargs.embed_dim=32",
    "model.kwargs.num_heads=2", "train.epochs=3", "train.eval_every=1",
]  # fmt: skip


@dataclass(frozen=True)
class Run:
    """One configuration: `workers` processes of `threads` torch threads each, on the CPU or one GPU each."""

    workers: int
    threads: int
    device: str  # "cpu" or "cuda"

    @property
    def parallel(self) -> int:
        """What it runs on in parallel: its workers (GPUs, or cores at 1 thread each), else its threads."""
        return self.workers if self.workers > 1 or self.device == "cuda" else self.threads

    @property
    def label(self) -> str:
        if self.device == "cuda":
            return f"{self.workers} worker{'s' * (self.workers > 1)} ({self.workers} GPU{'s' * (self.workers > 1)})"
        return f"{self.workers} worker{'s' * (self.workers > 1)} x {self.threads} thread{'s' * (self.threads > 1)}"


# ----- one run: a process group of `workers` processes ----------------------------------------------------------
def train_worker(rank: int, run: Run, overrides: list[str], port: int, out: str) -> None:
    """One worker: joins the group (gloo or NCCL), fits the trial, times an all-reduce of a gradient-sized tensor;
    rank 0 writes fit's per-epoch images/s (the group's) to `out`/result.json."""
    cuda = run.device == "cuda"
    if run.workers > 1:
        if cuda:
            torch.cuda.set_device(rank)
        dist.init_process_group(
            "nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=run.workers
        )
    try:
        rates: list[float] = []
        cfg = load_trial_config(None, overrides)
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix=f"pathsearch-workers-r{rank}-") as work:
            result = fit(
                cfg,
                lambda m, _: rates.append(m["images_per_s"]),
                work_dir=work,
                cpus=run.threads,
                device=f"cuda:{rank}" if cuda else "cpu",
            )
        fit_seconds = time.perf_counter() - start  # training, evaluation, checkpoints, the final path analysis
        params = int(result.metrics["params"])
        allreduce = time_allreduce(params, torch.device(f"cuda:{rank}" if cuda else "cpu")) if run.workers > 1 else None
        if rank == 0:
            figures = {"images_per_s": rates, "fit_s": fit_seconds, "params": params, "allreduce_s": allreduce}
            Path(out, "result.json").write_text(json.dumps(figures))
    finally:
        if run.workers > 1:
            dist.destroy_process_group()


def time_allreduce(numel: int, dev: torch.device, rounds: int = 20) -> float:
    """Median seconds of one all-reduce of `numel` float32 (a step's gradients) over the group: what DDP adds to a
    step at most (it overlaps the all-reduce with the backward pass where it can)."""
    grads = torch.ones(numel, device=dev)  # (numel,)
    for _ in range(3):
        dist.all_reduce(grads)
    dist.barrier()
    seconds = []
    for _ in range(rounds):
        start = time.perf_counter()
        dist.all_reduce(grads)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_group(run: Run, overrides: list[str], timeout: float) -> dict[str, Any]:
    """Starts the run's worker processes (forked from a forkserver that imported torch and pathsearch once: a clean
    process each, with no threads or CUDA context of this one, started in well under a second), waits for them and
    returns rank 0's figures plus the run's wall time (start-up included). Workers still running after
    `timeout` seconds are killed and the run is a RuntimeError."""
    with tempfile.TemporaryDirectory(prefix="pathsearch-workers-") as out:
        start = time.perf_counter()
        args = (run, overrides, free_port(), out)
        context = mp.start_processes(train_worker, args=args, nprocs=run.workers, join=False, start_method="forkserver")
        try:
            while not context.join(timeout=max(0.1, timeout - (time.perf_counter() - start))):
                if time.perf_counter() - start > timeout:
                    raise RuntimeError(f"{run.label}: still running after {timeout:.0f} s")
        finally:
            for process in context.processes:  # only after a timeout or an error: the workers this run started
                if process.is_alive():
                    process.kill()
                    process.join()
        figures = json.loads(Path(out, "result.json").read_text())
    return {**figures, "wall_s": time.perf_counter() - start}


# ----- figures --------------------------------------------------------------------------------------------------
def mean_and_interval(values: list[float], confidence: float = 0.95) -> dict[str, Any]:
    """Mean of `values` with its two-sided t interval (None for fewer than two values), and the values."""
    mean = statistics.fmean(values)
    low = high = None
    if len(values) > 1:
        half = stats.t.ppf(0.5 + confidence / 2, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
        low, high = mean - half, mean + half
    return {"mean": mean, "low": low, "high": high, "values": values}


def pair_ratios(numerators: list[float], denominators: list[float]) -> dict[str, Any]:
    """The per-repeat ratios numerator / denominator (runs of the same repeat), their mean and 95% t interval."""
    return mean_and_interval([a / b for a, b in zip(numerators, denominators, strict=True)])


def scaled(interval: dict[str, Any], factor: float) -> dict[str, Any]:
    """An interval of x as an interval of x * factor (efficiency = speed-up / workers)."""

    def scale(v: float | None) -> float | None:
        return None if v is None else v * factor

    return {
        "mean": interval["mean"] * factor,
        "low": scale(interval["low"]),
        "high": scale(interval["high"]),
        "values": [v * factor for v in interval["values"]],
    }


def summarise(plan: list[Run], records: list[dict[str, Any]], batch: int) -> dict[str, Any]:
    """Per configuration: images/s over the measured epochs of every repeat; speed-ups paired by repeat against
    1 worker x 1 thread; each N-worker run against 1 worker x N threads; the all-reduce's share of a step."""
    by_run: dict[Run, list[dict[str, Any]]] = {run: [] for run in plan}
    for record in records:
        by_run[record["run"]].append(record)
    means = {run: [statistics.fmean(r["images_per_s"][WARMUP_EPOCHS:]) for r in rs] for run, rs in by_run.items()}
    base = plan[0]
    configs = []
    for run in plan:
        epochs = [v for r in by_run[run] for v in r["images_per_s"][WARMUP_EPOCHS:]]
        entry: dict[str, Any] = {
            "label": run.label,
            "workers": run.workers,
            "threads": run.threads,
            "images_per_s_mean": statistics.fmean(epochs),
            "images_per_s_std": statistics.stdev(epochs) if len(epochs) > 1 else None,
            "epochs_measured": len(epochs),
            "run_means": means[run],
        }
        if run != base:
            entry["speedup"] = pair_ratios(means[run], means[base])
            entry["efficiency"] = scaled(entry["speedup"], 1 / run.parallel)  # per core or GPU
        configs.append(entry)
    equal_cpu = []
    allreduce = []
    for run in plan:
        if run.workers == 1:
            continue
        threads = Run(1, run.workers, run.device)
        if run.device == "cpu" and threads in by_run:
            equal_cpu.append({"workers": run.workers, "ratio": pair_ratios(means[run], means[threads])})
        seconds = statistics.median(r["allreduce_s"] for r in by_run[run])
        step = batch / statistics.fmean(means[run])  # seconds per global step of the group
        params = by_run[run][0]["params"]
        allreduce.append(
            {
                "workers": run.workers,
                "floats": params,
                "mib": 4 * params / 2**20,
                "ms": 1e3 * seconds,
                "step_ms": 1e3 * step,
                "share": seconds / step,
            }
        )
    return {"configs": configs, "equal_cpu": equal_cpu, "allreduce": allreduce}


def interval_text(interval: dict[str, Any]) -> str:
    if interval["low"] is None:
        return f"{interval['mean']:.3f} (no interval: 1 repeat)"
    return f"{interval['mean']:.3f} [{interval['low']:.3f}, {interval['high']:.3f}]"


def print_table(summary: dict[str, Any], repeats: int) -> None:
    print(f"\n{'run':<24} {'img/s':>8} {'± sd':>7} {'epochs':>6}   {'speed-up vs row 1 [95% t CI]':<34} efficiency")
    for c in summary["configs"]:
        sd = "-" if c["images_per_s_std"] is None else f"{c['images_per_s_std']:.0f}"
        speedup = interval_text(c["speedup"]) if "speedup" in c else "1 (baseline)"
        efficiency = interval_text(c["efficiency"]) if "efficiency" in c else ""
        print(
            f"{c['label']:<24} {c['images_per_s_mean']:>8.0f} {sd:>7} {c['epochs_measured']:>6}   "
            f"{speedup:<34} {efficiency}"
        )
    for e in summary["equal_cpu"]:
        n = e["workers"]
        print(
            f"\nsame cores: {n} workers x 1 thread / 1 worker x {n} threads = {interval_text(e['ratio'])} "
            f"(per repeat: {', '.join(f'{v:.3f}' for v in e['ratio']['values'])})"
        )
    for a in summary["allreduce"]:
        print(
            f"all-reduce of {a['floats']:,} float32 ({a['mib']:.1f} MiB), {a['workers']} workers: {a['ms']:.2f} ms "
            f"(median) = {100 * a['share']:.2f}% of a {a['step_ms']:.0f} ms global step"
        )
    print(
        f"speed-ups and efficiencies: mean of {repeats} per-repeat paired ratios, 95% t interval; efficiency = "
        "speed-up / (workers or threads); img/s ± sd over the measured epochs of all repeats"
    )


# ----- main -----------------------------------------------------------------------------------------------------
def plan_runs(counts: list[int], device: str) -> list[Run]:
    """1 worker first (the baseline), then each N workers, and on the CPU 1 worker with N threads beside it."""
    plan = [Run(1, 1, device)] if device == "cpu" else [Run(1, os.cpu_count() or 1, device)]
    for n in counts:
        if device == "cpu":
            plan += [Run(n, 1, device), Run(1, n, device)]
        else:  # each worker its share of the cores, as Ray would give it
            plan.append(Run(n, max(1, (os.cpu_count() or 1) // n), device))
    return plan


def machine(device: str) -> dict[str, Any]:
    info: dict[str, Any] = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
    }
    if device == "cuda":
        info["device"] = f"{torch.cuda.get_device_name(0)} x {torch.cuda.device_count()} visible"
        info["backend"] = "nccl"
    else:
        info["device"] = f"cpu ({platform.processor() or platform.machine()})"
        info["backend"] = "gloo"
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts (1 always runs)")
    parser.add_argument("--repeats", type=int, help="paired repeats (default 3; 1 with --quick)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--json", action="store_true", help="print one JSON line of figures (progress on stderr)")
    parser.add_argument("--quick", action="store_true", help="a tiny trial, one repeat: does it run (seconds)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds a run may take before it is killed")
    parser.add_argument("--set", action="append", default=[], help="extra trial overrides key=value")
    args = parser.parse_args()
    out = sys.stderr if args.json else sys.stdout
    say = partial(print, file=out, flush=True)
    repeats = args.repeats or (1 if args.quick else 3)
    if repeats < 1 or min(args.workers) < 1:
        parser.error("--repeats and --workers must be >= 1")
    counts = sorted({n for n in args.workers if n > 1})
    skipped = []
    if args.device == "cuda":
        visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if visible == 0:
            parser.error(f"--device cuda: no CUDA GPU is visible (torch {torch.__version__})")
        skipped = [n for n in counts if n > visible]
        counts = [n for n in counts if n <= visible]
        for n in skipped:
            say(f"note: {n} workers skipped: only {visible} CUDA GPU(s) visible")
    trial = QUICK_TRIAL if args.quick else CPU_TRIAL if args.device == "cpu" else GPU_TRIAL
    overrides = [*trial, *args.set]
    cfg = load_trial_config(None, overrides)  # checked once here, before any process starts
    batch = cfg.data.batch_size
    bad = [n for n in counts if batch % n]
    if bad:
        parser.error(f"data.batch_size {batch} does not split evenly over {bad} workers")
    command = shlex.join(["python3", os.path.relpath(__file__, ROOT), *sys.argv[1:]])
    info = machine(args.device)
    load_before = os.getloadavg()
    say(f"command: {command}")
    say(
        f"machine: {info['device']}, {info['backend']}; {info['cpus']} CPUs ({info['cpus_usable']} usable), "
        f"{info['host']}; torch {info['torch']}, python {info['python']}; {time.strftime('%Y-%m-%d %H:%M %Z')}"
    )
    say(f"load average before (1, 5, 15 min): {', '.join(f'{v:.2f}' for v in load_before)}")
    amp = args.device == "cuda" and cfg.train.amp
    say(
        f"trial: {cfg.model.name} {cfg.model.kwargs}, {cfg.data.name} {cfg.data.train_size} training images, "
        f"global batch {batch}, {cfg.train.epochs} epochs ({WARMUP_EPOCHS} warm-up), "
        f"{'bf16 autocast' if amp else 'float32'}; overrides: {' '.join(overrides)}"
    )
    plan = plan_runs(counts, args.device)
    mp.set_forkserver_preload(PRELOAD)
    records: list[dict[str, Any]] = []
    started = time.perf_counter()
    for repeat in range(repeats):
        order = plan if repeat % 2 == 0 else plan[::-1]  # neither side always first
        for run in order:
            figures = launch_group(run, overrides, args.timeout)
            records.append({**figures, "run": run, "repeat": repeat})
            measured = figures["images_per_s"][WARMUP_EPOCHS:]
            say(
                f"repeat {repeat + 1}/{repeats}: {run.label:<22} {statistics.fmean(measured):8.0f} img/s "
                f"(epochs: {', '.join(f'{v:.0f}' for v in figures['images_per_s'])}; first is warm-up) "
                f"fit {figures['fit_s']:.1f} s, {figures['wall_s']:.1f} s wall"
            )
    wall = time.perf_counter() - started
    load_after = os.getloadavg()
    summary = summarise(plan, records, batch)
    if args.json:
        runs = [
            {**{k: v for k, v in r.items() if k != "run"}, **asdict(r["run"]), "label": r["run"].label} for r in records
        ]
        print(
            json.dumps(
                {
                    "command": command,
                    "machine": info,
                    "date": time.strftime("%Y-%m-%d %H:%M %Z"),
                    "load_before": load_before,
                    "load_after": load_after,
                    "wall_s": wall,
                    "repeats": repeats,
                    "warmup_epochs": WARMUP_EPOCHS,
                    "global_batch": batch,
                    "overrides": overrides,
                    "skipped_workers": skipped,
                    **summary,
                    "runs": runs,
                }
            )
        )
        return
    print_table(summary, repeats)
    print(
        f"load average after (1, 5, 15 min): {', '.join(f'{v:.2f}' for v in load_after)}; "
        f"{wall:.0f} s for {len(records)} runs"
    )


if __name__ == "__main__":
    main()
