"""GPU benchmark: fit vs a bare timm loop, the wrapper's step cost, trials packed on one GPU, mask scoring on the
device. Every ratio is measured side by side in this one run; the table at the end gives each figure's target.

Run (one GPU; the script puts its checkout on sys.path; sized for under 8 minutes on an H100/H200, not yet timed):
    PYTHONPATH=. python3 benchmarks/gpu.py [--device cuda] [--sections a,b,c,d] [--json gpu.json] [--quick | --smoke]
Sections: (a) `fit` vs a bare timm loop (same model, data, batches, optimiser), eager and compiled, on the
Fashion-MNIST file's base trial and on ViT-S/16@224 with synthetic data; (b) PathEnsembleViT vs its own timm ViT,
forward+backward+AdamW, eager and compiled (ViT-S only unless --compile-all), time and peak memory; (c) 1..16
Fashion-MNIST trials as separate processes on one GPU, each capped to 1/N of its memory, then N = 4, 8, 16 under MPS;
(d) path features cached on the device and 200,000 random masks scored, checked against the model's own forward.
Fashion-MNIST: the Debian files in /usr/share/datasets/fashion-mnist/ (unpacked into a temporary data.root).
`--quick` runs tiny sizes on the CPU in about a minute (the test does); it compiles with Dynamo's eager backend only.
`--smoke` (implies --quick) runs the least of each section, in seconds: the synthetic workload of (a), ViT-Ti of (b),
N = 1 in (c), 2,000 masks on 200 images in (d). It checks that the script runs (tests/test_benchmarks.py runs
benchmarks/gpu_session.sh with it); its figures mean nothing.
Imports only torch, timm, numpy (and what pathsearch's tensor modules import): never ray, optuna, mlflow, matplotlib
or scikit-learn (a GPU image may have none of them; tests/test_benchmarks.py runs it where they cannot be imported).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from contextlib import ExitStack, nullcontext
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the GPU machine runs the checkout without installing it

import timm  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from common import interleaved_times, median  # noqa: E402
from timm.optim import create_optimizer_v2  # noqa: E402
from torch import Tensor  # noqa: E402
from torch.utils.data import TensorDataset  # noqa: E402

from pathsearch.config import FASHION_MNIST_DEBIAN, TrialConfig, load_trial_config  # noqa: E402
from pathsearch.config.paths import EnsembleScaleConfig, PathConfig  # noqa: E402
from pathsearch.ensemble.model import PathEnsembleViT, create_path_vit  # noqa: E402
from pathsearch.ensemble.scoring import cache_path_features, evaluate_masks  # noqa: E402
from pathsearch.trial.data import make_loader  # noqa: E402
from pathsearch.trial.train import build_model, fit, load_trial_data, resolve_device  # noqa: E402

FASHION = ROOT / "search_spaces" / "fashion_mnist_vit.yaml"
SECTIONS = "abcd"
B_MODELS = [("vit_tiny_patch16_224", 256), ("vit_small_patch16_224", 256), ("vit_base_patch16_224", 128)]
B_COMPILED = {"vit_small_patch16_224"}  # compiling all three costs about 5 minutes more (--compile-all)
C_TRIALS, C_MPS_TRIALS = [1, 2, 4, 8, 16], [4, 8, 16]


@dataclass
class Figure:
    section: str
    name: str
    value: float
    unit: str
    target: str | None = None  # ">= 0.97", "<= 1.05"

    @property
    def met(self) -> bool | None:
        if self.target is None:
            return None
        op, bound = self.target.split()
        return self.value >= float(bound) if op == ">=" else self.value <= float(bound)


FIGURES: list[Figure] = []


def record(section: str, name: str, value: float, unit: str, target: str | None = None) -> None:
    FIGURES.append(Figure(section, name, float(value), unit, target))


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def autocast(dev: torch.device, amp: bool = True) -> Any:
    """bf16 autocast on CUDA, as the product trains; float32 on the CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" and amp else nullcontext()


def fashion_overrides(args: argparse.Namespace, epochs: int) -> list[str]:
    """The Fashion-MNIST file's base trial (10,000 training images) with `epochs`, one thread, the run's temporary
    data.root."""
    overrides = [f"train.epochs={epochs}", "train.threads=1", f"data.root={args.data_root}"]
    if args.quick:
        overrides += ["data.train_size=512", "data.val_size=256"]
    return overrides


def vit_s_synthetic(args: argparse.Namespace, compiled: bool) -> TrialConfig:
    """ViT-S/16@224, 10 classes, 1 channel, on synthetic data (tiny in --quick)."""
    if args.quick:
        kwargs, img, train_size, batch = {"img_size": 8, "patch_size": 4, "depth": 2}, 8, 256, 64
    else:
        kwargs, img, train_size, batch = {"img_size": 224}, 224, 8192, 256
    raw = {
        "model": {"name": "vit_small_patch16_224", "kwargs": {**kwargs, "in_chans": 1, "num_classes": 10}},
        "data": {"name": "synthetic", "img_size": img, "train_size": train_size, "val_size": 256,
                 "batch_size": batch, "eval_batch_size": 256},
        "train": {"epochs": 3, "threads": 1, "warmup_epochs": 0},
    }  # fmt: skip
    return load_trial_config(None, ["train.compile=true"] if compiled else [], data=raw, source="vit_s_synthetic")


# ----- (a) fit vs a bare timm loop ----------------------------------------------------------------------------
def fit_epoch_seconds(cfg: TrialConfig, dev: torch.device) -> list[float]:
    """Training seconds of each epoch of `fit` (from its per-epoch `images_per_s`: eval excluded)."""
    images = len(load_trial_data(cfg).train)  # type: ignore[arg-type]
    rates: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        fit(cfg, lambda metrics, _ckpt: rates.append(metrics["images_per_s"]), work_dir=tmp, device=str(dev))
    return [images / r for r in rates]


def bare_epoch_seconds(cfg: TrialConfig, dev: torch.device, compiled: bool, backend: str) -> list[float]:
    """Seconds of each epoch of the loop a user would write: the same timm ViT (fit's init), timm's AdamW,
    cross-entropy, the same batches from `make_loader`, bf16 autocast and channels_last on CUDA as fit."""
    bundle = load_trial_data(cfg)
    vit = build_model(cfg, bundle, seed=cfg.train.seed).vit.to(dev)
    channels_last = dev.type == "cuda" and cfg.train.channels_last
    if channels_last:
        vit = vit.to(memory_format=torch.channels_last)
    t = cfg.train
    fused = {"fused": True} if dev.type == "cuda" else {}  # as fit's optimiser there
    opt = create_optimizer_v2(vit, t.opt, lr=t.lr, weight_decay=t.weight_decay, **fused)
    net = torch.compile(vit, backend=backend) if compiled else vit
    gen = torch.Generator().manual_seed(t.seed)
    loader = make_loader(bundle.train, cfg.data.batch_size, dev, shuffle=True, generator=gen)
    seconds = []
    for _ in range(t.epochs):
        sync(dev)
        start = time.perf_counter()
        for images, targets in loader:  # (B, C, H, W), (B,)
            images, targets = images.to(dev, non_blocking=True), targets.to(dev, non_blocking=True)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with autocast(dev, t.amp):
                loss = F.cross_entropy(net(images), targets)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sync(dev)
        seconds.append(time.perf_counter() - start)
    return seconds


def section_a(args: argparse.Namespace, dev: torch.device) -> None:
    workloads: dict[str, Callable[[bool], TrialConfig]] = {
        "fashion_mnist": lambda compiled: load_trial_config(
            FASHION, [*fashion_overrides(args, epochs=3), *(["train.compile=true"] if compiled else [])]
        ),
        "vit_s_224_synthetic" if not args.quick else "vit_s_tiny_synthetic": partial(vit_s_synthetic, args),
    }
    if args.smoke:
        del workloads["fashion_mnist"]
    for label, make_cfg in workloads.items():
        for compiled in (False, True):
            mode = "compiled" if compiled else "eager"
            if compiled and args.quick:
                print(f"(a) {label} compiled: skipped in --quick (inductor on the CPU takes minutes)")
                continue
            try:
                cfg = make_cfg(compiled)
            except ValueError as err:  # ConfigError: train.compile not in this checkout yet
                if compiled and "compile" in str(err):
                    print(f"(a) {label} compiled: skipped, fit cannot compile in this checkout: {err}")
                    continue
                raise
            images = len(load_trial_data(cfg).train)  # type: ignore[arg-type]
            rounds = 1 if compiled or args.quick else 2
            fit_s: list[list[float]] = []
            bare_s: list[list[float]] = []
            for r in range(rounds):  # A B, then B A: neither always runs first
                order = ["fit", "bare"] if r % 2 == 0 else ["bare", "fit"]
                for which in order:
                    if which == "fit":
                        fit_s.append(fit_epoch_seconds(cfg, dev))
                    else:
                        bare_s.append(bare_epoch_seconds(cfg, dev, compiled, args.compile_backend))
            # steady epochs: all but the first of each run (warm-up, compilation)
            fit_steady = median([s for run in fit_s for s in run[1:]])
            bare_steady = median([s for run in bare_s for s in run[1:]])
            name = f"{label} {mode}"
            print(
                f"(a) {name}: {images} images x {cfg.train.epochs} epochs, batch {cfg.data.batch_size}, {rounds} "
                f"round(s); epoch seconds fit {fmt_list(fit_s)}, bare {fmt_list(bare_s)}"
            )
            record("a", f"{name}: fit img/s", images / fit_steady, "img/s")
            record("a", f"{name}: bare timm loop img/s", images / bare_steady, "img/s")
            record("a", f"{name}: fit / bare", bare_steady / fit_steady, "ratio", ">= 0.97" if not compiled else None)
            if compiled:
                record("a", f"{name}: fit compile time", fit_s[0][0] - fit_steady, "s")
                record("a", f"{name}: bare compile time", bare_s[0][0] - bare_steady, "s")


def fmt_list(runs: list[list[float]]) -> str:
    return " / ".join(", ".join(f"{s:.2f}" for s in run) for run in runs)


# ----- (b) the wrapper's training step vs timm's ----------------------------------------------------------------
def train_step(net: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    opt.zero_grad(set_to_none=True)
    with autocast(x.device):
        loss = F.cross_entropy(net(x), y)
    loss.backward()
    opt.step()
    sync(x.device)


def peak_memory(fn: Callable[[], None], dev: torch.device) -> int:
    """Peak bytes allocated during one call (everything resident included: weights, both optimisers' state)."""
    sync(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    fn()
    return torch.cuda.max_memory_allocated(dev)


def section_b(args: argparse.Namespace, dev: torch.device) -> None:
    rounds = 1 if args.smoke else 3 if args.quick else 10
    cfg = PathConfig(ensemble_scale=EnsembleScaleConfig(kind="vector"))
    for name, batch in B_MODELS[:1] if args.smoke else B_MODELS:
        kwargs: dict[str, Any] = {"img_size": 32, "depth": 2} if args.quick else {"img_size": 224}
        batch = 8 if args.quick else batch
        img = kwargs["img_size"]
        torch.manual_seed(0)
        model = create_path_vit(name, path_config=cfg, num_classes=1000, **kwargs).to(dev).train()
        # separate AdamW states over the same (shared) weights, so both sides take a full optimiser step
        fused = {"fused": True} if dev.type == "cuda" else {}
        opt_path = create_optimizer_v2(model, "adamw", lr=1e-4, weight_decay=0.05, **fused)
        opt_timm = create_optimizer_v2(model.vit, "adamw", lr=1e-4, weight_decay=0.05, **fused)
        x = torch.randn(batch, 3, img, img, device=dev)  # (B, 3, H, W)
        y = torch.randint(0, 1000, (batch,), device=dev)  # (B,)
        short = name.split("_patch")[0]
        modes = ["eager"] + (["compiled"] if (args.compile_all or name in B_COMPILED) and not args.smoke else [])
        for mode in modes:
            path_net, timm_net = model, model.vit
            if mode == "compiled":
                mode += "" if args.compile_backend == "inductor" else f" ({args.compile_backend} backend)"
                path_net = torch.compile(model, backend=args.compile_backend)
                timm_net = torch.compile(model.vit, backend=args.compile_backend)
            fns = {
                "timm": partial(train_step, timm_net, opt_timm, x, y),
                "path": partial(train_step, path_net, opt_path, x, y),
            }
            start = time.perf_counter()
            times = interleaved_times(fns, rounds, warmup=2)
            t_timm, t_path = median(times["timm"]), median(times["path"])
            print(
                f"(b) {short} b{batch} {mode}: timm {1000 * t_timm:.1f} ms, path {1000 * t_path:.1f} ms per step "
                f"({rounds} interleaved rounds, {time.perf_counter() - start:.0f} s with warm-up)"
            )
            label = f"{short} b{batch} {mode}"
            target = "<= 1.05" if mode == "eager" else "<= 1.01"  # compiled
            record("b", f"{label}: path / timm step", t_path / t_timm, "ratio", target)
            record("b", f"{label}: timm img/s", batch / t_timm, "img/s")
            if dev.type == "cuda":
                mem_timm, mem_path = peak_memory(fns["timm"], dev), peak_memory(fns["path"], dev)
                record("b", f"{label}: peak memory path / timm", mem_path / mem_timm, "ratio")
                record("b", f"{label}: peak memory timm", mem_timm / 2**20, "MiB")
        del model, opt_path, opt_timm, path_net, timm_net, fns
        torch.compiler.reset()  # drop the compiled graphs (and their memory) before the next model
        free_memory(dev)


def free_memory(dev: torch.device) -> None:
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


# ----- (c) trials packed on one GPU -----------------------------------------------------------------------------
def worker(args: argparse.Namespace) -> None:
    """One trial in its own process, capped to 1/N of the GPU's memory as a fractional `{gpu: 1/N}` would be.
    Prints one JSON line: images trained, training seconds, peak memory reserved."""
    dev = resolve_device(args.device)  # with its index: the memory cap refuses a bare "cuda"
    if dev.type == "cuda":
        torch.cuda.set_per_process_memory_fraction(1 / args.worker, dev)
    cfg = load_trial_config(FASHION, fashion_overrides(args, epochs=1 if args.quick else 2))
    images = len(load_trial_data(cfg).train)  # type: ignore[arg-type]
    rates: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        fit(cfg, lambda metrics, _ckpt: rates.append(metrics["images_per_s"]), work_dir=tmp, device=args.device)
    reserved = torch.cuda.max_memory_reserved(dev) if dev.type == "cuda" else 0
    seconds = sum(images / r for r in rates)
    print(json.dumps({"images": images * len(rates), "train_seconds": seconds, "max_reserved": reserved}))


def run_packed(args: argparse.Namespace, n: int, env: dict[str, str], timeout: float) -> dict[str, Any]:
    """Starts `n` workers together; returns their JSON lines and the wall time from the common start to the last
    finish (start-up included)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(n), "--device", args.device]
    cmd += ["--data-root", args.data_root] + (["--quick"] if args.quick else []) + (["--smoke"] if args.smoke else [])
    with tempfile.TemporaryDirectory() as logs, ExitStack() as files:
        # output to files, not pipes: no worker can block on a full pipe while another is waited for
        outs = [files.enter_context(open(Path(logs) / f"{k}.out", "w+")) for k in range(n)]
        errs = [files.enter_context(open(Path(logs) / f"{k}.err", "w+")) for k in range(n)]
        start = time.perf_counter()
        procs = [subprocess.Popen(cmd, stdout=o, stderr=e, env=env) for o, e in zip(outs, errs, strict=True)]
        try:
            for p in procs:
                p.wait(timeout=max(1.0, timeout - (time.perf_counter() - start)))
        finally:
            wall = time.perf_counter() - start
            for p in procs:  # only after a timeout or an interrupt: stop the workers this call started
                if p.poll() is None:
                    p.kill()
                    p.wait()
        results = []
        for p, o, e in zip(procs, outs, errs, strict=True):
            o.seek(0)
            e.seek(0)
            if p.returncode != 0:
                raise RuntimeError(f"a worker exited {p.returncode}: {e.read().strip()[-2000:]}")
            results.append(json.loads([line for line in o.read().splitlines() if line.startswith("{")][-1]))
    return {"wall": wall, "workers": results}


def pack_figures(label: str, n: int, run: dict[str, Any], dev: torch.device) -> float:
    workers = run["workers"]
    total = sum(w["images"] for w in workers)
    aggregate = total / run["wall"]
    summed = sum(w["images"] / w["train_seconds"] for w in workers)
    print(f"(c) {label} N={n}: {total} images in {run['wall']:.1f} s wall (start-up included)")
    record("c", f"{label} N={n}: aggregate img/s (wall)", aggregate, "img/s")
    record("c", f"{label} N={n}: sum of per-trial img/s", summed, "img/s")
    if dev.type == "cuda":
        peaks = [w["max_reserved"] / 2**20 for w in workers]
        record("c", f"{label} N={n}: peak memory per trial", max(peaks), "MiB")
        record("c", f"{label} N={n}: peak memory total", sum(peaks), "MiB")
    return aggregate


def start_mps(folder: Path) -> dict[str, str] | None:
    """Starts an NVIDIA MPS control daemon with its pipe and log folders under `folder`; its env, or None (said why)."""
    exe = shutil.which("nvidia-cuda-mps-control")
    if exe is None:
        print("(c) MPS: skipped, nvidia-cuda-mps-control is not on PATH")
        return None
    env = {**os.environ, "CUDA_MPS_PIPE_DIRECTORY": str(folder / "pipe"), "CUDA_MPS_LOG_DIRECTORY": str(folder / "log")}
    (folder / "pipe").mkdir()
    (folder / "log").mkdir()
    started = subprocess.run([exe, "-d"], env=env, capture_output=True, text=True, timeout=30)
    if started.returncode != 0:
        print(f"(c) MPS: skipped, `nvidia-cuda-mps-control -d` exited {started.returncode}: {started.stderr.strip()}")
        return None
    return env


def mps_command(env: dict[str, str], command: str) -> str:
    exe = shutil.which("nvidia-cuda-mps-control") or "nvidia-cuda-mps-control"
    done = subprocess.run([exe], input=command + "\n", env=env, capture_output=True, text=True, timeout=30)
    return (done.stdout + done.stderr).strip()


def section_c(args: argparse.Namespace, dev: torch.device) -> None:
    load_trial_data(load_trial_config(FASHION, fashion_overrides(args, epochs=1)))  # unpack once, before workers
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    timeout = 120 if args.quick else 240
    trials = [1] if args.smoke else [1, 2] if dev.type != "cuda" else C_TRIALS
    best = max((pack_figures("plain", n, run_packed(args, n, env, timeout), dev), n) for n in trials)
    record("c", f"best aggregate img/s (plain, N={best[1]})", best[0], "img/s", ">= 30000")
    if dev.type != "cuda":
        print("(c) MPS: skipped on the CPU")
        return
    with tempfile.TemporaryDirectory(prefix="mps-") as folder:
        mps_env = start_mps(Path(folder))
        if mps_env is None:
            return
        try:
            mps_env.update(OMP_NUM_THREADS="1", PYTHONPATH=env["PYTHONPATH"])
            results = []
            for n in C_MPS_TRIALS:
                try:
                    run = run_packed(args, n, mps_env, timeout)
                except RuntimeError as err:
                    if n != C_MPS_TRIALS[0]:
                        raise
                    print(f"(c) MPS: skipped, the daemon started but its first clients failed: {err}")
                    return
                results.append((pack_figures("MPS", n, run, dev), n))
                if n == C_MPS_TRIALS[0]:  # the server starts with its first client: none listed, MPS was not used
                    print(f"(c) MPS server list after N={n}: {mps_command(mps_env, 'get_server_list') or 'empty'}")
            best = max(results)
            record("c", f"best aggregate img/s (MPS, N={best[1]})", best[0], "img/s", ">= 30000")
        finally:
            print(f"(c) MPS quit: {mps_command(mps_env, 'quit') or 'ok'}")


# ----- (d) mask scoring on the device ---------------------------------------------------------------------------
def section_d(args: argparse.Namespace, dev: torch.device) -> None:
    cfg = load_trial_config(FASHION)  # the file's own model: depth 6, dim 64, 13 paths, 28x28 x 1 channel
    torch.manual_seed(0)
    model = create_path_vit(cfg.model.name, path_config=cfg.model.path_config(), num_classes=10, **cfg.model.kwargs)
    model = model.to(dev).eval()
    with torch.no_grad():
        model.ensemble_scale.uniform_(0.5, 1.5)  # not all ones: the scores depend on EnsembleScale
    num_masks = 2_000 if args.smoke else 20_000 if args.quick else 200_000
    gen = torch.Generator().manual_seed(0)
    masks = torch.rand(num_masks, model.num_paths, generator=gen) < 0.5  # (K, P)
    masks[torch.arange(num_masks), torch.randint(0, model.num_paths, (num_masks,), generator=gen)] = True  # >= 1 kept
    masks = masks.to(dev)
    mismatches = 0
    spot = 5 if args.smoke else 20
    for images_n in [200] if args.smoke else [200, 1000] if args.quick else [1000, 10_000]:
        images = torch.randn(images_n, 1, 28, 28, generator=gen).to(dev)  # (N, 1, 28, 28)
        labels = torch.randint(0, 10, (images_n,), generator=gen).to(dev)  # (N,)
        loader = make_loader(TensorDataset(images, labels), 500, dev)
        sync(dev)
        start = time.perf_counter()
        features = cache_path_features(model, loader, device=dev)  # features (P, N, D)
        sync(dev)
        t_cache = time.perf_counter() - start
        evaluate_masks(model, features, masks=masks[:1000])  # warm-up
        sync(dev)
        start = time.perf_counter()
        acc = evaluate_masks(model, features, masks=masks)  # (K,)
        sync(dev)
        t_eval = time.perf_counter() - start
        wrong = spot_check(model, images, labels, masks, acc, gen, count=spot)
        mismatches += wrong
        print(
            f"(d) {images_n} images: features {tuple(features.features.shape)} on {features.features.device} "
            f"(cached in {t_cache:.2f} s), accuracies on {acc.device}; {num_masks} masks in {t_eval:.3f} s; "
            f"mismatches: {wrong}/{spot}"
        )
        target = ">= 1000000" if images_n == 1000 else None
        record("d", f"{images_n} images: masks/s", num_masks / t_eval, "masks/s", target)
        record("d", f"{images_n} images: feature caching img/s", images_n / t_cache, "img/s")
    if mismatches:
        raise RuntimeError(f"{mismatches} spot-checked masks scored differently from the model's own forward")


@torch.no_grad()
def spot_check(
    model: PathEnsembleViT, images: Tensor, labels: Tensor, masks: Tensor, acc: Tensor, gen: torch.Generator, count: int
) -> int:
    """Masks whose evaluate_masks accuracy differs from the model's own forward with that mask (float32)."""
    wrong = 0
    for k in torch.randperm(len(masks), generator=gen)[:count].tolist():
        model.set_path_mask(masks[k])
        own = (model(images).argmax(-1) == labels).double().mean().item()
        wrong += abs(own - acc[k].item()) > 1e-9
    model.set_path_mask([True] * model.num_paths)
    return wrong


# ----- main -----------------------------------------------------------------------------------------------------
def machine(dev: torch.device) -> str:
    if dev.type == "cuda":
        gpus = f"{torch.cuda.get_device_name(dev)} ({torch.cuda.device_count()} GPU(s) visible)"
    else:
        gpus = "no GPU used"
    return (
        f"{gpus}, {os.cpu_count()} CPUs, {platform.node()}; torch {torch.__version__}, timm {timm.__version__}, "
        f"python {platform.python_version()}"
    )


def print_table() -> None:
    print(f"\n{'':2}{'figure':<58} {'value':>12} {'unit':<8} {'target':<11} status")
    for f in FIGURES:
        value = f"{f.value:,.3f}" if f.unit == "ratio" else f"{f.value:,.1f}" if f.unit == "s" else f"{f.value:,.0f}"
        status = "-" if f.met is None else "met" if f.met else "MISSED"
        print(f"{f.section:<2}{f.name:<58} {value:>12} {f.unit:<8} {f.target or '-':<11} {status}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and few steps (CPU, about a minute)")
    parser.add_argument("--smoke", action="store_true", help="the least of each section: does it run (CPU, seconds)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated, of a,b,c,d")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    parser.add_argument("--compile-all", action="store_true", help="(b): compile all three ViTs, not only ViT-S")
    parser.add_argument("--compile-backend", help="torch.compile backend (default inductor; eager in --quick)")
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)  # (c): one trial sharing the GPU with N-1
    parser.add_argument("--data-root", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.quick = args.quick or args.smoke
    args.compile_backend = args.compile_backend or ("eager" if args.quick else "inductor")
    if args.worker:
        worker(args)
        return
    try:
        dev = resolve_device(args.device)
    except ValueError as err:  # no GPU visible (or not that one): one line, exit 2
        parser.error(str(err))
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        parser.error(f"unknown section(s) {unknown}: choose from {','.join(SECTIONS)}")
    print("command:", shlex.join(["python3", os.path.relpath(__file__, ROOT), *sys.argv[1:]]))
    print("machine:", machine(dev))
    if not FASHION_MNIST_DEBIAN.is_dir() and any(s in sections for s in "ac"):
        print(f"note: {FASHION_MNIST_DEBIAN}/ is missing: sections a and c will try to download Fashion-MNIST")
    runs = {"a": section_a, "b": section_b, "c": section_c, "d": section_d}
    failed: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="pathsearch-gpu-bench-") as data_root:
        args.data_root = data_root  # Fashion-MNIST is unpacked here, never into the checkout or ~/.cache
        for s in sections:
            start = time.perf_counter()
            print(f"\n== section {s}")
            try:
                runs[s](args, dev)
            except Exception as err:  # reported and counted: the script exits 1 at the end
                traceback.print_exc()
                failed[s] = f"{type(err).__name__}: {err}"
                print(f"section {s} failed: {failed[s]}")
            free_memory(dev)
            print(f"section {s}: {time.perf_counter() - start:.0f} s")
    print_table()
    if failed:
        print(f"\nfailed sections: {', '.join(failed)}")
    if args.json:
        met = [f.met for f in FIGURES]
        out = {"command": sys.argv, "machine": machine(dev), "failed": failed,
               "figures": [{**asdict(f), "met": m} for f, m in zip(FIGURES, met, strict=True)]}  # fmt: skip
        Path(args.json).write_text(json.dumps(out, indent=1))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
