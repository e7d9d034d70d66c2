"""Supernet training's two pieces: the masks each batch trains (sandwich rule) and the loss over them.

`train.py` uses these; this module never imports train (what a trained supernet scores lives in proxy.py).
Imports torch only; never ray, optuna or mlflow.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from pathsearch.config import SupernetConfig
from pathsearch.ensemble.model import PathEnsembleViT


# ----- supernet training ----------------------------------------------------------------------------------------
def sample_supernet_masks(num_paths: int, cfg: SupernetConfig, generator: torch.Generator) -> Tensor:
    """The masks one supernet batch trains: (masks_per_batch, P) bool.

    Row 0 is the full mask, row 1 a minimal mask (`min_kept` paths), the rest come from `cfg.distribution`
    (the sandwich rule of slimmable networks: the largest and the smallest sub-network every step, plus random ones).
    Every row keeps at least `min_kept` paths.
    """
    min_kept = min(cfg.min_kept, num_paths)
    masks = torch.zeros(cfg.masks_per_batch, num_paths, dtype=torch.bool)
    masks[0] = True
    if cfg.distribution == "shortest":
        masks[1, num_paths - min_kept :] = True  # keep only the longest paths
    else:
        masks[1, torch.randperm(num_paths, generator=generator)[:min_kept]] = True
    for row in range(2, cfg.masks_per_batch):
        masks[row] = _random_mask(num_paths, min_kept, cfg, generator)
    return masks


def _random_mask(num_paths: int, min_kept: int, cfg: SupernetConfig, generator: torch.Generator) -> Tensor:
    mask = torch.zeros(num_paths, dtype=torch.bool)
    if cfg.distribution == "shortest":
        pruned = int(torch.randint(0, num_paths - min_kept + 1, (1,), generator=generator))
        mask[pruned:] = True
        return mask
    if cfg.distribution == "bernoulli":
        for _ in range(100):  # redraw masks that keep too few paths (rare unless keep_prob is small)
            mask = torch.rand(num_paths, generator=generator) < cfg.keep_prob
            if int(mask.sum()) >= min_kept:
                return mask
        # keep_prob is small for min_kept: draw from the same distribution exactly, not from another one. (This
        # used to fall back to kept_count, silently training other masks than the ones asked for; an error would
        # refuse a valid if lopsided setting, and a warning would still train the wrong masks.) Running the
        # redraws first keeps the masks of every seed whose draws never got here as they were.
        kept = _truncated_binomial(num_paths, cfg.keep_prob, min_kept, generator)
    else:
        kept = int(torch.randint(min_kept, num_paths + 1, (1,), generator=generator))  # kept_count
    mask = torch.zeros(num_paths, dtype=torch.bool)
    mask[torch.randperm(num_paths, generator=generator)[:kept]] = True
    return mask


def _truncated_binomial(n: int, p: float, low: int, generator: torch.Generator) -> int:
    """A draw of Binomial(n, p) conditioned on >= low: how many paths a Bernoulli(p) mask that keeps at least `low`
    keeps. (Given that count, which paths are kept is uniform, so the mask is then a random subset of that size.)"""
    if p >= 1:
        return n
    counts = torch.arange(low, n + 1, dtype=torch.float64)
    log_pmf = (
        torch.lgamma(torch.tensor(n + 1.0, dtype=torch.float64))
        - torch.lgamma(counts + 1)
        - torch.lgamma(n - counts + 1)
        + counts * math.log(p)
        + (n - counts) * math.log1p(-p)
    )  # in logs: for tiny p the probabilities themselves underflow
    weights = torch.exp(log_pmf - log_pmf.max())
    return low + int(torch.multinomial(weights, 1, generator=generator))


def supernet_loss(model: PathEnsembleViT, logits: Tensor, targets: Tensor, criterion: torch.nn.Module) -> Tensor:
    """Mean classification loss over the sampled masks' logits (K, B, C); with self-distillation on (alpha > 0),
    the full mask (row 0) teaches the other masks instead of the configured students (in-place distillation)."""
    loss = torch.stack([criterion(row, targets) for row in logits]).mean()
    if model.distill.alpha > 0:
        loss = loss + model.distillation_loss(logits[0], list(logits[1:]))
    return loss
