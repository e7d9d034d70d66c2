"""Path masks and EnsembleScale values scored from cached path features: one trunk pass per image, then any number
of configurations from the pooled per-path outputs (a weighted sum, a norm and the head), without rebuilding a model.

Imports torch and timm only; never ray, optuna or mlflow.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import timm
import torch
from torch import Tensor, nn

from pathsearch.ensemble.model import PathEnsembleViT, combine_paths


@dataclass
class PathFeatures:
    """Raw pooled per-path features of a dataset: (P, N, D), or (P, N, T, D) in `tokens` mode; labels (N,)."""

    features: Tensor
    labels: Tensor


@torch.no_grad()
def cache_path_features(
    model: PathEnsembleViT, loader: Iterable[Any], device: str | torch.device = "cpu"
) -> PathFeatures:
    """One trunk forward per batch on `device` (the model's); keeps every path's pooled output there, float32."""
    was_training = model.training
    model.eval()
    feats, labels = [], []
    try:
        for images, targets in loader:
            feats.append(model.forward_paths(images.to(device, non_blocking=True)).float())  # (P, B, ...)
            labels.append(targets.to(device, non_blocking=True))
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
    """Logits for each mask from cached raw path features: yields (mask slice, image slice, (k, n, C) logits), on the
    features' device.

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
        step = mask_chunk or max(1, logits_budget(features.device) // (fast.num_images * fast.num_classes))
        for start in range(0, weights.shape[0], step):
            yield slice(start, start + step), slice(0, num_images), fast.logits(weights[start : start + step])
        return
    # Generic route (any head): materialise z per mask, then timm's head, chunked over masks and images.
    full = weights.to(scales.dtype)[:, :, None] * scales[None]  # (K, P, 1|D)
    image_chunk = max(1, 65536 // max(1, features[0, 0].numel() // features.shape[-1]))
    for start in range(0, weights.shape[0], 64):
        chunk = slice(start, start + 64)
        for n0 in range(0, num_images, image_chunk):
            z = combine_paths(full[chunk], features[:, n0 : n0 + image_chunk])  # (k, n, [T,] D)
            logits = model.forward_head(z.flatten(0, 1))
            yield chunk, slice(n0, n0 + z.shape[1]), logits.view(z.shape[0], z.shape[1], -1)


def logits_budget(device: torch.device) -> int:
    """How many logits one chunk of masks may hold: on a CPU about 4M (16 MB) stay cache-friendly (larger chunks ran
    several times slower); on a GPU 64M (256 MB, a few times that with the chunk's temporaries) keep it busy."""
    return 1 << 26 if device.type == "cuda" else 1 << 22


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


def evaluate_masks(model: PathEnsembleViT, features: Tensor | PathFeatures, **kwargs: Any) -> Tensor:
    """Accuracy of each mask (K,) from cached path features, as the model itself would score it (arguments as
    `score_masks`; no cross-entropy computed)."""
    return score_masks(model, features, with_loss=False, **kwargs).acc


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
    with_loss: bool = True,
) -> MaskScores:
    """Accuracy and cross-entropy of each mask from cached path features, as the model itself would score them.
    The loss breaks the many accuracy ties between masks on a small validation set.

    Args:
        model: the model the features came from (its norm and head are used).
        features: raw pooled path features from `cache_path_features` (or the PathFeatures itself).
        labels: (N,) targets (taken from PathFeatures when given one).
        masks: (K, P) bool; a row that keeps no path is refused.
        scales: optional EnsembleScale values (P, 1|D) to score instead of the model's (scope `ensemble`).
        factors: optional (K, P) multipliers of each path's EnsembleScale, per mask.
        with_loss: False skips the cross-entropy (`loss` is then NaN).
    """
    features, labels, masks, scales, factors = _check_scoring(model, features, labels, masks, scales, factors)
    correct, loss = mask_sums(model, features, labels, masks, scales, factors, with_loss)
    count = labels.shape[0]
    correct, loss = correct.cpu(), loss.cpu()  # the one host copy
    return MaskScores(correct / count, loss / count if with_loss else torch.full_like(loss, math.nan))


@torch.no_grad()
def mask_sums(
    model: PathEnsembleViT,
    features: Tensor,
    labels: Tensor,
    masks: Tensor,
    scales: Tensor | None = None,
    factors: Tensor | None = None,
    with_loss: bool = True,
) -> tuple[Tensor, Tensor]:
    """Correct predictions and summed cross-entropy of each mask, accumulated on the features' device: two (K,)
    float64 tensors there (the loss stays 0 without `with_loss`). Arguments as `score_masks`, unchecked."""
    correct = torch.zeros(masks.shape[0], dtype=torch.float64, device=features.device)
    loss = torch.zeros(masks.shape[0], dtype=torch.float64, device=features.device)
    for chunk, images, logits in mask_logits(model, features, masks, scales, factors):
        target = labels[images]
        correct[chunk] += (logits.argmax(-1) == target[None]).sum(dim=1)
        if not with_loss:
            continue
        picked = logits.gather(-1, target[None, :, None].expand(logits.shape[0], -1, 1)).squeeze(-1)  # (k, n)
        loss[chunk] += (torch.logsumexp(logits.double(), dim=-1) - picked.double()).sum(dim=1)
    return correct, loss


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
        f64, dev = torch.float64, features.device  # everything lives where the features are
        q = features.double() * scales.double()[:, None, :]  # (P, N, D)
        c = q - q.mean(dim=-1, keepdim=True)
        gamma = norm.weight.to(dev, f64) if norm.weight is not None else torch.ones(dim, dtype=f64, device=dev)
        beta = norm.bias.to(dev, f64) if norm.bias is not None else torch.zeros(dim, dtype=f64, device=dev)
        weight = head.weight.to(dev, f64)  # (C, D)
        bias = head.bias.to(dev, f64) if head.bias is not None else torch.zeros(weight.shape[0], dtype=f64, device=dev)
        self.num_classes = weight.shape[0]
        self.num_images = num_images
        self.dim = dim
        self.eps = norm.eps
        self.h = ((c * gamma) @ weight.T).reshape(num_paths, -1).float()  # (P, N*C)
        self.offset = (weight @ beta + bias).float()  # (C,)
        gram = torch.einsum("pnd,qnd->npq", c, c)  # (N, P, P)
        # Only the upper triangle is needed (G is symmetric): off-diagonal terms counted twice.
        iu = torch.triu_indices(num_paths, num_paths, device=features.device)
        self.iu = iu
        factor = torch.where(iu[0] == iu[1], 1.0, 2.0).to(dev, f64)
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
