"""The trainable Ray runs for every trial (search, supernet, confirmation): a thin adapter that turns `fit`'s
report(metrics, checkpoint_dir) into `tune.report`, and the device a Ray task was given. The only module of the trial
layer that knows Ray; torch and the training code load inside the trial.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ray import tune

from pathsearch.config.typed import set_dotted


def train_trial(config: dict[str, Any], base: dict[str, Any]) -> None:
    """Ray Tune trainable: the base trial config plus this trial's overrides, trained by `fit`.

    The only Ray-aware code around `fit`: it turns report(metrics, checkpoint_dir) into `tune.report` and
    resumes from Tune's checkpoint when the trial is retried or restored.
    """
    import ray

    from pathsearch.config import load_trial_config
    from pathsearch.trial.train import fit

    raw = copy.deepcopy(base)
    for key, value in config.get("overrides", {}).items():
        set_dotted(raw, key, value)
    cfg = load_trial_config(None, data=raw, source="trial config")
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
