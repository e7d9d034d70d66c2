"""Masks scored per second from cached path features (12-layer ViT-Tiny, 25 paths, 1,000 images).

Run: .venv/bin/python benchmarks/mask_eval.py [--masks 20000] [--classes 10] [--threads 2]
Also checks a sample of the scores against the model's own forward with each mask (target >= 10,000 masks/s).
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.data import DataLoader, TensorDataset

from pathsearch.config.paths import EnsembleScaleConfig, PathConfig
from pathsearch.ensemble.model import create_path_vit
from pathsearch.ensemble.scoring import cache_path_features, evaluate_masks


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--masks", type=int, default=20000)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--kind", choices=["scalar", "vector"], default="vector")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = PathConfig(ensemble_scale=EnsembleScaleConfig(kind=args.kind))
    model = create_path_vit(
        "vit_tiny_patch16_224", path_config=cfg, img_size=32, patch_size=4, num_classes=args.classes
    ).eval()
    with torch.no_grad():
        model.ensemble_scale.uniform_(0.5, 1.5)
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(args.images, 3, 32, 32, generator=gen)
    labels = torch.randint(0, args.classes, (args.images,), generator=gen)
    loader = DataLoader(TensorDataset(images, labels), batch_size=250)
    start = time.perf_counter()
    cached = cache_path_features(model, loader)
    t_cache = time.perf_counter() - start
    masks = torch.rand(args.masks, model.num_paths, generator=gen) < 0.5
    masks[:, -1] = True
    evaluate_masks(model, cached, masks=masks[:256])  # warm-up
    start = time.perf_counter()
    acc = evaluate_masks(model, cached, masks=masks)
    t_eval = time.perf_counter() - start

    # Spot check against the model's own forward.
    mismatches = 0
    for k in range(0, args.masks, args.masks // 5):
        model.set_path_mask(masks[k])
        with torch.no_grad():
            own = (model(images).argmax(-1) == labels).double().mean().item()
        mismatches += abs(own - acc[k].item()) > 1e-9
    print(f"features {tuple(cached.features.shape)} cached in {t_cache:.2f} s ({args.threads} threads)")
    print(
        f"{args.masks} masks in {t_eval:.3f} s: {args.masks / t_eval:,.0f} masks/s "
        f"({args.classes} classes, {args.kind} EnsembleScale); spot-check mismatches: {mismatches}/5"
    )


if __name__ == "__main__":
    main()
