"""A torch-free toy trainable with fit's contract, and a driver that runs a search with it (tests start it as a
separate process so they can kill -9 it). Usage: python tests/toy_search.py search|resume ARGS_JSON"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from pathlib import Path

from ray import tune


def toy_score(toy: dict, k: int, seed: int | str, split: str) -> float:
    """The toy's accuracy of the configuration that prunes k paths, trained with `seed`, on `split`.

    Without toy["means"]: 0.5 + 0.04 k, noise-free. With it: the true mean means[k] plus seed noise, deterministic
    per (seed, k, split): a part every configuration shares on seed s (`shared_sd`: what pairing seeds cancels)
    and a part of its own (`sd`). val and test draw independently. `seed` may be a string (see `noise_seed`)."""
    if "means" not in toy:
        return 0.5 + 0.04 * k
    shared = random.Random(f"{seed}/{split}").gauss(0.0, 1.0)
    own = random.Random(f"{seed}/{k}/{split}").gauss(0.0, 1.0)
    return toy["means"][k] + toy.get("shared_sd", 0.0) * shared + toy.get("sd", 0.0) * own


def noise_seed(toy: dict, seed: int, overrides: dict) -> int | str:
    """What seeds a trial's noise: the training seed, or with toy["per_config"] the seed and the whole configuration
    (so that configurations with the same k, e.g. other learning rates, draw noise of their own)."""
    if not toy.get("per_config"):
        return seed
    config = {k: v for k, v in overrides.items() if k not in ("train.seed", "train.test")}
    return f"{seed}/{json.dumps(config, sort_keys=True)}"


# The noisy toy: true accuracy peaks at k = 2 shortest pruned (not at "prune the most"), and each configuration's
# reported val_acc carries its own seeded noise (sd 0.02) as large as the gaps between the true means.
NOISY = {"means": [0.80, 0.83, 0.86, 0.84, 0.81], "sd": 0.02, "per_config": True}


def noisy_toy_trial(config: dict, base: dict) -> None:
    """`toy_trial` with the NOISY knobs (knobs in base["train"]["toy"] still win)."""
    knobs = {**NOISY, **(base["train"].get("toy") or {})}
    toy_trial(config, {**base, "train": {**base["train"], "toy": knobs}})


def toy_trial(config: dict, base: dict) -> None:
    """Per-epoch metrics and a checkpoint with a real PathConfig YAML. Knobs (marker_dir, fail_k, fail_after: {k:
    epoch} where the first attempt fails after reporting that epoch, sleep, means, sd, shared_sd, per_config) come
    from base["train"]["toy"] (in-process tests) or the PATHSEARCH_TOY environment variable (driver processes).
    Like `fit`, it reports test_acc/test_loss in the final report only when train.test is set."""
    # the flat layout's name, which this version still imports: the same script drives a search of an earlier
    # version (test_search.py resumes a run folder the flat layout made)
    from pathsearch.paths import PathConfig

    toy = base["train"].get("toy") or json.loads(os.environ.get("PATHSEARCH_TOY", "{}"))
    overrides = config["overrides"]
    pruned = overrides.get("model.pruned", [])
    seed = overrides.get("train.seed", base["train"].get("seed", 0))
    start = 0
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            start = json.loads((Path(folder) / "toy.json").read_text())["epoch"]
    if toy.get("marker_dir"):  # one file per attempt: retries and restores are countable
        trial_id = tune.get_context().get_trial_id()
        marker = Path(toy["marker_dir"]) / f"{trial_id}.{len(pruned)}.{start}.{time.monotonic_ns()}"
        marker.write_text(str(os.getpid()))
        if len(pruned) == toy.get("fail_k", -1):
            raise RuntimeError(f"toy failure for k={len(pruned)}")
    epochs = base["train"]["epochs"]
    noise = noise_seed(toy, seed, overrides)
    level = toy_score(toy, len(pruned), noise, "val")
    # like train_trial: a trial restored at its last epoch reports that epoch again
    for epoch in range(min(start + 1, epochs), epochs + 1):
        time.sleep(toy.get("sleep", 0.0))
        folder = Path(os.getcwd()) / "toy" / f"c{epoch}"
        folder.mkdir(parents=True, exist_ok=True)
        PathConfig(model_name="toy", depth=2, pruned=list(pruned)).save(folder / "path_config.yaml")
        (folder / "toy.json").write_text(json.dumps({"epoch": epoch}))
        metrics = {"val_acc": level * epoch / epochs, "epoch": epoch, "kept_paths": 5 - len(pruned), "train_loss": 1.0}
        if epoch == epochs and overrides.get("train.test"):
            metrics.update(test_acc=toy_score(toy, len(pruned), noise, "test"), test_loss=1.0)
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(str(folder)))
        failed = Path(toy.get("marker_dir") or ".") / f"failed.{len(pruned)}"
        if epoch == toy.get("fail_after", {}).get(str(len(pruned))) and not failed.exists():
            failed.write_text("")  # the first attempt only
            raise RuntimeError(f"toy failure after epoch {epoch} for k={len(pruned)}")


class DiesInCreation(tune.Trainable):
    """A trial whose actor dies in its creation task on its first `config["creation_failures"]` attempts, as one
    placed on a node that is lost before the trial starts: Tune retries or fails it without calling on_trial_start.
    Then it reports two epochs."""

    def setup(self, config: dict) -> None:
        markers = Path(config["marker_dir"])
        attempts = len(list(markers.glob(f"{config['name']}.*")))
        (markers / f"{config['name']}.{attempts}").touch()
        if attempts < config["creation_failures"]:
            raise RuntimeError(f"creation task of {config['name']} failed (attempt {attempts + 1})")
        self.epoch = 0

    def step(self) -> dict:
        self.epoch += 1
        return {"epoch": self.epoch, "val_acc": 0.5, "done": self.epoch >= 2}

    def save_checkpoint(self, checkpoint_dir: str) -> None:  # Tune saves a retried trial as it starts
        (Path(checkpoint_dir) / "toy.json").write_text(json.dumps({"epoch": self.epoch}))

    def load_checkpoint(self, checkpoint_dir: str) -> None:
        self.epoch = json.loads((Path(checkpoint_dir) / "toy.json").read_text())["epoch"]


def main() -> None:
    import ray

    from pathsearch.config import load_search_file
    from pathsearch.search import resume_search, run_search

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    verb, args = sys.argv[1], json.loads(sys.argv[2])
    if verb == "search":
        spec = load_search_file(args["file"])
        run_search(spec, args["storage"], args["uri"], name=args["name"], address=args.get("address"),
                   verbose=args.get("verbose", False), trainable=toy_trial)  # fmt: skip
    else:
        resume_search(args["run_dir"], address=args.get("address"), trainable=toy_trial)


if __name__ == "__main__":
    main()
