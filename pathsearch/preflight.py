"""What a run needs, checked before anything is written or started. config.py checks a search file's form, types and
ranges without torch; this module adds what only torch and timm know: the model is built on PyTorch's `meta` device
(no memory, no weights) from the resolved configuration and the dataset's channels, image size and classes, and run
forward there, so timm itself checks the head, channels, patches, heads and depth; pretrained weights (a file, or
timm's published ones in the Hugging Face cache) go through timm's own loader there, to check that they fill it; the
optimiser is built by timm's registry on that model; the augmentation policy is parsed by timm. `load_search` and
`load_trial` are config.py's loaders with these checks, for the base configuration and for the extreme points of the
space: every verb reads its search file through them, so `validate` says what `search` would stop on.

Imports torch and timm, never ray, optuna or mlflow.
"""

from __future__ import annotations

import difflib
import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import timm
import torch
from huggingface_hub import constants as hub_constants
from timm.data import create_transform
from timm.optim import create_optimizer_v2, list_optimizers

from pathsearch.config import SearchFile, TrialConfig, load_search_file, load_trial_config
from pathsearch.config.checks import MAX_PARAMS, weights_problems
from pathsearch.config.typed import ConfigError
from pathsearch.ensemble.model import CANNOT_BUILD, PathEnsembleViT, meta_path_vit, model_depth
from pathsearch.ensemble.weights import fill_problem, published_weights, read_weights, weights_overlay
from pathsearch.trial.data import AUGMENTED, data_shape


def load_search(path: str | Path, overrides: Sequence[str] = ()) -> SearchFile:
    """A search file, with every problem `search` would meet (ConfigError, one line each)."""
    spec = load_search_file(path, overrides, model_depth=model_depth, check_trial=trial_problems)
    c = spec.search.confirm
    if c.enabled and c.max_seeds is not None:  # a sequential confirmation: its boundaries must be computable
        from pathsearch.search.sequential import design_problem

        challengers = c.top_k + (len(spec.search.enqueue) if spec.search.strategy == "two_stage" else 0)
        problem = design_problem(c.alpha, challengers)
        if problem:
            raise ConfigError([f"{path}: search.confirm.alpha: {problem}, got {c.alpha!r}"])
    return spec


def load_trial(path: str | Path, overrides: Sequence[str] = ()) -> TrialConfig:
    """The trial of a search file (its model, data and train sections), with every problem `train` would meet."""
    cfg = load_trial_config(path, overrides)
    try:  # a name timm lacks, or not a ViT: said of model.name, as `validate` says it (not as kwargs timm cannot use)
        model_depth(cfg.model.name)
    except ValueError as err:
        raise ConfigError([f"{path}: model.name: {err}"]) from None
    problems = trial_problems(cfg, str(path))
    if problems:
        raise ConfigError(problems)
    return cfg


def trial_problems(cfg: TrialConfig, source: str) -> list[str]:
    """What stops this trial once it runs, one line each naming `source`, the key and the value; [] when none.

    Checks the configuration against its data (channels, image size, classes), builds the model and the optimiser
    on the meta device and runs one forward there. The data itself is not read: whether its files load is the
    loader's business (config.py checks that they are there).
    """
    d, m = cfg.data, cfg.model
    chans, size, classes = data_shape(d.name, d.root, d.img_size or _int(m.kwargs.get("img_size")))
    kwargs: dict[str, Any] = {"in_chans": chans, "img_size": size}
    if classes is not None:
        kwargs["num_classes"] = classes
    problems = []
    what = f"dataset {d.name!r} ({chans} x {size} x {size} images, {classes or 'its'} classes)"
    for key, want in kwargs.items():
        got = m.kwargs.get(key, want)
        if got != want:
            fix = "leave it out (set from the data)" if key != "img_size" or d.name == "digits" else "set data.img_size"
            problems.append(f"{source}: model.kwargs.{key}: {what} needs {want}; {fix}, got {got!r}")
    if problems:
        return problems
    kwargs.update(m.kwargs)
    try:  # whatever the builder raises (sizes it cannot build divide by 0 or overflow) is the configuration's problem
        model = meta_path_vit(m.name, m.path_config(), (chans, size, size), **kwargs)
    except ValueError as err:
        return [f"{source}: model.kwargs: {CANNOT_BUILD} {m.name!r} with {kwargs}: {err}, got {m.kwargs!r}"]
    patch = model.vit.patch_embed.patch_size
    if not getattr(model.vit.patch_embed, "dynamic_img_pad", False) and (size % patch[0] or size % patch[1]):
        problems.append(
            f"{source}: model.kwargs.patch_size: must divide the image size {size} (the last {size % patch[0]} pixel "
            f"rows and columns would never be seen), got {m.kwargs.get('patch_size', patch[0])!r}"
        )
    params = sum(p.numel() for p in model.parameters())
    if params > MAX_PARAMS:  # sizes each within their range can still make a model no process holds
        problems.append(f"{source}: model.kwargs: the model would have {params:,} parameters, more than one process "
                        f"trains (at most {MAX_PARAMS:,}), got {m.kwargs!r}")  # fmt: skip
    problems += _weights_problems(cfg, model, source)
    problems += _optimizer_problems(cfg, model, source)
    if d.auto_augment is not None:
        if d.name not in AUGMENTED:
            problems.append(
                f"{source}: data.auto_augment: dataset {d.name!r} is read as tensors, without timm's transforms "
                f"(augmentation policies apply to {', '.join(AUGMENTED)}), got {d.auto_augment!r}"
            )
        else:
            try:
                create_transform(size, is_training=True, auto_augment=d.auto_augment)
            except (AssertionError, ValueError, KeyError, IndexError) as err:
                problems.append(f"{source}: data.auto_augment: not a policy timm reads ({err}), got {d.auto_augment!r}")
    return problems


def _weights_problems(cfg: TrialConfig, model: PathEnsembleViT, source: str) -> list[str]:
    """Whether the model's pretrained weights (timm's published ones, or a file) are there and fill the model, as timm's
    loader would fill it (pathsearch.ensemble.weights.fill_problem), on the meta device; [] without pretrained weights.

    Published weights are read from the Hugging Face cache, never downloaded: where they are not cached yet, the model
    timm registers for them stands in (built on the meta device: their shapes), unless the hub is offline
    (HF_HUB_OFFLINE, huggingface_hub's own switch, which the trial's download obeys too), where a trial could not
    fetch them.
    """
    m = cfg.model
    if not (m.pretrained or m.weights) or weights_problems(m, source):
        return []  # no pretrained weights, or the config's checks say what is wrong with them
    key, value = ("model.weights", m.weights) if m.weights else ("model.pretrained", m.pretrained)
    try:
        if m.weights:
            what, overlay = "the weights", weights_overlay(m.name, _read_weights(m.weights))
        else:
            what, overlay = _published(m.name)
    except ValueError as err:
        return [f"{source}: {key}: {err}, got {value!r}"]
    why = fill_problem(model.vit, overlay)
    return [f"{source}: {key}: {what} {why}, got {value!r}"] if why else []


def _published(name: str) -> tuple[str, dict[str, Any]]:
    """What to call timm's published weights for `name`, and the pretrained_cfg overlay that gives their state dict."""
    repo, cached = published_weights(name)
    what = f"timm's published weights for {name!r} ({repo})"
    if cached is not None:
        return what, {"state_dict": _read_weights(cached)}
    if hub_constants.HF_HUB_OFFLINE:
        raise ValueError(
            f"{what} are not in the Hugging Face cache ({hub_constants.HF_HUB_CACHE}) and the hub is "
            "offline (HF_HUB_OFFLINE), so no trial could fetch them; download them where there is a network (timm's "
            "create_model(name, pretrained=True) with the same HF_HOME), or start from a file with model.weights"
        )
    return f"{what}, as timm registers them (not cached yet),", {"state_dict": _registered_state(name)}


@functools.lru_cache(maxsize=4)
def _read_file(path: str, stamp: tuple[int, int]) -> dict[str, torch.Tensor]:
    return {name: tensor.to("meta") for name, tensor in read_weights(path).items()}  # shapes: all that is checked


def _read_weights(path: str) -> dict[str, torch.Tensor]:
    """A weights file's state dict on the meta device, read once however many points of the space are checked
    against it (and again when the file changes)."""
    try:
        info = Path(path).expanduser().stat()
    except OSError:
        return read_weights(path)  # it says why
    return _read_file(path, (info.st_mtime_ns, info.st_size))


@functools.lru_cache(maxsize=4)
def _registered_state(name: str) -> dict[str, torch.Tensor]:
    """The state dict of the model timm registers for `name`'s published weights: the shapes of those weights."""
    with torch.device("meta"):
        return timm.create_model(name, pretrained=False).state_dict()


def _optimizer_problems(cfg: TrialConfig, model: torch.nn.Module, source: str) -> list[str]:
    t = cfg.train
    try:
        create_optimizer_v2(model, t.opt, lr=t.lr, weight_decay=t.weight_decay)
    except (ValueError, AssertionError, ImportError, TypeError, RuntimeError) as err:
        name = t.opt.lower().split("_")[-1]  # timm's optional prefixes: lookahead_adamw
        known = [str(name) for name in list_optimizers()]
        near = difflib.get_close_matches(name, known, n=3)
        hint = f"did you mean {' or '.join(map(repr, near))}?" if near else f"timm has {', '.join(known)}"
        why = f"timm has no optimiser of that name ({hint})" if name not in known else " ".join(str(err).split())
        return [f"{source}: train.opt: {why}, got {t.opt!r}"]
    return []


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None
