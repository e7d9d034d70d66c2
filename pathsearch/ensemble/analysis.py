"""The one-pass path analysis: single-path, leave-one-out and prefix-ensemble accuracy of every path of a model,
from one trunk forward per batch (the masks are scored from the cached path features), and its table and plot.

Imports torch only; never ray, optuna or mlflow.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from pathsearch.ensemble.model import PathEnsembleViT
from pathsearch.ensemble.scoring import mask_predictions


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
def count_correct(
    model: PathEnsembleViT, loader: Iterable[Any], masks: Tensor, device: str | torch.device = "cpu"
) -> tuple[Tensor, int]:
    """Correct predictions of each (M, P) mask over a loader, from one trunk forward per batch, counted on `device`:
    ((M,) float64 there, images)."""
    masks = masks.to(device)
    correct = torch.zeros(masks.shape[0], dtype=torch.float64, device=device)
    total = 0
    was_training = model.training
    model.eval()
    try:
        for images, targets in loader:
            features = model.forward_paths(images.to(device, non_blocking=True)).float()  # (P, B, ...)
            targets = targets.to(features.device, non_blocking=True)
            for chunk, preds in mask_predictions(model, features, masks):
                correct[chunk] += (preds == targets[None]).sum(dim=1)
            total += targets.shape[0]
    finally:
        model.train(was_training)
    return correct, total


def analyze_paths(model: PathEnsembleViT, loader: Iterable[Any], device: str | torch.device = "cpu") -> PathAnalysis:
    """Single-path, leave-one-out and prefix-ensemble accuracy of every path, from ONE trunk forward per batch."""
    masks, labels = analysis_masks(model.path_mask)
    valid = masks.any(dim=1)
    counted, total = count_correct(model, loader, masks[valid], device)
    if total == 0:
        raise ValueError("analyze_paths got an empty loader")
    correct = torch.zeros(masks.shape[0], dtype=torch.float64)
    correct[valid] = counted.cpu()  # the one host copy
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
