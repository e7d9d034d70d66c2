"""The trainables Ray runs for every trial (search, supernet, confirmation): thin adapters that turn `fit`'s
report(metrics, checkpoint_dir) into `tune.report` (one process) or `ray.train.report` (a data-parallel trial of
several workers, through Ray Train), and the device a Ray task was given. The only module of the trial layer that
knows Ray; torch and the training code load inside the trial.
"""

from __future__ import annotations

import copy
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback

from pathsearch.config.typed import set_dotted
from pathsearch.storage import GROUP_CHECKPOINT, checkpoint_location


def train_trial(config: dict[str, Any], base: dict[str, Any]) -> None:
    """Ray Tune trainable: the base trial config plus this trial's overrides, trained by `fit`.

    The only Ray-aware code around `fit`: it turns report(metrics, checkpoint_dir) into `tune.report` and
    resumes from Tune's checkpoint when the trial is retried or restored.
    """
    import ray

    from pathsearch.trial.train import fit

    cfg = trial_config(config, base)
    context = ray.get_runtime_context()
    assigned = context.get_assigned_resources()
    cpus = int(assigned.get("CPU", 1)) or 1
    device, gpu_fraction = claim_device(assigned)
    node_id = context.get_node_id()  # MLflow tags the run with it: which node trained (and retrained) a trial

    reports: list[Any] = []

    def report(metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        checkpoint = tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        tune.report({**metrics, "node_id": node_id}, checkpoint=checkpoint)
        reports.append(metrics.get("epoch"))

    work_dir = Path(os.getcwd()) / "checkpoints"
    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        fit(cfg, report, work_dir=work_dir, cpus=cpus, device=device, gpu_fraction=gpu_fraction)
    else:
        with checkpoint.as_directory() as folder:
            result = fit(cfg, report, folder, work_dir, cpus=cpus, device=device, gpu_fraction=gpu_fraction)
            if not reports and result.metrics:  # restored at its last epoch: Tune hears the final result again
                # (its snapshot may be older than the checkpoint, see storage.recover_checkpoints; MLflow does
                # not log an epoch its run already holds)
                report(result.metrics, folder)


@dataclass(frozen=True)
class WorkerGroup:
    """How a data-parallel trial runs: `workers` processes, each with `resources` (Ray's names: CPU, GPU, custom),
    placed as one placement group (`strategy`: PACK or SPREAD), retried `max_failures` times from the last
    checkpoint when a worker or its node dies, and failed when the group cannot be placed within `wait_s`."""

    workers: int
    resources: dict[str, float]
    strategy: str = "PACK"
    max_failures: int = 0
    wait_s: float = 600.0


def group_trial(config: dict[str, Any], base: dict[str, Any], group: WorkerGroup) -> None:
    """Ray Tune trainable of a data-parallel trial: it starts a Ray Train TorchTrainer of `group.workers` workers
    (gloo on CPUs, NCCL on GPUs), each running `fit` on its part of every global batch, and waits for it. Rank 0's
    reports reach Tune through Train's TuneReportCallback: the group's metrics (summed over the workers by `fit`)
    and, under GROUP_CHECKPOINT, where Train stored the checkpoint (Tune itself holds none for such a trial). The
    Train run is named after the Tune trial and kept beside Tune's experiment, so a retried or resumed trial
    continues from its last checkpoint, and Train replaces a dead worker from it too."""
    from ray.train import ControllerError
    from ray.train._internal.session import get_session
    from ray.train.torch import TorchConfig
    from ray.train.v2._internal.constants import WORKER_GROUP_START_TIMEOUT_S_ENV_VAR
    from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError
    from ray.train.v2.api.config import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.v2.torch.torch_trainer import TorchTrainer  # Train V2's (ray.train.torch's, typed as such)

    session = get_session()
    assert session is not None  # inside a Tune trial
    storage = session.storage  # the Tune trial's: the same store, the same filesystem
    # the controller reads how long it may wait for the group's placement from the environment it inherits
    os.environ[WORKER_GROUP_START_TIMEOUT_S_ENV_VAR] = str(group.wait_s)
    use_gpu = group.resources.get("GPU", 0.0) > 0
    trainer = TorchTrainer(
        group_worker,
        train_loop_config={"config": config, "base": base},
        scaling_config=ScalingConfig(
            num_workers=group.workers,
            use_gpu=use_gpu,
            resources_per_worker=group.resources,
            placement_strategy=group.strategy,
        ),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(
            name=tune.get_context().get_trial_id(),
            storage_path=f"{storage.experiment_fs_path}/train",
            storage_filesystem=storage.storage_filesystem,
            callbacks=[ReportToTune()],
            # worker deaths are retried from the last checkpoint; a group that cannot be placed in time is not
            # (Train would otherwise try to place it for ever): the trial fails with the line below
            failure_config=FailureConfig(max_failures=group.max_failures, controller_failure_limit=0),
            checkpoint_config=CheckpointConfig(num_to_keep=1),
        ),
    )
    try:
        trainer.fit()
    except ControllerError as err:
        if isinstance(err.controller_failure, WorkerGroupStartupTimeoutError):  # Train's own says to set its variable
            raise RuntimeError(
                f"the trial's worker group ({group.workers} workers of {group.resources}) could not be placed within "
                f"search.autoscaler_wait_min ({group.wait_s / 60:g} min): the cluster had no room for it"
            ) from None
        raise


def group_worker(loop: dict[str, Any]) -> None:
    """One worker of a data-parallel trial (run by Ray Train, the process group already set up): `fit` on this
    worker's device, every worker reporting each epoch (Train's barrier), rank 0 with the checkpoint."""
    import ray.train

    from pathsearch.trial.train import fit

    cfg = trial_config(loop["config"], loop["base"])
    context = ray.get_runtime_context()
    assigned = context.get_assigned_resources()
    device, _ = claim_device(assigned)
    if device == "cuda":
        device = str(ray.train.torch.get_device())  # this worker's GPU
    node_id = context.get_node_id()
    lead = ray.train.get_context().get_world_rank() == 0

    reports: list[Any] = []

    def report(metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir and lead else None
        ray.train.report({**metrics, "node_id": node_id}, checkpoint=checkpoint)
        reports.append(metrics.get("epoch"))

    cpus = int(assigned.get("CPU", 1)) or 1  # a share of a CPU trains on one thread
    checkpoint = ray.train.get_checkpoint()
    # rank 0's checkpoints are written here and copied to Train's storage by each report before it returns
    with tempfile.TemporaryDirectory(prefix="pathsearch-worker-") as work_dir:
        if checkpoint is None:
            fit(cfg, report, work_dir=work_dir, cpus=cpus, device=device)
            return
        with checkpoint.as_directory() as folder:
            result = fit(cfg, report, folder, work_dir, cpus=cpus, device=device)
            if not reports and result.metrics:  # restored at its last epoch: Tune hears the final result again
                report({**result.metrics, GROUP_CHECKPOINT: checkpoint_location(checkpoint)}, None)


class ReportToTune(TuneReportCallback):
    """Train's TuneReportCallback, with the checkpoint's place as pathsearch reads places (a local path, or a store
    URI: `storage.checkpoint_location`) under GROUP_CHECKPOINT; Tune's own checkpoint of the trial stays empty."""

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        if checkpoint is not None:
            metrics = [{**metrics[0], GROUP_CHECKPOINT: checkpoint_location(checkpoint)}, *metrics[1:]]
        super().after_report(run_context, metrics, checkpoint)


def trial_config(config: Mapping[str, Any], base: dict[str, Any]) -> Any:
    """The base trial config with this trial's overrides, validated."""
    from pathsearch.config import load_trial_config

    raw = copy.deepcopy(base)
    for key, value in config.get("overrides", {}).items():
        set_dotted(raw, key, value)
    return load_trial_config(None, data=raw, source="trial config")


def trial_device(assigned: Mapping[str, float]) -> tuple[str, float | None]:
    """(device, GPU share) of a Ray task or trial from the resources Ray assigned it: "cuda" with the share when it
    holds part of a GPU (None: one or more whole GPUs), else "cpu". Ray sets CUDA_VISIBLE_DEVICES for a task that
    holds a GPU, so "cuda" is that GPU."""
    gpus = float(assigned.get("GPU", 0.0))
    if gpus <= 0:
        return "cpu", None
    return "cuda", gpus if gpus < 1 else None


def claim_device(assigned: Mapping[str, float]) -> tuple[str, float | None]:
    """`trial_device` for the Ray task this runs in; a task given no GPU is also hidden from every GPU. Ray no
    longer blanks CUDA_VISIBLE_DEVICES for such tasks, and a CPU trial on a GPU node must neither train on a GPU it
    does not hold nor open a CUDA context there (torch's own Adam step asks CUDA for its stream when it sees one)."""
    device, share = trial_device(assigned)
    if device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    return device, share
