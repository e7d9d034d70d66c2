"""Path names, path masks, EnsembleScale specs and PathConfig, the exportable description of one path configuration.

A ViT of depth L has 2L+1 paths named `embed`, `attn.1`, `mlp.1`, ..., `attn.L`, `mlp.L` (shortest first).
This module is pure data: it imports no torch, so configs can be read, validated and written anywhere.
"""

from __future__ import annotations

import difflib
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import yaml

ScaleKind = Literal["scalar", "vector"]
ScaleScope = Literal["ensemble", "both"]
SCALE_KINDS: tuple[str, ...] = ("scalar", "vector")
SCALE_SCOPES: tuple[str, ...] = ("ensemble", "both")

# attn / mlp / layers, optionally with one layer or a layer range: attn.3, mlp.2-5, layers.1-4
_SELECTOR = re.compile(r"^(?P<kind>attn|mlp|layers?)(?:\.(?P<lo>\d+)(?:-(?P<hi>\d+))?)?$")


def path_names(depth: int) -> list[str]:
    """The 2L+1 path names of a depth-L ViT, in the order they are computed (shortest path first)."""
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    names = ["embed"]
    for layer in range(1, depth + 1):
        names += [f"attn.{layer}", f"mlp.{layer}"]
    return names


def select_paths(selector: str, depth: int) -> list[int]:
    """Indices into `path_names(depth)` matched by a path selector.

    Selectors: `all`, `embed`, a path name (`attn.3`), a kind (`attn`, `mlp`: every layer), a kind over a
    layer range (`mlp.2-5`), or both paths of layers (`layer.3`, `layers.1-4`). Layers are 1-based.
    """
    if selector == "all":
        return list(range(2 * depth + 1))
    if selector == "embed":
        return [0]
    match = _SELECTOR.match(selector) if isinstance(selector, str) else None
    if match is None:
        raise ValueError(
            f"unknown path selector {selector!r}: expected 'all', 'embed', 'attn', 'mlp', 'attn.K', 'mlp.K-M', "
            f"'layer.K' or 'layers.K-M' with layers in 1..{depth}"
        )
    kind, lo, hi = match["kind"], match["lo"], match["hi"]
    if kind.startswith("layer") and lo is None:
        raise ValueError(f"path selector {selector!r} needs a layer or range, e.g. 'layers.1-{depth}'")
    first = int(lo) if lo is not None else 1
    last = int(hi) if hi is not None else (first if lo is not None else depth)
    if not 1 <= first <= last <= depth:
        raise ValueError(f"path selector {selector!r} names layers outside 1..{depth} (or an empty range)")
    layers = range(first, last + 1)
    if kind == "attn":
        return [2 * layer - 1 for layer in layers]
    if kind == "mlp":
        return [2 * layer for layer in layers]
    return [i for layer in layers for i in (2 * layer - 1, 2 * layer)]


def parse_mask(keep: Mapping[str, Any] | Sequence[Any], depth: int) -> list[bool]:
    """A path mask (True = the path feeds the classifier) from a dict or a sequence, validated.

    A dict maps path names to bools; paths it does not name are kept. A sequence gives one bool per path in
    `path_names(depth)` order. A mask that keeps no path is refused.
    """
    names = path_names(depth)
    if isinstance(keep, Mapping):
        mask = [True] * len(names)
        for name, value in keep.items():
            if name not in names:
                near = difflib.get_close_matches(str(name), names, n=1)
                hint = f" (did you mean {near[0]!r}?)" if near else ""
                raise ValueError(f"unknown path name {name!r} for depth {depth}{hint}; valid names: {', '.join(names)}")
            mask[names.index(name)] = _as_bool(value, name)
    else:
        values = list(keep)
        if len(values) != len(names):
            raise ValueError(
                f"path mask has {len(values)} entries but a depth-{depth} ViT has {len(names)} paths ({names})"
            )
        mask = [_as_bool(value, names[i]) for i, value in enumerate(values)]
    if not any(mask):
        raise ValueError(f"path mask keeps no path: at least one of {names} must feed the classifier")
    return mask


def _as_bool(value: Any, name: str) -> bool:
    if hasattr(value, "item"):  # a 0-d tensor or numpy scalar
        value = value.item()
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise ValueError(f"path mask entry for {name!r} must be a bool, got {value!r}")


def resolve_scale_init(init: float | Mapping[str, float], depth: int) -> list[float]:
    """One EnsembleScale initial value per path from a single value or a {selector: value} dict.

    In a dict, `all` sets the default (else 1.0) and a narrower selector (fewer paths) overrides a wider one;
    two selectors of the same width that disagree on a path are refused as ambiguous.
    """
    num_paths = 2 * depth + 1
    if not isinstance(init, Mapping):
        return [_finite_init(init, "ensemble_scale.init")] * num_paths
    chosen: list[tuple[int, str, float] | None] = [None] * num_paths  # (width, selector, value)
    for selector, raw in init.items():
        value = _finite_init(raw, f"ensemble_scale.init[{selector!r}]")
        indices = select_paths(selector, depth)
        for i in indices:
            current = chosen[i]
            if current is None or len(indices) < current[0]:
                chosen[i] = (len(indices), selector, value)
            elif len(indices) == current[0] and current[2] != value:
                raise ValueError(
                    f"ensemble_scale.init: selectors {current[1]!r} and {selector!r} both set path "
                    f"{path_names(depth)[i]!r} ({current[2]} vs {value}); use a narrower selector"
                )
    return [c[2] if c is not None else 1.0 for c in chosen]


# The largest factor a trial may put on activations (an EnsembleScale, a loss weight, position embeddings' std):
# LayerNorm squares them and sums over the channels, and float32 (bf16 too) ends at 3.4e38
FLOAT32_SAFE = 1e15


def _finite_init(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{where} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{where} must be finite, got {value!r}")
    if abs(value) > FLOAT32_SAFE:
        raise ValueError(
            f"{where} must be at most {FLOAT32_SAFE:g} in size (activations scaled by it are squared and summed in "
            f"float32, which ends at 3.4e38), got {value!r}"
        )
    return float(value)


@dataclass
class EnsembleScaleConfig:
    """EnsembleScale: a learnable weight per ensemble component (scalar, or a vector of embed_dim channels).

    `init` is one value or {selector: value}; `values` holds learned values by path name (a float per path
    for `scalar`, a list of embed_dim floats for `vector`) and, when present, overrides `init`.
    """

    kind: ScaleKind = "scalar"
    scope: ScaleScope = "ensemble"
    init: float | dict[str, float] = 1.0
    learnable: bool = True
    values: dict[str, float | list[float]] | None = None

    def validate(self, depth: int | None = None) -> None:
        if self.kind not in SCALE_KINDS:
            raise ValueError(f"ensemble_scale.kind must be one of {SCALE_KINDS}, got {self.kind!r}")
        if self.scope not in SCALE_SCOPES:
            raise ValueError(f"ensemble_scale.scope must be one of {SCALE_SCOPES}, got {self.scope!r}")
        if not isinstance(self.learnable, bool):
            raise ValueError(f"ensemble_scale.learnable must be a bool, got {self.learnable!r}")
        if isinstance(self.init, Mapping):
            for key, value in self.init.items():
                _finite_init(value, f"ensemble_scale.init[{key!r}]")
        else:
            _finite_init(self.init, "ensemble_scale.init")
        if depth is not None:
            resolve_scale_init(self.init, depth)
        if self.values is not None:
            for name, learned in self.values.items():
                for v in learned if isinstance(learned, list) else [learned]:
                    _finite_init(v, f"ensemble_scale.values[{name!r}]")
                if self.kind == "scalar" and isinstance(learned, list):
                    raise ValueError(f"ensemble_scale.values[{name!r}]: kind 'scalar' takes one number per path")
                if self.kind == "vector" and not isinstance(learned, list):
                    raise ValueError(f"ensemble_scale.values[{name!r}]: kind 'vector' takes a list per path")
            if depth is not None and sorted(self.values) != sorted(path_names(depth)):
                raise ValueError(
                    f"ensemble_scale.values must give every path of a depth-{depth} ViT exactly once, "
                    f"got {sorted(self.values)}"
                )


@dataclass
class DistillConfig:
    """Self-distillation from the full ensemble (teacher) to short-path ensembles (students).

    `students` entries are prefix lengths (int k: the first k paths) or path selectors (`attn`, `layers.1-3`).
    `alpha = 0` turns distillation off.
    """

    alpha: float = 0.0
    temperature: float = 1.0
    students: list[int | str] = field(default_factory=list)

    def validate(self, depth: int | None = None) -> None:
        _finite_init(self.alpha, "distill.alpha")
        _finite_init(self.temperature, "distill.temperature")
        if self.alpha < 0:
            raise ValueError(f"distill.alpha must be >= 0, got {self.alpha}")
        if self.temperature <= 0:
            raise ValueError(f"distill.temperature must be > 0, got {self.temperature}")
        if not isinstance(self.students, list):
            raise ValueError(f"distill.students must be a list, got {self.students!r}")
        if self.alpha > 0 and not self.students:
            raise ValueError("distill.alpha > 0 needs at least one entry in distill.students")
        for student in self.students:
            if isinstance(student, bool) or not isinstance(student, int | str):
                raise ValueError(f"distill.students entries are prefix lengths or selectors, got {student!r}")
            if isinstance(student, int) and student < 1:
                raise ValueError(f"distill.students prefix length must be >= 1, got {student}")
            if depth is not None:
                student_indices(student, depth)


def student_indices(student: int | str, depth: int) -> list[int]:
    """Path indices of one distillation student: a prefix length (first k paths) or a path selector."""
    num_paths = 2 * depth + 1
    if isinstance(student, int):
        if not 1 <= student < num_paths:
            raise ValueError(
                f"distill.students prefix length {student} must be in 1..{num_paths - 1} for depth {depth}"
            )
        return list(range(student))
    return select_paths(student, depth)


@dataclass
class PathConfig:
    """One path configuration: the timm model, which paths are pruned, EnsembleScale and self-distillation.

    `pruned` lists path names removed from the classifier's input (they still feed the trunk).
    `create_path_vit(path_config=cfg)` rebuilds the model it describes.
    """

    model_name: str | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    depth: int | None = None
    pruned: list[str] = field(default_factory=list)
    ensemble_scale: EnsembleScaleConfig = field(default_factory=EnsembleScaleConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    provenance: dict[str, Any] | None = None  # where an exported configuration came from (search, seeds, verdict)

    def __post_init__(self) -> None:
        self.model_kwargs = _plain(dict(self.model_kwargs))

    def validate(self, depth: int | None = None) -> None:
        """Checks every field; with a depth (or `self.depth`), also path names and per-path settings."""
        if depth is not None and self.depth is not None and depth != self.depth:
            raise ValueError(f"path config is for depth {self.depth}, but the model has depth {depth}")
        depth = depth if depth is not None else self.depth
        if not isinstance(self.pruned, list) or not all(isinstance(n, str) for n in self.pruned):
            raise ValueError(f"pruned must be a list of path names, got {self.pruned!r}")
        duplicates = sorted({n for n in self.pruned if self.pruned.count(n) > 1})
        if duplicates:
            raise ValueError(f"pruned lists path names more than once: {duplicates}")
        if depth is not None:
            self.keep_mask(depth)
        else:  # depth unknown until the timm model is built: check the form of each name
            for name in self.pruned:
                if name != "embed" and not re.fullmatch(r"(attn|mlp)\.[1-9]\d*", name):
                    raise ValueError(f"unknown path name {name!r}: expected 'embed', 'attn.K' or 'mlp.K'")
        self.ensemble_scale.validate(depth)
        self.distill.validate(depth)

    def keep_mask(self, depth: int) -> list[bool]:
        """The path mask (True = kept) for a depth-L model."""
        return parse_mask({name: False for name in self.pruned}, depth)

    def to_dict(self) -> dict[str, Any]:
        scale = self.ensemble_scale
        out: dict[str, Any] = {
            "model_name": self.model_name,
            "model_kwargs": _plain(self.model_kwargs),
            "depth": self.depth,
        }
        if self.depth is not None:
            out["kept"] = [n for n in path_names(self.depth) if n not in self.pruned]
        out["pruned"] = list(self.pruned)
        out["ensemble_scale"] = {
            "kind": scale.kind,
            "scope": scale.scope,
            "init": dict(scale.init) if isinstance(scale.init, Mapping) else scale.init,
            "learnable": scale.learnable,
            "values": None if scale.values is None else {k: _plain(v) for k, v in scale.values.items()},
        }
        out["distill"] = {
            "alpha": self.distill.alpha,
            "temperature": self.distill.temperature,
            "students": list(self.distill.students),
        }
        if self.provenance is not None:
            out["provenance"] = _plain(self.provenance)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "path config") -> PathConfig:
        """Builds and validates a PathConfig; errors name the source and the offending key."""
        if not isinstance(data, Mapping):
            raise ValueError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
        known = {"model_name", "model_kwargs", "depth", "kept", "pruned", "ensemble_scale", "distill", "provenance"}
        _reject_unknown(data, known, source, "")
        scale_data = data.get("ensemble_scale") or {}
        distill_data = data.get("distill") or {}
        _reject_unknown(scale_data, {"kind", "scope", "init", "learnable", "values"}, source, "ensemble_scale.")
        _reject_unknown(distill_data, {"alpha", "temperature", "students"}, source, "distill.")
        try:
            cfg = cls(
                model_name=data.get("model_name"),
                model_kwargs=dict(data.get("model_kwargs") or {}),
                depth=data.get("depth"),
                pruned=list(data.get("pruned") or []),
                ensemble_scale=EnsembleScaleConfig(**scale_data),
                distill=DistillConfig(**distill_data),
                provenance=dict(data["provenance"]) if isinstance(data.get("provenance"), Mapping) else None,
            )
            cfg.validate()
            if "kept" in data and cfg.depth is not None:
                expected = [n for n in path_names(cfg.depth) if n not in cfg.pruned]
                if list(data["kept"]) != expected:
                    raise ValueError(f"kept {data['kept']} disagrees with pruned {cfg.pruned} (expected {expected})")
        except (TypeError, ValueError) as err:
            raise ValueError(f"{source}: {err}") from None
        return cfg

    def save(self, path: str | Path) -> Path:
        """Writes YAML or JSON by suffix (.yaml/.yml/.json), atomically (a temp file renamed into place)."""
        path = Path(path)
        fmt = _format_of(path)
        text = (
            json.dumps(self.to_dict(), indent=2) + "\n"
            if fmt == "json"
            else yaml.safe_dump(self.to_dict(), sort_keys=False)
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> PathConfig:
        path = Path(path)
        fmt = _format_of(path)
        if not path.is_file():
            raise ValueError(f"{path}: no such path config file")
        text = path.read_text()
        try:
            data = json.loads(text) if fmt == "json" else yaml.safe_load(text)
        except (json.JSONDecodeError, yaml.YAMLError) as err:
            raise ValueError(f"{path}: not valid {fmt.upper()}: {err}") from None
        return cls.from_dict(data, source=str(path))


def _format_of(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in (".yaml", ".yml"):
        return "yaml"
    if suffix == ".json":
        return "json"
    raise ValueError(f"{path}: path config files end in .yaml, .yml or .json, not {suffix!r}")


def _reject_unknown(data: Any, known: set[str], source: str, prefix: str) -> None:
    if not isinstance(data, Mapping):
        raise ValueError(f"{source}: key {prefix.rstrip('.')!r} must be a mapping, got {data!r}")
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{source}: unknown key(s) {[prefix + k for k in unknown]}; known: {sorted(known)}")


def _plain(value: Any) -> Any:
    """Tuples become lists, so that YAML/JSON round trips compare equal."""
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in cast(Mapping[str, Any], value).items()}
    return value
