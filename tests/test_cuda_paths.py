"""The product's CUDA branches, run to the end on the CPU under a simulated GPU (tests/cudasim.py): fit on a
fractional GPU (its memory cap), resume with the GPU's RNG state, float32 evaluation under bf16 autocast, the final
path analysis, export's rebuild, optimiser state moving between CUDA and CPU checkpoints, and the demo. Real timm
models and real fit on synthetic data; the only fakes are the host-side CUDA calls, which check their arguments as
torch does. Each recorder is shown refusing a broken call, and the harness is shown catching the shipped memory-cap
bug. What it cannot show (kernels, host syncs, real memory) is left to tests/test_gpu.py on a GPU.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import TINY_TRIAL
from cudasim import DEVICE_NAME, simulated_gpu
from safetensors.torch import load_file

import pathsearch.trial.train as train_module
from pathsearch.config import load_trial_config
from pathsearch.config.paths import PathConfig
from pathsearch.demo import run_demo
from pathsearch.ensemble.analysis import PathAnalysis, analyze_paths
from pathsearch.ensemble.model import create_path_vit
from pathsearch.trial.data import make_loader
from pathsearch.trial.train import evaluate_sums, fit, load_checkpoint_model, load_trial_data

CPU = torch.device("cpu")


@pytest.fixture
def gpu():
    with simulated_gpu() as sim:
        yield sim


def _fit(args: list[str], work: Path, keep_epoch: int | None = None, keep: Path | None = None, **kwargs: Any):
    def report(metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        if metrics["epoch"] == keep_epoch:
            shutil.copytree(str(checkpoint_dir), str(keep))

    return fit(load_trial_config(None, [*TINY_TRIAL, *args]), report, work_dir=work, **kwargs)


def _param_groups(checkpoint: Path) -> list[dict[str, Any]]:
    return json.loads((checkpoint / "state.json").read_text())["runs"][0]["optimizer"]["param_groups"]


def test_fit_on_a_fractional_gpu_caps_its_memory_and_runs_its_cuda_branches(gpu, tmp_path):
    result = _fit(["train.epochs=1"], tmp_path / "run", device="cuda", gpu_fraction=0.125)
    assert gpu.called("set_per_process_memory_fraction") == [(0.125, 0)]  # a float share of GPU 0, as torch wants
    assert gpu.moved["to"] > 0  # the model and the data were asked onto the GPU
    assert (torch.bfloat16, True) in gpu.called("autocast")  # training steps under bf16 autocast (train.amp)
    # the NaN guard's CUDA branch: a pinned host copy, an event recorded on GPU 0's stream and waited for
    assert gpu.called("pin_memory") and gpu.called("current_stream")[0] == (0,)
    assert gpu.called("Event.record") == gpu.called("Event.synchronize") == [(0,)] * len(gpu.called("Event"))
    rng = load_file(str(result.checkpoint_dir / "rng.safetensors"))
    assert gpu.called("cuda_generator.get_state") == [(0,)] and rng["cuda"].shape == (16,)
    assert _param_groups(result.checkpoint_dir)[0]["fused"] is True  # fused AdamW, as CUDA writes it
    assert {"path_analysis_json", "path_analysis_png", "path_config"} <= set(result.files)
    assert math.isfinite(result.metrics["val_loss"]) and result.metrics["epoch"] == 1


def test_the_shipped_resolve_device_fails_under_the_harness(gpu, tmp_path, monkeypatch):
    """Before the fix resolve_device gave a bare torch.device("cuda"), and every fractional-GPU trial died at the
    memory cap: the harness raises torch's own error for it."""
    monkeypatch.setattr(train_module, "resolve_device", lambda device=None: torch.device(device or "cuda"))
    with pytest.raises(
        ValueError, match=r"Expected a torch\.device with a specified index or an integer, but got:cuda"
    ):
        _fit(["train.epochs=1"], tmp_path / "run", device="cuda", gpu_fraction=0.125)
    assert gpu.called("set_per_process_memory_fraction") == []


def test_a_resumed_gpu_trial_restores_the_gpus_rng_state_and_trains_as_if_uninterrupted(gpu, tmp_path):
    whole = _fit(["train.epochs=2"], tmp_path / "whole", keep_epoch=1, keep=tmp_path / "epoch1", device="cuda")
    saved = load_file(str(tmp_path / "epoch1" / "rng.safetensors"))["cuda"]
    resumed = fit(load_trial_config(None, [*TINY_TRIAL, "train.epochs=2"]), lambda m, c: None,
                  checkpoint_dir=tmp_path / "epoch1", work_dir=tmp_path / "resumed", device="cuda")  # fmt: skip
    restored = gpu.called("cuda_generator.set_state")
    assert len(restored) == 1 and restored[0][0] == 0 and torch.equal(restored[0][1], saved)
    for key in ("train_loss", "val_loss", "val_acc"):
        assert resumed.metrics[key] == whole.metrics[key], key


def test_evaluation_and_the_path_analysis_are_float32_under_amp(tmp_path):
    """Trained under bf16 autocast, the reported val/test metrics and the final path analysis are exactly those of a
    float32 evaluation of the saved model on the CPU: bf16 logits would round and tie."""
    with simulated_gpu() as gpu:
        result = _fit(["train.epochs=1", "train.test=true"], tmp_path / "run", device="cuda")
    assert (torch.bfloat16, True) in gpu.called("autocast")
    analysis = PathAnalysis.load_json(result.files["path_analysis_json"])
    model, cfg = load_checkpoint_model(result.checkpoint_dir)
    bundle = load_trial_data(cfg)
    for split, data in (("val", bundle.val), ("test", bundle.test)):
        sums, count = evaluate_sums(model, make_loader(data, cfg.data.eval_batch_size, CPU), CPU)
        assert result.metrics[f"{split}_loss"] == sums[0].item() / count, split
        assert result.metrics[f"{split}_acc"] == sums[1].item() / count, split
    expected = analyze_paths(model, make_loader(bundle.val, cfg.data.eval_batch_size, CPU))
    assert analysis.full_acc == expected.full_acc and analysis.rows == expected.rows


def test_exports_rebuild_runs_on_the_gpu_and_gives_the_trained_logits(gpu, tmp_path):
    """What export hands on (path_config.yaml + model_0.safetensors) rebuilds the model on the GPU, through
    load_checkpoint_model and through create_path_vit alone."""
    result = _fit(["train.epochs=1", "model.ensemble_scale.kind=vector"], tmp_path / "run", device="cuda")
    x = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(0))  # (B, C, H, W): synthetic's images
    on_gpu, _ = load_checkpoint_model(result.checkpoint_dir, device="cuda")
    config = PathConfig.load(result.files["path_config"])
    rebuilt = create_path_vit(path_config=config).to("cuda").eval()
    rebuilt.load_state_dict(load_file(str(result.checkpoint_dir / "model_0.safetensors"), device="cuda:0"))
    reference, _ = load_checkpoint_model(result.checkpoint_dir)
    with torch.no_grad():
        want = reference(x)
        assert torch.equal(on_gpu(x.to("cuda")), want) and torch.equal(rebuilt(x.to("cuda")), want)
    assert gpu.moved["to"] > 0


def test_a_cuda_checkpoint_resumes_on_the_cpu_with_the_cpus_optimizer_settings(tmp_path):
    with simulated_gpu():
        _fit(["train.epochs=2"], tmp_path / "gpu", keep_epoch=1, keep=tmp_path / "epoch1", device="cuda")
    assert _param_groups(tmp_path / "epoch1")[0]["fused"] is True
    resumed = fit(load_trial_config(None, [*TINY_TRIAL, "train.epochs=2"]), lambda m, c: None,
                  checkpoint_dir=tmp_path / "epoch1", work_dir=tmp_path / "cpu", device="cpu")  # fmt: skip
    # the CPU optimiser keeps its own settings (fused unset: torch before 2.4 has fused AdamW on CUDA only) and steps
    groups = _param_groups(resumed.checkpoint_dir)
    assert [g["fused"] for g in groups] == [None] * len(_param_groups(tmp_path / "epoch1"))
    assert resumed.metrics["epoch"] == 2 and math.isfinite(resumed.metrics["train_loss"])
    tensors = load_file(str(resumed.checkpoint_dir / "optimizer_0.safetensors"))
    steps = [v for k, v in tensors.items() if k.endswith(".step")]  # counted on from the CUDA run: 2 epochs x 4 steps
    assert steps and all(v.dtype == torch.float32 and v.item() == 2 * 4 for v in steps)


def test_a_cpu_checkpoint_resumes_on_the_gpu_with_fused_adamw(tmp_path):
    _fit(["train.epochs=2"], tmp_path / "cpu", keep_epoch=1, keep=tmp_path / "epoch1", device="cpu")
    assert _param_groups(tmp_path / "epoch1")[0]["fused"] is None
    with simulated_gpu():
        resumed = fit(load_trial_config(None, [*TINY_TRIAL, "train.epochs=2"]), lambda m, c: None,
                      checkpoint_dir=tmp_path / "epoch1", work_dir=tmp_path / "gpu", device="cuda")  # fmt: skip
    assert all(g["fused"] is True for g in _param_groups(resumed.checkpoint_dir))
    assert resumed.metrics["epoch"] == 2 and math.isfinite(resumed.metrics["train_loss"])


def test_the_demo_runs_on_the_gpu(gpu, tmp_path):
    result = run_demo(out_dir=tmp_path / "demo", epochs=1, device="cuda")
    assert result.files["path_analysis_json"].is_file() and result.analysis.num_images > 0
    assert gpu.moved["to"] > 0 and gpu.called("autocast")


# Each host-side CUDA call the product (or tests/test_gpu.py) makes, called wrongly: the harness refuses it as torch
# on a one-GPU machine does. (name, call, error, message)
BROKEN_CALLS = [
    ("memory cap without an index (the shipped bug)", lambda: torch.cuda.set_per_process_memory_fraction(
        0.5, torch.device("cuda")), ValueError, "with a specified index"),
    ("memory cap above the whole GPU", lambda: torch.cuda.set_per_process_memory_fraction(1.5, 0), ValueError,
     "Invalid fraction value: 1.5"),
    ("memory cap as an int", lambda: torch.cuda.set_per_process_memory_fraction(1, 0), TypeError, "must be `float`"),
    ("memory cap on a GPU that is not there", lambda: torch.cuda.set_per_process_memory_fraction(0.5, "cuda:1"),
     RuntimeError, "invalid device ordinal"),
    ("memory cap on the CPU", lambda: torch.cuda.set_per_process_memory_fraction(0.5, CPU), ValueError,
     "Expected a cuda device"),
    ("GPU rng state as floats", lambda: torch.cuda.set_rng_state(torch.zeros(16), 0), TypeError,
     "must be a torch.ByteTensor"),
    ("the CPU's rng state given to the GPU", lambda: torch.cuda.set_rng_state(torch.get_rng_state(), "cuda:0"),
     RuntimeError, "wrong size"),
    ("rng state of a GPU that is not there", lambda: torch.cuda.get_rng_state("cuda:1"), IndexError, "out of range"),
    ("a GPU seed out of range", lambda: torch.cuda.manual_seed(2**70), (ValueError, RuntimeError), "Overflow"),
    ("the current stream of the CPU", lambda: torch.cuda.current_stream(CPU), ValueError, "Expected a cuda device"),
    ("an event recorded on a device, not a stream", lambda: torch.cuda.Event().record(torch.device("cuda:0")),
     TypeError, "must be torch.cuda.Stream"),
    ("synchronizing the CPU", lambda: torch.cuda.synchronize(CPU), ValueError, "Expected a cuda device"),
    ("synchronizing a GPU that is not there", lambda: torch.cuda.synchronize("cuda:1"), RuntimeError,
     "invalid device ordinal"),
    ("a sync debug mode torch does not know", lambda: torch.cuda.set_sync_debug_mode("loud"), RuntimeError,
     "invalid value of debug_mode"),
    ("peak memory of the CPU", lambda: torch.cuda.max_memory_allocated(CPU), ValueError, "Expected a cuda device"),
    ("resetting the peak of a GPU that is not there", lambda: torch.cuda.reset_peak_memory_stats(1), RuntimeError,
     "invalid device ordinal"),
    ("the name of a GPU that is not there", lambda: torch.cuda.get_device_name(1), AssertionError,
     "Invalid device id"),
    ("a tensor on a GPU that is not there", lambda: torch.zeros(2, device="cuda:1"), RuntimeError,
     "invalid device ordinal"),
    ("a module moved to a GPU that is not there", lambda: torch.nn.Linear(2, 2).to("cuda:1"), RuntimeError,
     "invalid device ordinal"),
    ("Tensor.cuda onto the CPU", lambda: torch.ones(2).cuda(CPU), ValueError, "Expected a cuda device"),
    ("an autocast given a device, not its type", lambda: torch.autocast(torch.device("cuda:0"), dtype=torch.bfloat16),
     ValueError, "Expected `device_type` of type `str`"),
]  # fmt: skip


@pytest.mark.parametrize(("call", "error", "message"), [r[1:] for r in BROKEN_CALLS], ids=[r[0] for r in BROKEN_CALLS])
def test_each_recorder_refuses_a_broken_call_as_torch_does(gpu, call, error, message):
    calls_before = len(gpu.calls)
    with pytest.raises(error, match=message):
        call()
    made = [name for name, _ in gpu.calls[calls_before:]]
    assert made in ([], ["Event"])  # a refused call is not recorded as made (an event to record on is)


def test_the_same_calls_made_rightly_are_recorded(gpu):
    torch.cuda.set_per_process_memory_fraction(0.25, torch.device("cuda:0"))
    torch.cuda.set_rng_state(torch.cuda.get_rng_state("cuda"), "cuda")
    torch.manual_seed(5)  # torch seeds every GPU's generator too
    torch.cuda.synchronize("cuda")
    torch.cuda.set_sync_debug_mode("error")
    torch.cuda.reset_peak_memory_stats(torch.device("cuda:0"))
    assert torch.cuda.max_memory_allocated(torch.device("cuda:0")) > 0
    torch.cuda.empty_cache()  # takes no argument: nothing to call wrongly, but the call is seen
    assert torch.cuda.get_device_name(torch.device("cuda:0")) == DEVICE_NAME
    assert [name for name, _ in gpu.calls] == [
        "set_per_process_memory_fraction", "cuda_generator.get_state", "cuda_generator.set_state",
        "cuda_generator.manual_seed", "synchronize", "set_sync_debug_mode", "reset_peak_memory_stats",
        "memory_stats", "empty_cache",
    ]  # fmt: skip
    assert gpu.called("cuda_generator.manual_seed") == [(0, 5)] and gpu.called("set_sync_debug_mode") == [(2,)]


def test_the_harness_keeps_cpu_tensors_on_the_cpu_and_undoes_itself():
    def state() -> tuple[Any, ...]:
        cuda = torch.cuda
        return cuda.is_available(), cuda.device_count(), cuda.default_generators, cuda._initialized, torch.autocast

    before = state()
    with simulated_gpu() as sim:
        assert torch.cuda.is_available() and torch.cuda.device_count() == 1
        made = [torch.zeros(2), torch.ones(2).to(torch.float64), torch.ones(2).to(CPU), torch.empty(1, device="cpu")]
        assert all(t.device == CPU for t in made) and not sim.moved  # a CPU tensor made on purpose is not counted
        torch.zeros(2, device="cuda")
        assert sim.moved == {"zeros": 1}
    assert state() == before  # a machine without a GPU sees none again; one with a GPU keeps its own
