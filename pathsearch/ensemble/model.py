"""The path-ensemble view of a timm VisionTransformer: path mask, EnsembleScale, self-distillation.

`PathEnsembleViT` wraps a timm `VisionTransformer` (sharing its weights), keeps the trunk exactly as timm computes
it and feeds the classifier a separate ensemble feature z = sum_i m_i * (s_i ⊙ p_i) (docs/paths.md).
Imports torch, timm and numpy only; never ray, optuna or mlflow.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import timm
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block, ResPostBlock, VisionTransformer
from torch import Tensor, nn

from pathsearch.config.paths import (
    DistillConfig,
    EnsembleScaleConfig,
    PathConfig,
    parse_mask,
    path_names,
    resolve_scale_init,
    student_indices,
)
from pathsearch.ensemble.weights import read_weights, weights_overlay

PoolMode = Literal["token", "avg", "tokens"]
# Blocks whose residual branches are additive: pre-norm x + a + f (Block) and post-norm (ResPostBlock).
SUPPORTED_BLOCKS: tuple[type[nn.Module], ...] = (Block, ResPostBlock)


class PathEnsembleViT(nn.Module):
    """A timm VisionTransformer seen as an explicit ensemble of its 2L+1 residual paths.

    Args:
        vit: a timm `VisionTransformer`; its modules and weights are shared, not copied.
        path_config: which paths feed the classifier, EnsembleScale, self-distillation. None: all paths kept,
            scalar EnsembleScale fixed at init 1.0 (learnable), no distillation; then logits equal timm's.
    """

    keep: Tensor  # (P,) bool buffer: the path mask, saved in state_dict

    def __init__(self, vit: nn.Module, path_config: PathConfig | None = None) -> None:
        super().__init__()
        check_vit(vit)
        assert isinstance(vit, VisionTransformer)
        self.vit = vit
        self.depth = len(vit.blocks)
        self.path_names = path_names(self.depth)
        self.num_paths = len(self.path_names)
        self.embed_dim = int(vit.embed_dim)
        self.pool_mode = pool_mode_of(vit)
        self.model_name: str | None = None
        self.model_kwargs: dict[str, Any] = {}
        self.register_buffer("keep", torch.ones(self.num_paths, dtype=torch.bool))
        self._keep: list[bool] = [True] * self.num_paths  # Python copy: no device sync per forward
        self.register_load_state_dict_post_hook(_refresh_keep)
        self.ensemble_scale = nn.Parameter(torch.ones(self.num_paths, 1))
        self.scale_config = EnsembleScaleConfig()
        self.distill = DistillConfig()
        self.apply_path_config(path_config or PathConfig())

    # ----- configuration -------------------------------------------------------------------------------------
    def apply_path_config(self, cfg: PathConfig) -> None:
        """Sets the path mask, EnsembleScale (shape, scope, init or learned values) and distillation from cfg.

        Replaces the `ensemble_scale` parameter: call before building an optimiser.
        """
        cfg.validate(self.depth)
        scale = cfg.ensemble_scale
        width = self.embed_dim if scale.kind == "vector" else 1
        if scale.values is not None:
            rows = [scale.values[name] for name in self.path_names]
            data = torch.tensor([r if isinstance(r, list) else [r] for r in rows], dtype=torch.float32)
            if data.shape != (self.num_paths, width):
                raise ValueError(
                    f"ensemble_scale.values have shape {tuple(data.shape)}, expected {(self.num_paths, width)}"
                )
        else:
            init = resolve_scale_init(scale.init, self.depth)
            data = torch.tensor(init, dtype=torch.float32)[:, None].repeat(1, width)  # (P, 1|D)
        device = self.ensemble_scale.device
        self.ensemble_scale = nn.Parameter(data.to(device), requires_grad=scale.learnable)
        self.scale_config = EnsembleScaleConfig(
            kind=scale.kind, scope=scale.scope, init=scale.init, learnable=scale.learnable
        )
        self.distill = DistillConfig(cfg.distill.alpha, cfg.distill.temperature, list(cfg.distill.students))
        self._students = [student_indices(s, self.depth) for s in self.distill.students]
        self._masks_cache: tuple[Any, Tensor] | None = None
        self.set_path_mask(cfg.keep_mask(self.depth))
        if cfg.model_name is not None:
            self.model_name, self.model_kwargs = cfg.model_name, dict(cfg.model_kwargs)

    @property
    def path_config(self) -> PathConfig:
        """The current configuration, learned EnsembleScale values included (export this)."""
        values = self.ensemble_scale.detach().float().cpu()
        scale = self.scale_config
        return PathConfig(
            model_name=self.model_name,
            model_kwargs=dict(self.model_kwargs),
            depth=self.depth,
            pruned=[n for n, k in zip(self.path_names, self._keep, strict=True) if not k],
            ensemble_scale=EnsembleScaleConfig(
                kind=scale.kind,
                scope=scale.scope,
                init=scale.init,
                learnable=scale.learnable,
                values={
                    n: (row.tolist() if scale.kind == "vector" else float(row[0]))
                    for n, row in zip(self.path_names, values, strict=True)
                },
            ),
            distill=DistillConfig(self.distill.alpha, self.distill.temperature, list(self.distill.students)),
        )

    def set_path_mask(self, keep: Mapping[str, Any] | Sequence[Any] | Tensor) -> None:
        """Chooses the paths that feed the classifier: {name: bool} (unnamed paths kept) or one bool per path."""
        if isinstance(keep, Tensor):
            keep = keep.tolist()
        mask = parse_mask(keep, self.depth)
        self._keep = mask
        self.keep.copy_(torch.tensor(mask, dtype=torch.bool))

    @property
    def path_mask(self) -> list[bool]:
        return list(self._keep)

    @property
    def kept_paths(self) -> int:
        return sum(self._keep)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Names timm's `create_optimizer_v2` keeps out of weight decay: EnsembleScale and timm's own."""
        return {"ensemble_scale"} | {f"vit.{name}" for name in self.vit.no_weight_decay()}

    # ----- forward -------------------------------------------------------------------------------------------
    def iter_paths(self, x: Tensor, attn_mask: Tensor | None = None) -> Iterator[Tensor]:
        """Runs the trunk once and yields each raw path output, pooled for the head, in path order.

        Yields (B, D) in `token`/`avg` pool mode, (B, N, D) in `tokens` mode. The trunk is timm's own
        computation, module by module in timm's order (so dropout/drop-path draw the same random numbers);
        with scope `both` each path enters the trunk multiplied by its EnsembleScale.
        """
        vit = self.vit
        scales = self.ensemble_scale.unbind(0)  # P x (1|D)
        both = self.scale_config.scope == "both"
        x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))  # (B, N, D)
        yield self._pool(x)
        if both:
            x = x * scales[0]
        kwargs = {} if attn_mask is None else {"attn_mask": attn_mask}
        for layer, blk in enumerate(vit.blocks, start=1):
            if isinstance(blk, ResPostBlock):
                a = blk.drop_path1(blk.norm1(blk.attn(x, **kwargs)))
            else:
                assert isinstance(blk, Block)
                a = blk.drop_path1(blk.ls1(blk.attn(blk.norm1(x), **kwargs)))
            yield self._pool(a)
            x = x + (a * scales[2 * layer - 1] if both else a)
            if isinstance(blk, ResPostBlock):
                f = blk.drop_path2(blk.norm2(blk.mlp(x)))
            else:
                assert isinstance(blk, Block)
                f = blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
            yield self._pool(f)
            x = x + (f * scales[2 * layer] if both else f)

    def forward_paths(self, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        """Raw pooled path outputs, stacked: (P, B, D), or (P, B, N, D) in `tokens` pool mode."""
        return torch.stack(list(self.iter_paths(x, attn_mask)))

    def forward_ensemble(self, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        """The ensemble feature z = sum_i m_i s_i ⊙ p_i, pooled ((B, D)) or per token ((B, N, D))."""
        if self.pool_mode != "tokens":
            # pooled paths are small: one stack, one weighted sum (a few kernels, not two per path)
            return combine_paths(self._weights(self.keep[None]), self.forward_paths(x, attn_mask))[0]
        scales = self.ensemble_scale.unbind(0)
        z: Tensor | None = None
        # per-token paths are large: summed as they come, so no (P, B, N, D) stack is held
        for i, feature in enumerate(self.iter_paths(x, attn_mask)):
            if self._keep[i]:
                term = feature * scales[i]
                z = term if z is None else z + term
        assert z is not None  # parse_mask refuses masks that keep no path
        return z

    def forward_head(self, z: Tensor) -> Tensor:
        """timm's head on an ensemble feature: per-token norm, pool, fc_norm, head_drop, head."""
        vit = self.vit
        if self.pool_mode == "tokens":
            return vit.forward_head(vit.norm(z))
        return vit.head(vit.head_drop(vit.fc_norm(vit.norm(z))))

    def forward(self, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        return self.forward_head(self.forward_ensemble(x, attn_mask))

    def forward_masks(self, features: Tensor, masks: Tensor) -> Tensor:
        """Logits for K masks from one set of raw path features: (P, B, ...) and (K, P) bool -> (K, B, C).

        Float rows are per-path weights m_i * a_i that multiply EnsembleScale (differentiable in a_i).
        """
        z = combine_paths(self._weights(masks.to(features.device)), features)  # (K, B, [N,] D)
        return self.forward_head(z.flatten(0, 1)).unflatten(0, tuple(z.shape[:2]))

    def forward_with_students(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Logits of the ensemble and of each self-distillation student, from one trunk pass.

        A student is the sum of its paths that the mask keeps; a student left with no kept path is skipped.
        """
        features = self.forward_paths(x)
        logits = self.forward_masks(features, self._student_masks(features.device))  # (1 + students, B, C)
        return logits[0], list(logits[1:])

    def _student_masks(self, device: torch.device) -> Tensor:
        """(1 + students, P) bool: the configured mask, then each student's kept paths; made once per mask and
        device (a tensor made from Python lists on a GPU would copy from the host every step)."""
        key = (tuple(self._keep), str(device))
        if self._masks_cache is None or self._masks_cache[0] != key:
            masks = [self._keep]
            for indices in self._students:
                member = [keep and i in indices for i, keep in enumerate(self._keep)]
                if any(member):
                    masks.append(member)
            self._masks_cache = (key, torch.tensor(masks, device=device))
        return self._masks_cache[1]

    def distillation_loss(self, logits: Tensor, student_logits: Sequence[Tensor]) -> Tensor:
        """alpha * sum_k T^2 KL(softmax(teacher / T) || softmax(student_k / T)) with this model's settings."""
        return distillation_loss(logits, student_logits, self.distill.alpha, self.distill.temperature)

    def _pool(self, t: Tensor) -> Tensor:
        if self.pool_mode == "token":
            return t[:, 0]
        if self.pool_mode == "avg":
            prefix = 0 if self.vit.pool_include_prefix else self.vit.num_prefix_tokens
            return t[:, prefix:].mean(dim=1)
        return t

    def _weights(self, masks: Tensor) -> Tensor:
        """Per-mask, per-path weights m_i * s_i: (K, P) bool -> (K, P, 1|D)."""
        return masks.to(self.ensemble_scale.dtype)[:, :, None] * self.ensemble_scale[None]


def combine_paths(weights: Tensor, features: Tensor) -> Tensor:
    """sum_i w_ki ⊙ f_i: weights (K, P, 1|D), features (P, B, [N,] D) -> (K, B, [N,] D)."""
    extra = features.dim() - 3  # 1 for token features (P, B, N, D)
    w = weights.reshape(weights.shape[0], weights.shape[1], 1, *([1] * extra), weights.shape[2])
    return (w * features[None]).sum(dim=1)


def distillation_loss(logits: Tensor, student_logits: Sequence[Tensor], alpha: float, temperature: float) -> Tensor:
    """Self-distillation term: alpha * sum_k T^2 KL(p_teacher^T || p_student_k^T).

    The teacher (full ensemble) is detached. Add it to the classification loss; alpha = 0 gives zero.
    """
    if alpha == 0 or not student_logits:
        return logits.new_zeros(())
    teacher = F.log_softmax(logits.detach() / temperature, dim=-1)
    total = logits.new_zeros(())
    for student in student_logits:
        log_q = F.log_softmax(student / temperature, dim=-1)
        total = total + F.kl_div(log_q, teacher, log_target=True, reduction="batchmean")
    return alpha * temperature**2 * total


# ----- construction and checks -------------------------------------------------------------------------------
def check_vit(vit: nn.Module) -> None:
    """Refuses models that are not a timm VisionTransformer with additive pre-/post-norm residual blocks."""
    if type(vit) is not VisionTransformer:
        raise ValueError(
            f"PathEnsembleViT needs a timm VisionTransformer, got {type(vit).__name__} "
            "(distilled DeiT, EVA, Swin, CNNs and other architectures are not supported)"
        )
    for i, blk in enumerate(vit.blocks):
        if type(blk) not in SUPPORTED_BLOCKS:
            raise ValueError(
                f"block {i} is a {type(blk).__name__}; PathEnsembleViT needs additive pre-norm (Block) or "
                "post-norm (ResPostBlock) residual blocks"
            )


def pool_mode_of(vit: VisionTransformer) -> PoolMode:
    """What to cache per path: the class token, the token mean, or all tokens."""
    per_token_norm = isinstance(vit.norm, nn.Identity | nn.LayerNorm | nn.RMSNorm)
    if vit.attn_pool is not None or not per_token_norm:
        return "tokens"
    if vit.global_pool == "token":
        return "token"
    if vit.global_pool == "avg" and isinstance(vit.norm, nn.Identity):
        return "avg"  # mean-pooling is linear and comes before the (fc_)norm
    return "tokens"


def create_path_vit(
    model_name: str | None = None,
    path_config: PathConfig | None = None,
    pretrained: bool = False,
    weights: str | Path | None = None,
    **timm_kwargs: Any,
) -> PathEnsembleViT:
    """Builds a timm ViT by name and wraps it. `model_name` and kwargs default to those in `path_config`.

    `timm_kwargs` (img_size, patch_size, depth, embed_dim, num_classes, ...) go to `timm.create_model`. `pretrained`
    loads timm's published weights for the name; `weights` a checkpoint file instead (`read_weights`), through the
    same loader of timm's (`weights_overlay`).
    """
    if model_name is None:
        if path_config is None or path_config.model_name is None:
            raise ValueError("create_path_vit needs a model_name, or a path_config that names one")
        model_name = path_config.model_name
    kwargs = dict(path_config.model_kwargs) if path_config is not None and path_config.model_name == model_name else {}
    kwargs.update(timm_kwargs)
    if not timm.is_model(model_name):
        raise ValueError(unknown_model(model_name))
    if weights is not None:
        pretrained = True
        overlay = weights_overlay(model_name, read_weights(weights))
        kwargs["pretrained_cfg_overlay"] = {**kwargs.get("pretrained_cfg_overlay", {}), **overlay}
    try:
        vit = timm.create_model(model_name, pretrained=pretrained, **kwargs)
    except TypeError as err:
        raise ValueError(f"timm model {model_name!r} does not accept these arguments {kwargs}: {err}") from None
    if type(vit) is not VisionTransformer:
        raise ValueError(f"timm model {model_name!r} is a {type(vit).__name__}, not a VisionTransformer")
    # Remember only what the caller chose (not pretrained-loading details) so that export rebuilds it.
    recorded = {k: v for k, v in kwargs.items() if k not in ("pretrained_cfg_overlay", "pretrained_cfg")}
    base = path_config or PathConfig()
    cfg = PathConfig(
        model_name=model_name,
        model_kwargs=recorded,
        depth=base.depth,
        pruned=list(base.pruned),
        ensemble_scale=base.ensemble_scale,
        distill=base.distill,
    )
    return PathEnsembleViT(vit, cfg)


def model_params(model_name: str, timm_kwargs: Mapping[str, Any] | None = None) -> int:
    """Parameter count of the path-ensemble model (pruning changes none), built on the meta device."""
    model_depth(model_name, timm_kwargs)
    with torch.device("meta"):
        model = PathEnsembleViT(timm.create_model(model_name, pretrained=False, **dict(timm_kwargs or {})))
    return sum(p.numel() for p in model.parameters())


CANNOT_BUILD = "timm cannot build"  # how model_depth's errors about the kwargs (not the name) begin


def model_depth(model_name: str, timm_kwargs: Mapping[str, Any] | None = None) -> int:
    """Depth of a timm ViT by name, built on the meta device (no memory, no weights); refuses non-ViTs. Remembered
    for the last configurations asked (`_remembered`)."""
    kwargs = dict(timm_kwargs or {})
    return _remembered(("depth", model_name, kwargs), lambda: _model_depth(model_name, kwargs))


def _model_depth(model_name: str, kwargs: dict[str, Any]) -> int:
    if not timm.is_model(model_name):
        raise ValueError(unknown_model(model_name))
    try:
        with torch.device("meta"):
            vit = timm.create_model(model_name, pretrained=False, **kwargs)
    except Exception as err:  # whatever timm raises for sizes it cannot build (asserts, a division by 0, overflows)
        said = " ".join(str(err).split()) or type(err).__name__
        if kwargs:  # the name may be the mistake (a ResNet takes no img_size): say that rather than the kwargs
            model_depth(model_name)
        raise ValueError(f"{CANNOT_BUILD} {model_name!r} with {kwargs}: {said}") from None
    try:
        check_vit(vit)
    except ValueError as err:
        raise ValueError(f"timm model {model_name!r}: {err}") from None
    assert isinstance(vit, VisionTransformer)
    return len(vit.blocks)


def meta_path_vit(
    model_name: str, path_config: PathConfig, image_shape: tuple[int, int, int], **timm_kwargs: Any
) -> PathEnsembleViT:
    """The path-ensemble ViT built on the meta device (no memory, no weights) and run forward once on two images of
    `image_shape` (C, H, W), so that timm checks what it builds and runs. Raises ValueError with what the builder
    or the forward pass raised, whatever it was (timm asserts heads and dims; sizes it cannot build divide by 0 or
    overflow). Remembered for the last configurations asked (`_remembered`): validation asks for the same model at
    every point of a space that changes no model key. The model is shared: callers must not change it."""

    def build() -> PathEnsembleViT:
        try:
            with torch.device("meta"):
                model = create_path_vit(model_name, path_config=path_config, **timm_kwargs)
                model(torch.empty(2, *image_shape))
        except Exception as err:
            raise ValueError(" ".join(str(err).split()) or type(err).__name__) from None
        return model

    return _remembered(("meta", model_name, dataclasses.asdict(path_config), image_shape, timm_kwargs), build)


_REMEMBERED: dict[str, Any] = {}  # a key's JSON -> its value, or the ValueError it raised (oldest first)


def _remembered(key: Any, compute: Any, keep: int = 32) -> Any:
    """`compute()`, or what it gave (or the ValueError it raised) for the same `key` among the last `keep` keys: the
    meta-device builds of validation, which a search file's space repeats point after point."""
    text = json.dumps(key, sort_keys=True, default=repr)
    if text not in _REMEMBERED:
        try:
            _REMEMBERED[text] = compute()
        except ValueError as err:
            _REMEMBERED[text] = err
        while len(_REMEMBERED) > keep:
            _REMEMBERED.pop(next(iter(_REMEMBERED)))
    found = _REMEMBERED[text]
    if isinstance(found, ValueError):
        raise ValueError(*found.args)
    return found


def unknown_model(model_name: str) -> str:
    """What to say of a name timm does not know: the three closest names it does, in the search file's one-line form."""
    near = difflib.get_close_matches(model_name, timm.list_models(), n=3)
    hint = f" (the closest timm names: {', '.join(map(repr, near))})" if near else " (`timm.list_models()` has them)"
    return f"unknown timm model{hint}, got {model_name!r}"


def _refresh_keep(module: nn.Module, incompatible_keys: Any) -> None:
    assert isinstance(module, PathEnsembleViT)
    module._keep = [bool(k) for k in module.keep.tolist()]
