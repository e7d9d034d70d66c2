"""The sections of a search file as typed dataclasses (model, data, train: the trial; search, space, tracking: the
search), loaded from YAML with `--set` overrides (typed.py) and validated as a whole by checks.py's checks.

Each field's comment (at the end of its line, or the lines just above it) is its description in the generated
reference, docs/reference/search-file.md (`python -m pathsearch.reference`); a field without one fails the tests.
Errors name the file, the dotted key and the value, one line per problem. Imports no torch (nor ray, optuna,
mlflow), so configs can be read and checked anywhere.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from pathsearch.config.checks import (
    baseline_problems,
    batch_split_problems,
    budget_problems,
    condition_problems,
    confirm_test_problems,
    enqueue_problems,
    experiment_problems,
    probe_space,
    search_problems,
    tracking_uri_problems,
    trial_problems,
    two_stage_problems,
    vit_kwargs_problems,
)
from pathsearch.config.checks import (  # the training side and the placement read a trial's workers from here
    trial_workers as trial_workers,
)
from pathsearch.config.checks import (
    worker_resources as worker_resources,
)
from pathsearch.config.datasets import (
    FASHION_MNIST_DEBIAN as FASHION_MNIST_DEBIAN,  # benchmarks/gpu.py imports it from here
)
from pathsearch.config.paths import DistillConfig, EnsembleScaleConfig, PathConfig
from pathsearch.config.space import parse_space
from pathsearch.config.typed import ConfigError, apply_overrides, from_dict, load_yaml, to_dict

# Top-level sections of a search file; the search-only ones (search, space, tracking) are read by the search.
SECTIONS = {"model", "data", "train", "search", "space", "tracking"}
DatasetName = Literal["digits", "synthetic", "cifar10", "cifar100", "fashion_mnist", "mnist", "imagefolder"]


@dataclass
class EnsembleScaleSection:
    """EnsembleScale: a learnable weight `s_i` on each path in the ensemble feature the classifier sees."""

    kind: Literal["scalar", "vector"] = "scalar"  # one number per path, or one per channel (embed_dim numbers)
    scope: Literal["ensemble", "both"] = "ensemble"  # both: also scales the path where it enters the trunk
    init: float | dict[str, float] = 1.0  # initial value: one number, or {path selector: number} (`all`: the rest)
    learnable: bool = True  # false: the scales stay at `init`


@dataclass
class DistillSection:
    """Self-distillation: the full ensemble (teacher) teaches short-path ensembles (students)."""

    alpha: float = 0.0  # weight of the distillation term in the loss; 0 turns self-distillation off
    temperature: float = 1.0  # softmax temperature T of teacher and students (the term is scaled by T^2)
    # the students: prefix lengths (k: the first k paths) or path selectors (`attn`, `layers.1-3`); needed when
    # alpha > 0
    students: list[int | str] = field(default_factory=list)


@dataclass
class ModelConfig:
    """The timm ViT and its path configuration. `kwargs` go to `timm.create_model` (img_size, depth, ...)."""

    name: str = "vit_tiny_patch16_224"  # the timm model, by the name `timm.create_model` takes
    pretrained: bool = False  # start from timm's published weights for `name` (read from the Hugging Face cache)
    # start from a checkpoint file instead: a torch state dict (.pth, .pt, .bin; nested under `state_dict` or `model`
    # as timm's own loaders accept) or .safetensors, of a timm ViT. timm's pretrained loader fills the model from it:
    # position embeddings and patch kernels resampled, channels adapted, the head reset for another class count.
    # A relative path is read from the working directory; not with `pretrained: true`
    weights: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)  # keyword arguments of `timm.create_model`: depth, img_size...
    pos_embed_std: float | None = None  # re-initialise position embeddings (std 1.0 trains digits far faster)
    # with pretrained weights (`pretrained` or `weights`): replace their position embeddings by pos_embed_std's
    # random ones; without it pos_embed_std is refused there, as it would silently overwrite them
    reinit_pos_embed: bool = False
    pruned: list[str] = field(default_factory=list)  # path names left out of the ensemble feature (they feed the trunk)
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

    name: DatasetName = "digits"  # the dataset (digits and synthetic are built in and offline)
    root: str | None = None  # the dataset's folder (required for cifar10, cifar100 and imagefolder)
    download: bool = False  # fetch (or unpack) missing dataset files into `root`
    train_size: int | None = None  # training images (default: the dataset's rule above)
    val_size: int | None = None  # validation images (default: the dataset's rule above)
    split_seed: int = 0  # seed of the train / val / test split (the same for every trial and seed)
    # training batch; with workers > 1 (search.resources_per_trial) the global batch, split evenly over the workers
    batch_size: int = 64
    eval_batch_size: int = 256  # batch of the evaluation passes (val, test)
    num_workers: int = 0  # data loader worker processes (0: load in the training process)
    img_size: int | None = None  # resize for torchvision/imagefolder data (default: the model's img_size)
    auto_augment: str | None = None  # timm's policy string, e.g. "rand-m9-mstd0.5-inc1"
    mixup: float = 0.0  # timm Mixup's alpha (0: off)
    cutmix: float = 0.0  # timm CutMix's alpha (0: off)
    label_smoothing: float = 0.0  # label smoothing of the cross-entropy (with Mixup/CutMix: of their soft targets)


@dataclass
class SupernetConfig:
    """Path-supernet training (one-shot path search): every batch trains several path masks on ONE trunk forward.

    Sandwich rule: each batch uses the full mask, a minimal mask (`min_kept` paths) and `masks_per_batch - 2` masks
    drawn from `distribution`: `kept_count` (how many paths are kept is uniform in min_kept..P, which ones uniform),
    `bernoulli` (each path kept with probability `keep_prob`, given that min_kept are) or `shortest` (the k shortest
    paths pruned, k uniform, as `model.pruned: {by: shortest}` searches). The configured mask (`model.pruned`) is
    what `val_acc` reports.
    """

    enabled: bool = False  # train the trial as a path supernet (a two_stage search turns it on for its supernet)
    masks_per_batch: int = 4  # path masks each batch trains: the full one, a minimal one, the rest drawn
    distribution: Literal["kept_count", "bernoulli", "shortest"] = "kept_count"  # how the other masks are drawn
    keep_prob: float = 0.5  # bernoulli: the chance that each path is kept
    min_kept: int = 1  # paths the minimal mask keeps (shortest: the longest ones), and the fewest any mask keeps


@dataclass
class TrainConfig:
    """How a trial trains: timm's optimiser and cosine schedule, seeds, evaluation, the device settings."""

    epochs: int = 15  # passes over the training split
    opt: str = "adamw"  # the optimiser, by the name timm's `create_optimizer_v2` takes
    lr: float = 1.0e-3  # peak learning rate, after the warm-up (timm's cosine schedule)
    weight_decay: float = 0.05  # the optimiser's weight decay (none on EnsembleScale, nor where timm exempts)
    warmup_epochs: float = 1.0  # linear warm-up, in epochs (a fraction allowed: it is counted in steps)
    min_lr: float = 1.0e-6  # the learning rate the cosine schedule ends at
    grad_clip: float | None = None  # clip the gradients' global norm to this (default: no clipping)
    seed: int = 0  # seed of initialisation, data order and augmentation (the first seed with `seeds` > 1)
    seeds: int = 1  # seeds trained in one trial (seed, seed + 1, ...): metrics are their mean, with `<metric>_std`
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
        """Checks value ranges and the path configuration (checks.trial_problems); raises ConfigError listing
        every problem."""
        problems = trial_problems(self, source)
        if problems:
            raise ConfigError(problems)


@dataclass
class TwoStageConfig:
    """`search.strategy: two_stage` (oneshot.py): train one path supernet, let Optuna score `proxy_trials`
    configurations of the path entries of `space` from its cached validation features, then train the `top_k` best
    (plus the baseline and `search.enqueue`) as ordinary trials."""

    top_k: int = 4  # the proxy's best configurations that stage 2 trains
    proxy_trials: int = 20000  # configurations stage 1's Optuna study scores from the supernet
    # Optuna sampler of stage 1. random: about 1 ms per evaluation at any count; tpe slows as the study grows
    # (measured 15 ms per trial at 1,000 trials, 30 ms at 2,000): give it a few thousand trials at most.
    proxy_sampler: Literal["random", "qmc", "tpe"] = "random"
    proxy_batch: int = 256  # Optuna trials asked, scored together from the cache, then told
    supernet_epochs: int | None = None  # epochs of the supernet's training (default: train.epochs)
    supernet_cpus: float | None = None  # CPUs of the supernet trial (default: resources_per_trial's cpu)


@dataclass
class ConfirmConfig:
    """`search.confirm`: after the search, the `top_k` distinct configurations with the best val score, plus the
    baseline, are trained again on the same `seeds` fresh seeds each (seed s: the same initialisation, data order
    and augmentation for every configuration), and the winner is the best mean val score. Only these trials read
    the test split: the verdict against the baseline is a paired difference on test over those seeds.

    With `max_seeds` it is sequential: `seeds` is the first round, each later round adds `step` paired seeds for the
    baseline and the challengers not yet decided, until each is decided (its anytime-valid interval above 0, below 0
    or below `min_effect`) or `max_seeds` (pathsearch.search.sequential).

    Present in a search file: on (unless `enabled: false`); absent: off.
    """

    enabled: bool = True  # false: no confirmation, though the section is there
    top_k: int = 3  # configurations confirmed besides the baseline (a two_stage search uses two_stage.top_k)
    seeds: int = 5  # paired seeds of each configuration (with max_seeds: the first round)
    first_seed: int | None = None  # the first seed (default: train.seed + train.seeds, one the search did not use)
    max_concurrent_trials: int | None = None  # confirmation trials at once (default: search.max_concurrent_trials)
    max_seeds: int | None = None  # paired seeds a sequential confirmation may use (default: `seeds`, one round)
    step: int = 2  # seeds each later round adds
    min_effect: float = 0.0025  # the smallest gain worth having, in the metric's units (a quarter point of accuracy)
    alpha: float = 0.05  # the chance that any interval of any round misses, at most


@dataclass
class SearchConfig:
    """How to search: Ray Tune's words for the run, Optuna's sampler, caps checked before training."""

    metric: str | list[str] = "val_acc"  # what the search optimises; a list of several: a multi-objective search
    mode: Literal["max", "min"] | list[Literal["max", "min"]] = "max"  # max or min, one per metric
    num_samples: int = 16  # configurations the search trains (the baseline among them)
    max_concurrent_trials: int | None = None  # trials at once (default: as many as fit; worker groups: one)
    sampler: Literal["tpe", "nsga2", "random", "gp", "qmc"] = "tpe"  # Optuna's sampler (nsga2: several metrics)
    scheduler: Literal["asha", "none"] = "asha"  # ASHA stops weak trials early (one metric only)
    grace_period: int = 1  # ASHA: reports before a trial can be stopped
    reduction_factor: float = 2.0  # ASHA: the fraction 1/reduction_factor of trials goes on at each rung
    seed: int = 0  # the sampler's seed
    # Ray resources of a trial (cpu, gpu, memory, custom); with `workers: N` (N > 1) the trial is a Ray Train worker
    # group of N processes and the resources are each worker's (checks.trial_workers, checks.worker_resources); a
    # worker count is written as an integer, and stays one (hence int | float)
    resources_per_trial: dict[str, int | float] = field(default_factory=lambda: {"cpu": 1.0})
    # how the worker group's placement group lays out its workers: Ray's PACK (as few nodes as will hold them) or
    # SPREAD (over as many nodes as there are); both are best effort, so a group fits wherever the nodes hold it
    worker_placement: Literal["pack", "spread"] = "pack"
    max_failures: int = 2  # retries of a failed trial, from its last checkpoint (Ray Tune's FailureConfig)
    # on a cluster whose autoscaler starts workers: how long the search waits for a worker that holds a trial before
    # it gives up (an autoscaler that reports nothing launched, or launched nodes that never joined)
    autoscaler_wait_min: float = 5.0
    time_budget_s: float | None = None  # Ray Tune stops the search's trials after this many seconds (default: none)
    max_kept_paths: int | None = None  # a sampled configuration that keeps more paths is not trained
    max_params: int | None = None  # a sampled configuration with more parameters is not trained
    enqueue: list[dict[str, Any]] = field(default_factory=list)  # configurations to train first (param values)
    # full: every configuration a trial; two_stage: one-shot path search, a path supernet scores the configurations
    # and the best are trained (TwoStageConfig)
    strategy: Literal["full", "two_stage"] = "full"
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
    """Where MLflow records the search."""

    tracking_uri: str | None = None  # MLflow tracking URI (default: sqlite:///mlflow.db in the working directory)
    experiment: str = "pathsearch"  # the MLflow experiment of the search's runs


@dataclass
class SearchFile:
    """A whole search file, validated: the base trial, the search settings, the space and tracking."""

    source: str
    trial: TrialConfig
    search: SearchConfig
    tracking: TrackingConfig
    space: Any  # pathsearch.config.space.SearchSpace
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
    the CLI passes `pathsearch.ensemble.model.model_depth` so that this module stays free of torch. Without it the file
    must set `model.kwargs.depth`. `check_trial(cfg, source) -> problems` adds what the trial will meet once it runs
    (pathsearch.preflight builds the model on the meta device), for the base and the space's extreme points. A
    search file needs a non-empty `space` (`load_trial_config` reads the same file for one trial, without one).
    """
    source = str(path)
    raw = apply_overrides(read_yaml(path), overrides, source)
    weights_from_here(raw)
    # Every stage runs wherever the keys it reads are sound, so that one run lists every problem: a problem in one
    # section hides none in another, and a stage whose inputs are broken is skipped (its inputs' problems say why).
    problems: list[str] = section_problems(raw, source)
    unknown = sorted(set(raw) - SECTIONS)
    problems += [f"{source}: {key}: unknown section (known: {', '.join(sorted(SECTIONS))})" for key in unknown]
    depth_said: list[str] = []
    depth = _search_depth(raw, model_depth, source, depth_said)
    check = check_trial if depth is not None else None  # no depth: the model cannot be built (a problem says why)
    base = _trial_sections(raw)
    trial, trial_said = _trial_problems(base, source, check)
    problems += trial_said
    search = from_dict(SearchConfig, raw.get("search") or {}, source, "search.", problems)
    tracking = from_dict(TrackingConfig, raw.get("tracking") or {}, source, "tracking.", problems)
    problems += search_problems(search, source)
    problems += tracking_uri_problems(tracking.tracking_uri, f"{source}: tracking.tracking_uri")
    problems += experiment_problems(tracking.experiment, source)
    problems += depth_said
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
    # each point of the space is told by what it adds to the base's own problems
    problems += probe_space(
        base, space, source, TrialConfig, lambda sections, src: _trial_problems(sections, src, check)[1], trial_said
    )
    named = said_keys(problems, source)
    if not names_any(named, "data.batch_size", "data.mixup", "data.cutmix", "search.resources_per_trial"):
        problems += batch_split_problems(trial, search, space, source)
    if not names_any(named, "space"):
        problems += condition_problems(base, space, source, TrialConfig)
        problems += baseline_problems(base, space, source)
        if not names_any(named, "search.max_kept_paths", "model.pruned"):
            problems += budget_problems(base, search, space, source)
        if not names_any(named, "search.enqueue"):
            problems += enqueue_problems(search, space, source)
    if not names_any(named, "train.test", "search.confirm", "data.name", "data.root"):
        problems += confirm_test_problems(trial, search, space, source)
    if search.strategy == "two_stage" and not names_any(named, "space", "model.ensemble_scale.scope"):
        problems += two_stage_problems(trial, space, source)
    if problems:
        raise ConfigError(problems)
    return SearchFile(source, trial, search, tracking, space, raw)


def section_problems(raw: dict[str, Any], source: str) -> list[str]:
    """A section written as something other than a mapping (`data: 0`, `search: []`) is a mistake, not "all defaults"
    (which is what empty is: `data:` or `data: {}`): one line each, and the section is then read as empty, so that
    the others are still checked. The space says its own (pathsearch.config.space)."""
    problems = []
    for name in sorted(SECTIONS - {"space"}):
        value = raw.get(name)
        if value is not None and not isinstance(value, Mapping):
            problems.append(f"{source}: {name}: expected a mapping of the section's keys, got {value!r}")
            raw[name] = {}
    return problems


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
    if scratch or vit_kwargs_problems(model.kwargs, source) or (isinstance(explicit, int) and explicit < 1):
        return None  # the trial's own checks report these (sizes timm cannot build among them)
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


# What `check_trial` (pathsearch.preflight) reads: it runs only where no problem names one of these keys
CHECK_TRIAL_READS = (
    "model.name", "model.kwargs", "model.pruned", "model.ensemble_scale", "model.distill",
    "data.name", "data.root", "data.img_size", "data.auto_augment", "train.opt", "train.lr", "train.weight_decay",
)  # fmt: skip


def _trial_problems(sections: Mapping[str, Any], source: str, check_trial: Any) -> tuple[TrialConfig, list[str]]:
    """A trial's sections loaded as far as they go (a bad value keeps its default) and every problem they have: types,
    ranges, and, where the keys it reads are sound, what `check_trial(cfg, source)` finds."""
    problems: list[str] = []
    cfg = from_dict(TrialConfig, {k: sections.get(k) or {} for k in ("model", "data", "train")}, source, "", problems)
    assert isinstance(cfg, TrialConfig)
    problems += trial_problems(cfg, source)
    if check_trial is not None and not names_any(said_keys(problems, source), *CHECK_TRIAL_READS):
        problems += check_trial(cfg, source)
    return cfg, problems


def said_keys(problems: Sequence[str], source: str) -> set[str]:
    """The dotted keys that `problems` name: each line is `SOURCE: KEY: what`."""
    head = f"{source}: "
    return {p[len(head) :].split(": ", 1)[0] for p in problems if p.startswith(head)}


def names_any(keys: set[str], *prefixes: str) -> bool:
    """Whether any of `keys` is one of `prefixes` or lies below one (`space` covers `space.train.lr`)."""
    return any(k == p or k.startswith((f"{p}.", f"{p}[")) for k in keys for p in prefixes)


def weights_from_here(raw: dict[str, Any]) -> None:
    """Makes a relative `model.weights` (and the choices of a space entry for it) absolute from the working directory,
    as `train` reads it: trials run elsewhere (Ray starts each in a folder of its own), and a resumed run may start
    from another directory."""

    def here(value: Any) -> Any:
        try:
            return str(Path.cwd() / Path(value).expanduser()) if isinstance(value, str) and value else value
        except RuntimeError:  # `~name/...` of no such user: the checks say so
            return value

    model = raw.get("model")
    if isinstance(model, dict) and "weights" in model:
        model["weights"] = here(model["weights"])
    entry = (raw.get("space") or {}).get("model.weights") if isinstance(raw.get("space"), dict) else None
    if isinstance(entry, dict) and isinstance(entry.get("choices"), list):
        entry["choices"] = [here(choice) for choice in entry["choices"]]


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
    weights_from_here(raw)
    problems: list[str] = section_problems(raw, source)
    sections = {k: raw.get(k) or {} for k in ("model", "data", "train")}
    cfg = from_dict(TrialConfig, sections, source, "", problems)
    assert isinstance(cfg, TrialConfig)
    try:
        cfg.validate(source)
    except ConfigError as err:
        problems += err.problems
    if problems:
        raise ConfigError(problems)
    return cfg
