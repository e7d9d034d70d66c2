"""What a trained model's cached path features answer: a supernet's proxy scores of path configurations (stage 1 of
the two-stage search) and post-hoc EnsembleScale fitting on a held-out part of the validation split (`fit-scales`).

`oneshot.py` and `fitscales.py` orchestrate these (Ray, Optuna, MLflow). Imports torch only; never ray, optuna or
mlflow.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from pathsearch.config import TrialConfig
from pathsearch.config.paths import PathConfig
from pathsearch.ensemble.model import PathEnsembleViT, create_path_vit
from pathsearch.ensemble.scoring import MaskScores, PathFeatures, cache_path_features, score_masks
from pathsearch.trial.data import make_loader
from pathsearch.trial.train import load_checkpoint_model, load_trial_data, resolve_device


# ----- scoring path configurations of a trained supernet ---------------------------------------------------------
@dataclass
class ProxyScorer:
    """A trained model and the pooled per-path features of its validation split, cached once: any path mask and
    any EnsembleScale factors are then scored with one weighted sum, one norm and one head matmul per image."""

    model: PathEnsembleViT
    features: PathFeatures
    seconds: float = 0.0  # spent loading and caching

    @classmethod
    def from_checkpoint(cls, checkpoint_dir: str | Path, device: str | torch.device = "cpu") -> ProxyScorer:
        """Rebuilds the model of a `fit` checkpoint on `device` and caches its validation features there (one trunk
        pass); every score is then computed there."""
        import time

        started = time.perf_counter()
        dev = resolve_device(device)
        model, cfg = load_checkpoint_model(checkpoint_dir, device=dev)
        loader = make_loader(load_trial_data(cfg).val, cfg.data.eval_batch_size, dev)
        features = cache_path_features(model, loader, device=dev)
        return cls(model, features, time.perf_counter() - started)

    def score(self, masks: Tensor, factors: Tensor | None = None) -> MaskScores:
        """Accuracy and cross-entropy of (K, P) bool masks with (K, P) EnsembleScale factors (default 1)."""
        return score_masks(self.model, self.features, masks=masks, factors=factors)

    def path_config(self, keep: Sequence[bool], factors: Sequence[float]) -> PathConfig:
        """The configuration scored for (keep, factors): this model's with that mask and scaled EnsembleScale values."""
        return scaled_path_config(self.model, keep, factors)


def scaled_path_config(model: PathEnsembleViT, keep: Sequence[bool], factors: Sequence[float]) -> PathConfig:
    cfg = model.path_config
    cfg.pruned = [name for name, k in zip(model.path_names, keep, strict=True) if not k]
    values = cfg.ensemble_scale.values or {}
    cfg.ensemble_scale.values = {
        name: ([a * float(f) for a in v] if isinstance(v, list) else v * float(f))
        for (name, v), f in zip(values.items(), factors, strict=True)
    }
    return cfg


# ----- post-hoc EnsembleScale fitting ------------------------------------------------------------------------------
@dataclass
class ScaleFit:
    """Per-path factors (and mask) fitted on the `fit` split of cached features; accuracy before and after on both
    splits. The factors multiply the model's EnsembleScale values."""

    factors: list[float]
    keep: list[bool]
    metrics: dict[str, float] = field(default_factory=dict)
    fit_indices: list[int] = field(default_factory=list)


def fit_ensemble_scale(
    model: PathEnsembleViT,
    features: PathFeatures,
    fit_fraction: float = 0.5,
    steps: int = 300,
    lr: float = 0.05,
    prune: bool = False,
    seed: int = 0,
) -> ScaleFit:
    """Fits one multiplier per path on the model's EnsembleScale (and, with `prune`, a path mask) on a held-out
    split of cached features, and reports the accuracy change on the rest (the validation split).

    The images are split by a seeded permutation: `fit_fraction` of them to fit on, the others to report on. The
    factors are fitted by full-batch gradient descent (Adam) on the cross-entropy through the model's own norm and
    head; the step with the best fit-split accuracy (lower loss on ties) is kept, the starting point included, so
    the fit split's accuracy never drops. `prune` then removes paths greedily while that does not lower the fit
    split's accuracy (and lowers its loss).
    """
    if not 0 < fit_fraction < 1:
        raise ValueError(f"fit_fraction must be in (0, 1), got {fit_fraction}")
    if steps < 0 or not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"steps must be >= 0 and lr a finite number > 0, got steps={steps}, lr={lr}")
    num_images = features.labels.shape[0]
    device = features.features.device
    order = torch.randperm(num_images, generator=torch.Generator().manual_seed(seed)).to(device)
    cut = round(fit_fraction * num_images)
    if not 1 <= cut < num_images:
        raise ValueError(f"fit_fraction {fit_fraction} leaves an empty split of {num_images} images")
    fit = PathFeatures(features.features[:, order[:cut]], features.labels[order[:cut]])
    held = PathFeatures(features.features[:, order[cut:]], features.labels[order[cut:]])
    start_keep = torch.tensor(model.path_mask, device=device)
    ones = torch.ones(1, model.num_paths, dtype=torch.float64, device=device)

    before = [score_masks(model, split, masks=start_keep[None], factors=ones) for split in (fit, held)]
    factors = _descend(model, fit, start_keep, steps, lr)
    descended = score_masks(model, fit, masks=start_keep[None], factors=factors[None])
    if (float(descended.acc[0]), -float(descended.loss[0])) < (float(before[0].acc[0]), -float(before[0].loss[0])):
        factors = ones[0]  # the descent scored in float32; the report's scoring (float64) has the last word
    keep = start_keep.clone()
    if prune:
        keep = _prune_greedily(model, fit, keep, factors)
    after = [score_masks(model, split, masks=keep[None], factors=factors[None]) for split in (fit, held)]
    metrics = {
        "fit_split_acc_before": float(before[0].acc[0]),
        "fit_split_acc_after": float(after[0].acc[0]),
        "fit_split_loss_before": float(before[0].loss[0]),
        "fit_split_loss_after": float(after[0].loss[0]),
        "val_acc_before": float(before[1].acc[0]),
        "val_acc_after": float(after[1].acc[0]),
        "val_loss_before": float(before[1].loss[0]),
        "val_loss_after": float(after[1].loss[0]),
        "fit_images": float(cut),
        "val_images": float(num_images - cut),
        "kept_paths": float(keep.sum()),
    }
    metrics["val_acc_delta"] = metrics["val_acc_after"] - metrics["val_acc_before"]
    return ScaleFit(factors.tolist(), keep.tolist(), metrics, order[:cut].tolist())


def _descend(model: PathEnsembleViT, fit: PathFeatures, keep: Tensor, steps: int, lr: float) -> Tensor:
    """Adam on log-factors (positive factors; 0 = factor 1) over the whole fit split; returns the best factors."""
    device = fit.features.device
    log_factors = torch.zeros(model.num_paths, dtype=torch.float32, device=device, requires_grad=True)
    optimizer = torch.optim.Adam([log_factors], lr=lr)
    best: tuple[float, float] | None = None  # (accuracy, -loss), compared as a tuple
    best_factors = torch.ones(model.num_paths, dtype=torch.float64, device=device)
    was_training = model.training
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in frozen:
        p.requires_grad_(False)  # only the factors learn; the model's weights stay as trained
    try:
        for _ in range(steps + 1):
            weights = keep.to(log_factors.dtype) * log_factors.exp()  # (P,)
            logits = model.forward_masks(fit.features, weights[None])[0]  # (N, C)
            loss = F.cross_entropy(logits, fit.labels)
            acc = (logits.argmax(-1) == fit.labels).double().mean().item()
            if best is None or (acc, -loss.item()) > best:
                best = (acc, -loss.item())
                best_factors = log_factors.detach().double().exp()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    finally:
        for p, flag in frozen:
            p.requires_grad_(flag)
        model.train(was_training)
    return best_factors


def _prune_greedily(model: PathEnsembleViT, fit: PathFeatures, keep: Tensor, factors: Tensor) -> Tensor:
    """Backward elimination: drop the path whose removal scores best, while accuracy holds and loss falls."""
    current = score_masks(model, fit, masks=keep[None], factors=factors[None])
    score = (float(current.acc[0]), -float(current.loss[0]))
    while int(keep.sum()) > 1:
        kept = keep.nonzero().flatten().tolist()
        candidates = keep[None].repeat(len(kept), 1)
        candidates[torch.arange(len(kept), device=keep.device), kept] = False
        scored = score_masks(model, fit, masks=candidates, factors=factors[None].expand(len(kept), -1))
        options = [(float(a), -float(b)) for a, b in zip(scored.acc, scored.loss, strict=True)]
        best = max(range(len(kept)), key=lambda i: options[i])
        if options[best] <= score:
            break
        keep, score = candidates[best].clone(), options[best]
    return keep


def fit_scales_of_files(
    path_config: str | Path,
    weights: str | Path,
    cfg: TrialConfig,
    out_dir: str | Path,
    fit_fraction: float = 0.5,
    steps: int = 300,
    lr: float = 0.05,
    prune: bool = False,
    seed: int = 0,
    device: str | torch.device | None = None,
) -> tuple[ScaleFit, dict[str, Path]]:
    """`fit_ensemble_scale` for a trained run's files (PathConfig + safetensors weights) on the validation split of
    `cfg`'s data, on `device` (default: cuda when visible); writes the fitted PathConfig and weights (EnsembleScale
    and mask updated) to `out_dir`."""
    from safetensors.torch import load_file, save_file

    config = PathConfig.load(path_config)
    if config.ensemble_scale.scope != "ensemble":  # the fit scores cached path features, which `both` scales change
        raise ValueError(
            f"{path_config}: ensemble_scale.scope is {config.ensemble_scale.scope!r}: fit-scales fits scales of the "
            "ensemble feature only (scope 'ensemble'); with 'both' they also change the trunk"
        )
    dev = resolve_device(device)
    model = create_path_vit(path_config=config).to(dev)
    model.load_state_dict(load_file(str(weights), device=str(dev)))
    loader = make_loader(load_trial_data(cfg).val, cfg.data.eval_batch_size, dev)
    features = cache_path_features(model, loader, device=dev)
    result = fit_ensemble_scale(model, features, fit_fraction, steps, lr, prune, seed)
    apply_scale_fit(model, result)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"path_config": model.path_config.save(out / "path_config.yaml"), "weights": out / "model_0.safetensors"}
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(files["weights"]))
    return result, files


@torch.no_grad()
def apply_scale_fit(model: PathEnsembleViT, result: ScaleFit) -> None:
    """Sets the fitted mask and multiplies the model's EnsembleScale by the fitted factors."""
    factors = torch.tensor(result.factors, dtype=model.ensemble_scale.dtype, device=model.ensemble_scale.device)
    model.ensemble_scale.mul_(factors[:, None])
    model.set_path_mask(result.keep)
