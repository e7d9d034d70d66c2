"""The reference pages generated from the code: docs/reference/search-file.md (every key of a search file) and
docs/reference/cli.md (every verb and flag). `python -m pathsearch.reference` writes both; tests/test_reference.py
fails when they and the code disagree.

A key's description is its field's comment in pathsearch/config (at the end of its line, or the lines just above
it), its type and default the dataclass's, its range the checks' `need(..., "must ...")` calls, whether and how it
can be searched the rules of config/space.py. The CLI's comes from `pathsearch.cli.build_parser`. Imports no torch
(nor ray, optuna, mlflow).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import io
import os
import sys
import textwrap
import tokenize
import types
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from pathsearch.config import DataConfig, ModelConfig, SearchConfig, TrackingConfig, TrainConfig, checks, space

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "reference"
COMMAND = "python -m pathsearch.reference"
SECTIONS: tuple[tuple[str, type], ...] = (
    ("model", ModelConfig),
    ("data", DataConfig),
    ("train", TrainConfig),
    ("search", SearchConfig),
    ("tracking", TrackingConfig),
)
# The checks' functions whose `need(ok, key, value, "must ...")` calls give a key's range, and the prefix their
# `need` puts before the key it is given.
RANGE_CHECKS = {"trial_problems": "", "search_problems": "search."}
# What the checks hold a key to beyond a `need` range: values that other code judges (timm, PathConfig, the space,
# the URI), or a range that depends on another value.
RULES = {
    "model.name": "a timm ViT whose blocks are `Block` or `ResPostBlock` (`pathsearch validate` asks timm)",
    "model.pretrained": "the published weights must fill the model (checked from the Hugging Face cache, or from the "
    "shapes timm registers for them while they are not cached); with HF_HUB_OFFLINE set they must be cached",
    "model.weights": "a file timm's loader reads whose tensors fill the model (checked on the meta device); not with "
    "`model.pretrained: true`",
    "model.kwargs": "what `timm.create_model` takes for the model; the model is built on the meta device to check it. "
    "The sizes of a ViT: `depth` a whole number 1 to 256; `embed_dim`, `num_heads`, `in_chans`, `num_classes`, "
    "`img_size`, `patch_size` 1 to 65536 (the last two also [height, width]); `mlp_ratio` > 0, giving 1 to 65536 "
    "MLP units; dropout rates in [0, 1); at most 2**34 parameters in all",
    "model.pos_embed_std": "with pretrained weights only together with `model.reinit_pos_embed: true`",
    "model.reinit_pos_embed": "needs `model.pos_embed_std`",
    "model.pruned": "path names (`embed`, `attn.K`, `mlp.K`, K in 1..depth), each once; at least one path kept",
    "model.ensemble_scale.init": "finite numbers of size at most 1e15; selectors `all`, `embed`, `attn`, `mlp`, "
    "`attn.K`, `mlp.K-M`, `layer.K`, `layers.K-M` (a narrower one overrides a wider one)",
    "model.distill.alpha": "must be a finite number >= 0",
    "model.distill.temperature": "must be a finite number > 0",
    "model.distill.students": "prefix lengths in 1..2L (L the depth) or path selectors; at least one when alpha > 0",
    "data.root": "required for cifar10, cifar100 and imagefolder (imagefolder: with train/ and val/ folders, and "
    "test/ for a confirmation)",
    "data.train_size": "at most the training images the dataset has left after val_size",
    "data.val_size": "fewer than the dataset's training images",
    "train.opt": "an optimiser timm's `create_optimizer_v2` knows",
    "train.supernet.min_kept": "at most 2L+1, the model's paths",
    "search.mode": "one per metric",
    "search.resources_per_trial": "finite numbers > 0 by resource name: `cpu`, `gpu` (at most 1: a share packs "
    "trials on a GPU), `memory` (bytes), custom names a node declares; `workers`: a whole number >= 1",
    "search.enqueue": "each name a parameter of the space, each value a point of it",
    "search.confirm.top_k": "at most search.num_samples - 1 (strategy full)",
    "search.confirm.max_seeds": "must be >= confirm.seeds",
    "data.batch_size": "with mixup or cutmix at most the training images, where the dataset tells them (digits, "
    "synthetic, CIFAR, MNIST)",
    "train.seeds": "train.seed + seeds - 1 at most 2**32 - 1",
    "train.min_lr": "at most train.lr",
    "search.max_kept_paths": "at least the paths the baseline keeps (all of them, or all but the base's model.pruned "
    "where the space does not search it)",
    "tracking.experiment": "one line of printable characters, not empty, without spaces around it, at most 500 "
    "characters (MLflow's limit); a slash is allowed (Databricks names experiments by workspace path)",
}
NOT_SEARCHED = {"train.test": "no: the test split is never a search parameter"}
# An example of each key that no shipped search file sets to another value than its default.
EXAMPLES = {
    "model.weights": "weights/digits_vit.safetensors",
    "model.reinit_pos_embed": True,
    "model.pruned": ["embed", "attn.1"],
    "model.ensemble_scale.scope": "both",
    "model.ensemble_scale.learnable": False,
    "model.distill.alpha": 0.5,
    "data.split_seed": 1,
    "data.img_size": 32,
    "train.opt": "sgd",
    "train.min_lr": 0.0,
    "train.grad_clip": 1.0,
    "train.seed": 7,
    "train.seeds": 3,
    "train.amp": False,
    "train.channels_last": True,
    "train.compile": True,
    "train.threads": 2,
    "train.test": True,
    "train.supernet.enabled": True,
    "train.supernet.masks_per_batch": 6,
    "train.supernet.distribution": "bernoulli",
    "train.supernet.keep_prob": 0.7,
    "train.supernet.min_kept": 3,
    "search.reduction_factor": 3.0,
    "search.worker_placement": "spread",
    "search.max_failures": 0,
    "search.autoscaler_wait_min": 15.0,
    "search.time_budget_s": 3600.0,
    "search.max_kept_paths": 9,
    "search.max_params": 5000000,
    "search.enqueue": [{"prune.shortest": 2}],
    "search.two_stage.proxy_sampler": "qmc",
    "search.two_stage.proxy_batch": 1024,
    "search.confirm.enabled": False,
    "search.confirm.first_seed": 100,
    "search.confirm.max_concurrent_trials": 4,
    "search.confirm.alpha": 0.1,
    "tracking.tracking_uri": "http://127.0.0.1:5000",
}
# The guide that explains a key, by the longest dotted prefix of it (paths relative to docs/).
GUIDES = {
    "model": "model.md",
    "model.pretrained": "own-data.md#pretrained-weights",
    "model.weights": "own-data.md#pretrained-weights",
    "model.reinit_pos_embed": "own-data.md#position-embeddings",
    "model.pruned": "paths.md#path-masks-and-pruning",
    "model.ensemble_scale": "paths.md#ensemblescale",
    "model.distill": "paths.md#self-distillation",
    "data": "train.md",
    "data.train_size": "confirmation.md",
    "data.val_size": "confirmation.md",
    "data.split_seed": "confirmation.md",
    "train": "train.md",
    "train.amp": "gpu.md",
    "train.channels_last": "gpu.md",
    "train.compile": "gpu.md",
    "train.test": "statistics.md#three-splits",
    "train.supernet": "analysis.md#the-two-stage-one-shot-search",
    "search": "search-files.md#what-a-search-file-holds",
    "search.resources_per_trial": "gpu.md",
    "search.worker_placement": "gpu.md",
    "search.autoscaler_wait_min": "cluster.md",
    "search.strategy": "analysis.md#the-two-stage-one-shot-search",
    "search.two_stage": "analysis.md#the-two-stage-one-shot-search",
    "search.confirm": "statistics.md#turning-it-on",
    "search.confirm.max_seeds": "statistics.md#sequential-confirmation-seeds-until-the-answer-is-decided",
    "search.confirm.step": "statistics.md#sequential-confirmation-seeds-until-the-answer-is-decided",
    "search.confirm.min_effect": "statistics.md#sequential-confirmation-seeds-until-the-answer-is-decided",
    "search.confirm.alpha": "statistics.md#sequential-confirmation-seeds-until-the-answer-is-decided",
    "tracking": "search-files.md#what-a-search-file-holds",
    "space": "search-files.md#what-a-search-file-holds",
}
SPACE_FIELDS = (
    (space.Dist, ("low", "high", "log", "step", "choices")),
    (space.SpaceEntry, ("by", "when")),
)


@dataclass
class Key:
    """One key of a search file: dotted name, declared type, default and description (its field's comment)."""

    name: str
    type: Any
    default: Any
    description: str


@dataclass
class Section:
    """A mapping of a search file (`model`, `search.confirm`, ...): its dataclass's docstring and its own keys."""

    name: str
    doc: str
    keys: list[Key]


@functools.cache
def field_comments(cls: type) -> dict[str, str]:
    """Each field of dataclass `cls` with its comment: the comment lines just above the field and the comment at
    the end of its line, joined ('' for a field with neither)."""
    lines, _ = inspect.getsourcelines(cls)
    source = textwrap.dedent("".join(lines))
    comments: dict[int, str] = {}  # line -> its comment
    code_lines: set[int] = set()
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            comments[token.start[0]] = token.string.lstrip("#").strip()
        elif token.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT):
            code_lines.add(token.start[0])
    found = {}
    tree = ast.parse(source).body[0]
    assert isinstance(tree, ast.ClassDef)
    for node in tree.body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            above: list[str] = []
            line = node.lineno - 1
            while line in comments and line not in code_lines:
                above.insert(0, comments[line])
                line -= 1
            trailing = comments.get(node.end_lineno or node.lineno, "")
            found[node.target.id] = " ".join(part for part in [*above, trailing] if part)
    return found


def class_doc(cls: type) -> str:
    """A dataclass's own docstring ('' without one: dataclasses make one up from the signature)."""
    doc = cls.__dict__.get("__doc__") or ""
    return "" if doc.startswith(cls.__name__ + "(") else inspect.cleandoc(doc)


def default_of(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def schema_sections() -> list[Section]:
    """Every mapping of a search file with its keys, in the dataclasses' order; a mapping's nested mappings follow
    its own keys."""
    out: list[Section] = []

    def walk(name: str, cls: type) -> None:
        hints, comments = get_type_hints(cls), field_comments(cls)
        section = Section(name, class_doc(cls), [])
        out.append(section)
        nested = []
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                nested.append((f"{name}.{f.name}", hints[f.name]))
            else:
                section.keys.append(Key(f"{name}.{f.name}", hints[f.name], default_of(f), comments[f.name]))
        for sub, sub_cls in nested:
            walk(sub, sub_cls)

    for name, cls in SECTIONS:
        walk(name, cls)
    return out


def schema_keys() -> list[Key]:
    return [key for section in schema_sections() for key in section.keys]


def need_ranges() -> dict[str, list[str]]:
    """The ranges the checks state as `need(ok, "key", value, "must ...")` calls, by dotted key."""
    tree = ast.parse(Path(inspect.getfile(checks)).read_text())
    ranges: dict[str, list[str]] = {}
    for func in tree.body:
        if not isinstance(func, ast.FunctionDef) or func.name not in RANGE_CHECKS:
            continue
        for node in ast.walk(func):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "need"):
                continue
            key, what = node.args[1], node.args[3]
            if not (isinstance(key, ast.Constant) and isinstance(what, ast.Constant) and isinstance(what.value, str)):
                continue  # a key or message made at run time: RULES says it in words
            if what.value.startswith("must"):  # other messages say what a key does not allow together with others
                texts = ranges.setdefault(RANGE_CHECKS[func.name] + str(key.value), [])
                texts += [] if what.value in texts else [what.value]
    return ranges


def literals(tp: Any) -> list[Any]:
    """The values of every Literal in a type, in order."""
    if get_origin(tp) is Literal:
        return list(get_args(tp))
    found: list[Any] = []
    for arg in get_args(tp):
        found += [v for v in literals(arg) if v not in found]
    return found


def type_text(tp: Any) -> str:
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(type_text(a) for a in args)
    if origin is Literal:
        return "str"
    if origin is list:
        union = get_origin(args[0]) in (Union, types.UnionType)
        return f"list of ({type_text(args[0])})" if union else f"list of {type_text(args[0])}"
    if origin is dict:
        return f"mapping of str to {type_text(args[1])}"
    if tp is type(None):
        return "null"
    if tp is Any:
        return "any"
    return str(tp.__name__)


def allowed_text(key: Key, ranges: dict[str, list[str]]) -> str:
    parts = []
    if values := literals(key.type):
        parts.append("one of " + ", ".join(f"`{v}`" for v in values))
    if key.name == "search.metric":
        parts.append("metrics " + ", ".join(f"`{m}`" for m in checks.METRICS))
    if key.name == "tracking.tracking_uri":
        parts.append("a folder or a URI of scheme " + ", ".join(f"`{s}`" for s in checks.TRACKING_SCHEMES if s))
    parts += ranges.get(key.name, [])
    if key.name in RULES:
        parts.append(RULES[key.name])
    return "; ".join(parts)


def space_text(key: Key) -> str:
    """Whether and how a `space` entry may search the key (tests/test_reference.py holds it to the validator)."""
    if not key.name.startswith(("model.", "data.", "train.")):
        return "no"  # the space's entries are keys of the trial's sections
    if key.name in NOT_SEARCHED:
        return NOT_SEARCHED[key.name]
    if key.name == "model.pruned":
        flags = ", ".join(f"`by: {by}`" for by in space.MASK_BY if by != "shortest")
        return f"{flags} (a keep/prune flag each), or `by: shortest` with integer `low`/`high` (k shortest pruned)"
    if key.name == "model.ensemble_scale.init":
        return ", ".join(f"`by: {by}`" for by in space.SCALE_BY) + " with `low`/`high` (`log`, `step`) or `choices`"
    if key.name == "model.kwargs":
        return "each `model.kwargs.<name>` on its own: `low`/`high` (`log`, `step`) or `choices`"
    union = get_origin(key.type) in (Union, types.UnionType)
    kinds = {get_origin(a) or a for a in (get_args(key.type) if union else (key.type,))} - {type(None)}
    if kinds & {list, dict}:
        return "no: a list or mapping is not a point Optuna samples"
    if kinds <= {int, float}:
        whole = "integer " if kinds == {int} else ""
        return f"{whole}`low`/`high` (`log`, `step`) or `choices`"
    return "`choices`"


def yaml_flow(value: Any) -> str:
    """A value as one line of YAML flow style."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6, sort_keys=False).strip()
    return text.removesuffix("...").strip()


def shipped_examples(keys: list[Key]) -> dict[str, tuple[Any, str]]:
    """Each key's value in the shipped search files (search_spaces/*.yaml, the first that differs from the default,
    else the first), with the file."""
    defaults = {key.name: key.default for key in keys}
    found: dict[str, tuple[Any, str]] = {}
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's, where PyYAML has it: 20 times as quick
    for path in sorted((ROOT / "search_spaces").glob("*.yaml")):
        data = yaml.load(path.read_text(), Loader=loader) or {}
        for name, default in defaults.items():
            value: Any = data
            for part in name.split("."):
                value = value.get(part, dataclasses.MISSING) if isinstance(value, dict) else dataclasses.MISSING
            if value is not dataclasses.MISSING and (name not in found or found[name][0] == default != value):
                found[name] = (value, path.name)
    return found


def link(path: Path) -> str:
    """A link from the reference pages (in OUT) to a file of the repository."""
    return Path(os.path.relpath(path, OUT)).as_posix()


def example_text(key: Key, shipped: dict[str, tuple[Any, str]]) -> str:
    """A value of the key as YAML: a shipped file's other than the default, else EXAMPLES's, else the default."""
    value, file = shipped.get(key.name, (key.default, ""))
    if value == key.default and key.name in EXAMPLES:
        value, file = EXAMPLES[key.name], ""
    where = f" ([{file}]({link(ROOT / 'search_spaces' / file)}))" if file else ""
    nested: Any = value
    for part in reversed(key.name.split(".")):
        nested = {part: nested}
    return f"`{yaml_flow(nested)}`{where}"


def guide_of(name: str) -> str:
    """The guide's page (and heading) that explains a key: GUIDES at the key's longest prefix."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in GUIDES:
            target = GUIDES[".".join(parts[:n])]
            page, _, heading = target.partition("#")
            return f"[{target}]({link(ROOT / 'docs' / page)}{'#' + heading if heading else ''})"
    raise KeyError(f"no guide for {name}: add its section to GUIDES")


def anchor(heading: str) -> str:
    """GitHub's id for a heading of these pages (code spans of dotted keys): `train.lr` -> trainlr."""
    return "".join(c for c in heading.lower() if c.isalnum() or c in "-_ ").replace(" ", "-")


def search_file_page() -> str:
    sections, ranges = schema_sections(), need_ranges()
    shipped = shipped_examples([key for section in sections for key in section.keys])
    two_stage = " and ".join(f"`{k}`" for k in checks.PATH_SPACE_KEYS)
    lines = [
        "# Search-file reference",
        "",
        f"Generated from the code by `{COMMAND}`; do not edit (tests/test_reference.py fails when this page and",
        "the code disagree). Every key of a search file: its type and default, the values the checks allow, whether",
        "a `space` entry can search it, an example and the guide that explains it. `pathsearch validate FILE` checks",
        "a file against all of it; `--set KEY=VALUE` overrides any key.",
        "",
        "| key | type | default | searched in `space` |",
        "|---|---|---|---|",
    ]
    for section in sections:
        for key in section.keys:
            kind = space_text(key).split(":")[0] if space_text(key).startswith("no") else "yes"
            lines.append(
                f"| [`{key.name}`](#{anchor(key.name)}) | {type_text(key.type)} | `{yaml_flow(key.default)}` | {kind} |"
            )
    lines += ["| [`space`](#space) | mapping of dotted key to entry | `{}` | |", ""]
    for section in sections:
        lines += [f"## `{section.name}`", ""]
        if section.doc:
            lines += [section.doc, ""]
        for key in section.keys:
            lines += [f"### `{key.name}`", "", key.description, ""]
            lines.append(f"- type: {type_text(key.type)}; default: `{yaml_flow(key.default)}`")
            if allowed := allowed_text(key, ranges):
                lines.append(f"- allowed: {allowed}")
            lines.append(f"- searched: {space_text(key)}")
            lines.append(f"- example: {example_text(key, shipped)}")
            lines += [f"- guide: {guide_of(key.name)}", ""]
    lines += [
        "## `space`",
        "",
        "What the search samples: a mapping from a dotted key of model, data or train (`train.lr`,",
        "`model.kwargs.embed_dim`) to an entry with the fields below (Optuna's words). An entry with `when` is sampled",
        "only when its condition holds, and a key it names must come before it. A two_stage search samples only",
        f"{two_stage}. Guide: {guide_of('space')}.",
        "",
        "| field | type | description |",
        "|---|---|---|",
    ]
    for cls, names in SPACE_FIELDS:
        hints, comments = get_type_hints(cls), field_comments(cls)
        for name in names:
            lines.append(f"| `{name}` | {type_text(hints[name])} | {comments[name]} |")
    mask = ", ".join(f"`{b}`" for b in space.MASK_BY)
    scale = ", ".join(f"`{b}`" for b in space.SCALE_BY)
    lines += ["", f"`by` takes {mask} for `model.pruned` and {scale} for `model.ensemble_scale.init`.", ""]
    return "\n".join(lines)


def verbs_of(parser: argparse.ArgumentParser) -> list[tuple[str, str, argparse.ArgumentParser]]:
    """(name, help, parser) of each verb of `parser`, sub-verbs after their verb (`cluster check`)."""
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            for name, sub in action.choices.items():
                found.append((name, helps.get(name, ""), sub))
                found += [(f"{name} {n}", h, p) for n, h, p in verbs_of(sub)]
    return found


def arguments_of(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """A verb's own arguments: not -h, nor a sub-verb."""
    return [a for a in parser._actions if not isinstance(a, argparse._HelpAction | argparse._SubParsersAction)]


def argument_text(action: argparse.Action) -> str:
    metavar = action.metavar or (action.dest if not action.option_strings else action.dest.upper())
    if isinstance(metavar, tuple):
        metavar = " ".join(metavar)
    value = {"+": f" {metavar} [{metavar} ...]", "?": f" [{metavar}]", "*": f" [{metavar} ...]"}.get(
        str(action.nargs), f" {metavar}"
    )
    if action.nargs == 0:
        value = ""
    if not action.option_strings:
        return value.strip()
    return ", ".join(action.option_strings) + value


def cli_page() -> str:
    from pathsearch.cli import build_parser
    from pathsearch.cli import main as cli_main

    parser, main_doc = build_parser(), cli_main.__doc__ or ""
    lines = [
        "# Command-line reference",
        "",
        f"Generated from `pathsearch.cli.build_parser` by `{COMMAND}`; do not edit (tests/test_reference.py fails",
        "when this page and the parser disagree). `pathsearch VERB --help` prints the same.",
        "",
        inspect.cleandoc(main_doc),
        "",
        "| verb | what it does |",
        "|---|---|",
    ]
    verbs = verbs_of(parser)
    lines += [f"| [`{name}`](#{anchor('pathsearch ' + name)}) | {text} |" for name, text, _ in verbs]
    lines.append("")
    for name, text, sub in verbs:
        lines += [f"## `pathsearch {name}`", "", text, ""]
        arguments = arguments_of(sub)
        if not arguments:
            continue
        lines += ["| argument | default | what it is |", "|---|---|---|"]
        for action in arguments:
            default = action.default
            shown = action.nargs != 0 and not (default is None or default == [] or default == argparse.SUPPRESS)
            what = action.help or ""
            if action.choices:
                what += " (" + ", ".join(f"`{c}`" for c in action.choices) + ")"
            if isinstance(action, argparse._AppendAction):
                what += " (repeatable)"
            if action.required and action.option_strings:
                what += " (required)"
            lines.append(f"| `{argument_text(action)}` | {f'`{default}`' if shown else ''} | {what} |")
        lines.append("")
    return "\n".join(lines)


def pages() -> dict[str, str]:
    """The generated pages by file name (under docs/reference/)."""
    return {"search-file.md": search_file_page(), "cli.md": cli_page()}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=COMMAND, description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", default=str(OUT), help="folder to write the pages to (default docs/reference)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, text in pages().items():
        (out / name).write_text(text)
        print(f"wrote {out / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
