"""Pretrained weights for a path-ensemble ViT's timm trunk: a checkpoint file read as timm reads it, handed to timm's
own pretrained loader (`weights_overlay`), timm's published weights found in the Hugging Face cache without network
traffic (`published_weights`), and why some weights cannot fill a model (`fill_problem`), which validation asks on the
meta device before anything runs.

Imports torch, timm and huggingface_hub (timm's own dependency) only.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import huggingface_hub
import timm
from timm.models import load_pretrained
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from torch import Tensor


def read_weights(path: str | Path) -> dict[str, Tensor]:
    """A checkpoint file's state dict, on the CPU, as timm's own loader reads it: safetensors (by the file's suffix) or
    torch's weights-only unpickling; nested under `state_dict`, `model` or an EMA key; DDP and compile prefixes
    removed. A pathsearch checkpoint (`model_N.safetensors`) gives the timm ViT it holds under `vit.`. Raises
    ValueError saying why a file is not one."""
    path = Path(path).expanduser()
    kind = "safetensors" if path.suffix == ".safetensors" else "torch"
    try:
        state = timm.models.load_state_dict(str(path), device="cpu")
    except FileNotFoundError:
        raise ValueError("no such file") from None
    except OSError as err:
        raise ValueError(f"cannot be read: {err.strerror or err}") from None
    except Exception as err:  # each format's reader has errors of its own for a file that is not of its format
        said = " ".join(str(err.__cause__ or err).split())[:200]
        raise ValueError(
            f"not a {kind} checkpoint (timm reads a file ending in .safetensors as safetensors, any other with "
            f"torch.load): {type(err.__cause__ or err).__name__}{': ' + said if said else ''}"
        ) from None
    if not isinstance(state, Mapping) or not state or not all(isinstance(v, Tensor) for v in state.values()):
        what = f"keys {', '.join(map(repr, list(state)[:5]))}" if isinstance(state, Mapping) else type(state).__name__
        raise ValueError(f"not a state dict of tensors (it holds {what or 'nothing'})")
    if "ensemble_scale" in state:  # a PathEnsembleViT's: the path mask and EnsembleScale beside its timm ViT
        state = {k.removeprefix("vit."): v for k, v in state.items() if k.startswith("vit.")}
    return dict(state)


def weights_overlay(model_name: str, state: Mapping[str, Tensor]) -> dict[str, Any]:
    """timm's `pretrained_cfg_overlay` that makes `state` (a timm ViT's state dict) the pretrained weights of
    `model_name`: the state dict, and the class count and input channels its head and patch embedding hold, so that
    timm resets the head and adapts the channels only where the model differs from them."""
    cfg = timm.models.get_pretrained_cfg(model_name)
    size = tuple(cfg.input_size[1:]) if cfg is not None and cfg.input_size else (224, 224)
    head, proj = state.get("head.weight"), state.get("patch_embed.proj.weight")
    return {
        "state_dict": dict(state),
        "num_classes": int(head.shape[0]) if head is not None else 0,  # none: a backbone's weights
        "label_offset": 0,
        "input_size": (int(proj.shape[1]) if proj is not None and proj.dim() == 4 else 3, *size),
    }


def published_weights(model_name: str) -> tuple[str, str | None]:
    """timm's published weights for `model_name`: where they come from (a Hugging Face repo, or a URL for the few that
    are not on the hub), and their file in this machine's Hugging Face cache (None when not cached), found without
    network traffic, in the order timm's loader tries the files. Raises ValueError when timm publishes none."""
    cfg = timm.models.get_pretrained_cfg(model_name)
    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        raise ValueError(f"timm publishes no weights for {model_name!r}")
    if not cfg.hf_hub_id:
        return str(cfg.url), None  # (timm keeps these in torch's hub cache: not looked up here)
    repo, _, revision = cfg.hf_hub_id.partition("@")
    names = [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
    for name in names:
        found = huggingface_hub.try_to_load_from_cache(repo, name, revision=revision or None)
        if isinstance(found, str):  # (else None, or a marker that the file is known to be absent)
            return cfg.hf_hub_id, found
    return cfg.hf_hub_id, None


def fill_problem(vit: VisionTransformer, overlay: Mapping[str, Any]) -> str | None:
    """Why timm's pretrained loader would not fill `vit` from the weights `overlay` gives (a `pretrained_cfg_overlay`
    holding their state dict), said of the weights ("cannot fill this model: ..."), or None. `vit` is built with
    pretrained=False, on any device: on meta (which costs nothing) it is left as it was, elsewhere it is loaded.

    timm's own `load_pretrained` runs: its checkpoint filter for ViTs and its adaptations (position embeddings and
    patch kernels resampled, input channels adapted, a head of another class count reset). The state dict it hands
    to `load_state_dict` is then compared with the model's: every parameter must come from the weights with its shape
    (a head timm resets aside), and where timm loads strictly (the head kept) every tensor of the weights must have
    its place.
    """
    handed: dict[str, Tensor] = {}
    hook = vit.register_load_state_dict_pre_hook(lambda module, state_dict, *args: handed.update(state_dict))
    if next(vit.parameters()).is_meta:  # shapes are all that is compared: the filter's resampling is free on meta,
        # and torch would warn of each copy of a real tensor into a meta one
        overlay = {**overlay, "state_dict": {k: v.to("meta") for k, v in overlay["state_dict"].items()}}
    cfg: dict[str, Any] = {**getattr(vit, "pretrained_cfg", {}), **overlay}  # timm sets it on the models it builds
    quiet = logging.getLogger("timm")  # its notes on resampling and left-out keys: the problem below says them
    level, refused = quiet.level, ""
    quiet.setLevel(logging.ERROR)
    try:
        load_pretrained(
            vit,
            pretrained_cfg=cfg,
            num_classes=vit.num_classes,
            in_chans=vit.patch_embed.proj.in_channels,
            filter_fn=checkpoint_filter_fn,
        )
    except Exception as err:  # load_state_dict refused what `handed` holds (said below), or timm's filter and
        # adaptations stopped before it on a checkpoint they do not expect, each with an error of its own
        if not handed:
            said = " ".join(str(err).split())[:300]
            return f"cannot be loaded by timm: {type(err).__name__}{': ' + said if said else ''}"
        refused = str(err)
    finally:
        hook.remove()
        quiet.setLevel(level)
    own = vit.state_dict()
    differ = _differing_dims(own, handed)
    for name, tensor in own.items():
        if name in handed and handed[name].shape != tensor.shape:
            return (
                f"cannot fill this model: {name} is {tuple(tensor.shape)} here and {tuple(handed[name].shape)} in the "
                f"weights{differ}"
            )
    classifier = cfg.get("classifier") or ()
    heads = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    if "Missing key" in refused:  # torch's words when a strict load (timm's, head kept) lacks a tensor: the head too
        heads = ()
    missing = [n for n in own if n not in handed and not n.startswith(tuple(f"{h}." for h in heads))]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        return f"cannot fill this model: they lack its {missing[0]}{more}{differ}"
    extra = [n for n in handed if n not in own]
    if extra and "Unexpected key" in refused:  # and when it has no place for one
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        return f"hold {extra[0]}{more}, which this model has no place for{differ}"
    return None


def _differing_dims(own: Mapping[str, Tensor], weights: Mapping[str, Tensor]) -> str:
    """The ViT dimensions in which the model and the weights differ, named by the model.kwargs that set them:
    embed_dim, depth, mlp_ratio, read from the tensors' shapes (timm reads no kwargs back from a state dict)."""

    def dims(state: Mapping[str, Tensor]) -> dict[str, Any]:
        found: dict[str, Any] = {}
        proj, fc1 = state.get("patch_embed.proj.weight"), state.get("blocks.0.mlp.fc1.weight")
        if proj is not None:
            found["embed_dim"] = int(proj.shape[0])
        blocks = {k.split(".")[1] for k in state if k.startswith("blocks.")}
        if blocks:
            found["depth"] = len(blocks)
        if fc1 is not None:
            found["mlp_ratio"] = round(fc1.shape[0] / fc1.shape[1], 4)
        return found

    mine, theirs = dims(own), dims(weights)
    said = [f"model.kwargs.{k}: {v} here, {theirs[k]} in the weights" for k, v in mine.items() if theirs.get(k, v) != v]
    return f" ({'; '.join(said)})" if said else ""
