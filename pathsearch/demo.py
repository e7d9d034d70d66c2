"""The path-analysis demo: one `fit` trial of a tiny path-ensemble ViT on the offline digits data, then its path
analysis, copied to one folder. Runs on a laptop CPU in well under a minute. Imports torch and timm only.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from pathsearch.config import load_trial_config
from pathsearch.ensemble.analysis import PathAnalysis
from pathsearch.trial.train import fit

# A depth-6 ViT on the raw 8x8 digits (patch 2 -> 16 tokens + class token); it reaches about 96% in 15 epochs.
# Position embeddings start at std 1.0: timm's 0.02 trains far slower on digits.
DEMO_MODEL = {
    "name": "vit_tiny_patch16_224",
    "kwargs": {"img_size": 8, "patch_size": 2, "in_chans": 1, "embed_dim": 64, "depth": 6, "num_heads": 2},
    "pos_embed_std": 1.0,
}


@dataclass
class DemoResult:
    analysis: PathAnalysis
    files: dict[str, Path]
    seconds: float


def run_demo(
    out_dir: str | Path = "runs/demo",
    epochs: int = 15,
    seed: int = 0,
    threads: int | None = None,
    device: str | torch.device | None = None,
) -> DemoResult:
    """Trains the demo ViT on the default digits split (60% train; the val images evaluated once, at the end) and
    writes the path analysis (JSON, PNG) and the learned PathConfig to `out_dir`."""
    if epochs < 1:
        raise ValueError(f"--epochs must be >= 1, got {epochs}")
    if threads is not None and threads < 1:
        raise ValueError(f"--threads must be >= 1, got {threads}")
    start = time.perf_counter()
    cfg = load_trial_config(
        data={
            "model": DEMO_MODEL,
            "data": {"name": "digits", "split_seed": seed, "batch_size": 64},
            "train": {"epochs": epochs, "warmup_epochs": 1, "eval_every": epochs, "seed": seed, "threads": threads},
        }
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        result = fit(cfg, lambda metrics, checkpoint_dir: None, work_dir=tmp, device=device)
        files = {label: Path(shutil.copy(path, out / path.name)) for label, path in result.files.items()}
    analysis = PathAnalysis.load_json(files["path_analysis_json"])
    return DemoResult(analysis, files, time.perf_counter() - start)
