"""The sections of a search file as typed dataclasses (model, data, train: the trial; search, space, tracking: the
search), loaded from YAML with `--set` overrides (typed.py) and validated as a whole.

Errors name the file, the dotted key and the value, one line per problem. Imports no torch (nor ray, optuna,
mlflow), so configs can be read and checked anywhere.
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import math
import os
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_type_hints

import yaml

from pathsearch.paths import DistillConfig, EnsembleScaleConfig, PathConfig
from pathsearch.space import lookup_value, parse_space
from pathsearch.typed import ConfigError, apply_overrides, deep_copy, from_dict, load_yaml, set_dotted, to_dict

# Top-level sections of a search file; the search-only ones (search, space, tracking) are read by the search.
SECTIONS = {"model", "data", "train", "search", "space", "tracking"}
DatasetName = Literal["digits", "synthetic", "cifar10", "cifar100", "fashion_mnist", "mnist", "imagefolder"]


@dataclass
class EnsembleScaleSection:
    kind: Literal["scalar", "vector"] = "scalar"
    scope: Literal["ensemble", "both"] = "ensemble"
    init: float | dict[str, float] = 1.0
    learnable: bool = True


@dataclass
class DistillSection:
    alpha: float = 0.0
    temperature: float = 1.0
    students: list[int | str] = field(default_factory=list)


@dataclass
class ModelConfig:
    """The timm ViT and its path configuration. `kwargs` go to `timm.create_model` (img_size, depth, ...)."""

    name: str = "vit_tiny_patch16_224"
    pretrained: bool = False
    kwargs: dict[str, Any] = field(default_factory=dict)
    pos_embed_std: float | None = None  # re-initialise position embeddings (std 1.0 trains digits far faster)
    pruned: list[str] = field(default_factory=list)
    ensemble_scale: EnsembleScaleSection = field(default_factory=EnsembleScaleSection)
    distill: DistillSection = field(default_factory=DistillSection)

    def path_config(self) -> PathConfig:
        scale, distill = self.ensemble_scale, self.distill
        init = dict(scale.init) if isinstance(scale.init, Mapping) else scale.init
        return PathConfig(
            model_name=self.name,
            model_kwargs=dict(self.kwargs),
            pruned=list(self.pruned),
            ensemble_scale=EnsembleScaleConfig(scale.kind, scale.scope, init, scale.learnable),
            distill=DistillConfig(distill.alpha, distill.temperature, list(distill.students)),
        )


DIGITS_IMAGES = 1797  # the UCI digits data.py loads; counted here because data.py imports torch
CIFAR_TRAIN_IMAGES = 50000  # the official CIFAR-10/100 training set, which the validation slice is drawn from
CIFAR_VAL_SIZE = 5000  # default size of that slice
MNIST_TRAIN_IMAGES = 60000  # the official MNIST / Fashion-MNIST training set, which the validation slice is drawn from
MNIST_VAL_SIZE = 5000  # default size of that slice: as CIFAR's, and MNIST's customary 55,000 / 5,000 split
# The IDX files torchvision's MNIST / FashionMNIST read from ROOT/<folder>/raw/ (uncompressed)
MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
MNIST_FOLDERS = {"fashion_mnist": "FashionMNIST", "mnist": "MNIST"}  # torchvision's class names
FASHION_MNIST_DEBIAN = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist: the four .gz files
# name: (what errors call it, official training images, default val_size); val is a seeded slice of the training set
HELD_OUT_VAL = {
    "cifar10": ("CIFAR", CIFAR_TRAIN_IMAGES, CIFAR_VAL_SIZE),
    "cifar100": ("CIFAR", CIFAR_TRAIN_IMAGES, CIFAR_VAL_SIZE),
    "fashion_mnist": ("Fashion-MNIST", MNIST_TRAIN_IMAGES, MNIST_VAL_SIZE),
    "mnist": ("MNIST", MNIST_TRAIN_IMAGES, MNIST_VAL_SIZE),
}


def default_data_root() -> Path:
    """Where `mnist` and `fashion_mnist` live without `data.root`: $XDG_CACHE_HOME (or ~/.cache)/pathsearch/datasets."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pathsearch" / "datasets"


def mnist_raw_folder(name: str, root: str | None) -> Path:
    """ROOT/MNIST/raw or ROOT/FashionMNIST/raw, where torchvision reads (and downloads) the IDX files."""
    base = Path(root).expanduser() if root else default_data_root()
    return base / MNIST_FOLDERS[name] / "raw"


def mnist_missing(name: str, root: str | None) -> str | None:
    """One line naming the IDX files that ROOT lacks and where to get them; None when all four are there."""
    raw = mnist_raw_folder(name, root)
    missing = [f for f in MNIST_FILES if not (raw / f).is_file()]
    if not missing:
        return None
    if name == "fashion_mnist":
        where = (
            f"Debian's package dataset-fashion-mnist ships Fashion-MNIST in {FASHION_MNIST_DEBIAN}/, which "
            "data.download: true unpacks (without it, download fetches from the internet)"
        )
    else:
        where = f"set data.download: true (needs the internet), or place the four uncompressed files in {raw}/"
    return f"dataset {name!r}: {raw}/ lacks {', '.join(missing)} (of {', '.join(MNIST_FILES)}); {where}"


def digits_split_sizes(
    train_size: int | None, val_size: int | None, total: int = DIGITS_IMAGES
) -> tuple[int, int, int]:
    """(train, val, test) sizes of the digits split.

    Args:
        train_size: training images; None: 60% of `total` (rounded down).
        val_size: validation images; None: half of what training leaves (rounded down). The rest is test.
        total: images to split.

    Raises:
        ValueError: naming both sizes and `total`, when fewer than 10 training images, no validation image or no test
            image would remain.
    """
    train = int(0.6 * total) if train_size is None else train_size
    val = (total - train) // 2 if val_size is None else val_size
    sizes = f"digits: train_size {train} + val_size {val}"
    if train < 10:
        raise ValueError(f"{sizes}: train_size must be >= 10 (of the {total} digits)")
    if val < 1:
        raise ValueError(f"{sizes} leave no validation images of the {total} digits")
    if train + val >= total:
        raise ValueError(f"{sizes} leave no test images of the {total} digits")
    return train, val, total - train - val


@dataclass
class DataConfig:
    """Which dataset and how to load it, and its train / val / test split.

    digits: one seeded permutation (`split_seed`) gives `train_size` training images (default 60%), then `val_size`
    validation images (default: half the rest), then the test images. synthetic: `val_size` images (default 128)
    each for val and test. cifar10/cifar100, fashion_mnist/mnist: val is a seeded slice of `val_size` images (default
    5000) of the official training set, `train_size` a subset of the rest; test is the official test set (fashion_mnist
    and mnist: `root` defaults to `default_data_root()`). imagefolder: root/train, root/val and, when present,
    root/test (`train_size` and `val_size` are not used).
    """

    name: DatasetName = "digits"
    root: str | None = None
    download: bool = False
    train_size: int | None = None
    val_size: int | None = None
    split_seed: int = 0
    batch_size: int = 64
    eval_batch_size: int = 256
    num_workers: int = 0
    img_size: int | None = None  # resize for torchvision/imagefolder data (default: the model's img_size)
    auto_augment: str | None = None  # timm's policy string, e.g. "rand-m9-mstd0.5-inc1"
    mixup: float = 0.0
    cutmix: float = 0.0
    label_smoothing: float = 0.0


@dataclass
class SupernetConfig:
    """Path-supernet training (one-shot path search): every batch trains several path masks on ONE trunk forward.

    Sandwich rule: each batch uses the full mask, a minimal mask (`min_kept` paths) and `masks_per_batch - 2` masks
    drawn from `distribution`: `kept_count` (how many paths are kept is uniform in min_kept..P, which ones uniform),
    `bernoulli` (each path kept with probability `keep_prob`, given that min_kept are) or `shortest` (the k shortest
    paths pruned, k uniform, as `model.pruned: {by: shortest}` searches). The configured mask (`model.pruned`) is
    what `val_acc` reports.
    """

    enabled: bool = False
    masks_per_batch: int = 4
    distribution: Literal["kept_count", "bernoulli", "shortest"] = "kept_count"
    keep_prob: float = 0.5
    min_kept: int = 1


@dataclass
class TrainConfig:
    epochs: int = 15
    opt: str = "adamw"
    lr: float = 1.0e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    min_lr: float = 1.0e-6
    grad_clip: float | None = None
    seed: int = 0
    seeds: int = 1
    eval_every: int = 1  # epochs between evaluations (= reports and checkpoints); the last epoch always reports
    amp: bool = True  # bf16 autocast of training steps, on CUDA only (evaluation is always float32)
    # channels_last memory format, on CUDA only: only the patch embedding is a convolution, and converting costs a
    # copy of every batch
    channels_last: bool = False
    # torch.compile the training step's forward and loss (one compile per seed, tens of seconds on a GPU: pays off
    # for long trials of large models; benchmarks/gpu.py measures it)
    compile: bool = False
    # torch threads; default: the CPUs Ray gave the trial, else $OMP_NUM_THREADS, else every core this process may use
    threads: int | None = None
    test: bool = False  # evaluate the test split after the last epoch (test_acc, test_loss in the final report only)
    supernet: SupernetConfig = field(default_factory=SupernetConfig)


@dataclass
class TrialConfig:
    """One trial: the base configuration that a search varies."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self, source: str = "config") -> None:
        """Checks value ranges and the path configuration; raises ConfigError listing every problem."""
        problems: list[str] = []

        def need(ok: bool, key: str, value: Any, what: str) -> None:
            if not ok:
                problems.append(f"{source}: {key}: {what}, got {value!r}")

        t, d = self.train, self.data
        need(t.epochs >= 1, "train.epochs", t.epochs, "must be >= 1")
        need(t.seed >= 0, "train.seed", t.seed, "must be >= 0 (torch and numpy seeds)")
        need(d.split_seed >= 0, "data.split_seed", d.split_seed, "must be >= 0")
        need(t.seeds >= 1, "train.seeds", t.seeds, "must be >= 1")
        need(t.eval_every >= 1, "train.eval_every", t.eval_every, "must be >= 1")
        need(t.lr > 0 and math.isfinite(t.lr), "train.lr", t.lr, "must be a finite number > 0")
        need(t.weight_decay >= 0, "train.weight_decay", t.weight_decay, "must be >= 0")
        need(t.warmup_epochs >= 0, "train.warmup_epochs", t.warmup_epochs, "must be >= 0")
        need(t.min_lr >= 0, "train.min_lr", t.min_lr, "must be >= 0")
        need(t.grad_clip is None or t.grad_clip > 0, "train.grad_clip", t.grad_clip, "must be > 0")
        need(t.threads is None or t.threads >= 1, "train.threads", t.threads, "must be >= 1")
        sn = t.supernet
        need(sn.masks_per_batch >= 2, "train.supernet.masks_per_batch", sn.masks_per_batch,
             "must be >= 2 (the full and a minimal mask, then random ones)")  # fmt: skip
        need(0 < sn.keep_prob <= 1, "train.supernet.keep_prob", sn.keep_prob, "must be in (0, 1]")
        need(sn.min_kept >= 1, "train.supernet.min_kept", sn.min_kept, "must be >= 1")
        depth = self.model.kwargs.get("depth")
        if isinstance(depth, int) and depth >= 1:
            need(sn.min_kept <= 2 * depth + 1, "train.supernet.min_kept", sn.min_kept,
                 f"must be <= {2 * depth + 1}, the number of paths of a depth-{depth} ViT")  # fmt: skip
        need(d.batch_size >= 1, "data.batch_size", d.batch_size, "must be >= 1")
        need(d.eval_batch_size >= 1, "data.eval_batch_size", d.eval_batch_size, "must be >= 1")
        need(d.num_workers >= 0, "data.num_workers", d.num_workers, "must be >= 0")
        need(d.train_size is None or d.train_size >= 1, "data.train_size", d.train_size, "must be >= 1")
        need(d.val_size is None or d.val_size >= 1, "data.val_size", d.val_size, "must be >= 1")
        sizes_ok = (d.train_size is None or d.train_size >= 1) and (d.val_size is None or d.val_size >= 1)
        if d.name == "digits" and sizes_ok:
            try:
                digits_split_sizes(d.train_size, d.val_size)
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
        for key in ("mixup", "cutmix"):
            need(getattr(d, key) >= 0, f"data.{key}", getattr(d, key), "must be >= 0")
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
            self.model.pos_embed_std is None or self.model.pos_embed_std > 0,
            "model.pos_embed_std",
            self.model.pos_embed_std,
            "must be > 0",
        )
        depth = self.model.kwargs.get("depth")
        depth = depth if isinstance(depth, int) and not isinstance(depth, bool) and depth >= 1 else None
        m = self.model
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
        if problems:
            raise ConfigError(problems)


METRICS = ("val_acc", "val_loss", "val_acc_full", "train_loss", "kept_paths", "params", "images_per_s")


@dataclass
class TwoStageConfig:
    """`search.strategy: two_stage` (oneshot.py): train one path supernet, let Optuna score `proxy_trials`
    configurations of the path entries of `space` from its cached validation features, then train the `top_k` best
    (plus the baseline and `search.enqueue`) as ordinary trials."""

    top_k: int = 4
    proxy_trials: int = 20000
    # Optuna sampler of stage 1. random: about 1 ms per evaluation at any count; tpe slows as the study grows
    # (measured 15 ms per trial at 1,000 trials, 30 ms at 2,000): give it a few thousand trials at most.
    proxy_sampler: Literal["random", "qmc", "tpe"] = "random"
    proxy_batch: int = 256  # Optuna trials asked, scored together from the cache, then told
    supernet_epochs: int | None = None  # default: train.epochs
    supernet_cpus: float | None = None  # CPUs of the supernet trial (default: resources_per_trial's cpu)


@dataclass
class ConfirmConfig:
    """`search.confirm`: after the search, the `top_k` distinct configurations with the best val score, plus the
    baseline, are trained again on the same `seeds` fresh seeds each (seed s: the same initialisation, data order
    and augmentation for every configuration), and the winner is the best mean val score. Only these trials read
    the test split: the verdict against the baseline is a paired difference on test over those seeds.

    With `max_seeds` it is sequential: `seeds` is the first round, each later round adds `step` paired seeds for the
    baseline and the challengers not yet decided, until each is decided (its anytime-valid interval above 0, below 0
    or below `min_effect`) or `max_seeds` (pathsearch.sequential).

    Present in a search file: on (unless `enabled: false`); absent: off.
    """

    enabled: bool = True
    top_k: int = 3
    seeds: int = 5
    first_seed: int | None = None  # default: train.seed + train.seeds, the first seed the search did not use
    max_concurrent_trials: int | None = None  # default: search.max_concurrent_trials
    max_seeds: int | None = None  # the budget of a sequential confirmation; None: `seeds` seeds, one round
    step: int = 2  # seeds each later round adds
    min_effect: float = 0.0025  # the smallest gain worth having, in the metric's units (a quarter point of accuracy)
    alpha: float = 0.05  # the chance that any interval of any round misses, at most


@dataclass
class SearchConfig:
    """How to search: Ray Tune's words for the run, Optuna's sampler, caps checked before training."""

    metric: str | list[str] = "val_acc"
    mode: Literal["max", "min"] | list[Literal["max", "min"]] = "max"
    num_samples: int = 16
    max_concurrent_trials: int | None = None
    sampler: Literal["tpe", "nsga2", "random", "gp", "qmc"] = "tpe"
    scheduler: Literal["asha", "none"] = "asha"
    grace_period: int = 1  # ASHA: reports before a trial can be stopped
    reduction_factor: float = 2.0
    seed: int = 0
    resources_per_trial: dict[str, float] = field(default_factory=lambda: {"cpu": 1.0})
    max_failures: int = 2
    # on a cluster whose autoscaler starts workers: how long the search waits for a worker that holds a trial before
    # it gives up (an autoscaler that reports nothing launched, or launched nodes that never joined)
    autoscaler_wait_min: float = 5.0
    time_budget_s: float | None = None
    max_kept_paths: int | None = None
    max_params: int | None = None
    enqueue: list[dict[str, Any]] = field(default_factory=list)  # configurations to train first (param values)
    strategy: Literal["full", "two_stage"] = "full"  # two_stage: one-shot path search (see TwoStageConfig)
    two_stage: TwoStageConfig = field(default_factory=TwoStageConfig)
    confirm: ConfirmConfig = field(default_factory=lambda: ConfirmConfig(enabled=False))

    @property
    def metrics(self) -> list[str]:
        return [self.metric] if isinstance(self.metric, str) else list(self.metric)

    @property
    def modes(self) -> list[str]:
        return [self.mode] if isinstance(self.mode, str) else list(self.mode)


@dataclass
class TrackingConfig:
    tracking_uri: str | None = None  # default: an SQLite file in the working directory
    experiment: str = "pathsearch"


@dataclass
class SearchFile:
    """A whole search file, validated: the base trial, the search settings, the space and tracking."""

    source: str
    trial: TrialConfig
    search: SearchConfig
    tracking: TrackingConfig
    space: Any  # pathsearch.space.SearchSpace
    raw: dict[str, Any]  # the file with overrides applied, as plain data

    @property
    def base(self) -> dict[str, Any]:
        """The base trial (model, data, train sections) as plain data: what each trial's overrides apply to."""
        return _trial_sections(self.raw)

    def to_yaml(self) -> str:
        resolved = {
            **to_dict(self.trial),
            "search": to_dict(self.search),
            "space": self.raw.get("space") or {},
            "tracking": to_dict(self.tracking),
        }
        return yaml.safe_dump(resolved, sort_keys=False)


def load_search_file(
    path: str | Path, overrides: Sequence[str] = (), model_depth: Any = None, check_trial: Any = None
) -> SearchFile:
    """Loads and checks a whole search file; raises ConfigError listing every problem (file, key, what).

    `model_depth(name, kwargs) -> int` resolves the timm model's depth (and refuses unknown or non-ViT models);
    the CLI passes `pathsearch.model.model_depth` so that this module stays free of torch. Without it the file
    must set `model.kwargs.depth`. `check_trial(cfg, source) -> problems` adds what the trial will meet once it runs
    (pathsearch.preflight builds the model on the meta device), for the base and the space's extreme points. A
    search file needs a non-empty `space` (`load_trial_config` reads the same file for one trial, without one).
    """
    source = str(path)
    raw = apply_overrides(read_yaml(path), overrides, source)
    problems: list[str] = []
    unknown = sorted(set(raw) - SECTIONS)
    problems += [f"{source}: {key}: unknown section (known: {', '.join(sorted(SECTIONS))})" for key in unknown]
    trial = TrialConfig()
    try:
        trial = load_trial_config(None, data=_trial_sections(raw), source=source)
        trial_ok = True
    except ConfigError as err:
        problems += err.problems
        trial_ok = False
    search = from_dict(SearchConfig, raw.get("search") or {}, source, "search.", problems)
    tracking = from_dict(TrackingConfig, raw.get("tracking") or {}, source, "tracking.", problems)
    _check_search(search, source, problems)
    problems += tracking_uri_problems(tracking.tracking_uri, f"{source}: tracking.tracking_uri")
    depth = _search_depth(raw, model_depth, source, problems)
    raw_space = raw.get("space")
    if not raw_space:
        problems.append(
            f"{source}: space: nothing to search (no entries), got {raw_space!r}; add a space section, "
            f"or train the base configuration alone with `pathsearch train {source}`"
        )
    if depth is not None:
        space = parse_space(raw_space, depth, source, problems)
    else:  # a problem says why; the entries that do not depend on the depth are checked all the same
        if isinstance(raw_space, Mapping):
            raw_space = {key: entry for key, entry in raw_space.items() if key != "model.pruned"}
        space = parse_space(raw_space, 1, source, problems)
    if trial_ok and depth is not None and check_trial is not None:  # even where the search has problems of its own
        problems += check_trial(trial, source)
    if not problems:
        problems += _probe_space(raw, space, source, check_trial)
    if not problems:
        problems += _check_conditions(raw, space, source)
        problems += _check_baseline(raw, space, source)
        problems += _check_enqueue(search, space, source)
    if not problems:
        problems += _check_test_split(trial, search, space, source)
    if not problems and search.strategy == "two_stage":
        problems += _check_two_stage(trial, space, source)
    if problems:
        raise ConfigError(problems)
    return SearchFile(source, trial, search, tracking, space, raw)


def _check_baseline(raw: Mapping[str, Any], space: Any, source: str) -> list[str]:
    """Every search trains the baseline first, as a point of its space that Optuna is told to try (no path pruned,
    EnsembleScale init 1.0, every other searched key at its base value): each of those values must be a point of
    its entry, or the search would stop once it had started."""
    base = _trial_sections(raw)
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


def _check_conditions(raw: Mapping[str, Any], space: Any, source: str) -> list[str]:
    """Each `when: {key: value}` of the space must be able to hold: `key` is an earlier entry that can sample
    `value`, or a key of the trial sections whose base value is `value`; otherwise its entry is never sampled."""
    base = _trial_sections(raw)
    entries = {entry.key: entry for entry in space.entries}
    problems = []
    for entry in space.entries:
        for key, value in entry.when.items():
            where = f"{source}: space.{entry.key}.when.{key}"
            if key in entries:
                why = entries[key].dist.excludes(value)
                if why is not None:
                    problems.append(f"{where}: the condition never holds ({why}), got {value!r}")
            elif not _key_exists(key):
                near = difflib.get_close_matches(key, [*entries, *_trial_keys()], n=1)
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


def _check_enqueue(search: SearchConfig, space: Any, source: str) -> list[str]:
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


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A search file's top-level mapping, or a ConfigError naming the file (missing, not YAML, empty, a list)."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError([f"{path}: is a folder, not a search file"])
    if not p.is_file():
        raise ConfigError([f"{path}: no such file"])
    try:
        data = p.read_bytes()
    except OSError as err:
        raise ConfigError([f"{path}: cannot be read: {err.strerror or err}"]) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(
            [f"{path}: not a text file (byte {data[err.start]:#04x} at offset {err.start} is not UTF-8): not YAML"]
        ) from None
    if "\0" in text:
        raise ConfigError([f"{path}: not a text file (it holds NUL bytes at offset {text.index(chr(0))}): not YAML"])
    loaded = load_yaml(text, str(path))
    if loaded is None:  # 0 bytes, or only blank lines and comments: a wrong or truncated file, never "all defaults"
        known = ", ".join(sorted(SECTIONS))
        raise ConfigError([f"{path}: top level: expected a mapping of sections ({known}), got an empty file"])
    if not isinstance(loaded, dict):
        raise ConfigError([f"{path}: expected a mapping at the top level, got {type(loaded).__name__}"])
    return loaded


def _search_depth(raw: Mapping[str, Any], model_depth: Any, source: str, problems: list[str]) -> int | None:
    """The ViT's depth, which the space's path entries are read against; None when unknown (a problem says why).

    Read from the model section alone, so that problems elsewhere in the trial do not hide the space's. With
    `model_depth` (timm, on the caller's side) the depth follows from the model name and kwargs; without it only an
    explicit `model.kwargs.depth` gives it: a timm name implies a depth (12 for most ViTs, 24 or 32 for the large
    ones) that this torch-free module cannot look up, so none is assumed.
    """
    scratch: list[str] = []
    model = from_dict(ModelConfig, raw.get("model") or {}, source, "model.", scratch)
    explicit = model.kwargs.get("depth")
    if scratch or (isinstance(explicit, int) and explicit < 1):
        return None  # the trial's own checks report these
    if model_depth is not None:
        try:
            depth = model_depth(model.name, model.kwargs)
        except ValueError as err:
            key = "model.kwargs" if str(err).startswith("timm cannot build") else "model.name"
            problems.append(f"{source}: {key}: {err}")
            return None
    elif explicit is None:
        problems.append(
            f"{source}: model.kwargs.depth: needed to read the space, and the depth that model.name {model.name!r} "
            "implies is only known to timm (not loaded here); set it, got None"
        )
        return None
    else:
        depth = explicit
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        problems.append(f"{source}: model.kwargs.depth: must be a whole number >= 1, got {depth!r}")
        return None
    return depth


def _trial_sections(raw: Mapping[str, Any]) -> dict[str, Any]:
    return {k: raw[k] for k in ("model", "data", "train") if k in raw}


def _check_search(s: SearchConfig, source: str, problems: list[str]) -> None:
    def need(ok: bool, key: str, value: Any, what: str) -> None:
        if not ok:
            problems.append(f"{source}: search.{key}: {what}, got {value!r}")

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
    need(s.seed >= 0, "seed", s.seed, "must be >= 0 (Optuna's samplers take seeds 0 to 2**32 - 1)")
    need(c.seeds >= 2, "confirm.seeds", c.seeds, "must be >= 2 (a spread and a confidence interval need two seeds)")
    need(c.first_seed is None or c.first_seed >= 0, "confirm.first_seed", c.first_seed, "must be >= 0")
    need(c.max_concurrent_trials is None or c.max_concurrent_trials >= 1, "confirm.max_concurrent_trials",
         c.max_concurrent_trials, "must be >= 1")  # fmt: skip
    need(c.max_seeds is None or c.max_seeds >= c.seeds, "confirm.max_seeds", c.max_seeds,
         f"must be >= confirm.seeds ({c.seeds}), the first round")  # fmt: skip
    need(c.step >= 1, "confirm.step", c.step, "must be >= 1 (seeds each later round adds)")
    need(math.isfinite(c.min_effect) and c.min_effect >= 0, "confirm.min_effect", c.min_effect,
         "must be a finite number >= 0 (in the metric's units: 0.0025 is a quarter point of accuracy)")  # fmt: skip
    need(0 < c.alpha <= 0.5, "confirm.alpha", c.alpha, "must be in (0, 0.5]")


RAY_RESOURCES = ("cpu", "gpu", "memory")  # resources_per_trial's names of Ray's own resources (memory in bytes)


def resource_problems(name: str, amount: Any, source: str) -> list[str]:
    """What is wrong with one `search.resources_per_trial` entry: a non-number, a non-positive or infinite amount,
    or a GPU amount above 1 (a trial trains on one GPU: Ray would reserve the others and they would sit idle)."""
    key = f"{source}: search.resources_per_trial.{name}"
    near = difflib.get_close_matches(name.lower(), RAY_RESOURCES, n=1, cutoff=0.6)
    if name not in RAY_RESOURCES and near:  # other names are custom resources, which nodes declare themselves
        return [
            f"{key}: not a resource Ray knows (did you mean {near[0]!r}? Ray's own are {', '.join(RAY_RESOURCES)}; "
            f"any other name is a custom resource that some node must declare), got {name!r}: {amount!r}"
        ]
    if isinstance(amount, bool) or not isinstance(amount, int | float):
        return [f"{key}: must be a number, got {amount!r}"]
    if not (amount > 0 and math.isfinite(amount)):
        return [f"{key}: must be a finite number > 0, got {amount!r}"]
    if name == "gpu" and amount > 1:
        return [f"{key}: must be at most 1: a trial trains on one GPU (a share, e.g. 0.25, packs trials on a GPU), "
                f"got {amount!r}"]  # fmt: skip
    return []


def _check_test_split(trial: TrialConfig, search: SearchConfig, space: Any, source: str) -> list[str]:
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


def _check_two_stage(trial: TrialConfig, space: Any, source: str) -> list[str]:
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


def _probe_space(raw: dict[str, Any], space: Any, source: str, check_trial: Any = None) -> list[str]:
    """Checks each space entry's key and extreme values against the trial config's types and ranges, and with
    `check_trial(cfg, source) -> problems` what the trial will meet (the model built from the configuration):
    at each extreme value of each entry, and at each corner of the model.kwargs entries together (at most
    MAX_CORNERS: a model is built at each), as those interact (embed_dim and num_heads, img_size and patch_size)."""
    problems: list[str] = []
    points: list[dict[str, Any]] = []
    for entry in space.entries:
        if entry.key in PATH_SPACE_KEYS:
            continue
        if not _key_exists(entry.key):
            near = difflib.get_close_matches(entry.key, _trial_keys(), n=1)
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
        probe = deep_copy(raw)
        for key, value in point.items():
            set_dotted(probe, key, value)
        try:
            cfg = load_trial_config(None, data=_trial_sections(probe), source=source)
            said = check_trial(cfg, source) if check_trial is not None else []
        except ConfigError as err:
            said = err.problems
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


def _trial_keys(node: Any = TrialConfig, prefix: str = "") -> list[str]:
    """Every dotted key of the trial sections (model.kwargs as `model.kwargs.*`), for suggestions."""
    keys = []
    for f in dataclasses.fields(node):
        tp = get_type_hints(node)[f.name]
        if dataclasses.is_dataclass(tp):
            keys += _trial_keys(tp, f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def _key_exists(key: str) -> bool:
    node: Any = TrialConfig
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


def load_trial_config(
    path: str | Path | None = None,
    overrides: Sequence[str] = (),
    data: Mapping[str, Any] | None = None,
    source: str | None = None,
) -> TrialConfig:
    """Reads the model/data/train sections of a YAML file (other top-level sections are left to the search),
    applies `key=value` overrides and validates. Raises ConfigError with every problem found."""
    source = source or (str(path) if path is not None else "config")
    raw: dict[str, Any] = read_yaml(path) if path is not None else {}
    if data is not None:
        raw = {**raw, **data}
    unknown = sorted(set(raw) - SECTIONS)
    if unknown:
        raise ConfigError(
            [f"{source}: {key}: unknown section (known: {', '.join(sorted(SECTIONS))})" for key in unknown]
        )
    raw = apply_overrides(raw, overrides, source)
    sections = {k: raw.get(k) or {} for k in ("model", "data", "train")}
    problems: list[str] = []
    cfg = from_dict(TrialConfig, sections, source, "", problems)
    assert isinstance(cfg, TrialConfig)
    try:
        cfg.validate(source)
    except ConfigError as err:
        problems += err.problems
    if problems:
        raise ConfigError(problems)
    return cfg
