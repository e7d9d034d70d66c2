"""Device bugs caught without a GPU: the tensor code runs on PyTorch's `meta` device (a CPU-made tensor meeting a
meta one raises the same "expected all tensors to be on the same device" error as one meeting a CUDA tensor, and a
host sync such as `.item()` fails there too), a trial's device follows what Ray assigned it, CPU trials never touch
CUDA, and the batches made on the device are the DataLoader's own, in the same seeded order."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import STEP_KINDS, TINY_TRIAL
from torch.utils.data import DataLoader, TensorDataset

from pathsearch.cli import main
from pathsearch.config import load_search_file, load_trial_config
from pathsearch.ensemble.analysis import analysis_masks, count_correct
from pathsearch.ensemble.model import create_path_vit
from pathsearch.ensemble.scoring import cache_path_features, mask_sums
from pathsearch.trial.data import TensorBatches, make_loader
from pathsearch.trial.train import (
    LossGuard,
    build_seed_run,
    evaluate_sums,
    fit,
    load_trial_data,
    make_mixup,
    train_step,
)
from pathsearch.trial.trainable import trial_device

ROOT = Path(__file__).resolve().parents[1]
META = torch.device("meta")


@pytest.mark.parametrize("kind", list(STEP_KINDS))
def test_training_steps_run_on_the_meta_device(kind):
    cfg = load_trial_config(None, [*TINY_TRIAL, *STEP_KINDS[kind]])
    bundle = load_trial_data(cfg)
    run = build_seed_run(cfg, bundle, 0, META)
    mixup = make_mixup(cfg, bundle.num_classes)
    guard = LossGuard(META, window=2)  # a full window is handed on: its copy is made on the device too
    for step, (images, targets) in zip(range(3), run.train_loader, strict=False):
        assert images.device == META and targets.device == META  # batched where the model is
        loss = train_step(run, cfg, images, targets, amp=False, mixup=mixup)
        guard.add(loss, 0, step, run.seed, 1e-3)
    assert loss.device == META
    assert all(p.device == META for p in run.model.parameters())
    assert all(t.device == META for state in run.optimizer.state.values() for t in state.values() if t.dim())


@pytest.mark.parametrize("pool", ["token", "avg", "map"])  # the fast LayerNorm+head algebra, and the generic route
def test_evaluation_analysis_and_mask_scoring_stay_on_the_meta_device(pool):
    kwargs = {} if pool == "token" else {"global_pool": pool}
    model = create_path_vit("vit_tiny_patch16_224", img_size=8, patch_size=2, in_chans=1, embed_dim=32, depth=2,
                            num_heads=2, num_classes=4, **kwargs).to(META)  # fmt: skip
    model.set_path_mask({"embed": False})
    bundle = load_trial_data(load_trial_config(None, TINY_TRIAL))
    val = make_loader(bundle.val, 64, META)
    sums, count = evaluate_sums(model, val, META)
    assert sums.device == META and count == len(bundle.val)
    masks, _ = analysis_masks(model.path_mask)
    correct, _ = count_correct(model, val, masks[masks.any(dim=1)], META)
    assert correct.device == META
    features = cache_path_features(model, val, META)
    assert features.features.device == META and features.labels.device == META
    scales = torch.rand(model.num_paths, 1)  # made on the CPU by a caller: moved to the features' device
    factors = torch.rand(masks.shape[0], model.num_paths, dtype=torch.float64)
    correct, loss = mask_sums(model, features.features, features.labels, masks.clone(), scales, factors)
    assert correct.device == META and loss.device == META


def test_a_trial_gets_cuda_only_when_ray_assigned_it_a_gpu():
    assert trial_device({"CPU": 1.0}) == ("cpu", None)
    assert trial_device({"CPU": 1.0, "GPU": 0.0}) == ("cpu", None)
    assert trial_device({"CPU": 1.0, "GPU": 0.25}) == ("cuda", 0.25)  # a share: its memory is capped to it
    assert trial_device({"CPU": 8.0, "GPU": 1.0}) == ("cuda", None)
    assert trial_device({"CPU": 8.0, "GPU": 2.0}) == ("cuda", None)


def test_ray_tasks_get_the_device_of_what_ray_assigned_them(tmp_path):
    """A real local Ray that declares one GPU (Ray schedules by declared resources; no GPU is touched): a task given
    no GPU gets cpu and sees no GPU, one given a quarter gets cuda with its share."""
    script = textwrap.dedent(
        """
        import json, os, ray
        from pathsearch.trial.trainable import claim_device
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        os.environ["CUDA_VISIBLE_DEVICES"] = "0"  # a GPU node: Ray 2.60 leaves it so for tasks given no GPU
        ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False, configure_logging=False)
        def device():
            got = claim_device(ray.get_runtime_context().get_assigned_resources())
            return [*got, os.environ.get("CUDA_VISIBLE_DEVICES")]
        cpu = ray.get(ray.remote(num_cpus=1)(device).remote())
        quarter = ray.get(ray.remote(num_cpus=1, num_gpus=0.25)(device).remote())
        print(json.dumps([cpu, quarter]))
        ray.shutdown()
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    # no GPU: cpu, and the GPUs hidden from it; a quarter: cuda, its share, and the GPU Ray chose for it
    assert json.loads(result.stdout.strip().splitlines()[-1]) == [["cpu", None, ""], ["cuda", 0.25, "0"]]


def test_a_cpu_trial_calls_nothing_that_opens_a_cuda_context(tmp_path, monkeypatch):
    """fit on the CPU, resumed from its checkpoint, with every CUDA call that opens a context made to fail. (A CPU
    trial on a GPU node cannot be simulated here: torch's own Adam step asks for the current CUDA stream whenever
    CUDA is visible, so the runner hides the GPUs from a trial given none: see the Ray test above.)"""

    def touched(*args, **kwargs):
        raise AssertionError("a CPU trial touched CUDA")

    for name in ("_lazy_init", "init", "get_rng_state", "set_rng_state", "synchronize", "current_stream",
                 "set_per_process_memory_fraction", "mem_get_info"):  # fmt: skip
        monkeypatch.setattr(torch.cuda, name, touched)
    cfg = load_trial_config(None, [*TINY_TRIAL, "train.epochs=2"])
    first = fit(load_trial_config(None, [*TINY_TRIAL, "train.epochs=1"]), lambda m, c: None, work_dir=tmp_path / "a",
                device="cpu")  # fmt: skip
    result = fit(cfg, lambda m, c: None, checkpoint_dir=first.checkpoint_dir, work_dir=tmp_path / "b", device="cpu")
    assert result.metrics["epoch"] == 2


@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("drop_last", [True, False])
@pytest.mark.parametrize("size", [96, 103])
def test_tensor_batches_are_the_dataloaders_batches_in_the_same_seeded_order(shuffle, drop_last, size):
    images, labels = torch.randn(size, 1, 4, 4), torch.arange(size)
    states = []
    for make in (DataLoader, TensorBatches):
        generator = torch.Generator().manual_seed(3) if shuffle else None
        torch.manual_seed(11)
        if make is DataLoader:
            loader = DataLoader(TensorDataset(images, labels), 32, shuffle=shuffle, generator=generator,
                                drop_last=drop_last)  # fmt: skip
        else:
            loader = TensorBatches((images, labels), 32, shuffle, generator, drop_last)
        epochs = [[(x.clone(), y.clone()) for x, y in loader] for _ in range(3)]
        states.append((epochs, len(loader), generator.get_state() if generator else None, torch.get_rng_state()))
    (want, want_len, want_gen, want_rng), (got, got_len, got_gen, got_rng) = states
    assert got_len == want_len == len(want[0])
    for epoch_want, epoch_got in zip(want, got, strict=True):
        assert len(epoch_want) == len(epoch_got)
        for (xw, yw), (xg, yg) in zip(epoch_want, epoch_got, strict=True):
            assert torch.equal(yw, yg) and torch.equal(xw, xg)
    # the same draws from the generator and the global RNG: a checkpoint of either resumes the same order
    assert torch.equal(want_rng, got_rng)
    assert want_gen is None or torch.equal(want_gen, got_gen)


def test_in_memory_data_trains_exactly_as_through_a_dataloader(tmp_path, monkeypatch):
    """The device loader is an implementation detail: fit through it equals fit through torch's DataLoader."""
    import pathsearch.trial.train as train_module

    cfg = load_trial_config(None, [*TINY_TRIAL, "train.epochs=2", "model.kwargs.drop_path_rate=0.1"])
    seen = []
    fast = fit(cfg, lambda m, c: seen.append(m), work_dir=tmp_path / "fast", device="cpu")
    assert isinstance(build_seed_run(cfg, load_trial_data(cfg), 0, torch.device("cpu")).train_loader, TensorBatches)

    def through_dataloader(dataset, batch_size, device, shuffle=False, generator=None, drop_last=False, **_):
        return DataLoader(dataset, batch_size, shuffle=shuffle, generator=generator, drop_last=drop_last)

    monkeypatch.setattr(train_module, "make_loader", through_dataloader)
    slow = fit(cfg, lambda m, c: None, work_dir=tmp_path / "slow", device="cpu")
    for key in ("train_loss", "val_loss", "val_acc", "val_acc_full"):
        assert fast.metrics[key] == slow.metrics[key], key
    assert len(seen) == 2


def test_mixup_trains_when_the_last_batch_would_be_odd(tmp_path):
    """timm's Mixup refuses an odd batch: with mixup the last, partial, batch is dropped (65 images, batch 32)."""
    cfg = load_trial_config(None, [*TINY_TRIAL, "data.train_size=65", "data.batch_size=32", "data.mixup=0.8",
                                   "train.epochs=1"])  # fmt: skip
    seen = []
    fit(cfg, lambda m, c: seen.append(m), work_dir=tmp_path / "run", device="cpu")
    assert len(seen) == 1 and torch.isfinite(torch.tensor(seen[0]["train_loss"]))


def test_train_compile_trains_the_same_model(tmp_path):
    """train.compile (torch.compile of the step's forward and loss) learns what the eager step learns."""
    args = [*TINY_TRIAL, "train.epochs=1", "data.train_size=64"]
    eager = fit(load_trial_config(None, args), lambda m, c: None, work_dir=tmp_path / "eager", device="cpu")
    compiled = fit(load_trial_config(None, [*args, "train.compile=true"]), lambda m, c: None,
                   work_dir=tmp_path / "compiled", device="cpu")  # fmt: skip
    assert compiled.metrics["train_loss"] == pytest.approx(eager.metrics["train_loss"], rel=1e-3)
    assert compiled.metrics["val_loss"] == pytest.approx(eager.metrics["val_loss"], rel=1e-3)


@pytest.mark.parametrize(
    ("resources", "wanted"),
    [
        ("{cpu: 1, gpu: -1}", "search.resources_per_trial.gpu: must be a finite number > 0, got -1"),
        ("{cpu: 1, gpu: 0}", "search.resources_per_trial.gpu: must be a finite number > 0, got 0"),  # leave gpu out
        ("{cpu: 1, gpu: 1.5}", "search.resources_per_trial.gpu: must be at most 1: a trial trains on one GPU"),
        # two whole GPUs: Ray would reserve both and the trial would train on one
        (
            "{cpu: 8, gpu: 2}",
            "search.resources_per_trial.gpu: must be at most 1: a trial trains on one GPU (a share, e.g. 0.25, packs "
            "trials on a GPU), got 2",
        ),
        ("{cpu: 1, gpu: two}", "search.resources_per_trial.gpu: expected int or float, got 'two'"),
        ("{cpu: .inf}", "search.resources_per_trial.cpu: must be a finite number (not inf or nan), got inf"),
        ("{cpu: 1, gpu: true}", "search.resources_per_trial.gpu: expected int or float, got True"),
    ],
)
def test_bad_gpu_amounts_exit_2_naming_key_and_value(tmp_path, capsys, resources, wanted):
    path = ROOT / "search_spaces/digits_tiny.yaml"
    assert main(["validate", str(path), "--set", f"search.resources_per_trial={resources}"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0] and wanted in lines[0], lines


def test_a_share_of_a_gpu_and_one_whole_gpu_are_valid():
    for resources in ({"cpu": 1, "gpu": 0.25}, {"cpu": 1, "gpu": 1}, {"cpu": 8, "gpu": 1.0}):
        spec = load_search_file(ROOT / "search_spaces/digits_tiny.yaml", [f"search.resources_per_trial={resources}"])
        assert spec.search.resources_per_trial == resources


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine where no CUDA GPU is visible")
@pytest.mark.parametrize("verb", ["train", "demo"])
def test_device_cuda_without_a_gpu_exits_2_and_writes_nothing(tmp_path, monkeypatch, capsys, verb):
    monkeypatch.chdir(tmp_path)
    args = ["train", str(ROOT / "search_spaces/digits_tiny.yaml")] if verb == "train" else ["demo"]
    assert main([*args, "--device", "cuda"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"pathsearch {verb}: error: device 'cuda': no CUDA GPU is visible to this process (torch {torch.__version__})"
    ]
    assert list(tmp_path.iterdir()) == []


def test_train_compile_on_a_torch_without_it_exits_2_and_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delattr(torch, "compile")  # a torch from before torch.compile
    assert main(["train", str(ROOT / "search_spaces/digits_tiny.yaml"), "--set", "train.compile=true"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pathsearch train: error: train.compile: torch "), lines
    assert list(tmp_path.iterdir()) == []
