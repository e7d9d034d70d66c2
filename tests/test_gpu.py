"""The product on a CUDA GPU: training steps without a host sync, fit end to end (seeds, test split, resume, NaN
guard, path analysis), scoring, proxy and fit-scales on the device, a fractional GPU's memory cap and export's
rebuild. Marked `gpu`: skipped, saying why, where no GPU is visible.

Imports only the torch side of pathsearch and trains on synthetic data only: a GPU machine may have torch, timm,
torchvision, numpy, scipy and pytest and nothing else (no Ray, Optuna, MLflow, scikit-learn, matplotlib, xdist).
Run there as benchmarks/gpu_session.sh does. `PATHSEARCH_GPU_TESTS_ON=cpu` runs them on the CPU (no sync check),
to try their logic on a machine without a GPU; tests/test_cuda_paths.py runs the CUDA branches on the CPU too
(the demo's among them: it trains on the digits, which come from scikit-learn).
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import STEP_KINDS, TINY_TRIAL
from safetensors.torch import load_file

from pathsearch.config import load_trial_config
from pathsearch.config.paths import EnsembleScaleConfig, PathConfig
from pathsearch.ensemble.analysis import analyze_paths
from pathsearch.ensemble.model import create_path_vit
from pathsearch.ensemble.scoring import evaluate_masks
from pathsearch.trial.data import make_loader
from pathsearch.trial.proxy import ProxyScorer, fit_ensemble_scale
from pathsearch.trial.train import (
    LossGuard,
    NonFiniteLossError,
    build_seed_run,
    fit,
    load_trial_data,
    make_mixup,
    train_step,
)

pytestmark = pytest.mark.gpu
DEVICE = torch.device(os.environ.get("PATHSEARCH_GPU_TESTS_ON", "cuda"))
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("kind", list(STEP_KINDS))
def test_a_training_step_makes_no_host_sync(kind):
    cfg = load_trial_config(None, [*TINY_TRIAL, *STEP_KINDS[kind], "data.batch_size=32"])  # 8 steps an epoch
    amp = DEVICE.type == "cuda"  # bf16 autocast, as fit uses it there
    bundle = load_trial_data(cfg)
    run = build_seed_run(cfg, bundle, 0, DEVICE)
    mixup = make_mixup(cfg, bundle.num_classes)
    guard = LossGuard(DEVICE, window=4)
    batches = iter(run.train_loader)
    for step in range(2):  # first steps: lazy initialisations (cuBLAS handles, optimiser state)
        images, targets = next(batches)
        guard.add(train_step(run, cfg, images, targets, amp=amp, mixup=mixup), 0, step, run.seed, 1e-3)
    if DEVICE.type == "cuda":
        torch.cuda.set_sync_debug_mode("error")  # any host sync in these steps raises
    try:
        for step in range(2, 7):  # a full window is handed on to the host too, without waiting
            images, targets = next(batches)
            loss = train_step(run, cfg, images, targets, amp=amp, mixup=mixup)
            guard.add(loss, 0, step, run.seed, 1e-3)
            run.scheduler.step_update(step + 1)
    finally:
        if DEVICE.type == "cuda":
            torch.cuda.set_sync_debug_mode(0)
    guard.check()
    assert loss.device.type == DEVICE.type and math.isfinite(float(loss))


def test_fit_trains_several_seeds_scores_test_and_resumes(tmp_path):
    args = [*TINY_TRIAL, "train.seeds=2", "model.distill.alpha=0.5", "model.distill.students=[3]"]
    reports = []
    whole = fit(load_trial_config(None, [*args, "train.epochs=2"]), lambda m, c: reports.append(m),
                work_dir=tmp_path / "whole", device=DEVICE)  # fmt: skip
    assert [m["epoch"] for m in reports] == [1, 2]
    assert all(math.isfinite(v) for m in reports for v in m.values() if isinstance(v, float))
    assert set(whole.files) >= {"path_analysis_json", "path_analysis_seed1_json", "path_config"}
    rng = load_file(str(whole.checkpoint_dir / "rng.safetensors"))
    assert ("cuda" in rng) == (DEVICE.type == "cuda")
    # stopped after epoch 1, resumed from that checkpoint with its RNG states: the same second epoch (to float
    # tolerance: some CUDA backward kernels add in a varying order)
    kept = tmp_path / "epoch1"

    def keep_first(metrics, checkpoint_dir):
        if metrics["epoch"] == 1:
            shutil.copytree(checkpoint_dir, kept)

    cfg = load_trial_config(None, [*args, "train.epochs=2"])
    fit(cfg, keep_first, work_dir=tmp_path / "again", device=DEVICE)
    resumed = fit(cfg, lambda m, c: None, checkpoint_dir=kept, work_dir=tmp_path / "resumed", device=DEVICE)
    for key in ("train_loss", "val_loss", "val_acc"):
        assert resumed.metrics[key] == pytest.approx(whole.metrics[key], rel=1e-3, abs=1e-3), key
    tested = fit(load_trial_config(None, [*TINY_TRIAL, "train.epochs=1", "train.test=true"]), lambda m, c: None,
                 work_dir=tmp_path / "tested", device=DEVICE)  # fmt: skip
    assert 0 <= tested.metrics["test_acc"] <= 1


def test_the_nan_guard_stops_a_diverging_trial(tmp_path):
    reports = []
    with pytest.raises(NonFiniteLossError, match=r"training loss became \S+ at epoch \d+, step \d+ \(seed 0, lr "):
        fit(load_trial_config(None, [*TINY_TRIAL, "train.epochs=3", "train.lr=1.0e6"]), lambda m, c: reports.append(m),
            work_dir=tmp_path / "lr", device=DEVICE)  # fmt: skip
    assert all(math.isfinite(m["train_loss"]) for m in reports)


def _trained_model(tmp_path: Path, extra: list[str] = ()) -> tuple[Path, object]:
    cfg = load_trial_config(None, [*TINY_TRIAL, "train.epochs=1", *extra])
    return fit(cfg, lambda m, c: None, work_dir=tmp_path / "run", device=DEVICE).checkpoint_dir, cfg


def test_analysis_and_mask_scoring_on_the_device_agree_with_the_cpu(tmp_path):
    checkpoint, cfg = _trained_model(tmp_path)
    on_cpu = ProxyScorer.from_checkpoint(checkpoint, device="cpu")
    on_dev = ProxyScorer.from_checkpoint(checkpoint, device=DEVICE)
    assert on_dev.features.features.device.type == DEVICE.type
    masks = torch.rand(500, on_cpu.model.num_paths, generator=torch.Generator().manual_seed(0)) < 0.5
    masks[:, -1] = True
    tolerance = 2 / on_cpu.features.labels.shape[0]  # an argmax may flip on a float tie
    a, b = evaluate_masks(on_cpu.model, on_cpu.features, masks=masks), evaluate_masks(on_dev.model, on_dev.features,
                                                                                      masks=masks)  # fmt: skip
    assert (a - b).abs().max().item() <= tolerance
    loader = make_loader(load_trial_data(cfg).val, 64, DEVICE)
    dev_rows = analyze_paths(on_dev.model, loader, device=DEVICE).rows
    cpu_rows = analyze_paths(on_cpu.model, make_loader(load_trial_data(cfg).val, 64, torch.device("cpu"))).rows
    for r, s in zip(dev_rows, cpu_rows, strict=True):
        assert abs(r.single_acc - s.single_acc) <= tolerance


def test_proxy_scores_and_fit_scales_run_on_the_device(tmp_path):
    checkpoint, _ = _trained_model(tmp_path, ["train.supernet.enabled=true"])
    scorer = ProxyScorer.from_checkpoint(checkpoint, device=DEVICE)
    masks = torch.ones(3, scorer.model.num_paths, dtype=torch.bool)
    masks[1, 0] = masks[2, :2] = False
    factors = torch.full((3, scorer.model.num_paths), 0.5, dtype=torch.float64)
    scores = scorer.score(masks, factors)
    assert torch.isfinite(scores.loss).all() and ((scores.acc >= 0) & (scores.acc <= 1)).all()
    fitted = fit_ensemble_scale(scorer.model, scorer.features, steps=20, prune=True)
    assert fitted.metrics["fit_split_acc_after"] >= fitted.metrics["fit_split_acc_before"]
    assert all(math.isfinite(f) for f in fitted.factors)


@pytest.mark.skipif(DEVICE.type != "cuda", reason="a memory cap is a CUDA allocator setting")
def test_a_fractional_gpu_caps_the_trials_memory(tmp_path):
    """fit with gpu_fraction (what {gpu: 0.0005} gives: about 70 MB of a 140 GB GPU) cannot allocate past it."""
    script = (
        "import sys; from pathsearch.config import load_trial_config; from pathsearch.trial.train import fit\n"
        "cfg = load_trial_config(None, ['data.name=synthetic', 'data.img_size=224', 'data.train_size=256',\n"
        "    'model.kwargs.in_chans=1', 'data.batch_size=128', 'train.epochs=1', 'model.name=vit_small_patch16_224'])\n"
        "try:\n"
        "    fit(cfg, lambda m, c: None, work_dir=sys.argv[1], device='cuda', gpu_fraction=0.0005)\n"
        "except Exception as err:\n"
        "    print(type(err).__name__); sys.exit(0)\n"
        "print('no error'); sys.exit(1)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path / "run")], capture_output=True, text=True,
                            timeout=300, env=env)  # fmt: skip
    assert result.returncode == 0 and "OutOfMemoryError" in result.stdout, result.stdout + result.stderr[-2000:]


def test_export_rebuild_gives_the_cpu_logits_on_the_device():
    cfg = PathConfig(pruned=["embed"], ensemble_scale=EnsembleScaleConfig(kind="vector", init=0.1))
    torch.manual_seed(0)
    model = create_path_vit("vit_tiny_patch16_224", path_config=cfg, img_size=16, patch_size=4, embed_dim=32, depth=2,
                            num_heads=2, num_classes=5).eval()  # fmt: skip
    rebuilt = create_path_vit(path_config=model.path_config).eval()
    rebuilt.load_state_dict(model.state_dict())
    rebuilt = rebuilt.to(DEVICE)
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        assert (rebuilt(x.to(DEVICE)).cpu() - model(x)).abs().max().item() <= 1e-4
