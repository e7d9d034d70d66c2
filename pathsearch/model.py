"""The path-ensemble view of a timm VisionTransformer: path mask, EnsembleScale, self-distillation, path analysis.

`PathEnsembleViT` wraps a timm `VisionTransformer` (sharing its weights), keeps the trunk exactly as timm computes
it and feeds the classifier a separate ensemble feature z = sum_i m_i * (s_i ⊙ p_i) (README, "What a path is").
Imports torch, timm and numpy only; never ray, optuna or mlflow.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import timm
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block, ResPostBlock, VisionTransformer
from torch import Tensor, nn

from pathsearch.paths import (
    DistillConfig,
    EnsembleScaleConfig,
    PathConfig,
    parse_mask,
    path_names,
    resolve_scale_init,
    student_indices,
)

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
        scales = self.ensemble_scale.unbind(0)
        z: Tensor | None = None
        # Summed in path order so that with every m_i = s_i = 1 it is bit-for-bit timm's trunk sum.
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
        z = _combine(self._weights(masks.to(features.device)), features)  # (K, B, [N,] D)
        return self.forward_head(z.flatten(0, 1)).unflatten(0, tuple(z.shape[:2]))

    def forward_with_students(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Logits of the ensemble and of each self-distillation student, from one trunk pass.

        A student is the sum of its paths that the mask keeps; a student left with no kept path is skipped.
        """
        masks = [self._keep]
        for indices in self._students:
            member = [keep and i in indices for i, keep in enumerate(self._keep)]
            if any(member):
                masks.append(member)
        logits = self.forward_masks(self.forward_paths(x), torch.tensor(masks))  # (1 + students, B, C)
        return logits[0], list(logits[1:])

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


def _combine(weights: Tensor, features: Tensor) -> Tensor:
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
    **timm_kwargs: Any,
) -> PathEnsembleViT:
    """Builds a timm ViT by name and wraps it. `model_name` and kwargs default to those in `path_config`.

    `timm_kwargs` (img_size, patch_size, depth, embed_dim, num_classes, ...) go to `timm.create_model`.
    """
    if model_name is None:
        if path_config is None or path_config.model_name is None:
            raise ValueError("create_path_vit needs a model_name, or a path_config that names one")
        model_name = path_config.model_name
    kwargs = dict(path_config.model_kwargs) if path_config is not None and path_config.model_name == model_name else {}
    kwargs.update(timm_kwargs)
    if not timm.is_model(model_name):
        raise ValueError(f"unknown timm model {model_name!r}")
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


def model_depth(model_name: str, timm_kwargs: Mapping[str, Any] | None = None) -> int:
    """Depth of a timm ViT by name, built on the meta device (no memory, no weights); refuses non-ViTs."""
    if not timm.is_model(model_name):
        raise ValueError(f"unknown timm model {model_name!r}")
    kwargs = dict(timm_kwargs or {})
    try:
        with torch.device("meta"):
            vit = timm.create_model(model_name, pretrained=False, **kwargs)
    except TypeError as err:
        raise ValueError(f"timm model {model_name!r} does not accept these arguments {kwargs}: {err}") from None
    try:
        check_vit(vit)
    except ValueError as err:
        raise ValueError(f"timm model {model_name!r}: {err}") from None
    assert isinstance(vit, VisionTransformer)
    return len(vit.blocks)


def _refresh_keep(module: nn.Module, incompatible_keys: Any) -> None:
    assert isinstance(module, PathEnsembleViT)
    module._keep = [bool(k) for k in module.keep.tolist()]


# ----- cached features and mask evaluation ------------------------------------------
@dataclass
class PathFeatures:
    """Raw pooled per-path features of a dataset: (P, N, D), or (P, N, T, D) in `tokens` mode; labels (N,)."""

    features: Tensor
    labels: Tensor


@torch.no_grad()
def cache_path_features(
    model: PathEnsembleViT, loader: Iterable[Any], device: str | torch.device = "cpu"
) -> PathFeatures:
    """One trunk forward per batch; keeps every path's pooled output."""
    was_training = model.training
    model.eval()
    feats, labels = [], []
    try:
        for images, targets in loader:
            feats.append(model.forward_paths(images.to(device)).float().cpu())
            labels.append(targets.cpu())
    finally:
        model.train(was_training)
    return PathFeatures(torch.cat(feats, dim=1), torch.cat(labels))


@torch.no_grad()
def mask_logits(
    model: PathEnsembleViT,
    features: Tensor,
    masks: Tensor,
    scales: Tensor | None = None,
    factors: Tensor | None = None,
    mask_chunk: int | None = None,
) -> Iterator[tuple[slice, slice, Tensor]]:
    """Logits for each mask from cached raw path features: yields (mask slice, image slice, (k, n, C) logits).

    features (P, N, D) or (P, N, T, D); masks (K, P) bool; scales (P, 1|D), default the model's EnsembleScale;
    factors (K, P): per-mask multipliers of each path's EnsembleScale (default 1), so that a search can score
    EnsembleScale values as well as masks without rebuilding anything per candidate.
    """
    scales = (model.ensemble_scale if scales is None else scales).detach().to(features)
    weights = masks.to(features.device, torch.float64)  # (K, P): m_i, or m_i * factor_i
    if factors is not None:
        weights = weights * factors.to(weights)
    head = _linear_norm_head(model)
    num_images = features.shape[1]
    if head is not None and features.dim() == 3:
        fast = _NormHeadAlgebra(features, scales, *head)
        # Chunks of about 4M logits (16 MB) stay cache-friendly; larger ones ran several times slower.
        step = mask_chunk or max(1, (1 << 22) // (fast.num_images * fast.num_classes))
        for start in range(0, weights.shape[0], step):
            yield slice(start, start + step), slice(0, num_images), fast.logits(weights[start : start + step])
        return
    # Generic route (any head): materialise z per mask, then timm's head, chunked over masks and images.
    full = weights.to(scales.dtype)[:, :, None] * scales[None]  # (K, P, 1|D)
    image_chunk = max(1, 65536 // max(1, features[0, 0].numel() // features.shape[-1]))
    for start in range(0, weights.shape[0], 64):
        chunk = slice(start, start + 64)
        for n0 in range(0, num_images, image_chunk):
            z = _combine(full[chunk], features[:, n0 : n0 + image_chunk])  # (k, n, [T,] D)
            logits = model.forward_head(z.flatten(0, 1))
            yield chunk, slice(n0, n0 + z.shape[1]), logits.view(z.shape[0], z.shape[1], -1)


@torch.no_grad()
def mask_predictions(
    model: PathEnsembleViT,
    features: Tensor,
    masks: Tensor,
    scales: Tensor | None = None,
    mask_chunk: int | None = None,
    factors: Tensor | None = None,
) -> Iterator[tuple[slice, Tensor]]:
    """Predicted classes for each mask from cached raw path features: yields (mask slice, (k, N) classes).

    Arguments as `mask_logits`.
    """
    pending: slice | None = None
    parts: list[Tensor] = []
    for chunk, _, logits in mask_logits(model, features, masks, scales, factors, mask_chunk):
        if pending is not None and chunk != pending:
            yield pending, torch.cat(parts, dim=1)
            parts = []
        pending = chunk
        parts.append(logits.argmax(-1))
    if pending is not None:
        yield pending, torch.cat(parts, dim=1)


def evaluate_masks(
    model: PathEnsembleViT,
    features: Tensor | PathFeatures,
    labels: Tensor | None = None,
    masks: Tensor | None = None,
    scales: Tensor | None = None,
    factors: Tensor | None = None,
) -> Tensor:
    """Accuracy of each mask (K,) from cached path features, as the model itself would score it.

    Args:
        model: the model the features came from (its norm and head are used).
        features: raw pooled path features from `cache_path_features` (or the PathFeatures itself).
        labels: (N,) targets (taken from PathFeatures when given one).
        masks: (K, P) bool; a row that keeps no path is refused.
        scales: optional EnsembleScale values (P, 1|D) to score instead of the model's (scope `ensemble`).
        factors: optional (K, P) multipliers of each path's EnsembleScale, per mask.
    """
    features, labels, masks, scales, factors = _check_scoring(model, features, labels, masks, scales, factors)
    acc = torch.empty(masks.shape[0], dtype=torch.float64)
    for chunk, preds in mask_predictions(model, features, masks, scales, factors=factors):
        acc[chunk] = (preds == labels[None]).double().mean(dim=1).cpu()
    return acc


@dataclass
class MaskScores:
    """Per-mask accuracy and mean cross-entropy, both (K,) float64."""

    acc: Tensor
    loss: Tensor


@torch.no_grad()
def score_masks(
    model: PathEnsembleViT,
    features: Tensor | PathFeatures,
    labels: Tensor | None = None,
    masks: Tensor | None = None,
    scales: Tensor | None = None,
    factors: Tensor | None = None,
) -> MaskScores:
    """Accuracy and cross-entropy of each mask from cached path features (arguments as `evaluate_masks`).

    The loss breaks the many accuracy ties between masks on a small validation set.
    """
    features, labels, masks, scales, factors = _check_scoring(model, features, labels, masks, scales, factors)
    correct = torch.zeros(masks.shape[0], dtype=torch.float64)
    loss = torch.zeros(masks.shape[0], dtype=torch.float64)
    for chunk, images, logits in mask_logits(model, features, masks, scales, factors):
        target = labels[images]
        correct[chunk] += (logits.argmax(-1) == target[None]).double().sum(dim=1).cpu()
        picked = logits.gather(-1, target[None, :, None].expand(logits.shape[0], -1, 1)).squeeze(-1)  # (k, n)
        loss[chunk] += (torch.logsumexp(logits.double(), dim=-1) - picked.double()).sum(dim=1).cpu()
    count = labels.shape[0]
    return MaskScores(correct / count, loss / count)


def _check_scoring(
    model: PathEnsembleViT,
    features: Tensor | PathFeatures,
    labels: Tensor | None,
    masks: Tensor | None,
    scales: Tensor | None,
    factors: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None]:
    if isinstance(features, PathFeatures):
        labels = features.labels if labels is None else labels
        features = features.features
    if labels is None or masks is None:
        raise ValueError("evaluate_masks needs features, labels and masks")
    masks = torch.as_tensor(masks, dtype=torch.bool)
    if masks.dim() != 2 or masks.shape[1] != model.num_paths:
        raise ValueError(f"masks must be (K, {model.num_paths}) for depth {model.depth}, got {tuple(masks.shape)}")
    empty = (~masks.any(dim=1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"mask rows {empty[:10]} keep no path")
    if scales is not None:
        scales = scales.detach().reshape(model.num_paths, -1)
        if scales.shape[1] not in (1, model.embed_dim) or not torch.isfinite(scales).all():
            raise ValueError(
                f"scales must be finite with shape (P, 1) or (P, {model.embed_dim}), got {tuple(scales.shape)}"
            )
    if factors is not None:
        factors = torch.as_tensor(factors).detach()
        if factors.shape != masks.shape or not torch.isfinite(factors).all():
            raise ValueError(f"factors must be finite with the masks' shape {tuple(masks.shape)}")
    return features, labels.to(features.device), masks, scales, factors


def _linear_norm_head(model: PathEnsembleViT) -> tuple[nn.LayerNorm, nn.Linear] | None:
    """(LayerNorm, Linear) when the pooled head is exactly one LayerNorm then a linear classifier."""
    vit = model.vit
    if model.pool_mode == "tokens" or not isinstance(vit.head, nn.Linear):
        return None
    norms = [m for m in (vit.norm, vit.fc_norm) if not isinstance(m, nn.Identity)]
    if len(norms) != 1 or type(norms[0]) not in (nn.LayerNorm, timm.layers.LayerNorm):
        return None
    if not isinstance(vit.head_drop, nn.Dropout | nn.Identity):
        return None
    norm = norms[0]
    assert isinstance(norm, nn.LayerNorm)
    return norm, vit.head


class _NormHeadAlgebra:
    """Scores many masks at once when the head is LayerNorm + Linear, without forming z per mask.

    Hand-written because no library offers it: with c_i the channel-centred scaled path features, z - mean(z)
    = sum_i m_i c_i, so var(z) = m^T G m / D with the per-image Gram matrix G_ij = <c_i, c_j>, and
    head(norm(z)) = (sum_i m_i H_i) / sqrt(var + eps) + W beta + b with H_i = (gamma ⊙ c_i) W^T.
    Cost per mask: P*N*C + P^2*N multiply-adds instead of P*N*D for the sum plus N*D*C for the head.
    """

    def __init__(self, features: Tensor, scales: Tensor, norm: nn.LayerNorm, head: nn.Linear) -> None:
        num_paths, num_images, dim = features.shape
        q = features.double() * scales.double()[:, None, :]  # (P, N, D)
        c = q - q.mean(dim=-1, keepdim=True)
        gamma = norm.weight.double() if norm.weight is not None else torch.ones(dim, dtype=torch.float64)
        beta = norm.bias.double() if norm.bias is not None else torch.zeros(dim, dtype=torch.float64)
        weight = head.weight.double().to(c.device)  # (C, D)
        bias = head.bias.double() if head.bias is not None else torch.zeros(weight.shape[0], dtype=torch.float64)
        self.num_classes = weight.shape[0]
        self.num_images = num_images
        self.dim = dim
        self.eps = norm.eps
        self.h = ((c * gamma.to(c.device)) @ weight.T).reshape(num_paths, -1).float()  # (P, N*C)
        self.offset = (weight @ beta.to(c.device) + bias.to(c.device)).float()  # (C,)
        gram = torch.einsum("pnd,qnd->npq", c, c)  # (N, P, P)
        # Only the upper triangle is needed (G is symmetric): off-diagonal terms counted twice.
        iu = torch.triu_indices(num_paths, num_paths)
        self.iu = iu
        factor = torch.where(iu[0] == iu[1], 1.0, 2.0).double()
        self.gram = (gram[:, iu[0], iu[1]] * factor).T.contiguous()  # (P(P+1)/2, N)

    def logits(self, weights: Tensor) -> Tensor:
        """(k, N, C) logits for per-path weights w_i = m_i (a mask), or m_i times an EnsembleScale factor.

        Scaling path i by a scalar a scales c_i by a too, so real weights use the same algebra as masks.
        """
        m = weights.double()  # (k, P)
        pairs = m[:, self.iu[0]] * m[:, self.iu[1]]  # (k, P(P+1)/2)
        var = (pairs @ self.gram) / self.dim  # (k, N)
        inv_std = torch.rsqrt(var.clamp_min(0) + self.eps).float()
        logits = (m.float() @ self.h).view(-1, self.num_images, self.num_classes)  # (k, N, C)
        logits.mul_(inv_std[:, :, None]).add_(self.offset)  # in place: this tensor dominates memory traffic
        return logits

    def predict(self, masks: Tensor) -> Tensor:
        return self.logits(masks).argmax(dim=-1)


# ----- path analysis ----------------------------------------------------------------------------------------
@dataclass
class PathStats:
    path: str
    kept: bool
    single_acc: float
    loo_acc: float | None  # None: removing this path would leave no path
    prefix_acc: float | None  # None: no kept path among the first ones


@dataclass
class PathAnalysis:
    """Per-path accuracies of one model on one dataset."""

    rows: list[PathStats]
    full_acc: float
    num_images: int
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "full_acc": self.full_acc,
            "num_images": self.num_images,
            "meta": self.meta,
            "rows": [vars(r) for r in self.rows],
        }

    def save_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load_json(cls, path: str | Path) -> PathAnalysis:
        data = json.loads(Path(path).read_text())
        return cls([PathStats(**r) for r in data["rows"]], data["full_acc"], data["num_images"], data.get("meta", {}))

    def format_table(self) -> str:
        def pct(v: float | None) -> str:
            return "   -  " if v is None else f"{100 * v:6.2f}"

        lines = [f"{'path':<9} {'kept':<5} {'single':>6} {'loo':>6} {'prefix':>6}   (accuracy, %)"]
        for r in self.rows:
            lines.append(
                f"{r.path:<9} {'yes' if r.kept else 'no':<5} {pct(r.single_acc)} {pct(r.loo_acc)} {pct(r.prefix_acc)}"
            )
        lines.append(f"ensemble as configured: {100 * self.full_acc:.2f}% on {self.num_images} images")
        return "\n".join(lines)

    def plot(self, path: str | Path) -> Path:
        """Bar chart PNG: single-path, leave-one-out and prefix accuracy per path, full ensemble as a line."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np

        names = [r.path for r in self.rows]
        x = np.arange(len(names))
        fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(names)), 3.6))
        for offset, key, label in (
            (-0.27, "single_acc", "single path"),
            (0.0, "loo_acc", "leave one out"),
            (0.27, "prefix_acc", "prefix ensemble"),
        ):
            values = [getattr(r, key) for r in self.rows]
            ax.bar(x + offset, [math.nan if v is None else 100 * v for v in values], width=0.27, label=label)
        ax.axhline(100 * self.full_acc, color="black", linewidth=1, linestyle="--", label="ensemble")
        ax.set_xticks(x, names, rotation=60, fontsize=7)
        ax.set_ylabel("accuracy (%)")
        ax.set_ylim(0, 100)
        ax.legend(fontsize=7, ncol=4, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path


def analysis_masks(keep: Sequence[bool]) -> tuple[Tensor, list[str]]:
    """The masks the analysis scores: for each path, single / leave-one-out / prefix; and the full mask.

    Returns (M, P) bool masks (rows that keep no path included) and their labels `kind:i`.
    """
    num_paths = len(keep)
    kept = torch.tensor(keep, dtype=torch.bool)
    rows, labels = [kept.clone()], ["full"]
    for i in range(num_paths):
        single = torch.zeros(num_paths, dtype=torch.bool)
        single[i] = True
        loo = kept.clone()
        loo[i] = False
        prefix = kept.clone()
        prefix[i + 1 :] = False
        rows += [single, loo, prefix]
        labels += [f"single:{i}", f"loo:{i}", f"prefix:{i}"]
    return torch.stack(rows), labels


@torch.no_grad()
def analyze_paths(model: PathEnsembleViT, loader: Iterable[Any], device: str | torch.device = "cpu") -> PathAnalysis:
    """Single-path, leave-one-out and prefix-ensemble accuracy of every path, from ONE trunk forward per batch."""
    masks, labels = analysis_masks(model.path_mask)
    valid = masks.any(dim=1)
    correct = torch.zeros(masks.shape[0], dtype=torch.float64)
    total = 0
    was_training = model.training
    model.eval()
    try:
        for images, targets in loader:
            features = model.forward_paths(images.to(device)).float()  # (P, B, ...)
            targets = targets.to(features.device)
            for chunk, preds in mask_predictions(model, features, masks[valid]):
                correct[valid.nonzero().flatten()[chunk]] += (preds == targets[None]).double().sum(dim=1).cpu()
            total += targets.shape[0]
    finally:
        model.train(was_training)
    if total == 0:
        raise ValueError("analyze_paths got an empty loader")
    acc = {
        label: (float(c / total) if ok else None) for label, c, ok in zip(labels, correct, valid.tolist(), strict=True)
    }
    rows = [
        PathStats(
            path=name,
            kept=model.path_mask[i],
            single_acc=float(acc[f"single:{i}"] or 0.0),
            loo_acc=acc[f"loo:{i}"],
            prefix_acc=acc[f"prefix:{i}"],
        )
        for i, name in enumerate(model.path_names)
    ]
    full = acc["full"]
    assert full is not None
    return PathAnalysis(rows, full, total, {"pool_mode": model.pool_mode, "depth": model.depth})
