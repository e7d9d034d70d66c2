"""Forward+backward time of PathEnsembleViT (all paths, vector EnsembleScale) vs the same timm ViT, same weights.

Run: .venv/bin/python benchmarks/model_overhead.py [--rounds 12] [--threads 2]
Prints the time ratio per setting (target <= 1.05 for a 12-layer ViT-Tiny at 224 and 32 px on CPU).
"""

from __future__ import annotations

import argparse
from functools import partial

import torch
import torch.nn.functional as F
from common import interleaved_times, median

from pathsearch.config.paths import EnsembleScaleConfig, PathConfig
from pathsearch.ensemble.model import create_path_vit

SETTINGS = [  # (label, img_size, patch_size, batch)
    ("ViT-Tiny/16 @224", 224, 16, 16),
    ("ViT-Tiny/16 @32", 32, 16, 128),
    ("ViT-Tiny/4 @32", 32, 4, 32),
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = PathConfig(ensemble_scale=EnsembleScaleConfig(kind="vector"))
    print(f"torch {torch.__version__}, {args.threads} threads, {args.rounds} interleaved rounds, fwd+bwd, float32")
    for label, img, patch, batch in SETTINGS:
        torch.manual_seed(0)
        model = create_path_vit("vit_tiny_patch16_224", path_config=cfg, img_size=img, patch_size=patch, num_classes=10)
        model.train()
        x = torch.randn(batch, 3, img, img)
        y = torch.randint(0, 10, (batch,))

        def step(net: torch.nn.Module, x: torch.Tensor = x, y: torch.Tensor = y) -> None:
            net.zero_grad(set_to_none=True)
            F.cross_entropy(net(x), y).backward()

        times = interleaved_times({"timm": partial(step, model.vit), "path": partial(step, model)}, args.rounds)
        t_timm, t_path = median(times["timm"]), median(times["path"])
        print(
            f"{label:<18} batch {batch:>3}: timm {1000 * t_timm:7.1f} ms  path-ensemble {1000 * t_path:7.1f} ms"
            f"  ratio {t_path / t_timm:.3f}"
        )


if __name__ == "__main__":
    main()
