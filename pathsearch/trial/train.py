"""One trial: train a PathEnsembleViT with one path configuration and report each epoch.

`fit(cfg, report)` knows nothing of Ray: `report(metrics, checkpoint_dir)` is its only way out, so the search
wraps it in a thin adapter. Checkpoints are safetensors (tensors) + JSON (the rest), never pickle.

Run in a torch.distributed process group (a data-parallel trial: Ray Train starts one process per worker and sets
up the group), `fit` trains one replica per worker: each worker takes its part of every global batch of
`data.batch_size` images (`data.shard_of`), DistributedDataParallel averages the gradients, so a step is the
one-process step on the whole global batch; evaluation is split over the workers and summed; metrics are the
group's, and only rank 0 writes checkpoints and the path analysis.
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
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from torch import Tensor, nn
from torch.utils.data import DataLoader

from pathsearch.config import TrialConfig, load_trial_config
from pathsearch.config.typed import to_dict
from pathsearch.ensemble.analysis import analyze_paths
from pathsearch.ensemble.model import PathEnsembleViT, create_path_vit
from pathsearch.ensemble.supernet import sample_supernet_masks, supernet_loss
from pathsearch.trial.data import DataBundle, TensorBatches, load_data, make_loader, on_device

Report = Callable[[dict[str, Any], str | None], None]
CHECKPOINT_VERSION = 1


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite: the trial failed (a search counts it as a failed trial)."""


@dataclass(frozen=True)
class Group:
    """This process's place in a data-parallel trial: its rank among `world` workers (0 of 1 alone)."""

    rank: int = 0
    world: int = 1

    @classmethod
    def current(cls) -> Group:
        """The torch.distributed process group this process is in (Ray Train sets it up), or a group of one."""
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    @property
    def shard(self) -> tuple[int, int] | None:
        return (self.rank, self.world) if self.world > 1 else None

    @property
    def lead(self) -> bool:
        """The worker that writes checkpoints and the path analysis, and whose report the search hears."""
        return self.rank == 0

    def total(self, tensor: Tensor) -> Tensor:
        """`tensor` summed over the workers (in place; itself alone): a collective on the device, no host sync."""
        if self.world > 1:
            dist.all_reduce(tensor)
        return tensor


class StepLoss(nn.Module):
    """`step_loss` as a module, so DistributedDataParallel can wrap the whole step (its forward is where DDP hooks
    in, and a step calls several of the model's methods, not only `forward`)."""

    def __init__(self, model: PathEnsembleViT, criterion: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.criterion = criterion

    def forward(self, images: Tensor, targets: Tensor, masks: Tensor | None = None, distill: bool = False) -> Tensor:
        return step_loss(self.model, self.criterion, images, targets, masks, distill)


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
    train_loader: TensorBatches | DataLoader[Any]
    mask_generator: torch.Generator  # the supernet's mask sampling (train.supernet), checkpointed like the rest
    loss_fn: Callable[..., torch.Tensor]  # the step's forward and loss (compiled with train.compile)


def fit(
    cfg: TrialConfig,
    report: Report,
    checkpoint_dir: str | Path | None = None,
    work_dir: str | Path | None = None,
    cpus: int | None = None,
    device: str | torch.device | None = None,
    progress: bool = False,
    gpu_fraction: float | None = None,
) -> FitResult:
    """Trains `cfg.train.seeds` seeds of one configuration, reporting mean (and std) metrics every epoch.

    With `cfg.train.test`, each seed's model is scored on the test split after the last epoch, and only the final
    report holds `test_acc` and `test_loss` (and with several seeds `test_acc_std`, `test_loss_std`). Without it the
    test split is never read.

    Args:
        cfg: the validated trial configuration.
        report: called as report(metrics, checkpoint_dir) after each epoch; the last call's checkpoint also holds
            the path analysis (JSON + PNG) and the final PathConfig with learned EnsembleScale values. Besides the
            numbers, `metrics["dataset_inputs"]` describes the splits the trial read (JSON, see `dataset_inputs`).
        checkpoint_dir: a checkpoint written by an earlier `fit` to resume from (exactly).
        work_dir: where new checkpoints go (default: a fresh temporary folder); older ones are removed once the
            next is reported.
        cpus: CPUs given to this trial; sets torch's thread count unless `train.threads` does (see torch_threads;
            reused Ray actors keep the last one).
        device: where the trial trains: "cpu", "cuda", "cuda:1", ... (default: cuda when a GPU is visible, else
            cpu). Data held in memory, features, masks and scales stay there; a training step never waits on the host.
        progress: show a progress bar per epoch (for the CLI).
        gpu_fraction: the share of the GPU this trial was given (Ray's fractional `gpu`): its memory is capped to it.

    Returns:
        The last report's metrics, checkpoint and final files. Resumed from a checkpoint of the last epoch (nothing
        left to train): that checkpoint's saved metrics (test ones included, when it has them) and no files.

    Raises:
        ValueError: `cfg.train.test` is set and the data has no test split, OMP_NUM_THREADS is unreadable, the
            device is not there, or train.compile is set on a torch without torch.compile (checked before any
            training).
    """
    torch.set_num_threads(torch_threads(cfg.train.threads, cpus))
    dev = resolve_device(device)
    group = Group.current()
    if cfg.train.compile:
        check_compile()
    if dev.type == "cuda" and gpu_fraction is not None and gpu_fraction < 1:
        # a fractional GPU shares the device with other trials: its allocator may take only its share
        torch.cuda.set_per_process_memory_fraction(gpu_fraction, dev)
    resume = _read_state(Path(checkpoint_dir)) if checkpoint_dir is not None else None
    if resume is not None and resume["config"]["model"] != to_dict(cfg)["model"]:
        raise ValueError(f"checkpoint {checkpoint_dir} was written for another model configuration")
    bundle, mixup, runs, val_loader = set_up_trial(cfg, dev, group)
    start_epoch = 0
    if resume is not None:
        start_epoch = _restore(runs, Path(str(checkpoint_dir)), resume, dev)
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
            loss, seen = _train_one_epoch(run, cfg, epoch, mixup, dev, amp, progress, group)
            train_seconds += time.perf_counter() - started
            train_images += seen
            per_seed.append({"train_loss": loss})
        last = epoch + 1 == cfg.train.epochs
        if not last and (epoch + 1) % cfg.train.eval_every:
            continue  # evaluate, checkpoint and report every eval_every epochs (and after the last)
        for run, entry in zip(runs, per_seed, strict=True):
            entry.update(_evaluate(run.model, val_loader, dev, group=group))
        if last and cfg.train.test:
            assert bundle.test is not None  # checked before training
            test_loader = make_loader(bundle.test, cfg.data.eval_batch_size, dev, num_workers=cfg.data.num_workers,
                                      shard=group.shard)  # fmt: skip
            for run, entry in zip(runs, per_seed, strict=True):
                scores = _evaluate(run.model, test_loader, dev, prefix="test", group=group)
                entry.update(test_acc=scores["test_acc"], test_loss=scores["test_loss"])
        metrics = _summarise(per_seed)
        metrics.update(
            epoch=epoch + 1,
            kept_paths=runs[0].model.kept_paths,
            params=sum(p.numel() for p in runs[0].model.parameters()),
            images_per_s=group.world * train_images / max(train_seconds, 1e-9),  # equal parts: the group's rate
            seeds=len(runs),
        )
        inputs = dataset_inputs(cfg, bundle, test=last and cfg.train.test)
        train_images, train_seconds = 0, 0.0
        if not group.lead:  # the group's numbers, heard from rank 0; its checkpoint holds every worker's state
            report({**metrics, "dataset_inputs": inputs}, None)
            continue
        ckpt = out_root / f"checkpoint_{epoch + 1:04d}"
        _write_checkpoint(ckpt, runs, cfg, epoch + 1, metrics, dev)
        if last:  # on the whole val split, unsplit
            full_val = val_loader if group.world == 1 else make_loader(bundle.val, cfg.data.eval_batch_size, dev)
            files = _write_final_artifacts(ckpt, runs, full_val, dev)
        report({**metrics, "dataset_inputs": inputs}, str(ckpt))
        if previous is not None and previous.exists():
            shutil.rmtree(previous)
        previous = ckpt
    if previous is None and resume is not None and start_epoch == cfg.train.epochs:  # nothing left to train
        previous = Path(str(checkpoint_dir))
        metrics = dict(resume["metrics"])
    return FitResult(metrics, previous or out_root, files)


def set_up_trial(
    cfg: TrialConfig, dev: torch.device, group: Group = Group()
) -> tuple[DataBundle, Mixup | None, list[SeedRun], TensorBatches | DataLoader[Any]]:
    """Everything a trial makes before its first step, as `fit` makes it: the data, the seeded global RNGs, Mixup,
    each seed's run (model, optimiser, schedule, loader) and the validation loader. tests/test_boundaries.py runs it
    and one `train_step` for every value validation accepts.

    Raises:
        ValueError: `cfg.train.test` is set and the data has no test split.
    """
    bundle = load_trial_data(cfg)
    if cfg.train.test and bundle.test is None:
        where = f" at {cfg.data.root}" if cfg.data.root else ""
        raise ValueError(
            f"train.test is set but dataset {cfg.data.name!r}{where} has no test split "
            "(imagefolder: add a test/ folder with the train/ classes, or set train.test: false)"
        )
    # timm's Mixup draws from numpy and its augmentations from `random`: seed both, like torch, per trial.
    np.random.seed(cfg.train.seed)
    random.seed(cfg.train.seed)
    mixup = make_mixup(cfg, bundle.num_classes)
    criterion = _make_criterion(cfg, mixup is not None)
    train_data = on_device(bundle.train, dev)  # one copy on the device, shared by the seeds
    runs = [
        build_seed_run(cfg, bundle, cfg.train.seed + k, dev, criterion, train_data, group)
        for k in range(cfg.train.seeds)
    ]
    val_loader = make_loader(bundle.val, cfg.data.eval_batch_size, dev, num_workers=cfg.data.num_workers,
                             shard=group.shard)  # fmt: skip
    return bundle, mixup, runs, val_loader


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


def dataset_inputs(cfg: TrialConfig, bundle: DataBundle, test: bool = False) -> str:
    """The splits a trial read, as JSON for a tracker: [{name, context, size, digest, source}], one per split
    (train, validation, and test when it was scored). The digest identifies the split's definition (dataset, root,
    split seed, sizes, image size), not its bytes: hashing an image folder would mean reading it all."""
    import hashlib

    d = cfg.data
    source = {"dataset": d.name, "root": d.root, "split_seed": d.split_seed, "img_size": bundle.img_size}
    splits = [("train", bundle.train), ("validation", bundle.val)]
    if test and bundle.test is not None:
        splits.append(("test", bundle.test))
    out = []
    for context, split in splits:
        size = len(split)  # type: ignore[arg-type]
        key = json.dumps({**source, "split": context, "size": size}, sort_keys=True)
        digest = hashlib.sha256(key.encode()).hexdigest()[:16]
        out.append({"name": f"{d.name}-{context}", "context": context, "size": size, "digest": digest,
                    "source": source})  # fmt: skip
    return json.dumps(out)


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """The device a trial trains on: `device`, or cuda when a GPU is visible, else cpu. A CUDA device always comes
    with its index ("cuda" is the current device, "cuda:0" where Ray set CUDA_VISIBLE_DEVICES): torch calls such as
    `set_per_process_memory_fraction` refuse a CUDA device without one. A CUDA device that is not there is a
    ValueError (bad input), not a fall-back to the CPU."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"device {device!r}: {err}") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(
                f"device {str(device)!r}: no CUDA GPU is visible to this process (torch {torch.__version__})"
            )
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"device {str(device)!r}: only {count} CUDA GPU(s) are visible (cuda:0..cuda:{count - 1})")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def check_compile() -> None:
    """Raises ValueError when this torch cannot compile (train.compile): torch.compile missing or Dynamo not
    supported on this Python."""
    compile_fn = getattr(torch, "compile", None)
    supported = getattr(getattr(torch, "_dynamo", None), "is_dynamo_supported", None)
    if compile_fn is None or supported is None or not supported():
        raise ValueError(
            f"train.compile: torch {torch.__version__} cannot compile on this Python ({sys.version.split()[0]}): "
            "set train.compile: false"
        )


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
    m = cfg.model
    model = create_path_vit(m.name, path_config=m.path_config(), pretrained=m.pretrained, weights=m.weights, **kwargs)
    # over pretrained position embeddings only with model.reinit_pos_embed, which the config's checks demand there
    if cfg.model.pos_embed_std is not None and model.vit.pos_embed is not None:
        nn.init.normal_(model.vit.pos_embed, std=cfg.model.pos_embed_std)
    return model


def load_checkpoint_model(
    checkpoint_dir: str | Path, seed_index: int = 0, device: str | torch.device = "cpu"
) -> tuple[PathEnsembleViT, TrialConfig]:
    """The trained model of a `fit` checkpoint (seed `seed_index`) in eval mode, and the trial config it was
    trained with. Builds it without pretrained weights (published or a file): the checkpoint holds them all."""
    path = Path(checkpoint_dir)
    state = _read_state(path)
    trained = state["config"]
    started = {k: trained["model"].get(k) for k in ("pretrained", "weights") if k in trained.get("model", {})}
    # read as a model without pretrained weights: the weights file may be gone, and the checkpoint needs none of it
    blank = load_trial_config(None, data={**trained, "model": {**trained.get("model", {}), "pretrained": False,
                              "weights": None}}, source=f"{path}/state.json")  # fmt: skip
    cfg = dataclasses.replace(blank, model=dataclasses.replace(blank.model, **started))
    bundle = load_trial_data(cfg)
    model = build_model(blank, bundle, int(state["runs"][seed_index]["seed"])).to(device)
    model.load_state_dict(load_file(str(path / f"model_{seed_index}.safetensors"), device=str(device)))
    return model.eval(), cfg


def build_seed_run(
    cfg: TrialConfig,
    bundle: DataBundle,
    seed: int,
    dev: torch.device,
    criterion: nn.Module | None = None,
    train_data: Any = None,
    group: Group = Group(),
) -> SeedRun:
    """Seed `seed`'s model, optimiser, schedule, data order and step function on `dev`. `train_data`: the training
    split already moved to `dev` (`bundle.train` by default). In a group of several workers the loader gives this
    worker's part of each global batch, a last partial global batch is dropped (every part the same size, so DDP's
    mean of the workers' gradients is the global batch's), and the step is wrapped in DistributedDataParallel."""
    model = build_model(cfg, bundle, seed).to(dev)
    if dev.type == "cuda" and cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    t = cfg.train
    optimizer = create_optimizer_v2(model, t.opt, lr=t.lr, weight_decay=t.weight_decay, **_fused(t.opt, dev))
    generator = torch.Generator().manual_seed(seed)
    # timm's Mixup needs an even batch: a last, odd, batch would stop the trial, so with mixup it is dropped
    soft_targets = cfg.data.mixup > 0 or cfg.data.cutmix > 0
    loader = make_loader(
        train_data if train_data is not None else bundle.train,
        cfg.data.batch_size,
        dev,
        shuffle=True,
        generator=generator,
        drop_last=soft_targets or group.world > 1,
        num_workers=cfg.data.num_workers,
        shard=group.shard,
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
    criterion = criterion or _make_criterion(cfg, soft_targets)
    loss_fn: Callable[..., Tensor] = partial(step_loss, model, criterion)
    if group.world > 1:
        # every parameter that requires a gradient gets one in every step kind (pruned paths and the supernet's
        # masks multiply, they do not skip a component): DDP need not search the graph for unused ones each step
        loss_fn = nn.parallel.DistributedDataParallel(
            StepLoss(model, criterion), device_ids=[dev.index] if dev.type == "cuda" else None
        )
    if t.compile:
        loss_fn = torch.compile(loss_fn)
    return SeedRun(seed, model, optimizer, scheduler, generator, loader, masks, loss_fn)


def _fused(opt: str, dev: torch.device) -> dict[str, Any]:
    """torch's fused Adam/AdamW kernels on CUDA (one kernel for all parameters instead of several per tensor)."""
    return {"fused": True} if dev.type == "cuda" and opt.lower() in ("adam", "adamw") else {}


def make_mixup(cfg: TrialConfig, num_classes: int) -> Mixup | None:
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


def step_loss(
    model: PathEnsembleViT,
    criterion: nn.Module,
    images: Tensor,
    targets: Tensor,
    masks: Tensor | None = None,
    distill: bool = False,
) -> Tensor:
    """One training step's loss: the configured ensemble; with `masks` (K, P) the supernet's masks on one trunk pass;
    with `distill` plus the self-distillation term. All on the inputs' device, no host sync."""
    if masks is not None:  # one trunk forward, then the head on each sampled mask (path supernet)
        logits = model.forward_masks(model.forward_paths(images), masks)  # (K, B, C)
        return supernet_loss(model, logits, targets, criterion)
    if distill:
        logits, students = model.forward_with_students(images)
        return criterion(logits, targets) + model.distillation_loss(logits, students)
    return criterion(model(images), targets)


def train_step(
    run: SeedRun, cfg: TrialConfig, images: Tensor, targets: Tensor, amp: bool, mixup: Mixup | None = None
) -> Tensor:
    """Mixup/CutMix, forward, backward and optimiser step of one batch (already on the model's device); returns the
    loss, still on the device: reading it (`.item()`) would make the host wait for the GPU every step."""
    model = run.model
    if mixup is not None:
        images, targets = mixup(images, targets)
    masks = None
    if cfg.train.supernet.enabled:
        masks = sample_supernet_masks(model.num_paths, cfg.train.supernet, run.mask_generator)  # (K, P), CPU
        masks = masks.pin_memory().to(images.device, non_blocking=True) if images.is_cuda else masks.to(images.device)
    with _autocast(images.device, amp):
        loss = run.loss_fn(images, targets, masks, model.distill.alpha > 0)
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.train.grad_clip is not None:
        nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
    run.optimizer.step()
    return loss.detach()


class LossGuard:
    """Stops a trial at its first non-finite training loss without a host sync per step.

    Hand-written because neither torch nor timm offers it: the losses of the last `window` steps are kept on the
    device; when the window is full they are copied to the host without blocking and the window before it (whose
    copy is done by then) is read. So a NaN is reported within two windows of its step, with that step's epoch,
    number and learning rate, and `check()` (end of each epoch, before any checkpoint) reads everything left.
    """

    def __init__(self, device: torch.device, window: int = 16) -> None:
        self.device = device
        self.window = window
        self.values = torch.empty(window, dtype=torch.float32, device=device)  # (window,)
        self.labels: list[tuple[int, int, int, float]] = []  # (epoch, step, seed, lr) of each slot
        self.pending: tuple[Tensor, Any, list[tuple[int, int, int, float]]] | None = None

    def add(self, loss: Tensor, epoch: int, step: int, seed: int, lr: float) -> None:
        self.values[len(self.labels)] = loss  # a device-side copy
        self.labels.append((epoch, step, seed, lr))
        if len(self.labels) == self.window:
            self._send()

    def check(self) -> None:
        """Reads every loss added so far (one host sync); raises NonFiniteLossError at the first non-finite one."""
        self._send()
        self._read()

    def _send(self) -> None:
        self._read()
        if not self.labels:
            return
        count = len(self.labels)
        if self.device.type == "cuda":  # the device asked for (its values live there), as fit's other CUDA branches
            host = torch.empty(count, dtype=torch.float32, pin_memory=True)
            host.copy_(self.values[:count], non_blocking=True)
            done = torch.cuda.Event()
            done.record(torch.cuda.current_stream(self.device))
            self.values = torch.empty_like(self.values)  # the copy may still read the old buffer
        else:
            host, done = self.values[:count].clone(), None
        self.pending, self.labels = (host, done, self.labels), []

    def _read(self) -> None:
        if self.pending is None:
            return
        host, done, labels = self.pending
        self.pending = None
        if done is not None:
            done.synchronize()  # recorded a window ago: normally long finished
        for value, (epoch, step, seed, lr) in zip(host.tolist(), labels, strict=True):
            if not math.isfinite(value):
                raise NonFiniteLossError(
                    f"training loss became {value} at epoch {epoch + 1}, step {step + 1} (seed {seed}, "
                    f"lr {lr:.3g}): the trial failed"
                )


def _train_one_epoch(
    run: SeedRun,
    cfg: TrialConfig,
    epoch: int,
    mixup: Mixup | None,
    dev: torch.device,
    amp: bool,
    progress: bool,
    group: Group = Group(),
) -> tuple[float, int]:
    """One epoch of one seed; returns (mean training loss over the group, images this worker saw). The host waits
    for the device once, at the end (LossGuard.check and the loss sum)."""
    model = run.model
    model.train()
    steps_per_epoch = len(run.train_loader)
    batches: Iterable[Any] = run.train_loader
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches, desc=f"epoch {epoch + 1}/{cfg.train.epochs} seed {run.seed}", leave=False)
    guard = LossGuard(dev)
    total = torch.zeros((), dtype=torch.float64, device=dev)  # sum of loss * batch size
    seen = 0
    for i, (images, targets) in enumerate(batches):
        step = epoch * steps_per_epoch + i
        images, targets = images.to(dev, non_blocking=True), targets.to(dev, non_blocking=True)
        if dev.type == "cuda" and cfg.train.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        lr = run.optimizer.param_groups[0]["lr"]
        loss = train_step(run, cfg, images, targets, amp, mixup)
        guard.add(loss, epoch, i, run.seed, lr)
        run.scheduler.step_update(step + 1)
        total += loss.double() * len(images)
        seen += len(images)
    guard.check()
    sums = group.total(torch.stack([total, torch.tensor(float(seen), dtype=torch.float64, device=dev)]))
    loss_sum, images = sums.tolist()
    return loss_sum / max(images, 1.0), seen


def evaluate_sums(model: PathEnsembleViT, loader: Iterable[Any], dev: torch.device) -> tuple[Tensor, int]:
    """Summed cross-entropy and correct counts of the model as configured and with every path kept, over a loader,
    accumulated on the device: ((3,) float64 [loss sum, correct, correct with all paths], images). In float32 even
    where training uses bf16 autocast (`train.amp`): bf16 logits tie and round, so accuracy and loss would depend on
    the training precision, and val/test metrics of a GPU trial would not compare with a CPU trial's."""
    model.eval()
    masks = torch.stack([model.keep, torch.ones_like(model.keep)])  # (2, P): as configured, all paths
    sums = torch.zeros(3, dtype=torch.float64, device=dev)
    count = 0
    with torch.no_grad():
        for images, targets in loader:
            if len(targets) == 0:  # a worker's part of a last batch smaller than the group (a shape, not a sync)
                continue
            images, targets = images.to(dev, non_blocking=True), targets.to(dev, non_blocking=True)
            features = model.forward_paths(images)  # (P, B, ...)
            logits = model.forward_masks(features, masks)  # (2, B, C)
            sums[0] += F.cross_entropy(logits[0], targets, reduction="sum")
            sums[1:] += (logits.argmax(-1) == targets).sum(dim=1)
            count += len(targets)
    return sums, count


def _evaluate(
    model: PathEnsembleViT, loader: Iterable[Any], dev: torch.device, prefix: str = "val", group: Group = Group()
) -> dict[str, float]:
    """`<prefix>_loss` / `<prefix>_acc` of the model as configured and `<prefix>_acc_full` (every path kept) on the
    loader's split (each worker's part, summed over the group), in float32, one trunk pass each batch and one host
    sync in all."""
    sums, count = evaluate_sums(model, loader, dev)
    sums = group.total(torch.cat([sums, torch.tensor([float(count)], dtype=torch.float64, device=dev)]))
    loss_sum, correct, correct_full, count = sums.tolist()
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
def _write_checkpoint(
    path: Path, runs: list[SeedRun], cfg: TrialConfig, epoch: int, metrics: dict[str, Any], dev: torch.device
) -> None:
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
    if dev.type == "cuda":  # a CPU trial never touches CUDA (no context on a GPU node it was given no GPU of)
        rng["cuda"] = torch.cuda.get_rng_state(dev)
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


def _restore(runs: list[SeedRun], path: Path, state: dict[str, Any], dev: torch.device) -> int:
    """Puts a checkpoint's weights, optimiser, schedule and RNG states into `runs` (built on `dev`, whichever device
    wrote it); returns its epoch."""
    if len(state["runs"]) != len(runs):
        raise ValueError(f"{path}: checkpoint holds {len(state['runs'])} seeds, the config asks for {len(runs)}")
    for k, (run, saved) in enumerate(zip(runs, state["runs"], strict=True)):
        run.model.load_state_dict(load_file(str(path / f"model_{k}.safetensors"), device=str(dev)))
        tensors = load_file(str(path / f"optimizer_{k}.safetensors"))
        optimizer_state = _join_optimizer_state(tensors, saved["optimizer"])
        run.optimizer.load_state_dict(_with_device_settings(optimizer_state, run.optimizer))
        run.scheduler.load_state_dict(saved["scheduler"])
        run.loader_generator.set_state(torch.tensor(saved["loader_generator"], dtype=torch.uint8))
        if "mask_generator" in saved:  # absent in checkpoints written before supernet training existed
            run.mask_generator.set_state(torch.tensor(saved["mask_generator"], dtype=torch.uint8))
    rng = load_file(str(path / "rng.safetensors"))
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and dev.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"], dev)
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


# how torch runs an optimiser step on a device, not what it learned: build_seed_run chooses them for its device
DEVICE_OPTIMIZER_SETTINGS = ("fused", "foreach", "capturable")


def _with_device_settings(sd: dict[str, Any], optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """An optimiser state_dict from a checkpoint with `optimizer`'s own device settings (`fused`, `foreach`,
    `capturable`) in its param groups. torch's `load_state_dict` takes them from the checkpoint: a CUDA checkpoint
    (fused=True) would make a CPU resume run the fused kernel (which torch before 2.4 has only on CUDA), a CPU one
    would take fused AdamW away from a CUDA resume. With this device's settings, torch also puts each state tensor
    where they want it (`step` as float32 on the parameter's device when fused, else where it was)."""
    if len(sd["param_groups"]) != len(optimizer.param_groups):
        return sd  # torch's load_state_dict says what is wrong
    groups = [
        {**saved, **{key: own[key] for key in DEVICE_OPTIMIZER_SETTINGS if key in own}}
        for saved, own in zip(sd["param_groups"], optimizer.param_groups, strict=True)
    ]
    return {**sd, "param_groups": groups}


def _join_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    for pid, entries in meta["scalars"].items():
        state.setdefault(int(pid), {}).update(entries)
    return {"state": state, "param_groups": meta["param_groups"]}


def _write_final_artifacts(
    ckpt: Path, runs: list[SeedRun], val_loader: Iterable[Any], dev: torch.device
) -> dict[str, Path]:
    """Path analysis (JSON + PNG) and the final PathConfig of each seed, inside the last checkpoint."""
    files: dict[str, Path] = {}
    for k, run in enumerate(runs):
        suffix = "" if k == 0 else f"_seed{k}"
        analysis = analyze_paths(run.model, val_loader, device=dev)
        analysis.meta.update(seed=run.seed)
        files[f"path_analysis{suffix}_json"] = analysis.save_json(ckpt / f"path_analysis{suffix}.json")
        try:
            files[f"path_analysis{suffix}_png"] = analysis.plot(ckpt / f"path_analysis{suffix}.png")
        except ModuleNotFoundError as err:  # a GPU image may have torch and timm only: the numbers are in the JSON
            if err.name != "matplotlib":
                raise
            warnings.warn(f"path analysis plot not drawn: matplotlib is not installed ({err})", stacklevel=2)
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
