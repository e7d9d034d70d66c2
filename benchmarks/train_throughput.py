"""Training throughput of `fit` against a bare training loop over the same timm ViT, data, batch and threads.

Run: .venv/bin/python benchmarks/train_throughput.py [--rounds 5] [--epochs 3] [--threads 2] [--device cpu]
     [--file search_spaces/fashion_mnist_vit.yaml] [--set key=value ...]
Rounds alternate fit / bare loop. Prints images/s of each and the ratio (target >= 0.95): fit's own
`images_per_s` (training steps only), and end to end (fit's wall time, with evaluation, checkpoint and analysis).
Also the data-loading share of fit's training time (target < 10%): one epoch of fit's own shuffled batches drawn
from the same DataLoader settings with no model at all, divided by fit's training time per epoch.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from tempfile import TemporaryDirectory

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from pathsearch.config import load_trial_config
from pathsearch.trial.train import build_model, build_seed_run, fit, load_trial_data

ROOT = Path(__file__).resolve().parents[1]


def bare_loop(cfg, bundle, device: torch.device, amp: bool) -> float:
    """The plain loop a user would write: timm ViT, AdamW, cross-entropy, shuffled DataLoader. Returns img/s."""
    vit = build_model(cfg, bundle, seed=0).vit.to(device)
    opt = torch.optim.AdamW(vit.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    loader = DataLoader(bundle.train, batch_size=cfg.data.batch_size, shuffle=True)
    seen, start = 0, time.perf_counter()
    for _ in range(cfg.train.epochs):
        for images, targets in loader:
            images, targets = images.to(device), targets.to(device)
            with torch.autocast("cuda", dtype=torch.bfloat16) if amp else torch.autocast("cpu", enabled=False):
                loss = F.cross_entropy(vit(images), targets)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            seen += len(images)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return seen / (time.perf_counter() - start)


def loading_seconds(cfg, bundle) -> float:
    """Seconds to draw one epoch of training batches from fit's own loader (build_seed_run's: shuffled, same batch
    size, workers and generator), with nothing computed on them: the data-loading part of a training epoch."""
    loader = build_seed_run(cfg, bundle, seed=0, dev=torch.device("cpu")).train_loader
    start = time.perf_counter()
    for _batch in loader:
        pass
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--file", default=str(ROOT / "search_spaces" / "digits_tiny.yaml"))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--set", action="append", default=[], help="extra key=value overrides")
    args = parser.parse_args()
    overrides = [f"train.epochs={args.epochs}", f"train.eval_every={args.epochs}", f"train.threads={args.threads}"]
    cfg = load_trial_config(args.file, [*overrides, *args.set])
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    amp = device.type == "cuda" and cfg.train.amp
    bundle = load_trial_data(cfg)
    fit_ips, fit_e2e, bare_ips, loading = [], [], [], []
    for r in range(args.rounds + 1):  # round 0 warms up both
        with TemporaryDirectory() as tmp:
            start = time.perf_counter()
            result = fit(cfg, lambda m, c: None, work_dir=tmp, device=args.device)
            wall = time.perf_counter() - start
        bare = bare_loop(cfg, bundle, device, amp)
        load = loading_seconds(cfg, bundle)
        if r > 0:
            loading.append(load)
            fit_ips.append(result.metrics["images_per_s"])
            fit_e2e.append(cfg.train.epochs * len(bundle.train) / wall)  # type: ignore[arg-type]
            bare_ips.append(bare)
    f, e, b = statistics.median(fit_ips), statistics.median(fit_e2e), statistics.median(bare_ips)
    print(f"{args.file}: {cfg.train.epochs} epochs x {len(bundle.train)} images, batch {cfg.data.batch_size}, ")  # type: ignore[arg-type]
    print(
        f"{args.threads} threads, device {args.device}{' (AMP bf16)' if amp else ''}, {args.rounds} interleaved rounds"
    )
    print(f"bare loop        {b:8.0f} img/s")
    print(f"fit (training)   {f:8.0f} img/s   ratio {f / b:.3f}")
    print(f"fit (end to end) {e:8.0f} img/s   ratio {e / b:.3f}   (includes evaluation, checkpoint, path analysis)")
    epoch_seconds = len(bundle.train) / f  # type: ignore[arg-type]
    share = statistics.median(loading) / epoch_seconds
    print(
        f"data loading     {statistics.median(loading):8.5f} s/epoch  share {100 * share:.2f}% of fit's training time "
        f"({epoch_seconds:.2f} s/epoch)"
    )


if __name__ == "__main__":
    main()
