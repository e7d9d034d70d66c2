"""The checks of a search file's values: ranges, the path configuration, the search settings, the space against
the trial sections, the tracking URI. Each returns its problems, one line each (file, dotted key, what, the value),
and pathsearch.config raises them together as one ConfigError.

pathsearch.config imports this module, so it takes the config dataclasses as plain objects (and the trial
dataclass, or its loader, as an argument where it needs them) rather than importing them. Imports no torch (nor
numpy, ray, optuna, mlflow).
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import math
import urllib.parse
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any, get_type_hints

from pathsearch.config.datasets import (
    HELD_OUT_VAL,
    MNIST_FOLDERS,
    SYNTHETIC_TRAIN_IMAGES,
    digits_split_sizes,
    mnist_missing,
)
from pathsearch.config.paths import FLOAT32_SAFE, PathConfig
from pathsearch.config.space import lookup_value
from pathsearch.config.typed import deep_copy, set_dotted

SEED_MAX = 2**32 - 1  # numpy's seeds end here (torch's and Optuna's go as far or further): every seed a run uses
MAX_PROCESSES = 1024  # threads or worker processes of one trial: more than any machine's cores
MAX_MASKS = 1024  # path masks a supernet step trains: the head runs once per mask
MAX_DEPTH = 256  # blocks of a ViT: timm's deepest have 48, and validation builds the model (about 10 ms a block)
MAX_WIDTH = 2**16  # any one width of a ViT (embed_dim, MLP units, heads, image, patch, channels, classes)
MAX_PARAMS = 2**34  # parameters of a trial's model: one process holds it, its gradients and AdamW's two moments
# The keyword arguments of timm's VisionTransformer that size it, and what each takes: whole numbers from 1 to
# MAX_WIDTH (depth: to MAX_DEPTH), img_size and patch_size also as [height, width]; mlp_ratio any number > 0 that
# leaves the MLP 1 to MAX_WIDTH hidden units; the dropout rates [0, 1).
VIT_WHOLE = ("depth", "embed_dim", "num_heads", "in_chans", "num_classes")
VIT_PAIRS = ("img_size", "patch_size")
VIT_RATES = ("drop_rate", "pos_drop_rate", "patch_drop_rate", "proj_drop_rate", "attn_drop_rate", "drop_path_rate")


def vit_kwargs_problems(kwargs: Mapping[str, Any], source: str) -> list[str]:
    """What timm's VisionTransformer cannot build, or no trial can train, among the `model.kwargs` that size it
    (VIT_WHOLE, VIT_PAIRS, mlp_ratio, VIT_RATES), one line each naming its key; [] when those are sound (the model
    is then built on the meta device by pathsearch.preflight, which finds the rest). Told before anything is built:
    a build of sizes timm cannot handle divides by zero, overflows or runs for ever."""
    problems = []

    def whole(value: Any, top: int) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= top

    for name in (*VIT_WHOLE, *VIT_PAIRS):
        if name not in kwargs:
            continue
        value, top = kwargs[name], MAX_DEPTH if name == "depth" else MAX_WIDTH
        pair = name in VIT_PAIRS and isinstance(value, list) and len(value) == 2 and all(whole(v, top) for v in value)
        if not (whole(value, top) or pair):
            form = " (or a [height, width] pair of them)" if name in VIT_PAIRS else ""
            why = "timm's deepest ViTs have 48 blocks" if name == "depth" else "no ViT comes near the top"
            problems.append(f"{source}: model.kwargs.{name}: must be a whole number from 1 to {top}{form} ({why}), "
                            f"got {value!r}")  # fmt: skip
    if "mlp_ratio" in kwargs:
        ratio, width = kwargs["mlp_ratio"], kwargs.get("embed_dim")
        number = isinstance(ratio, int | float) and not isinstance(ratio, bool) and 0 < ratio <= MAX_WIDTH  # not nan
        units = int(ratio * width) if number and whole(width, MAX_WIDTH) else 1  # (a model's own width: timm's)
        if not (number and 1 <= units <= MAX_WIDTH):
            problems.append(f"{source}: model.kwargs.mlp_ratio: must be a number > 0 giving the MLP 1 to {MAX_WIDTH} "
                            f"hidden units (mlp_ratio x embed_dim), got {ratio!r}")  # fmt: skip
    for name in VIT_RATES:
        rate = kwargs.get(name, 0.0)
        if isinstance(rate, bool) or not isinstance(rate, int | float) or not 0 <= rate < 1:
            problems.append(f"{source}: model.kwargs.{name}: must be a number in [0, 1) (a dropout rate), got {rate!r}")
    return problems


def trial_problems(trial: Any, source: str) -> list[str]:
    """What is wrong with a trial (a pathsearch.config.TrialConfig): value ranges, the split sizes, the data
    root and the path configuration."""
    problems: list[str] = []

    def need(ok: bool, key: str, value: Any, what: str) -> None:
        if not ok:
            problems.append(f"{source}: {key}: {what}, got {value!r}")

    t, d = trial.train, trial.data
    need(t.epochs >= 1, "train.epochs", t.epochs, "must be >= 1")
    need(t.seed >= 0, "train.seed", t.seed, "must be >= 0 (torch and numpy seeds)")
    need(t.seed <= SEED_MAX, "train.seed", t.seed, "must be at most 2**32 - 1 (numpy's seeds, the narrowest range)")
    need(d.split_seed >= 0, "data.split_seed", d.split_seed, "must be >= 0")
    need(d.split_seed <= SEED_MAX, "data.split_seed", d.split_seed, "must be at most 2**32 - 1, as every seed")
    need(t.seeds >= 1, "train.seeds", t.seeds, "must be >= 1")
    if 0 <= t.seed <= SEED_MAX:
        need(t.seed + t.seeds - 1 <= SEED_MAX, "train.seeds", t.seeds,
             f"the seeds train.seed ({t.seed}) to train.seed + seeds - 1 must be at most 2**32 - 1")  # fmt: skip
    need(t.eval_every >= 1, "train.eval_every", t.eval_every, "must be >= 1")
    need(t.lr > 0 and math.isfinite(t.lr), "train.lr", t.lr, "must be a finite number > 0")
    need(t.weight_decay >= 0, "train.weight_decay", t.weight_decay, "must be >= 0")
    need(t.warmup_epochs >= 0, "train.warmup_epochs", t.warmup_epochs, "must be >= 0")
    need(t.min_lr >= 0, "train.min_lr", t.min_lr, "must be >= 0")
    need(t.min_lr <= t.lr or not t.lr > 0, "train.min_lr", t.min_lr,
         f"must be at most train.lr ({t.lr:g}), where the cosine schedule starts")  # fmt: skip
    need(t.grad_clip is None or t.grad_clip > 0, "train.grad_clip", t.grad_clip, "must be > 0")
    need(t.threads is None or t.threads >= 1, "train.threads", t.threads, "must be >= 1")
    need(t.threads is None or t.threads <= MAX_PROCESSES, "train.threads", t.threads,
         "must be at most 1024 (more than any machine's cores: the rest only oversubscribe it)")  # fmt: skip
    sn = t.supernet
    need(sn.masks_per_batch >= 2, "train.supernet.masks_per_batch", sn.masks_per_batch,
         "must be >= 2 (the full and a minimal mask, then random ones)")  # fmt: skip
    need(sn.masks_per_batch <= MAX_MASKS, "train.supernet.masks_per_batch", sn.masks_per_batch,
         "must be at most 1024 (every step runs the head once per mask)")  # fmt: skip
    need(0 < sn.keep_prob <= 1, "train.supernet.keep_prob", sn.keep_prob, "must be in (0, 1]")
    need(sn.min_kept >= 1, "train.supernet.min_kept", sn.min_kept, "must be >= 1")
    kwargs_said = vit_kwargs_problems(trial.model.kwargs, source)
    problems += kwargs_said
    depth = trial.model.kwargs.get("depth")
    depth = depth if isinstance(depth, int) and not kwargs_said else None  # checked there, with the other sizes
    if depth is not None:
        need(sn.min_kept <= 2 * depth + 1, "train.supernet.min_kept", sn.min_kept,
             f"must be <= {2 * depth + 1}, the number of paths of a depth-{depth} ViT")  # fmt: skip
    need(d.batch_size >= 1, "data.batch_size", d.batch_size, "must be >= 1")
    need(d.eval_batch_size >= 1, "data.eval_batch_size", d.eval_batch_size, "must be >= 1")
    need(d.img_size is None or 1 <= d.img_size <= MAX_WIDTH, "data.img_size", d.img_size,
         "must be a whole number from 1 to 65536 (pixels)")  # fmt: skip
    need(d.num_workers >= 0, "data.num_workers", d.num_workers, "must be >= 0")
    need(d.num_workers <= MAX_PROCESSES, "data.num_workers", d.num_workers,
         "must be at most 1024 (more than any machine's cores: the rest only oversubscribe it)")  # fmt: skip
    need(d.train_size is None or d.train_size >= 1, "data.train_size", d.train_size, "must be >= 1")
    need(d.val_size is None or d.val_size >= 1, "data.val_size", d.val_size, "must be >= 1")
    sizes_ok = (d.train_size is None or d.train_size >= 1) and (d.val_size is None or d.val_size >= 1)
    train_images = None  # the training split's size, where the config tells it
    if d.name == "synthetic" and sizes_ok:
        train_images = d.train_size or SYNTHETIC_TRAIN_IMAGES
    if d.name == "digits" and sizes_ok:
        try:
            train_images = digits_split_sizes(d.train_size, d.val_size)[0]
        except ValueError as err:  # blame val_size when it was set and train_size alone is fine
            train_ok = d.train_size is None or d.train_size >= 10
            key = "val_size" if d.val_size is not None and train_ok else "train_size"
            need(False, f"data.{key}", getattr(d, key), str(err))
    if d.name in HELD_OUT_VAL and sizes_ok:
        what, total, default_val = HELD_OUT_VAL[d.name]
        val = default_val if d.val_size is None else d.val_size
        left = total - val
        need(left > 0, "data.val_size", val, f"must be < {total}, the {what} training images")
        need(d.train_size is None or d.train_size <= left, "data.train_size", d.train_size,
             f"must be <= {left}, the {what} training images left by val_size {val}")  # fmt: skip
        train_images = d.train_size or left if left > 0 and (d.train_size or 0) <= left else None
    if train_images is not None and (d.mixup > 0 or d.cutmix > 0):  # (without them a larger batch is the split)
        need(d.batch_size <= train_images, "data.batch_size", d.batch_size,
             f"must be at most {train_images}, the training images of dataset {d.name!r}, with mixup or cutmix: "
             "they drop a last partial batch, so an epoch would train on none")  # fmt: skip
    need(d.mixup >= 0, "data.mixup", d.mixup, "must be >= 0")
    need(d.cutmix >= 0, "data.cutmix", d.cutmix, "must be >= 0")
    need(0 <= d.label_smoothing < 1, "data.label_smoothing", d.label_smoothing, "must be in [0, 1)")
    need(d.name not in ("cifar10", "cifar100", "imagefolder") or bool(d.root), "data.root", d.root, "is required")
    if d.root and d.name == "imagefolder":
        for split in ("train", "val"):
            folder = Path(d.root).expanduser() / split
            need(folder.is_dir(), "data.root", d.root, f"needs a {split}/ folder ({folder} does not exist)")
    if d.root and d.name in ("cifar10", "cifar100") and not d.download:
        need(Path(d.root).expanduser().is_dir(), "data.root", d.root, "does not exist (or set data.download)")
    if d.name in MNIST_FOLDERS and not d.download:
        missing = mnist_missing(d.name, d.root)
        need(missing is None, "data.root", d.root, str(missing))
    need(
        trial.model.pos_embed_std is None or trial.model.pos_embed_std > 0,
        "model.pos_embed_std",
        trial.model.pos_embed_std,
        "must be > 0",
    )
    need(trial.model.pos_embed_std is None or trial.model.pos_embed_std <= FLOAT32_SAFE, "model.pos_embed_std",
         trial.model.pos_embed_std, "must be at most 1e15 (activations scaled by it are squared and summed in "
         "float32, which ends at 3.4e38)")  # fmt: skip
    problems += weights_problems(trial.model, source)
    problems += pos_embed_problems(trial.model, source)
    m = trial.model
    whole = m.path_config()
    parts = (  # each part of the path configuration on its own, so that a problem names its key
        ("pruned", PathConfig(pruned=list(m.pruned))),
        ("ensemble_scale", PathConfig(ensemble_scale=whole.ensemble_scale)),
        ("distill", PathConfig(distill=whole.distill)),
    )
    for key, part in parts:
        try:
            part.validate(depth)
        except ValueError as err:  # its messages name the value; most start with the key below `model.`
            said = str(err)
            problems.append(f"{source}: model.{said if said.startswith(key + '.') else f'{key}: {said}'}")
    return problems


def weights_problems(m: Any, source: str) -> list[str]:
    """What is wrong with where a model's pretrained weights come from (a pathsearch.config.ModelConfig), told without
    reading them: one source at most, and a weights file that is there (pathsearch.preflight reads it and checks that
    it fills the model)."""
    if m.weights is None:
        return []
    where = f"{source}: model.weights"
    if m.pretrained:
        return [
            f"{where}: a weights file and timm's published weights (model.pretrained: true) are two starting points; "
            f"keep one, got {m.weights!r}"
        ]
    if not m.weights.strip():
        return [f"{where}: must name a checkpoint file (leave it out, or null, for random weights), got {m.weights!r}"]
    try:
        path = Path(m.weights).expanduser()
        folder, there = path.is_dir(), path.is_file()
    except (OSError, ValueError, RuntimeError) as err:  # no file system holds the name (too long, a NUL, ~nobody)
        return [f"{where}: not a file name this machine can open ({err}), got {m.weights!r}"]
    if folder:
        return [f"{where}: is a folder; give the checkpoint file in it, got {m.weights!r}"]
    return [] if there else [f"{where}: no such file, got {m.weights!r}"]


def pos_embed_problems(m: Any, source: str) -> list[str]:
    """Position embeddings are re-initialised over pretrained ones (model.pretrained or model.weights) only when the
    file says so: otherwise `pos_embed_std` would silently replace them."""
    problems = []
    pretrained = m.pretrained or m.weights is not None
    if m.pos_embed_std is not None and pretrained and not m.reinit_pos_embed:
        problems.append(
            f"{source}: model.pos_embed_std: would overwrite the pretrained position embeddings; leave it out, or set "
            f"model.reinit_pos_embed: true to replace them, got {m.pos_embed_std!r}"
        )
    if m.reinit_pos_embed and m.pos_embed_std is None:
        problems.append(
            f"{source}: model.reinit_pos_embed: needs model.pos_embed_std, the std of the new position embeddings, "
            f"got {m.reinit_pos_embed!r}"
        )
    return problems


METRICS = ("val_acc", "val_loss", "val_acc_full", "train_loss", "kept_paths", "params", "images_per_s")


def search_problems(s: Any, source: str) -> list[str]:
    """What is wrong with the search section (a pathsearch.config.SearchConfig)."""
    problems: list[str] = []

    def need(ok: bool, key: str, value: Any, what: str) -> None:
        if not ok:
            problems.append(f"{source}: search.{key}: {what}, got {value!r}")

    need(len(s.metrics) >= 1, "metric", s.metric, "must name at least one metric")
    for metric in s.metrics:
        need(metric in METRICS, "metric", metric, f"unknown metric (known: {', '.join(METRICS)})")
    need(len(s.metrics) == len(s.modes), "mode", s.mode, f"needs one mode per metric ({len(s.metrics)})")
    need(len(set(s.metrics)) == len(s.metrics), "metric", s.metric, "lists a metric twice")
    need(s.num_samples >= 1, "num_samples", s.num_samples, "must be >= 1")
    need(s.max_concurrent_trials is None or s.max_concurrent_trials >= 1, "max_concurrent_trials",
         s.max_concurrent_trials, "must be >= 1")  # fmt: skip
    need(s.grace_period >= 1, "grace_period", s.grace_period, "must be >= 1")
    need(s.reduction_factor > 1, "reduction_factor", s.reduction_factor, "must be > 1")
    need(s.max_failures >= 0, "max_failures", s.max_failures, "must be >= 0")
    need(s.time_budget_s is None or s.time_budget_s > 0, "time_budget_s", s.time_budget_s, "must be > 0")
    need(math.isfinite(s.autoscaler_wait_min) and s.autoscaler_wait_min > 0, "autoscaler_wait_min",
         s.autoscaler_wait_min, "must be a finite number of minutes > 0")  # fmt: skip
    need(s.max_kept_paths is None or s.max_kept_paths >= 1, "max_kept_paths", s.max_kept_paths, "must be >= 1")
    need(s.max_params is None or s.max_params >= 1, "max_params", s.max_params, "must be >= 1")
    for name, amount in s.resources_per_trial.items():
        problems.extend(resource_problems(name, amount, source))
    problems += group_problems(s, source)
    need(len(s.metrics) == 1 or s.scheduler == "none", "scheduler", s.scheduler,
         "ASHA needs a single metric; use scheduler: none with several")  # fmt: skip
    need(len(s.metrics) > 1 or s.sampler != "nsga2", "sampler", s.sampler, "nsga2 is for several metrics")
    two = s.two_stage
    need(two.top_k >= 1, "two_stage.top_k", two.top_k, "must be >= 1")
    need(two.proxy_trials >= 1, "two_stage.proxy_trials", two.proxy_trials, "must be >= 1")
    need(two.proxy_batch >= 1, "two_stage.proxy_batch", two.proxy_batch, "must be >= 1")
    need(two.supernet_epochs is None or two.supernet_epochs >= 1, "two_stage.supernet_epochs", two.supernet_epochs,
         "must be >= 1")  # fmt: skip
    need(two.supernet_cpus is None or two.supernet_cpus > 0, "two_stage.supernet_cpus", two.supernet_cpus,
         "must be > 0")  # fmt: skip
    if s.strategy == "two_stage":
        need(s.metrics in (["val_acc"], ["val_loss"]), "metric", s.metric,
             "a two_stage search ranks by one metric the supernet can score: val_acc or val_loss")  # fmt: skip
        need(s.confirm.enabled, "confirm", s.confirm,
             "a two_stage search trains its top configurations in the confirmation: add search.confirm")  # fmt: skip
    c = s.confirm
    need(c.top_k >= 1, "confirm.top_k", c.top_k, "must be >= 1")
    if c.enabled and s.strategy == "full":  # the baseline is one of the search's trials (two_stage: confirms them all)
        need(c.top_k <= s.num_samples - 1, "confirm.top_k", c.top_k,
             f"a search of num_samples {s.num_samples} trials (the baseline among them) has at most "
             f"{s.num_samples - 1} other configurations to confirm")  # fmt: skip
    need(0 <= s.seed <= SEED_MAX, "seed", s.seed, "must be 0 to 2**32 - 1 (Optuna's samplers take those seeds)")
    need(c.seeds >= 2, "confirm.seeds", c.seeds, "must be >= 2 (a spread and a confidence interval need two seeds)")
    need(c.first_seed is None or c.first_seed >= 0, "confirm.first_seed", c.first_seed, "must be >= 0")
    need(c.first_seed is None or c.first_seed <= SEED_MAX, "confirm.first_seed", c.first_seed,
         "must be at most 2**32 - 1 (numpy's seeds)")  # fmt: skip
    for key, count in (("confirm.seeds", c.seeds), ("confirm.max_seeds", c.max_seeds)):
        last = (c.first_seed or 0) + (count or 1) - 1  # the last seed the confirmation trains
        need(last <= SEED_MAX or (c.first_seed or 0) > SEED_MAX, key, count, "the confirmation's seeds, from "
             f"confirm.first_seed ({c.first_seed or 0}), must be at most 2**32 - 1 (numpy's seeds)")  # fmt: skip
    need(c.max_concurrent_trials is None or c.max_concurrent_trials >= 1, "confirm.max_concurrent_trials",
         c.max_concurrent_trials, "must be >= 1")  # fmt: skip
    need(c.max_seeds is None or c.max_seeds >= c.seeds, "confirm.max_seeds", c.max_seeds,
         f"must be >= confirm.seeds ({c.seeds}), the first round")  # fmt: skip
    need(c.step >= 1, "confirm.step", c.step, "must be >= 1 (seeds each later round adds)")
    need(math.isfinite(c.min_effect) and c.min_effect >= 0, "confirm.min_effect", c.min_effect,
         "must be a finite number >= 0 (in the metric's units: 0.0025 is a quarter point of accuracy)")  # fmt: skip
    need(0 < c.alpha <= 0.5, "confirm.alpha", c.alpha, "must be in (0, 0.5]")
    return problems


RAY_RESOURCES = ("cpu", "gpu", "memory")  # resources_per_trial's names of Ray's own resources (memory in bytes)
WORKERS = "workers"  # resources_per_trial's one name that is not a resource: how many workers train a trial


def trial_workers(resources: Mapping[str, float]) -> int:
    """How many data-parallel workers (one process each, a Ray Train worker group) train one trial of
    `resources` (a search's resources_per_trial): its `workers`, 1 when absent (one process, no worker group)."""
    return int(resources.get(WORKERS, 1))


def worker_resources(resources: Mapping[str, float]) -> dict[str, float]:
    """One worker's resources: resources_per_trial without `workers`. With workers > 1, cpu, gpu and custom
    resources are each worker's (a worker given no cpu gets 1, as Ray Train gives it); with one worker they are
    the trial's, which is the same thing."""
    own = {name: float(amount) for name, amount in resources.items() if name != WORKERS}
    if trial_workers(resources) > 1 and not {"cpu", "CPU"} & set(own):  # (placement passes Ray's names)
        own["cpu"] = 1.0
    return own


def resource_problems(name: str, amount: Any, source: str) -> list[str]:
    """What is wrong with one `search.resources_per_trial` entry: a non-number, a non-positive or infinite amount,
    or a GPU amount above 1 (a trial, or each of its workers, trains on one GPU: Ray would reserve the others and
    they would sit idle); `workers` must be a whole number >= 1."""
    key = f"{source}: search.resources_per_trial.{name}"
    if name == WORKERS:  # a count, not an amount: 2.0 or '2' is a mistake, not a number of processes
        if isinstance(amount, bool) or not isinstance(amount, int) or amount < 1:
            return [f"{key}: must be a whole number >= 1 (the trial's data-parallel workers, one per process; an "
                    f"integer, not 2.0 or '2'), got {amount!r}"]  # fmt: skip
        return []
    near = difflib.get_close_matches(name.lower(), (*RAY_RESOURCES, WORKERS), n=1, cutoff=0.6)
    if name not in RAY_RESOURCES and near:  # other names are custom resources, which nodes declare themselves
        return [
            f"{key}: not a resource Ray knows (did you mean {near[0]!r}? Ray's own are {', '.join(RAY_RESOURCES)}, "
            f"and {WORKERS} sets a trial's worker count; any other name is a custom resource that some node must "
            f"declare), got {name!r}: {amount!r}"
        ]
    if isinstance(amount, bool) or not isinstance(amount, int | float):
        return [f"{key}: must be a number, got {amount!r}"]
    if not (amount > 0 and math.isfinite(amount)):
        return [f"{key}: must be a finite number > 0, got {amount!r}"]
    if name == "gpu" and amount > 1:
        return [f"{key}: must be at most 1: a trial trains on one GPU (a share, e.g. 0.25, packs trials on a GPU), "
                f"got {amount!r}"]  # fmt: skip
    return []


def group_problems(s: Any, source: str) -> list[str]:
    """What a search (a pathsearch.config.SearchConfig) cannot do with its trials split over workers (Ray Train,
    one worker per GPU): share a GPU between workers, or train a two_stage search's supernet and proxy step, which
    run in one process."""
    workers = s.resources_per_trial.get(WORKERS, 1)
    if not (isinstance(workers, int) and workers > 1):
        return []  # one process (or a bad count, said by resource_problems)
    key = f"{source}: search.resources_per_trial"
    problems = []
    gpu = s.resources_per_trial.get("gpu")
    if isinstance(gpu, int | float) and 0 < gpu < 1:
        problems.append(
            f"{key}.gpu: a worker group trains one worker per whole GPU (workers: {workers}): give each worker "
            f"gpu 1, or leave gpu out to train on CPUs, got {gpu!r}"
        )
    if s.strategy == "two_stage":
        problems.append(
            f"{key}.{WORKERS}: the supernet and its proxy step train in one process, so two_stage trials cannot "
            f"be split over workers (search.strategy: two_stage); leave workers out or use strategy full, "
            f"got {workers!r}"
        )
    return problems


BATCH_KEY = "data.batch_size"
MIX_KEYS = ("data.mixup", "data.cutmix")


def batch_split_problems(trial: Any, search: Any, space: Any, source: str) -> list[str]:
    """With workers > 1 the global batch (data.batch_size) is split evenly over the workers, and with mixup or
    cutmix on (or searched) each worker's share must be even (timm's Mixup mixes a batch with its flip): the base
    value and every value a `space.data.batch_size` entry samples (each choice, or each point of an integer
    range) must be a multiple of the workers (twice that with mixing)."""
    workers = search.resources_per_trial.get(WORKERS, 1)
    if not (isinstance(workers, int) and workers > 1):
        return []
    d = trial.data
    mixed = d.mixup > 0 or d.cutmix > 0
    for entry in space.entries:
        if entry.key in MIX_KEYS:
            mixed = mixed or any(isinstance(v, int | float) and v > 0 for v in entry.dist.extremes())
    split = 2 * workers if mixed else workers
    why = (
        f"the global batch is split evenly over the trial's {workers} workers (search.resources_per_trial.workers)"
        + (", and mixup/cutmix needs an even batch on each worker" if mixed else "")
        + f", so it must be a multiple of {split}"
    )
    problems = []
    if d.batch_size % split:
        problems.append(f"{source}: {BATCH_KEY}: {why}, got {d.batch_size!r}")
    for entry in space.entries:
        if entry.key != BATCH_KEY:
            continue
        dist = entry.dist
        values: Any = dist.choices
        if values is None and all(isinstance(v, int) for v in (dist.low, dist.high, dist.step or 1)):
            values = range(dist.low, dist.high + 1, dist.step or 1)  # Optuna's suggest_int grid
        bad = next((v for v in values or [] if isinstance(v, int) and v % split), None)
        if bad is not None:
            problems.append(f"{source}: space.{BATCH_KEY}: {why}, got {bad!r} (a value the space samples)")
    return problems


def confirm_test_problems(trial: Any, search: Any, space: Any, source: str) -> list[str]:
    """Only confirmation trials read the test split: never the search's own trials, and a confirmation needs one."""
    problems = []
    if trial.train.test:
        problems.append(
            f"{source}: train.test: a search's trials never read the test split (the confirmation stage does), "
            f"got {trial.train.test!r}"
        )
    if any(e.key == "train.test" for e in space.entries):
        problems.append(f"{source}: space.train.test: the test split is not a search parameter")
    d = trial.data
    if search.confirm.enabled and d.name == "imagefolder" and d.root and Path(d.root).expanduser().is_dir():
        folder = Path(d.root).expanduser() / "test"
        if not folder.is_dir():
            problems.append(
                f"{source}: search.confirm: the confirmation reports on a test split, but data.root {d.root!r} has no "
                f"test/ folder ({folder} does not exist); add one or set search.confirm.enabled: false"
            )
    return problems


PATH_SPACE_KEYS = ("model.pruned", "model.ensemble_scale.init")  # what a supernet's cached features can score


def two_stage_problems(trial: Any, space: Any, source: str) -> list[str]:
    """A two_stage search scores only path entries from the supernet's cached features."""
    problems = []
    for entry in space.entries:
        if entry.key not in PATH_SPACE_KEYS:
            problems.append(
                f"{source}: space.{entry.key}: a two_stage search scores only {' and '.join(PATH_SPACE_KEYS)} "
                "from the supernet; search this key with strategy full"
            )
    keys = {entry.key for entry in space.entries}
    if not keys & set(PATH_SPACE_KEYS):
        problems.append(f"{source}: space: a two_stage search needs a model.pruned or model.ensemble_scale.init entry")
    scope = trial.model.ensemble_scale.scope
    if "model.ensemble_scale.init" in keys and scope != "ensemble":
        problems.append(
            f"{source}: model.ensemble_scale.scope: a two_stage search of EnsembleScale needs scope 'ensemble' "
            f"(with 'both' the scales change the trunk, so cached path features cannot score them), got {scope!r}"
        )
    return problems


def probe_space(
    base: Mapping[str, Any],
    space: Any,
    source: str,
    trial_type: type,
    point_problems: Callable[[dict[str, Any], str], list[str]],
    known: Collection[str] = (),
) -> list[str]:
    """Checks each space entry's key and extreme values against the trial config's types and ranges, and what the
    trial will meet (the model built from the configuration): at each extreme value of each entry, and at each
    corner of the model.kwargs entries together (at most MAX_CORNERS: a model is built at each), as those interact
    (embed_dim and num_heads, img_size and patch_size).

    `base` is the file's trial sections; `trial_type` the trial dataclass, whose dotted keys the entries name;
    `point_problems(sections, source)` is every problem of one point's trial sections; `known` are the base's own,
    which a point repeats and which are said once, by the base.
    """
    problems: list[str] = []
    points: list[dict[str, Any]] = []
    for entry in space.entries:
        if entry.key in PATH_SPACE_KEYS:
            continue
        if not key_exists(trial_type, entry.key):
            near = difflib.get_close_matches(entry.key, dotted_keys(trial_type), n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            problems.append(f"{source}: space.{entry.key}: no such key in the model/data/train sections{hint}")
            continue
        points += [{entry.key: value} for value in entry.dist.extremes()]
    model = [e for e in space.entries if e.key.startswith("model.kwargs.") and e.key not in PATH_SPACE_KEYS]
    if len(model) > 1:
        corners = itertools.islice(itertools.product(*(e.dist.extremes() for e in model)), MAX_CORNERS)
        points += [{e.key: value for e, value in zip(model, corner, strict=True)} for corner in corners]
    bad: set[str] = set()  # entries (or "corners") already said: one line each
    for point in points:
        label = next(iter(point)) if len(point) == 1 else "corners"
        if label in bad:
            continue
        probe = deep_copy(dict(base))
        for key, value in point.items():
            set_dotted(probe, key, value)
        said = [p for p in point_problems(probe, source) if p not in known]
        if said:
            bad.add(label)
            why = "; ".join(p.split(": ", 1)[1] for p in said)
            if len(point) == 1:
                key, value = next(iter(point.items()))
                problems.append(f"{source}: space.{key}: value {value!r} is invalid ({why})")
            else:
                where = ", ".join(f"{k}={v!r}" for k, v in point.items())
                problems.append(f"{source}: space: the point {where} (extremes of its entries) is invalid ({why})")
    return problems


MAX_CORNERS = 64


def dotted_keys(node: Any, prefix: str = "") -> list[str]:
    """Every dotted key of a config dataclass (the trial's: model.kwargs as `model.kwargs.*`), for suggestions."""
    keys = []
    for f in dataclasses.fields(node):
        tp = get_type_hints(node)[f.name]
        if dataclasses.is_dataclass(tp):
            keys += dotted_keys(tp, f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def key_exists(trial_type: type, key: str) -> bool:
    """Whether `key` names a value of the trial dataclass (any `model.kwargs.<name>`: timm kwargs are free-form)."""
    node: Any = trial_type
    parts = key.split(".")
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(node):
            return False
        hints = get_type_hints(node)
        if part not in hints:
            return False
        node = hints[part]
        if parts[0] == "model" and i == 1 and part == "kwargs":
            return len(parts) == 3  # timm kwargs are free-form: model.kwargs.<name>
    return not dataclasses.is_dataclass(node)


def baseline_problems(base: Mapping[str, Any], space: Any, source: str) -> list[str]:
    """Every search trains the baseline first, as a point of its space that Optuna is told to try (no path pruned,
    EnsembleScale init 1.0, every other searched key at its base value): each of those values must be a point of
    its entry, or the search would stop once it had started. `base`: the trial sections of the file."""
    problems = []
    for entry in space.entries:
        value: Any
        if entry.key == "model.pruned":
            if entry.by != "shortest":
                continue  # flags: keeping every path is always a point
            value, what = 0, "pruning no path, k = 0"
        elif entry.key == "model.ensemble_scale.init":
            value, what = 1.0, "EnsembleScale init 1.0"
        else:
            value = lookup_value({}, base, entry.key)
            if value is None or any(lookup_value({}, base, k) != v for k, v in entry.when.items()):
                continue  # not set in the base (sampled for the baseline too), or its condition does not hold
            what = f"the base value {entry.key}: {value!r}"
        why = entry.dist.excludes(value)
        if why is not None:
            problems.append(
                f"{source}: space.{entry.key}: the baseline ({what}) is trained first as a point of the space, but "
                f"{why}; widen the space or change the base value, got {value!r}"
            )
    return problems


def condition_problems(base: Mapping[str, Any], space: Any, source: str, trial_type: type) -> list[str]:
    """Each `when: {key: value}` of the space must be able to hold: `key` is an earlier entry that can sample
    `value`, or a key of the trial sections (`base`, of type `trial_type`) whose base value is `value`; otherwise
    its entry is never sampled."""
    entries = {entry.key: entry for entry in space.entries}
    problems = []
    for entry in space.entries:
        for key, value in entry.when.items():
            where = f"{source}: space.{entry.key}.when.{key}"
            if key in entries:
                why = entries[key].dist.excludes(value)
                if why is not None:
                    problems.append(f"{where}: the condition never holds ({why}), got {value!r}")
            elif not key_exists(trial_type, key):
                near = difflib.get_close_matches(key, [*entries, *dotted_keys(trial_type)], n=1)
                hint = f" (did you mean {near[0]!r}?)" if near else ""
                problems.append(
                    f"{where}: no such key in the space or the model/data/train sections{hint}, got {value!r}"
                )
            elif lookup_value({}, base, key) != value:
                problems.append(
                    f"{where}: the condition never holds: {key} is not searched and its base value is "
                    f"{lookup_value({}, base, key)!r}, got {value!r}"
                )
    return problems


def enqueue_problems(search: Any, space: Any, source: str) -> list[str]:
    """`search.enqueue` points are told to Optuna as they are: each name must be a parameter of the space and each
    value a point of its distribution."""
    dists = space.param_dists()
    problems = []
    for i, point in enumerate(search.enqueue):
        for name, value in point.items():
            where = f"{source}: search.enqueue[{i}].{name}"
            if name not in dists:
                problems.append(f"{where}: not a parameter of the space (its parameters: {', '.join(dists)})")
            elif (why := dists[name].excludes(value)) is not None:
                problems.append(f"{where}: an enqueued point must be a point of the space, but {why}, got {value!r}")
    return problems


def budget_problems(base: Mapping[str, Any], search: Any, space: Any, source: str) -> list[str]:
    """Every search trains the baseline first (no path pruned by the space, else the base's `model.pruned`), and a
    configuration that keeps more paths than `search.max_kept_paths` is never trained: a budget below the baseline's
    paths leaves the search without its baseline."""
    cap = search.max_kept_paths
    if cap is None or cap < 1:
        return []  # no budget, or one the range check refuses
    searched = any(entry.key == "model.pruned" for entry in space.entries)
    pruned = [] if searched else lookup_value({}, base, "model.pruned") or []
    kept = space.num_paths - len(pruned)
    if cap >= kept:
        return []
    return [
        f"{source}: search.max_kept_paths: every search trains the baseline first, which keeps {kept} of the "
        f"{space.num_paths} paths, and a configuration keeping more than max_kept_paths is never trained; must be "
        f">= {kept}, got {cap!r}"
    ]


MLFLOW_NAME_MAX = 500  # characters of an MLflow experiment name (mlflow.utils.validation)


def experiment_problems(name: str, source: str) -> list[str]:
    """What MLflow, or the one-line output naming it, cannot take as an experiment name: an empty or blank one, one
    with spaces around it (`--experiment NAME` would not find it), a line break or control character, or more than
    MLflow's 500 characters. A slash is allowed: Databricks names experiments by workspace path (/Users/me/x)."""
    where = f"{source}: tracking.experiment"
    if not name.strip():
        return [f"{where}: must not be empty (MLflow refuses it; leave it out for 'pathsearch'), got {name!r}"]
    if name != name.strip():
        return [f"{where}: must not start or end with spaces (`--experiment` would not find it), got {name!r}"]
    if any(not ch.isprintable() for ch in name):
        return [f"{where}: must be one line of printable characters, got {name!r}"]
    if len(name) > MLFLOW_NAME_MAX:
        return [f"{where}: must be at most {MLFLOW_NAME_MAX} characters (MLflow's limit), got {name[:40]!r}..."]
    return []


# MLflow's tracking stores by URI scheme ("" a folder): its file and database stores, a tracking server, Databricks
TRACKING_SCHEMES = ("", "file", "sqlite", "postgresql", "mysql", "mssql", "http", "https", "databricks")


def tracking_uri_problems(uri: str | None, where: str) -> list[str]:
    """What can be told of an MLflow tracking URI before it is used: its scheme is one MLflow opens, a server URI
    has a host, and a local store's folder or SQLite file can be made where it points. `where` names the flag or
    the file's key."""
    if uri is None:
        return []
    split = urllib.parse.urlsplit(uri)
    scheme = split.scheme.lower().split("+")[0] if len(split.scheme) > 1 else ""  # postgresql+psycopg2; C: a drive
    scheme = scheme.removesuffix("-uc")  # databricks-uc
    if not uri.strip():
        return [f"{where}: must not be empty (leave it out for sqlite:///mlflow.db), got {uri!r}"]
    if scheme not in TRACKING_SCHEMES:
        known = ", ".join(f"{s}://" for s in TRACKING_SCHEMES if s) + " or a folder"
        return [f"{where}: not a tracking URI MLflow opens (it opens {known}), got {uri!r}"]
    if scheme in ("http", "https") and not split.hostname:
        return [f"{where}: a tracking server URI needs a host (http://HOST:PORT), got {uri!r}"]
    if scheme == "sqlite":
        file = uri.partition(":///")[2]
        if not file or file == ":memory:":
            return [f"{where}: an SQLite store needs a file (sqlite:///mlflow.db), got {uri!r}"]
        local, kind = Path(file), "file"
    elif scheme in ("", "file"):
        local, kind = Path(urllib.parse.unquote(split.path) if scheme else uri).expanduser(), "folder"
    else:
        return []
    if kind == "folder" and local.exists() and not local.is_dir():
        return [f"{where}: {local} is a file; a local MLflow store is a folder, got {uri!r}"]
    if kind == "file" and local.is_dir():
        return [f"{where}: {local} is a folder; an SQLite store is a file, got {uri!r}"]
    above = local.parents if kind == "file" else [local, *local.parents]  # an SQLite file may exist already
    parent = next((p for p in above if p.exists()), None)
    if parent is not None and not parent.is_dir():
        return [f"{where}: {parent} is a file, so {local} cannot be made, got {uri!r}"]
    if kind == "file" and not local.parent.is_dir():
        return [f"{where}: the folder {local.parent} does not exist (SQLite makes a file, not folders), got {uri!r}"]
    return []
