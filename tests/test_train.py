from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_TRIAL as TINY
from PIL import Image
from safetensors.torch import load_file
from torch.utils.flop_counter import FlopCounterMode

from pathsearch.config import load_trial_config
from pathsearch.config.paths import PathConfig
from pathsearch.ensemble.model import create_path_vit
from pathsearch.trial.train import NonFiniteLossError, fit

ROOT = Path(__file__).resolve().parents[1]
METRICS = {"train_loss", "val_loss", "val_acc", "val_acc_full", "kept_paths", "params", "images_per_s", "epoch"}


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[dict, str | None]] = []

    def __call__(self, metrics, checkpoint_dir) -> None:
        self.calls.append((dict(metrics), checkpoint_dir))


def test_fit_reports_every_epoch_with_finite_metrics_and_a_checkpoint(tmp_path):
    cfg = load_trial_config(None, [*TINY, "train.epochs=2"])
    rec = Recorder()
    result = fit(cfg, rec, work_dir=tmp_path)
    assert [m["epoch"] for m, _ in rec.calls] == [1, 2]
    for metrics, _ in rec.calls:
        assert set(metrics) >= METRICS
        splits = json.loads(metrics.pop("dataset_inputs"))  # what it read, for a tracker: never the test split
        assert [(s["context"], s["size"]) for s in splits] == [("train", 256), ("validation", 128)]
        assert all(math.isfinite(v) for v in metrics.values())
        assert 0.0 <= metrics["val_acc"] <= 1.0 and metrics["kept_paths"] == 5
        assert not [key for key in metrics if key.startswith("test")]  # train.test is off by default
    last = Path(rec.calls[-1][1])
    assert last == result.checkpoint_dir
    assert {p.name for p in last.iterdir()} >= {
        "model_0.safetensors", "optimizer_0.safetensors", "rng.safetensors", "state.json",
        "path_analysis.json", "path_analysis.png", "path_config.yaml",
    }  # fmt: skip
    assert not Path(rec.calls[0][1]).exists()  # the earlier checkpoint is removed once the next is reported
    assert not any(p.suffix == ".pkl" or p.suffix == ".pt" for p in last.iterdir())  # no pickle
    exported = PathConfig.load(last / "path_config.yaml")
    assert exported.ensemble_scale.values is not None and exported.depth == 2


def test_resume_continues_exactly(tmp_path):
    # drop-path (torch RNG), Mixup/CutMix (numpy RNG), shuffling (loader generator), 2 seeds, vector scales
    overrides = [
        *TINY,
        "train.epochs=2",
        "train.seeds=2",
        "train.warmup_epochs=1",
        "model.kwargs.drop_path_rate=0.2",
        "data.mixup=0.4",
        "data.cutmix=0.5",
        "model.ensemble_scale.kind=vector",
    ]
    cfg = load_trial_config(None, overrides)
    straight = fit(cfg, Recorder(), work_dir=tmp_path / "straight")

    class Interrupt(Exception):
        pass

    first: list[str] = []

    def stop_after_first_epoch(metrics, checkpoint_dir):
        first.append(checkpoint_dir)
        raise Interrupt

    with pytest.raises(Interrupt):
        fit(cfg, stop_after_first_epoch, work_dir=tmp_path / "part")
    resumed_reports = Recorder()
    resumed = fit(cfg, resumed_reports, checkpoint_dir=first[0], work_dir=tmp_path / "resumed")
    assert [m["epoch"] for m, _ in resumed_reports.calls] == [2]
    for k in range(2):
        for name in ("model", "optimizer"):
            a = load_file(str(straight.checkpoint_dir / f"{name}_{k}.safetensors"))
            b = load_file(str(resumed.checkpoint_dir / f"{name}_{k}.safetensors"))
            assert a.keys() == b.keys()
            for key in a:
                assert torch.equal(a[key], b[key]), (name, k, key)
    timing = {"images_per_s", "images_per_s_std"}
    same = {k: v for k, v in straight.metrics.items() if k not in timing}
    assert {k: v for k, v in resumed.metrics.items() if k not in timing} == pytest.approx(same, rel=1e-6)


def test_pruned_trial_changes_val_acc_but_not_trunk_compute(tmp_path):
    base = load_trial_config(None, [*TINY, "train.epochs=2"])
    pruned = load_trial_config(None, [*TINY, "train.epochs=2", "model.pruned=[mlp.2, attn.2]"])
    full_metrics = fit(base, Recorder(), work_dir=tmp_path / "a").metrics
    pruned_metrics = fit(pruned, Recorder(), work_dir=tmp_path / "b").metrics
    assert pruned_metrics["kept_paths"] == 3 and full_metrics["kept_paths"] == 5
    assert pruned_metrics["params"] == full_metrics["params"]
    assert pruned_metrics["val_acc"] != full_metrics["val_acc"]
    # Same trunk: identical FLOPs for one forward pass (the pruned paths are still computed for later layers).
    x = torch.randn(4, 1, 8, 8)
    flops = []
    for cfg in (PathConfig(), PathConfig(pruned=["mlp.2", "attn.2"])):
        model = create_path_vit(
            "vit_tiny_patch16_224", path_config=cfg, img_size=8, patch_size=2, in_chans=1, depth=2, embed_dim=32,
            num_heads=2, num_classes=4,
        )  # fmt: skip
        with FlopCounterMode(display=False) as counter:
            model(x)
        flops.append(counter.get_total_flops())
    assert flops[0] == flops[1] > 0


def test_several_seeds_report_mean_and_spread(tmp_path):
    cfg = load_trial_config(None, [*TINY, "train.epochs=1", "train.seeds=3"])
    rec = Recorder()
    fit(cfg, rec, work_dir=tmp_path / "three")
    metrics = rec.calls[-1][0]
    assert metrics["seeds"] == 3
    assert (Path(rec.calls[-1][1]) / "path_config_seed2.yaml").is_file()
    # Seed k of the three is the one-seed trial of train.seed k: the report holds their mean and sample spread.
    one_seed = [load_trial_config(None, [*TINY, "train.epochs=1", f"train.seed={s}"]) for s in range(3)]
    single = [fit(one, Recorder(), work_dir=tmp_path / str(s)) for s, one in enumerate(one_seed)]
    for key in ("train_loss", "val_loss", "val_acc"):
        values = np.array([one.metrics[key] for one in single])
        assert metrics[key] == pytest.approx(values.mean(), rel=1e-6), key
        assert metrics[f"{key}_std"] == pytest.approx(values.std(ddof=1), rel=1e-6, abs=1e-12), key
    assert metrics["train_loss_std"] > 0 and metrics["val_loss_std"] > 0  # three seeds really differ


def test_test_split_is_scored_after_the_last_epoch_only(tmp_path):
    digits = ["data.name=digits", "data.train_size=300", "train.epochs=2", "train.eval_every=1", "train.seeds=2"]
    cfg = load_trial_config(None, [*TINY, *digits, "train.test=true"])
    rec = Recorder()
    result = fit(cfg, rec, work_dir=tmp_path / "a")
    assert [m["epoch"] for m, _ in rec.calls] == [1, 2]
    assert not [key for key in rec.calls[0][0] if key.startswith("test")]
    final = rec.calls[-1][0]
    read = [json.loads(m.pop("dataset_inputs")) for m, _ in rec.calls]  # the test split only with the last report
    assert [[s["context"] for s in splits] for splits in read] == [["train", "validation"], ["train", "validation",
                                                                                              "test"]]  # fmt: skip
    assert {key for key in final if key.startswith("test")} == {
        "test_acc",
        "test_loss",
        "test_acc_std",
        "test_loss_std",
    }
    assert 0.0 <= final["test_acc"] <= 1.0 and math.isfinite(final["test_loss"]) and final["test_acc_std"] >= 0
    assert result.metrics == final
    # the same training without train.test: the same val figures (scoring test changes nothing else)
    plain = fit(load_trial_config(None, [*TINY, *digits]), Recorder(), work_dir=tmp_path / "b").metrics
    assert plain["val_acc"] == final["val_acc"] and plain["val_loss"] == pytest.approx(final["val_loss"], rel=1e-6)
    # resumed from the last checkpoint: nothing to train, the saved metrics (test ones included) as they were
    again = Recorder()
    resumed = fit(cfg, again, checkpoint_dir=result.checkpoint_dir, work_dir=tmp_path / "c")
    assert again.calls == [] and resumed.metrics == pytest.approx(final)


def _write_imagefolder(root: Path, splits: tuple[str, ...], broken: str | None = None) -> None:
    for split in splits:
        for c, colour in (("cat", (200, 40, 40)), ("dog", (40, 40, 200))):
            (root / split / c).mkdir(parents=True)
            for i in range(4):
                if split == broken:  # a file no image reader can open: reading this split fails
                    (root / split / c / f"{i}.png").write_bytes(b"not a png")
                else:
                    Image.new("RGB", (10, 10), color=(colour[0], 20 * i, colour[2])).save(root / split / c / f"{i}.png")


def test_test_split_is_never_read_unless_asked(tmp_path):
    _write_imagefolder(tmp_path, ("train", "val", "test"), broken="test")
    sets = [*TINY, "data.name=imagefolder", f"data.root={tmp_path}", "data.img_size=8", "train.epochs=1"]
    fit(load_trial_config(None, sets), Recorder(), work_dir=tmp_path / "a")  # the unreadable test/ is not touched
    with pytest.raises(OSError, match="cannot identify image file"):  # PIL's UnidentifiedImageError
        fit(load_trial_config(None, [*sets, "train.test=true"]), Recorder(), work_dir=tmp_path / "b")


def test_train_test_without_a_test_split_is_a_clear_error(tmp_path):
    _write_imagefolder(tmp_path, ("train", "val"))
    sets = [*TINY, "data.name=imagefolder", f"data.root={tmp_path}", "data.img_size=8", "train.test=true"]
    rec = Recorder()
    with pytest.raises(ValueError, match=re.escape(f"dataset 'imagefolder' at {tmp_path} has no test split")):
        fit(load_trial_config(None, sets), rec, work_dir=tmp_path / "run")
    assert rec.calls == []  # refused before any training


class PoisonAfter(torch.utils.data.Dataset):
    """The wrapped images until `after` of them have been read; every image read after that is NaN."""

    def __init__(self, data, after: int) -> None:
        self.data, self.after, self.reads = data, after, 0

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i):
        image, label = self.data[i]
        self.reads += 1
        return (image if self.reads <= self.after else torch.full_like(image, float("nan"))), label


def test_nan_loss_fails_the_trial_at_once(tmp_path, monkeypatch):
    import dataclasses

    import pathsearch.trial.train as train_module

    cfg = load_trial_config(None, [*TINY, "train.epochs=3", "data.batch_size=32"])
    load = train_module.load_trial_data
    images = len(load(cfg).train)  # 256 synthetic images: 8 steps an epoch

    def poisoned(c):  # epoch 1 and the first two batches of epoch 2 are clean; the third batch of epoch 2 is NaN
        bundle = load(c)
        return dataclasses.replace(bundle, train=PoisonAfter(bundle.train, images + 2 * 32))

    monkeypatch.setattr(train_module, "load_trial_data", poisoned)
    rec = Recorder()
    with pytest.raises(NonFiniteLossError, match=r"training loss became nan at epoch 2, step 3 \(seed 0,"):
        fit(cfg, rec, work_dir=tmp_path / "poisoned")
    assert [m["epoch"] for m, _ in rec.calls] == [1] and math.isfinite(rec.calls[0][0]["train_loss"])
    assert [p.name for p in (tmp_path / "poisoned").iterdir()] == ["checkpoint_0001"]  # nothing after the NaN
    monkeypatch.undo()
    # a diverging learning rate fails the same way, in whichever epoch its loss leaves the finite numbers
    rec = Recorder()
    with pytest.raises(NonFiniteLossError, match=r"training loss became \S+ at epoch (\d+)") as info:
        fit(load_trial_config(None, [*TINY, "train.epochs=3", "train.lr=1.0e6"]), rec, work_dir=tmp_path / "lr")
    epoch = int(re.search(r"at epoch (\d+)", str(info.value)).group(1))
    assert [m["epoch"] for m, _ in rec.calls] == list(range(1, epoch))
    assert all(math.isfinite(m["train_loss"]) for m, _ in rec.calls)


def test_threads_are_set_from_the_cpus_given(tmp_path):
    torch.set_num_threads(1)
    fit(load_trial_config(None, [*TINY, "train.epochs=1"]), Recorder(), work_dir=tmp_path / "a", cpus=2)
    assert torch.get_num_threads() == 2
    fit(
        load_trial_config(None, [*TINY, "train.epochs=1", "train.threads=1"]),
        Recorder(),
        work_dir=tmp_path / "b",
        cpus=2,
    )
    assert torch.get_num_threads() == 1


def test_depth6_vit_reaches_90_percent_on_digits_within_the_demo_budget(tmp_path):
    # Budget (the README demo's): depth-6 dim-64 ViT of digits_tiny.yaml, trained 15 epochs on the default 60/20/20
    # split (1078 training images, batch 64), scored on the 359 val images; about 20 s on 2 cores.
    overrides = ["data.train_size=null", "data.batch_size=64", "train.epochs=15", "train.warmup_epochs=1"]
    cfg = load_trial_config(ROOT / "search_spaces" / "digits_tiny.yaml", [*overrides, "train.eval_every=15"])
    assert cfg.model.kwargs["depth"] == 6 and cfg.data.train_size is None
    rec = Recorder()
    fit(cfg, rec, work_dir=tmp_path)
    assert len(rec.calls) == 1  # eval_every=15: one evaluation, after the last epoch
    assert rec.calls[-1][0]["val_acc"] >= 0.90


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pathsearch.cli", *args], cwd=cwd, capture_output=True, text=True)


def test_cli_train_end_to_end(tmp_path):
    out = tmp_path / "run"
    sets = [a for o in [*TINY, "train.epochs=2", "train.test=true"] for a in ("--set", o)]
    result = run_cli("train", str(ROOT / "search_spaces" / "digits_tiny.yaml"), *sets, "--out", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "final metrics (trained on cpu):" in result.stdout and "val_acc_full" in result.stdout
    assert "test (128 images, seeds 0): test_acc " in result.stdout  # synthetic data: 128 test images
    assert f"path_config: {out}/checkpoint_0002/path_config.yaml" in result.stdout
    assert (out / "checkpoint_0002" / "path_analysis.png").is_file()
    assert "\r" not in result.stdout + result.stderr  # no progress-bar frames in a pipe or a log


def test_cli_train_bad_input_exits_2_and_writes_nothing(tmp_path):
    out = tmp_path / "run"
    spec = str(ROOT / "search_spaces" / "digits_tiny.yaml")
    result = run_cli("train", spec, "--set", "train.epochs=0", "--set", "data.nmae=x", "--out", str(out), cwd=tmp_path)
    assert result.returncode == 2
    assert "digits_tiny.yaml: train.epochs: must be >= 1, got 0" in result.stderr
    assert "data.nmae: unknown key" in result.stderr
    assert not out.exists()


def test_cli_train_nan_exits_1_with_a_clear_message(tmp_path):
    sets = [a for o in [*TINY, "train.lr=1.0e6"] for a in ("--set", o)]
    spec = str(ROOT / "search_spaces" / "digits_tiny.yaml")
    result = run_cli("train", spec, *sets, "--out", str(tmp_path / "r"), "--no-progress", cwd=tmp_path)
    assert result.returncode == 1
    assert "trial failed: training loss became" in result.stderr


# ----- torch threads from the environment; supernet masks of a small keep_prob ---------------------------------
def test_torch_threads_follow_train_threads_then_ray_then_omp_num_threads_then_every_core():
    import os

    from pathsearch.trial.train import torch_threads

    cores = len(os.sched_getaffinity(0))
    assert torch_threads(3, 2, {"OMP_NUM_THREADS": "1"}) == 3  # train.threads wins
    assert torch_threads(None, 2, {"OMP_NUM_THREADS": "1"}) == 2  # a Ray trial's CPUs: its share of the node
    assert torch_threads(None, None, {"OMP_NUM_THREADS": "1"}) == 1
    assert torch_threads(None, None, {"OMP_NUM_THREADS": "4,2"}) == 4  # OpenMP's nested form: the outer level
    assert torch_threads(None, None, {}) == cores  # neither: every core, as before
    assert torch_threads(None, None, {"OMP_NUM_THREADS": " "}) == cores
    for bad in ("0", "two", "-1"):
        with pytest.raises(ValueError, match=rf"OMP_NUM_THREADS='{bad}': expected a whole number >= 1"):
            torch_threads(None, None, {"OMP_NUM_THREADS": bad})


def test_cli_train_runs_on_omp_num_threads_unless_train_threads_is_set(tmp_path):
    """`pathsearch train` once set every core, whatever OMP_NUM_THREADS said; the checkpoint records what ran."""
    import json
    import os

    spec = str(ROOT / "search_spaces" / "digits_tiny.yaml")
    sets = [a for o in [*TINY, "train.epochs=1", "data.train_size=64", "data.val_size=16"] for a in ("--set", o)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = {
        "omp": subprocess.Popen(
            [sys.executable, "-m", "pathsearch.cli", "train", spec, *sets, "--out", str(tmp_path / "omp")],
            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        ),
        "set": subprocess.Popen(
            [sys.executable, "-m", "pathsearch.cli", "train", spec, *sets, "--set", "train.threads=2",
             "--out", str(tmp_path / "set")],
            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        ),
    }  # fmt: skip
    for proc in runs.values():
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
    threads = {n: json.loads((tmp_path / n / "checkpoint_0001" / "state.json").read_text())["threads"] for n in runs}
    assert threads == {"omp": 1, "set": 2}
    bad = subprocess.run(
        [sys.executable, "-m", "pathsearch.cli", "train", spec, *sets, "--out", str(tmp_path / "bad")],
        cwd=tmp_path, env={**env, "OMP_NUM_THREADS": "all"}, capture_output=True, text=True,
    )  # fmt: skip
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "pathsearch train: error: OMP_NUM_THREADS='all': expected a whole number >= 1" in bad.stderr
    assert not (tmp_path / "bad").exists()  # the run's folder is removed again: nothing was written


def test_bernoulli_supernet_masks_keep_their_distribution_when_keep_prob_is_small():
    """Bernoulli masks redrawn until they keep >= min_kept paths: after 100 failed redraws they once came from
    kept_count instead, silently (mean 9.5 kept paths of 13 there). Now every mask follows the conditioned law."""
    from pathsearch.config import SupernetConfig
    from pathsearch.ensemble.supernet import sample_supernet_masks

    n, p, low = 13, 0.15, 6  # P(kept >= 6) = 0.0075: about half the masks exhaust the 100 redraws
    pmf = {k: math.comb(n, k) * p**k * (1 - p) ** (n - k) for k in range(low, n + 1)}
    mean = sum(k * v for k, v in pmf.items()) / sum(pmf.values())  # 6.19
    cfg = SupernetConfig(enabled=True, masks_per_batch=6, distribution="bernoulli", keep_prob=p, min_kept=low)
    gen = torch.Generator().manual_seed(0)
    kept = torch.stack([sample_supernet_masks(n, cfg, gen)[2:] for _ in range(500)]).sum(-1).double()  # (500, 4)
    assert kept.min() >= low
    assert kept.mean().item() == pytest.approx(mean, abs=0.06)  # the old fallback: about 7.8
    tiny = SupernetConfig(enabled=True, masks_per_batch=6, distribution="bernoulli", keep_prob=1e-9, min_kept=4)
    kept = torch.stack([sample_supernet_masks(n, tiny, gen)[2:] for _ in range(50)]).sum(-1)
    assert (kept == 4).all()  # conditioned on >= 4, a Bernoulli(1e-9) mask keeps exactly 4
