"""Typed configuration from YAML, the machinery under config.py: dataclasses built from plain data by their declared
types (every problem collected as one line naming the file, the dotted key and the value), dotted keys, and `--set
key=value` overrides. Imports no torch (nor ray, optuna, mlflow).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
from collections.abc import Mapping, Sequence
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from pathsearch.config.space import parse_number


class ConfigError(ValueError):
    """Invalid configuration; `problems` holds one line per problem, each naming file, key and value."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class _Strict(yaml.constructor.SafeConstructor):
    """A safe loader's mappings, refusing a key given twice in one mapping: PyYAML keeps the last one silently, so a
    second `train:` section would replace the first without a word (PyYAML has no option for this)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node.start_mark.line + 1)
            except TypeError:  # an unhashable key: PyYAML's own error says where
                break
            if first != key_node.start_mark.line + 1:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice in one mapping (first on line {first})", key_node.start_mark
                )
        return super().construct_mapping(node, deep)


class _StrictLoader(_Strict, yaml.SafeLoader):
    """PyYAML's safe loader, strict (_Strict): its errors say where and what."""


# The same on libyaml's parser where PyYAML has it, about 20 times as quick (validation reads a file, and each
# override, at every run); a text it refuses is read again by the loader above, whose messages are the ones told.
_FastLoader = type("_FastLoader", (_Strict, yaml.CSafeLoader), {}) if hasattr(yaml, "CSafeLoader") else None


def load_yaml(text: str, source: str) -> Any:
    """Parses YAML text strictly (duplicate keys refused); a problem is one line, `SOURCE:LINE:COL: what`."""
    if _FastLoader is not None:
        try:
            return yaml.load(text, Loader=_FastLoader)  # a safe loader: builds plain data only
        except yaml.YAMLError:
            pass  # said below, as PyYAML's own parser says it
    try:
        return yaml.load(text, Loader=_StrictLoader)  # a SafeLoader: builds plain data only
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark is not None else source
        what = " ".join(part for part in (err.context, err.problem) if part)
        raise ConfigError([f"{where}: not valid YAML: {what}"]) from None
    except yaml.YAMLError as err:  # no position (a reader error, say)
        raise ConfigError([f"{source}: not valid YAML: {' '.join(str(err).split())}"]) from None


def set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    """raw[a][b][c] = value for key 'a.b.c', creating sections as needed."""
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[parts[-1]] = value


def apply_overrides(raw: Mapping[str, Any], overrides: Sequence[str], source: str = "config") -> dict[str, Any]:
    """Returns a copy of `raw` with dotted `a.b.c=value` overrides applied (values parsed as YAML)."""
    out: dict[str, Any] = deep_copy(raw)
    problems = []
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            problems.append(f"{source}: --set {item!r}: expected dotted.key=value")
            continue
        try:
            value = load_yaml(text, f"--set {key}") if text else ""
        except ConfigError:
            value = text  # not YAML: the text itself (a plain string), which the types then judge
        parts = key.split(".")
        if parts[0] == "space" and len(parts) > 1:  # space keys are dotted themselves: space.<key>[.<field>]
            fields = {"low", "high", "log", "step", "choices", "when", "by"}
            space = out.setdefault("space", {}) or {}
            out["space"] = space
            if parts[-1] in fields and len(parts) > 2:
                entry = space.setdefault(".".join(parts[1:-1]), {})
                if isinstance(entry, dict):
                    entry[parts[-1]] = value
                    continue
            else:
                space[".".join(parts[1:])] = value
                continue
        node = out
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
            near = difflib.get_close_matches(str(key), names, n=1)
            hint = f"did you mean {near[0]!r}? " if near else ""
            problems.append(f"{source}: {prefix}{key}: unknown key ({hint}known: {', '.join(sorted(names))})")
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
        if get_origin(tp) is dict and isinstance(value, Mapping) and all(isinstance(k, str) for k in value):
            kind = get_args(tp)[1]
            for name, item in value.items():  # a mapping's entries each by their own key
                if _try_convert(kind, item) is _MISSING:
                    problems.append(f"{source}: {key}.{name}: expected {_describe(kind)}, got {item!r}")
        else:
            problems.append(f"{source}: {key}: expected {_describe(tp)}, got {value!r}")
    elif not all_finite(result):
        entries = result.items() if isinstance(result, Mapping) else [(None, result)]
        for name, item in entries:  # a mapping's entries each by their own key
            if not all_finite(item):
                where = key if name is None else f"{key}.{name}"
                problems.append(f"{source}: {where}: must be a finite number (not inf or nan), got {item!r}")
        return _MISSING
    return result


def all_finite(value: Any) -> bool:
    """False when `value` is, or holds (in lists and mappings), an infinite or NaN float."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, Mapping):
        return all(all_finite(v) for v in value.values())
    if isinstance(value, list):
        return all(all_finite(v) for v in value)
    return True


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
        number = parse_number(value)
        return _MISSING if number is None else float(number)
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


def deep_copy(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: deep_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [deep_copy(v) for v in value]
    return value
