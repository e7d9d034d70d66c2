"""The path-analysis demo: train a tiny path-ensemble ViT on the offline digits data, then analyse its paths.

Runs on a laptop CPU in well under a minute. Imports torch and timm only.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from torch import nn
from torch.utils.data import DataLoader

from pathsearch.data import load_digits_split
from pathsearch.model import PathAnalysis, PathEnsembleViT, analyze_paths, create_path_vit
from pathsearch.paths import PathConfig

# A depth-6 ViT on the raw 8x8 digits (patch 2 -> 16 tokens + class token); FIELD-NOTES.md measured it.
DIGITS_VIT: dict[str, Any] = dict(
    img_size=8, patch_size=2, in_chans=1, embed_dim=64, depth=6, num_heads=2, num_classes=10
)


@dataclass
class DemoResult:
    model: PathEnsembleViT
    analysis: PathAnalysis
    files: dict[str, Path]
    seconds: float


def build_digits_vit(path_config: PathConfig | None = None, seed: int = 0) -> PathEnsembleViT:
    """The demo's tiny ViT; position embeddings start at std 1.0 (timm's 0.02 trains far slower on digits)."""
    torch.manual_seed(seed)
    model = create_path_vit("vit_tiny_patch16_224", path_config=path_config, **DIGITS_VIT)
    assert model.vit.pos_embed is not None
    nn.init.normal_(model.vit.pos_embed, std=1.0)
    return model


def run_demo(
    out_dir: str | Path = "runs/demo", epochs: int = 15, seed: int = 0, threads: int | None = None
) -> DemoResult:
    """Trains the demo ViT on an 80/20 digits split, analyses its paths and writes JSON, PNG and YAML."""
    if epochs < 1:
        raise ValueError(f"--epochs must be >= 1, got {epochs}")
    if threads is not None and threads < 1:
        raise ValueError(f"--threads must be >= 1, got {threads}")
    if threads:
        torch.set_num_threads(threads)
    start = time.perf_counter()
    split = load_digits_split(seed=seed)
    model = build_digits_vit(seed=seed)
    generator = torch.Generator().manual_seed(seed)
    train = DataLoader(split.train, batch_size=64, shuffle=True, generator=generator)
    val = DataLoader(split.val, batch_size=256)
    optimizer = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05)
    scheduler = CosineLRScheduler(
        optimizer, t_initial=epochs * len(train), warmup_t=len(train), warmup_prefix=True, t_in_epochs=False
    )
    step = 0
    for _ in range(epochs):
        model.train()
        for images, labels in train:
            loss = nn.functional.cross_entropy(model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            scheduler.step_update(step)
    analysis = analyze_paths(model, val)
    analysis.meta.update({"epochs": epochs, "seed": seed, "dataset": "digits", "train_images": len(split.train)})
    out = Path(out_dir)
    files = {
        "analysis_json": analysis.save_json(out / "path_analysis.json"),
        "analysis_png": analysis.plot(out / "path_analysis.png"),
        "path_config": model.path_config.save(out / "path_config.yaml"),
    }
    return DemoResult(model, analysis, files, time.perf_counter() - start)
