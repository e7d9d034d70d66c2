"""Data-parallel trials (search.resources_per_trial.workers > 1): the same training as one process, proved on the CPU
with torch.distributed's gloo backend, and the whole path through Ray Train inside a search.

Equivalence: with dropout and drop-path off, a 2-worker trial (each worker its half of every global batch, DDP
averaging the gradients) must give the per-epoch losses and final weights of a 1-worker trial of the same global
batch. They differ only by float32 summation order: a gradient is the mean of two half-batch means instead of one
mean, about 1e-7 relative, and SGD with momentum carries that through 16 steps. Tolerances: losses and val metrics
rel 1e-5, weights abs 1e-5 (their largest entry is about 1; one SGD step moves a weight by up to lr x gradient,
about 1e-3 here, so a missed or doubled gradient average, a wrong shard, or a worker that trains on other data is
hundreds of times larger). SGD, not Adam: Adam divides out the gradient's scale, so it would hide a doubled
gradient.
"""

from __future__ import annotations

import dataclasses
import os
import socket
from pathlib import Path

import pytest
import ray
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import TINY_TRIAL as TINY
from safetensors.torch import load_file
from torch.utils.data import TensorDataset

from pathsearch.config import load_trial_config
from pathsearch.trial.data import make_loader
from pathsearch.trial.train import fit

KINDS = {
    "plain": [],
    "distillation": ["model.distill.alpha=0.5", "model.distill.students=[3]"],
    "vector_scale": ["model.ensemble_scale.kind=vector", "model.pruned=[embed, attn.1]"],
}
# 256 synthetic training images, a global batch of 32: 8 steps an epoch, two epochs
BASE = [*TINY, "train.epochs=2", "data.batch_size=32", "train.opt=sgd", "train.lr=0.05", "train.weight_decay=0"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(rank: int, world: int, overrides: list[str], out: str, port: int) -> None:
    """One worker (or the single process): fit, then rank 0 saves its per-epoch metrics and final weights."""
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
    import pathsearch.trial.train as train

    step, images = train.train_step, []

    def counted(run, cfg, batch, *args):  # the images this worker trained on, step by step
        images.append(len(batch))
        return step(run, cfg, batch, *args)

    train.train_step = counted
    try:
        reports: list[dict] = []
        cfg = load_trial_config(None, [*BASE, *overrides])
        result = fit(cfg, lambda m, _: reports.append(m), work_dir=f"{out}/r{rank}", cpus=1)
        torch.save(images, f"{out}/images{world}_{rank}.pt")
        metrics = [{k: m[k] for k in ("train_loss", "val_loss", "val_acc")} for m in reports]
        if rank == 0:
            weights = load_file(str(result.checkpoint_dir / "model_0.safetensors"))
            torch.save({"metrics": metrics, "weights": weights}, f"{out}/world{world}.pt")
        else:
            assert result.files == {} and not any(Path(f"{out}/r{rank}").iterdir())  # rank 0 alone writes
    finally:
        if world > 1:
            dist.destroy_process_group()


@pytest.mark.parametrize("kind", KINDS)
def test_two_workers_train_the_one_process_trial_of_the_same_global_batch(kind, tmp_path):
    out = str(tmp_path)
    _train(0, 1, KINDS[kind], out, 0)
    mp.spawn(_train, args=(2, KINDS[kind], out, _free_port()), nprocs=2)
    one, two = torch.load(f"{out}/world1.pt"), torch.load(f"{out}/world2.pt")
    assert torch.load(f"{out}/images1_0.pt") == [32] * 16  # 2 epochs of 8 global batches
    assert torch.load(f"{out}/images2_0.pt") == torch.load(f"{out}/images2_1.pt") == [16] * 16  # half each
    assert len(one["metrics"]) == len(two["metrics"]) == 2
    for a, b in zip(one["metrics"], two["metrics"], strict=True):
        assert b == pytest.approx(a, rel=1e-5)
    moved = 0.0
    for name, w in one["weights"].items():
        if w.is_floating_point():
            assert torch.allclose(two["weights"][name], w, rtol=0, atol=1e-5), name
            moved = max(moved, float((w - load_initial(kind)[name]).abs().max()))
    assert moved > 1e-2  # the weights did train: equal because both trained alike, not because neither moved


def load_initial(kind: str, cache: dict = {}) -> dict[str, torch.Tensor]:  # noqa: B006 (a per-process cache)
    """The model's weights before training (the same seed builds the same model)."""
    if kind not in cache:
        from pathsearch.trial.train import build_model, load_trial_data

        cfg = load_trial_config(None, [*BASE, *KINDS[kind]])
        cache[kind] = build_model(cfg, load_trial_data(cfg), cfg.train.seed).state_dict()
    return cache[kind]


@pytest.mark.parametrize("in_memory", [True, False])
def test_each_worker_takes_its_own_part_of_every_global_batch(in_memory):
    """The workers' parts of a batch are disjoint and together the one-process batch, in the same order of batches
    (the same generator), for in-memory tensors and for a DataLoader-fed dataset alike; a last partial batch is
    split too (a worker may get one image fewer)."""
    images = torch.arange(70, dtype=torch.float32)[:, None]
    data = TensorDataset(images, torch.arange(70))
    if not in_memory:
        data = torch.utils.data.Subset(data, range(70))  # not a TensorDataset: the DataLoader path

    def batches(shard=None):
        g = torch.Generator().manual_seed(3)
        return [b[1].tolist() for b in make_loader(data, 16, torch.device("cpu"), True, g, False, 0, shard)]

    whole = batches()
    parts = [batches((r, 3)) for r in range(3)]
    assert len(whole) == 5 and all(len(p) == 5 for p in parts)
    for k, batch in enumerate(whole):
        assert [i for p in parts for i in p[k]] == batch  # in rank order: exactly the global batch
    assert [len(p[0]) for p in parts] == [6, 5, 5] and [len(p[-1]) for p in parts] == [2, 2, 2]


def _worker_pids() -> set[int]:
    """The live Ray Train workers of this machine (their process title is Ray's: ray::RayTrainWorker...)."""
    pids = set()
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if b"RayTrainWorker" in (proc / "cmdline").read_bytes():
                    pids.add(int(proc.name))
            except OSError:
                continue
    return pids


def _live_groups() -> list[list[dict]]:
    """The bundles of every placement group of this Ray that holds resources (created or being created)."""
    return [
        [dict(b) for b in pg["bundles"].values()]
        for pg in ray.util.placement_group_table().values()
        if pg["state"] in ("CREATED", "PENDING", "RESCHEDULING")
    ]


def test_a_search_of_two_worker_trials_runs_end_to_end_and_survives_a_killed_worker(tmp_path):
    """The demo's search file with `workers: 2` (2 worker processes of 0.5 CPU per trial, gloo; one group at a time,
    so that its dozen processes do not starve the tests beside it): the search and its confirmation run through Ray
    Train, every trial COMPLETE or PRUNED with one MLflow run each, holding the path analysis (read from Train's
    storage); a worker killed (SIGKILL) after the first trial's first checkpoint is replaced and that trial
    continues from its checkpoint (no epoch reported twice); no placement group is left. Then, with a placement
    group holding the CPUs a group needs, a search's trial fails after the placement wait
    (search.autoscaler_wait_min) with one line naming it, where Train would wait for ever."""
    import signal
    import threading
    import time

    from mlflow.tracking import MlflowClient

    from pathsearch.config import load_search_file
    from pathsearch.search.driver import run_search
    from pathsearch.search.runner import init_ray, shutdown_ray

    spec = load_search_file(
        Path(__file__).parents[1] / "search_spaces" / "digits_tiny.yaml",
        [
            "search.resources_per_trial={cpu: 0.5, workers: 2}",
            "search.num_samples=2",
            "search.grace_period=1",
            "train.epochs=3",
            "train.eval_every=1",
            "train.warmup_epochs=0",
            "search.confirm.top_k=1",
            "search.confirm.seeds=2",
            "search.confirm.max_seeds=2",
            "search.max_concurrent_trials=1",
            "search.confirm.max_concurrent_trials=1",
        ],
    )
    killed: list[int] = []
    stop = threading.Event()

    def kill_a_worker() -> None:  # once the first Train checkpoint exists, one worker of its group dies
        while not stop.is_set() and not killed:
            if list((tmp_path / "runs").glob("w2/train/*/checkpoint_*")) and (pids := _worker_pids()):
                killed.append(min(pids))
                os.kill(killed[0], signal.SIGKILL)
            time.sleep(0.2)

    killer = threading.Thread(target=kill_a_worker, daemon=True)
    killer.start()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    init_ray(None, dashboard=True)  # as a search of worker groups starts it
    try:
        result = run_search(spec, tmp_path / "runs", uri, name="w2", verbose=False)
        # every group's placement group is gone, a stopped (pruned) trial's too: Train's cleaner found the
        # dashboard (another test's Ray may run beside this one)
        deadline = time.monotonic() + 30
        while (left := _live_groups()) and time.monotonic() < deadline:
            time.sleep(1)
        assert not left, left
        # a group the cluster has no room for (another placement group holds its CPUs) fails its trial in the wait
        hog = ray.util.placement_group([{"CPU": ray.cluster_resources()["CPU"] - 0.5}])
        ray.get(hog.ready(), timeout=60)
        cramped = dataclasses.replace(spec.search, num_samples=1, autoscaler_wait_min=0.1, max_failures=0)
        cramped = dataclasses.replace(cramped, confirm=dataclasses.replace(cramped.confirm, enabled=False))
        failed = run_search(dataclasses.replace(spec, search=cramped), tmp_path / "runs", uri, name="cramped")
    finally:
        stop.set()
        shutdown_ray()  # and the dashboard address it gave this process
    assert failed.counts["failed"] == 1
    (error,) = (tmp_path / "runs" / "cramped").glob("group_trial_*/error.txt")
    assert error.read_text().strip().splitlines()[-1] == (
        "RuntimeError: the trial's worker group (2 workers of {'CPU': 0.5}) could not be placed within "
        "search.autoscaler_wait_min (0.1 min): the cluster had no room for it"
    )
    assert killed, "no worker was killed: the test proved nothing"
    folder = tmp_path / "runs" / "w2"
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("digits_tiny").experiment_id])
    ours = [r for r in runs if result.parent_run_id in (r.info.run_id, r.data.tags.get("pathsearch.search"))]
    trials = [r for r in ours if r.info.run_name.startswith("trial ")]
    assert len(trials) == 2 + 2 * 2  # 2 search trials, 2 configurations x 2 seeds: one run each
    assert all(r.info.status == "FINISHED" for r in ours), [(r.info.run_name, r.info.status) for r in ours]
    states = {r.data.tags.get("pathsearch.state") for r in trials}
    assert states <= {"COMPLETE", "PRUNED"}, states
    for r in trials:
        if r.data.tags.get("pathsearch.state") == "COMPLETE":
            assert "path_analysis.json" in {a.path for a in client.list_artifacts(r.info.run_id)}, r.info.run_name
    assert result.confirmation is not None and result.confirmation.winner is not None
    epochs = [
        [int(line.split(",")[header.index("epoch")]) for line in lines]
        for progress in folder.glob("group_trial_*/progress.csv")
        for header, *lines in [progress.read_text().splitlines()]
        for header in [header.split(",")]
    ]
    assert epochs and all(e == sorted(set(e)) for e in epochs), epochs  # no trial went back to an earlier epoch
    assert "RAY_API_SERVER_ADDRESS" not in os.environ  # a later job submission from this process goes where it says
