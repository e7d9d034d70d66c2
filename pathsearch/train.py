"""One trial: train a PathEnsembleViT with one path configuration and report each epoch.

`fit(cfg, report)` knows nothing of Ray: `report(metrics, checkpoint_dir)` is its only way out, so the search
wraps it in a thin adapter. Checkpoints are safetensors (tensors) + JSON (the rest), never pickle.
Imports torch, timm and numpy; never ray, optuna or mlflow.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from torch import nn
from torch.utils.data import DataLoader

from pathsearch.analysis import analyze_paths
from pathsearch.config import TrialConfig, load_trial_config
from pathsearch.data import DataBundle, load_data
from pathsearch.model import PathEnsembleViT, create_path_vit
from pathsearch.supernet import sample_supernet_masks, supernet_loss
from pathsearch.typed import to_dict

Report = Callable[[dict[str, Any], str | None], None]
CHECKPOINT_VERSION = 1


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite: the trial failed (a search counts it as a failed trial)."""


@dataclass
class FitResult:
    metrics: dict[str, Any]
    checkpoint_dir: Path
    files: dict[str, Path] = field(default_factory=dict)


@dataclass
class SeedRun:
    """One seed's model, optimiser, schedule and data order: seed s starts every configuration alike."""

    seed: int
    model: PathEnsembleViT
    optimizer: torch.optim.Optimizer
    scheduler: CosineLRScheduler
    loader_generator: torch.Generator
    train_loader: DataLoader[Any]
    mask_generator: torch.Generator  # the supernet's mask sampling (train.supernet), checkpointed like the rest


def fit(
    cfg: TrialConfig,
    report: Report,
    checkpoint_dir: str | Path | None = None,
    work_dir: str | Path | None = None,
    cpus: int | None = None,
    device: str | None = None,
    progress: bool = False,
) -> FitResult:
    """Trains `cfg.train.seeds` seeds of one configuration, reporting mean (and std) metrics every epoch.

    With `cfg.train.test`, each seed's model is scored on the test split after the last epoch, and only the final
    report holds `test_acc` and `test_loss` (and with several seeds `test_acc_std`, `test_loss_std`). Without it the
    test split is never read.

    Args:
        cfg: the validated trial configuration.
        report: called as report(metrics, checkpoint_dir) after each epoch; the last call's checkpoint also holds
            the path analysis (JSON + PNG) and the final PathConfig with learned EnsembleScale values.
        checkpoint_dir: a checkpoint written by an earlier `fit` to resume from (exactly).
        work_dir: where new checkpoints go (default: a fresh temporary folder); older ones are removed once the
            next is reported.
        cpus: CPUs given to this trial; sets torch's thread count unless `train.threads` does (see torch_threads;
            reused Ray actors keep the last one).
        device: "cpu" or "cuda" (default: cuda when available).
        progress: show a progress bar per epoch (for the CLI).

    Returns:
        The last report's metrics, checkpoint and final files. Resumed from a checkpoint of the last epoch (nothing
        left to train): that checkpoint's saved metrics (test ones included, when it has them) and no files.

    Raises:
        ValueError: `cfg.train.test` is set and the data has no test split, or OMP_NUM_THREADS is unreadable
            (checked before any training).
    """
    torch.set_num_threads(torch_threads(cfg.train.threads, cpus))
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    bundle = load_trial_data(cfg)
    if cfg.train.test and bundle.test is None:
        where = f" at {cfg.data.root}" if cfg.data.root else ""
        raise ValueError(
            f"train.test is set but dataset {cfg.data.name!r}{where} has no test split "
            "(imagefolder: add a test/ folder with the train/ classes, or set train.test: false)"
        )
    resume = _read_state(Path(checkpoint_dir)) if checkpoint_dir is not None else None
    if resume is not None and resume["config"]["model"] != to_dict(cfg)["model"]:
        raise ValueError(f"checkpoint {checkpoint_dir} was written for another model configuration")
    # timm's Mixup draws from numpy and its augmentations from `random`: seed both, like torch, per trial.
    np.random.seed(cfg.train.seed)
    random.seed(cfg.train.seed)
    runs = [build_seed_run(cfg, bundle, cfg.train.seed + k, dev) for k in range(cfg.train.seeds)]
    start_epoch = 0
    if resume is not None:
        start_epoch = _restore(runs, Path(str(checkpoint_dir)), resume)
    val_loader = DataLoader(bundle.val, batch_size=cfg.data.eval_batch_size, num_workers=cfg.data.num_workers)
    mixup = _make_mixup(cfg, bundle.num_classes)
    criterion = _make_criterion(cfg, mixup is not None)
    out_root = Path(work_dir) if work_dir is not None else Path(tempfile.mkdtemp(prefix="pathsearch-trial-"))
    out_root.mkdir(parents=True, exist_ok=True)
    previous: Path | None = None
    metrics: dict[str, Any] = {}
    files: dict[str, Path] = {}
    amp = dev.type == "cuda" and cfg.train.amp
    train_images, train_seconds = 0, 0.0  # since the last report
    for epoch in range(start_epoch, cfg.train.epochs):
        per_seed: list[dict[str, float]] = []
        for run in runs:
            started = time.perf_counter()
            loss, seen = _train_one_epoch(run, cfg, epoch, criterion, mixup, dev, amp, progress)
            train_seconds += time.perf_counter() - started
            train_images += seen
            per_seed.append({"train_loss": loss})
        last = epoch + 1 == cfg.train.epochs
        if not last and (epoch + 1) % cfg.train.eval_every:
            continue  # evaluate, checkpoint and report every eval_every epochs (and after the last)
        for run, entry in zip(runs, per_seed, strict=True):
            entry.update(_evaluate(run.model, val_loader, dev, amp))
        if last and cfg.train.test:
            assert bundle.test is not None  # checked before training
            test_loader = DataLoader(bundle.test, batch_size=cfg.data.eval_batch_size, num_workers=cfg.data.num_workers)
            for run, entry in zip(runs, per_seed, strict=True):
                scores = _evaluate(run.model, test_loader, dev, amp, prefix="test")
                entry.update(test_acc=scores["test_acc"], test_loss=scores["test_loss"])
        metrics = _summarise(per_seed)
        metrics.update(
            epoch=epoch + 1,
            kept_paths=runs[0].model.kept_paths,
            params=sum(p.numel() for p in runs[0].model.parameters()),
            images_per_s=train_images / max(train_seconds, 1e-9),
            seeds=len(runs),
        )
        ckpt = out_root / f"checkpoint_{epoch + 1:04d}"
        _write_checkpoint(ckpt, runs, cfg, epoch + 1, metrics)
        if last:
            files = _write_final_artifacts(ckpt, runs, val_loader, dev)
        report(metrics, str(ckpt))
        train_images, train_seconds = 0, 0.0
        if previous is not None and previous.exists():
            shutil.rmtree(previous)
        previous = ckpt
    if previous is None:  # resumed from a checkpoint of the last epoch: nothing left to train
        previous = Path(str(checkpoint_dir))
        metrics = dict(resume["metrics"]) if resume is not None else {}
    return FitResult(metrics, previous, files)


def torch_threads(configured: int | None, cpus: int | None, environ: Mapping[str, str] = os.environ) -> int:
    """Torch's thread count for a trial: `train.threads`; else the CPUs Ray gave the trial (its share of the node,
    so concurrent trials do not oversubscribe it, whatever OMP_NUM_THREADS the workers inherited); else
    OMP_NUM_THREADS (how a process is sized by hand, e.g. `pathsearch train` beside other jobs); else every core
    this process may use. A set but unreadable OMP_NUM_THREADS is a ValueError, not silently ignored."""
    if configured:
        return configured
    if cpus:
        return cpus
    text = environ.get("OMP_NUM_THREADS", "").strip()
    if not text:
        return len(os.sched_getaffinity(0))
    try:
        threads = int(text.split(",")[0])  # OpenMP's nested form "4,2": the outer level
    except ValueError:
        threads = 0
    if threads < 1:
        raise ValueError(f"OMP_NUM_THREADS={text!r}: expected a whole number >= 1 (or unset it, or set train.threads)")
    return threads


def load_trial_data(cfg: TrialConfig) -> DataBundle:
    d = cfg.data
    img_size = d.img_size or cfg.model.kwargs.get("img_size")
    return load_data(d.name, d.root, d.download, d.train_size, d.split_seed, img_size, d.auto_augment, d.val_size)


def build_model(cfg: TrialConfig, bundle: DataBundle, seed: int) -> PathEnsembleViT:
    """The trial's model, sized to the data (num_classes, img_size, in_chans unless the config sets them)."""
    kwargs = {"num_classes": bundle.num_classes, "img_size": bundle.img_size, "in_chans": bundle.in_chans}
    kwargs.update(cfg.model.kwargs)
    if kwargs["img_size"] != bundle.img_size or kwargs["in_chans"] != bundle.in_chans:
        raise ValueError(
            f"model.kwargs img_size={kwargs['img_size']}, in_chans={kwargs['in_chans']} do not fit dataset "
            f"{cfg.data.name!r} ({bundle.in_chans} x {bundle.img_size} x {bundle.img_size} images)"
        )
    torch.manual_seed(seed)
    model = create_path_vit(
        cfg.model.name, path_config=cfg.model.path_config(), pretrained=cfg.model.pretrained, **kwargs
    )
    if cfg.model.pos_embed_std is not None and model.vit.pos_embed is not None:
        nn.init.normal_(model.vit.pos_embed, std=cfg.model.pos_embed_std)
    return model


def load_checkpoint_model(
    checkpoint_dir: str | Path, seed_index: int = 0, device: str | torch.device = "cpu"
) -> tuple[PathEnsembleViT, TrialConfig]:
    """The trained model of a `fit` checkpoint (seed `seed_index`) in eval mode, and the trial config it was
    trained with. Builds it without pretrained weights: the checkpoint holds them all."""
    path = Path(checkpoint_dir)
    state = _read_state(path)
    cfg = load_trial_config(None, data=state["config"], source=f"{path}/state.json")
    bundle = load_trial_data(cfg)
    blank = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, pretrained=False))
    model = build_model(blank, bundle, int(state["runs"][seed_index]["seed"])).to(device)
    model.load_state_dict(load_file(str(path / f"model_{seed_index}.safetensors"), device=str(device)))
    return model.eval(), cfg


def build_seed_run(cfg: TrialConfig, bundle: DataBundle, seed: int, dev: torch.device) -> SeedRun:
    model = build_model(cfg, bundle, seed).to(dev)
    if dev.type == "cuda" and cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    t = cfg.train
    optimizer = create_optimizer_v2(model, t.opt, lr=t.lr, weight_decay=t.weight_decay)
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(
        bundle.train,
        batch_size=cfg.data.batch_size,
        shuffle=True,
        generator=generator,
        num_workers=cfg.data.num_workers,
        pin_memory=dev.type == "cuda",
    )
    steps = t.epochs * len(loader)
    scheduler = CosineLRScheduler(
        optimizer,
        t_initial=steps,
        lr_min=t.min_lr,
        warmup_t=int(t.warmup_epochs * len(loader)),
        warmup_lr_init=t.lr * 1e-3,
        warmup_prefix=True,
        t_in_epochs=False,
    )
    masks = torch.Generator().manual_seed(seed + 7919)  # a stream of its own: shuffling is unchanged by supernet mode
    return SeedRun(seed, model, optimizer, scheduler, generator, loader, masks)


def _make_mixup(cfg: TrialConfig, num_classes: int) -> Mixup | None:
    d = cfg.data
    if d.mixup <= 0 and d.cutmix <= 0:
        return None
    return Mixup(mixup_alpha=d.mixup, cutmix_alpha=d.cutmix, label_smoothing=d.label_smoothing, num_classes=num_classes)


def _make_criterion(cfg: TrialConfig, soft_targets: bool) -> nn.Module:
    if soft_targets:
        return SoftTargetCrossEntropy()  # Mixup already applied label smoothing to the targets
    if cfg.data.label_smoothing > 0:
        return LabelSmoothingCrossEntropy(cfg.data.label_smoothing)
    return nn.CrossEntropyLoss()


def _autocast(dev: torch.device, amp: bool) -> Any:
    return torch.autocast("cuda", dtype=torch.bfloat16) if amp else nullcontext()


def _train_one_epoch(
    run: SeedRun,
    cfg: TrialConfig,
    epoch: int,
    criterion: nn.Module,
    mixup: Mixup | None,
    dev: torch.device,
    amp: bool,
    progress: bool,
) -> tuple[float, int]:
    model = run.model
    model.train()
    steps_per_epoch = len(run.train_loader)
    batches: Iterable[Any] = run.train_loader
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches, desc=f"epoch {epoch + 1}/{cfg.train.epochs} seed {run.seed}", leave=False)
    distill = model.distill.alpha > 0
    supernet = cfg.train.supernet
    total, seen = 0.0, 0
    for i, (images, targets) in enumerate(batches):
        step = epoch * steps_per_epoch + i
        images, targets = images.to(dev, non_blocking=True), targets.to(dev, non_blocking=True)
        if dev.type == "cuda" and cfg.train.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        if mixup is not None:
            images, targets = mixup(images, targets)
        with _autocast(dev, amp):
            if supernet.enabled:  # one trunk forward, then the head on each sampled mask (path supernet)
                masks = sample_supernet_masks(model.num_paths, supernet, run.mask_generator)  # (K, P)
                logits = model.forward_masks(model.forward_paths(images), masks.to(dev))  # (K, B, C)
                loss = supernet_loss(model, logits, targets, criterion)
            elif distill:
                logits, students = model.forward_with_students(images)
                loss = criterion(logits, targets) + model.distillation_loss(logits, students)
            else:
                loss = criterion(model(images), targets)
        value = loss.item()
        if not math.isfinite(value):
            raise NonFiniteLossError(
                f"training loss became {value} at epoch {epoch + 1}, step {i + 1} (seed {run.seed}, "
                f"lr {run.optimizer.param_groups[0]['lr']:.3g}): the trial failed"
            )
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.train.grad_clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        run.optimizer.step()
        run.scheduler.step_update(step + 1)
        total += value * len(images)
        seen += len(images)
    return total / max(seen, 1), seen


@torch.no_grad()
def _evaluate(
    model: PathEnsembleViT, loader: DataLoader[Any], dev: torch.device, amp: bool, prefix: str = "val"
) -> dict[str, float]:
    """`<prefix>_loss` / `<prefix>_acc` of the model as configured and `<prefix>_acc_full` (every path kept) on the
    loader's split, one trunk pass each batch."""
    model.eval()
    kept = torch.tensor(model.path_mask, device=dev)
    masks = torch.stack([kept, torch.ones_like(kept)])  # (2, P): as configured, all paths
    loss_sum, correct, correct_full, count = 0.0, 0, 0, 0
    for images, targets in loader:
        images, targets = images.to(dev), targets.to(dev)
        with _autocast(dev, amp):
            features = model.forward_paths(images)  # (P, B, ...)
            logits = model.forward_masks(features, masks)  # (2, B, C)
        loss_sum += F.cross_entropy(logits[0].float(), targets, reduction="sum").item()
        correct += (logits[0].argmax(-1) == targets).sum().item()
        correct_full += (logits[1].argmax(-1) == targets).sum().item()
        count += len(targets)
    return {
        f"{prefix}_loss": loss_sum / count,
        f"{prefix}_acc": correct / count,
        f"{prefix}_acc_full": correct_full / count,
    }


def _summarise(per_seed: list[dict[str, float]]) -> dict[str, Any]:
    """Mean over seeds of each metric; with several seeds also `<metric>_std` (sample standard deviation)."""
    out: dict[str, Any] = {}
    for key in per_seed[0]:
        values = [m[key] for m in per_seed]
        out[key] = statistics.fmean(values)
        if len(values) > 1:
            out[f"{key}_std"] = statistics.stdev(values)
    return out


# ----- checkpoints: safetensors for tensors, JSON for the rest -------------------------------------------------
def _write_checkpoint(path: Path, runs: list[SeedRun], cfg: TrialConfig, epoch: int, metrics: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    run_states = []
    for k, run in enumerate(runs):
        save_file(_cpu(run.model.state_dict()), str(tmp / f"model_{k}.safetensors"))
        opt_tensors, opt_meta = _split_optimizer_state(run.optimizer.state_dict())
        save_file(opt_tensors, str(tmp / f"optimizer_{k}.safetensors"))
        run_states.append(
            {
                "seed": run.seed,
                "optimizer": opt_meta,
                "scheduler": run.scheduler.state_dict(),
                "loader_generator": run.loader_generator.get_state().tolist(),
                "mask_generator": run.mask_generator.get_state().tolist(),
            }
        )
    np_state: tuple[Any, ...] = tuple(np.random.get_state())
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    save_file(rng, str(tmp / "rng.safetensors"))
    py_state = random.getstate()
    state = {
        "version": CHECKPOINT_VERSION,
        "epoch": epoch,
        "config": to_dict(cfg),
        "metrics": metrics,
        "threads": torch.get_num_threads(),  # what images_per_s was measured with
        "runs": run_states,
        "numpy_rng": [np_state[0], np.asarray(np_state[1]).tolist(), *[_plain(v) for v in np_state[2:]]],
        "python_rng": [py_state[0], list(py_state[1]), py_state[2]],
    }
    (tmp / "state.json").write_text(json.dumps(state))
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)  # a checkpoint is either complete or absent


def _read_state(path: Path) -> dict[str, Any]:
    state_file = path / "state.json"
    if not state_file.is_file():
        raise ValueError(f"{path}: not a pathsearch checkpoint (no state.json)")
    state: dict[str, Any] = json.loads(state_file.read_text())
    if state.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"{path}: checkpoint version {state.get('version')} is not {CHECKPOINT_VERSION}")
    return state


def _restore(runs: list[SeedRun], path: Path, state: dict[str, Any]) -> int:
    if len(state["runs"]) != len(runs):
        raise ValueError(f"{path}: checkpoint holds {len(state['runs'])} seeds, the config asks for {len(runs)}")
    for k, (run, saved) in enumerate(zip(runs, state["runs"], strict=True)):
        device = next(run.model.parameters()).device
        run.model.load_state_dict(load_file(str(path / f"model_{k}.safetensors"), device=str(device)))
        tensors = load_file(str(path / f"optimizer_{k}.safetensors"))
        run.optimizer.load_state_dict(_join_optimizer_state(tensors, saved["optimizer"]))
        run.scheduler.load_state_dict(saved["scheduler"])
        run.loader_generator.set_state(torch.tensor(saved["loader_generator"], dtype=torch.uint8))
        if "mask_generator" in saved:  # absent in checkpoints written before supernet training existed
            run.mask_generator.set_state(torch.tensor(saved["mask_generator"], dtype=torch.uint8))
    rng = load_file(str(path / "rng.safetensors"))
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    np_state = state["numpy_rng"]
    np.random.set_state((np_state[0], np.asarray(np_state[1], dtype=np.uint32), *np_state[2:]))
    py_state = state["python_rng"]
    random.setstate((py_state[0], tuple(py_state[1]), py_state[2]))
    return int(state["epoch"])


def _split_optimizer_state(sd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Optimizer state_dict -> (tensors by 'param_id.name', JSON-able rest)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, entry in sd["state"].items():
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{pid}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(pid), {})[name] = _plain(value)
    groups = [{k: _plain(v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def _join_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    for pid, entries in meta["scalars"].items():
        state.setdefault(int(pid), {}).update(entries)
    return {"state": state, "param_groups": meta["param_groups"]}


def _write_final_artifacts(
    ckpt: Path, runs: list[SeedRun], val_loader: DataLoader[Any], dev: torch.device
) -> dict[str, Path]:
    """Path analysis (JSON + PNG) and the final PathConfig of each seed, inside the last checkpoint."""
    files: dict[str, Path] = {}
    for k, run in enumerate(runs):
        suffix = "" if k == 0 else f"_seed{k}"
        analysis = analyze_paths(run.model, val_loader, device=dev)
        analysis.meta.update(seed=run.seed)
        files[f"path_analysis{suffix}_json"] = analysis.save_json(ckpt / f"path_analysis{suffix}.json")
        files[f"path_analysis{suffix}_png"] = analysis.plot(ckpt / f"path_analysis{suffix}.png")
        files[f"path_config{suffix}"] = run.model.path_config.save(ckpt / f"path_config{suffix}.yaml")
    return files


def _cpu(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in sd.items()}


def _plain(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, torch.Tensor):
        return value.item()
    return value
