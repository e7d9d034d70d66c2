"""Shared helpers: tiny timm ViTs (depth 2-4, dim 32-64) so the suite stays fast on 2 CPU cores."""

from __future__ import annotations

import os
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import timm
import torch
from torch.utils.data import DataLoader, TensorDataset


def pytest_collection_modifyitems(config, items):
    """`gpu`-marked tests run where torch sees a CUDA GPU and are skipped, with the reason, elsewhere."""
    if torch.cuda.is_available() or os.environ.get("PATHSEARCH_GPU_TESTS_ON") == "cpu":  # see tests/test_gpu.py
        return
    skip = pytest.mark.skip(
        reason=f"no CUDA GPU visible (torch {torch.__version__}: torch.cuda.is_available() is False)"
    )
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# One trial of a tiny ViT on the synthetic data (pathsearch.config overrides), and the kinds of training step the
# product runs, each as the overrides that turn it on (tests/test_device.py on meta, tests/test_gpu.py on CUDA)
TINY_TRIAL = [
    "data.name=synthetic",
    "model.kwargs.depth=2",
    "model.kwargs.embed_dim=32",
    "model.kwargs.num_heads=2",
    "model.kwargs.patch_size=2",
    "train.warmup_epochs=0",
]
STEP_KINDS = {
    "plain": [],
    "distillation": ["model.distill.alpha=0.5", "model.distill.students=[3]"],
    "supernet": ["train.supernet.enabled=true"],
    "grad_clip_and_pruning": ["train.grad_clip=1.0", "model.pruned=[embed, attn.1]"],
    "mixup_cutmix_smoothing": ["data.mixup=0.8", "data.cutmix=1.0", "data.label_smoothing=0.1"],
    "drop_path_vector_scale_scope_both": [
        "model.kwargs.drop_path_rate=0.1",
        "model.ensemble_scale.kind=vector",
        "model.ensemble_scale.scope=both",
    ],
}

TINY = dict(img_size=16, patch_size=4, in_chans=3, embed_dim=32, depth=3, num_heads=2, num_classes=5)


def tiny_timm_vit(seed: int = 0, **overrides):
    """A tiny timm VisionTransformer with random (seeded) weights."""
    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", **{**TINY, **overrides})


def randomize_norms(module: torch.nn.Module, seed: int = 0) -> None:
    """Non-trivial LayerNorm affine params, so head algebra is exercised beyond gamma=1, beta=0."""
    gen = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, torch.nn.LayerNorm) and m.weight is not None:
            with torch.no_grad():
                m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=gen))
                m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=gen))


@pytest.fixture
def image_loader():
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(40, 3, 16, 16, generator=gen)
    labels = torch.randint(0, 5, (40,), generator=gen)
    return DataLoader(TensorDataset(images, labels), batch_size=16)


def wait_until_healthy(server: subprocess.Popen, url: str, log: Path, timeout_s: float = 90) -> None:
    """Waits until an `mlflow server` answers `url`/health; its log's end when it exits or stays silent."""
    deadline = time.monotonic() + timeout_s
    while True:
        assert server.poll() is None, log.read_text()[-3000:]
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2).close()
            return
        except OSError:
            assert time.monotonic() < deadline, f"mlflow server not healthy after {timeout_s} s"
            time.sleep(0.3)
