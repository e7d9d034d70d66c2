"""Typed configuration of a trial (model, data, train sections of a search file): YAML loading, validation and
dotted `--set key=value` overrides.

Errors name the file, the dotted key and the value, one line per problem. Imports no torch (nor ray, optuna,
mlflow), so configs can be read and checked anywhere.
"""

from __future__ import annotations

import dataclasses
import math
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from pathsearch.paths import DistillConfig, EnsembleScaleConfig, PathConfig

# Top-level sections of a search file; the search-only ones (search, space, tracking) are read by the search.
SECTIONS = {"model", "data", "train", "search", "space", "tracking"}
DatasetName = Literal["digits", "synthetic", "cifar10", "cifar100", "imagefolder"]


class ConfigError(ValueError):
    """Invalid configuration; `problems` holds one line per problem, each naming file, key and value."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


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


@dataclass
class DataConfig:
    """Which dataset and how to load it. `train_size` takes a training subset (digits: the rest is held out)."""

    name: DatasetName = "digits"
    root: str | None = None
    download: bool = False
    train_size: int | None = None
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
    amp: bool = True  # used on CUDA only
    channels_last: bool = True  # used on CUDA only
    threads: int | None = None  # torch threads; default: the CPUs given to the trial


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
        need(t.seeds >= 1, "train.seeds", t.seeds, "must be >= 1")
        need(t.eval_every >= 1, "train.eval_every", t.eval_every, "must be >= 1")
        need(t.lr > 0 and math.isfinite(t.lr), "train.lr", t.lr, "must be a finite number > 0")
        need(t.weight_decay >= 0, "train.weight_decay", t.weight_decay, "must be >= 0")
        need(t.warmup_epochs >= 0, "train.warmup_epochs", t.warmup_epochs, "must be >= 0")
        need(t.min_lr >= 0, "train.min_lr", t.min_lr, "must be >= 0")
        need(t.grad_clip is None or t.grad_clip > 0, "train.grad_clip", t.grad_clip, "must be > 0")
        need(t.threads is None or t.threads >= 1, "train.threads", t.threads, "must be >= 1")
        need(d.batch_size >= 1, "data.batch_size", d.batch_size, "must be >= 1")
        need(d.eval_batch_size >= 1, "data.eval_batch_size", d.eval_batch_size, "must be >= 1")
        need(d.num_workers >= 0, "data.num_workers", d.num_workers, "must be >= 0")
        need(d.train_size is None or d.train_size >= 1, "data.train_size", d.train_size, "must be >= 1")
        for key in ("mixup", "cutmix"):
            need(getattr(d, key) >= 0, f"data.{key}", getattr(d, key), "must be >= 0")
        need(0 <= d.label_smoothing < 1, "data.label_smoothing", d.label_smoothing, "must be in [0, 1)")
        need(d.name not in ("cifar10", "cifar100", "imagefolder") or bool(d.root), "data.root", d.root, "is required")
        need(
            self.model.pos_embed_std is None or self.model.pos_embed_std > 0,
            "model.pos_embed_std",
            self.model.pos_embed_std,
            "must be > 0",
        )
        depth = self.model.kwargs.get("depth")
        try:
            self.model.path_config().validate(depth if isinstance(depth, int) else None)
        except ValueError as err:
            problems.append(f"{source}: model: {err}")
        if problems:
            raise ConfigError(problems)


def load_trial_config(
    path: str | Path | None = None,
    overrides: Sequence[str] = (),
    data: Mapping[str, Any] | None = None,
) -> TrialConfig:
    """Reads the model/data/train sections of a YAML file (other top-level sections are left to the search),
    applies `key=value` overrides and validates. Raises ConfigError with every problem found."""
    source = str(path) if path is not None else "config"
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError([f"{source}: no such file"])
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as err:
            raise ConfigError([f"{source}: not valid YAML: {err}"]) from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError([f"{source}: expected a mapping at the top level, got {type(loaded).__name__}"])
        raw = loaded or {}
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


def apply_overrides(raw: Mapping[str, Any], overrides: Sequence[str], source: str = "config") -> dict[str, Any]:
    """Returns a copy of `raw` with dotted `a.b.c=value` overrides applied (values parsed as YAML)."""
    out: dict[str, Any] = _deep_copy(raw)
    problems = []
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            problems.append(f"{source}: --set {item!r}: expected dotted.key=value")
            continue
        try:
            value = yaml.safe_load(text) if text else ""
        except yaml.YAMLError:
            value = text
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                problems.append(f"{source}: --set {key}: {part!r} is not a section (it is {child!r})")
                break
            node = child
        else:
            node[parts[-1]] = value
    if problems:
        raise ConfigError(problems)
    return out


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain dict of a config dataclass (for YAML, MLflow params, logs)."""
    return dataclasses.asdict(cfg)


def from_dict(cls: type, data: Any, source: str, prefix: str, problems: list[str]) -> Any:
    """Builds dataclass `cls` from `data`, converting by declared types; appends problems instead of raising."""
    where = prefix.rstrip(".") or "top level"
    if not isinstance(data, Mapping):
        problems.append(f"{source}: {where}: expected a mapping, got {data!r}")
        return cls()
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            problems.append(f"{source}: {prefix}{key}: unknown key (known: {', '.join(sorted(names))})")
    values = {}
    for name in names & set(data):
        value = _convert(hints[name], data[name], source, prefix + name, problems)
        if value is not _MISSING:  # a bad value keeps the default, so range checks can still run on the rest
            values[name] = value
    return cls(**values)


_MISSING = object()


def _convert(tp: Any, value: Any, source: str, key: str, problems: list[str]) -> Any:
    """Converts `value` to type `tp` or records a problem (and returns the type's neutral value)."""
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, source, key + ".", problems)  # type: ignore[arg-type]
    result = _try_convert(tp, value)
    if result is _MISSING:
        problems.append(f"{source}: {key}: expected {_describe(tp)}, got {value!r}")
    return result


def _try_convert(tp: Any, value: Any) -> Any:
    origin, args = get_origin(tp), get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            out = _try_convert(arg, value)
            if out is not _MISSING:
                return out
        return _MISSING
    if origin is Literal:
        return value if value in args else _MISSING
    if origin is list:
        if not isinstance(value, list):
            return _MISSING
        items = [_try_convert(args[0], v) for v in value]
        return _MISSING if any(i is _MISSING for i in items) else items
    if origin is dict:
        if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
            return _MISSING
        converted = {k: _try_convert(args[1], v) for k, v in value.items()}
        return _MISSING if any(v is _MISSING for v in converted.values()) else converted
    if tp is bool:
        return value if isinstance(value, bool) else _MISSING
    if tp is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else _MISSING
    if tp is float:
        if isinstance(value, bool):
            return _MISSING
        if isinstance(value, int | float):
            return float(value)
        if isinstance(value, str):  # PyYAML reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                return _MISSING
        return _MISSING
    if tp is str:
        return value if isinstance(value, str) else _MISSING
    return value if isinstance(value, tp) else _MISSING


def _describe(tp: Any) -> str:
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is list:
        return f"a list of {_describe(args[0])}"
    if origin is dict:
        return f"a mapping of names to {_describe(args[1])}"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _deep_copy(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _deep_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deep_copy(v) for v in value]
    return value
