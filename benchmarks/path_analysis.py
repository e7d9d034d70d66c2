"""One-pass path analysis vs the naive loop that re-runs the whole model once per lesioned mask.

Run: .venv/bin/python benchmarks/path_analysis.py [--images 256] [--threads 2]
12-layer ViT-Tiny (25 paths). The naive loop needs one full forward per mask: 3P+1 = 76 per batch for
single-path, leave-one-out and prefix accuracies; the one-pass analysis needs one trunk forward per batch.
Checks that both give the same table, then prints the speedup (target >= 12x).
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.data import DataLoader, TensorDataset

from pathsearch.ensemble.analysis import analysis_masks, analyze_paths
from pathsearch.ensemble.model import PathEnsembleViT, create_path_vit


def naive_accuracies(model: PathEnsembleViT, loader: DataLoader, masks: torch.Tensor) -> list[float | None]:
    base = model.path_mask
    out: list[float | None] = []
    for mask in masks:
        if not mask.any():
            out.append(None)
            continue
        model.set_path_mask(mask)
        correct = total = 0
        with torch.no_grad():
            for x, y in loader:
                correct += (model(x).argmax(-1) == y).sum().item()
                total += len(y)
        out.append(correct / total)
    model.set_path_mask(base)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--img-size", type=int, default=32)
    parser.add_argument("--patch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = create_path_vit(
        "vit_tiny_patch16_224", img_size=args.img_size, patch_size=args.patch_size, num_classes=10
    ).eval()
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(args.images, 3, args.img_size, args.img_size, generator=gen)
    # Labels the model itself predicts for a few paths, so accuracies are far from 0 and differ per mask.
    with torch.no_grad():
        labels = model(images).argmax(-1)
        labels[::3] = torch.randint(0, 10, labels[::3].shape, generator=gen)
    loader = DataLoader(TensorDataset(images, labels), batch_size=64)

    start = time.perf_counter()
    analysis = analyze_paths(model, loader)
    t_one = time.perf_counter() - start

    masks, names = analysis_masks(model.path_mask)
    start = time.perf_counter()
    naive = naive_accuracies(model, loader, masks)
    t_naive = time.perf_counter() - start

    by_name = dict(zip(names, naive, strict=True))
    mismatches = 0
    for i, row in enumerate(analysis.rows):
        for key, got in (("single", row.single_acc), ("loo", row.loo_acc), ("prefix", row.prefix_acc)):
            want = by_name[f"{key}:{i}"]
            if (want is None) != (got is None) or (want is not None and got is not None and abs(want - got) > 1e-9):
                mismatches += 1
    print(f"{model.num_paths} paths, {args.images} images at {args.img_size} px, {args.threads} threads")
    print(f"one-pass analysis: {t_one:.2f} s   naive loop ({len(masks)} forwards per batch): {t_naive:.2f} s")
    print(f"speedup {t_naive / t_one:.1f}x   mismatching entries: {mismatches}")


if __name__ == "__main__":
    main()
