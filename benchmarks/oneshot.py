"""One-shot path search on digits (depth 6, 13 paths), measured side by side in one process on a local Ray.

Run: .venv/bin/python benchmarks/oneshot.py [--file search_spaces/digits_two_stage.yaml] [--masks 16]
     [--budget-s 600] [--set key=value ...]
1. The two-stage search of the file (supernet, Optuna over cached features, top-k + baseline trained).
2. Ranking quality: the baseline and `--masks` random masks trained standalone (the file's trial, EnsembleScale
   init as in the file), against their proxy scores from the stage-1 supernet: Kendall tau (target >= 0.5).
3. The full search of the same file (`search.strategy=full`: TPE + ASHA) with a wall-clock budget of `--budget-s`;
   the two-stage search runs under the same cap. Best val_acc of each and compute (CPU-seconds inside trials and
   the proxy task). Target: the two-stage search at least as good with <= 1/3 of the full search's compute.
4. Each search's best configuration trained again with `--reseed` other seeds: differences between configurations
   on digits are often inside seed noise (benchmarks/selection.py), and a search that trains more configurations
   picks its best from more noise.
Torch uses one thread per trial slot; the machine's two cores are two slots. `--masks 0` skips part 2.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]


def trial_seconds(run_dir: Path) -> tuple[float, int]:
    """Sum of Tune's time_total_s over the trials of one Tune experiment folder, and their count."""
    total, count = 0.0, 0
    for result_file in run_dir.glob("*/result.json"):
        lines = result_file.read_text().strip().splitlines()
        if lines:
            total += json.loads(lines[-1])["time_total_s"]
            count += 1
    return total, count


def reseed(spec: Any, overrides: dict[str, Any], seeds: list[int]) -> list[float]:
    """val_acc of one configuration trained once per seed, two at a time (Ray tasks of one CPU each)."""
    import copy

    import ray

    from pathsearch.config import load_trial_config
    from pathsearch.config.typed import set_dotted

    @ray.remote(num_cpus=1)
    def train(seed: int) -> float:
        from pathsearch.trial.train import fit

        raw = copy.deepcopy(spec.base)
        for key, value in {**overrides, "train.seed": seed, "train.threads": 1}.items():
            set_dotted(raw, key, value)
        with tempfile.TemporaryDirectory() as work:
            return float(fit(load_trial_config(None, data=raw), lambda m, c: None, work_dir=work).metrics["val_acc"])

    return list(ray.get([train.remote(s) for s in seeds]))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--file", default=str(ROOT / "search_spaces" / "digits_two_stage.yaml"))
    parser.add_argument("--masks", type=int, default=16, help="random masks trained standalone (plus the baseline)")
    parser.add_argument("--budget-s", type=float, default=600.0, help="wall-clock budget of each search")
    parser.add_argument("--set", action="append", default=[], help="override for every run, e.g. train.epochs=30")
    parser.add_argument("--reseed", type=int, default=3, help="seeds to train each search's best again with")
    parser.add_argument("--keep", default=None, help="keep runs and the MLflow store in this folder")
    args = parser.parse_args()
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ["OMP_NUM_THREADS"] = "1"
    import ray
    import torch

    from pathsearch.config import load_search_file
    from pathsearch.ensemble.model import model_depth
    from pathsearch.search.driver import run_search
    from pathsearch.search.oneshot import STAGE1_FILE, rank_correlation
    from pathsearch.trial.proxy import ProxyScorer

    torch.set_num_threads(1)
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(args.keep or scratch)
        work.mkdir(parents=True, exist_ok=True)
        uri, runs = f"sqlite:///{work / 'mlflow.db'}", work / "runs"
        budget = [f"search.time_budget_s={args.budget_s}"]

        # 1. the two-stage search
        spec = load_search_file(args.file, [*args.set, *budget], model_depth=model_depth)
        if spec.search.strategy != "two_stage":
            raise SystemExit(f"{args.file} is not a two_stage search file")
        started = time.perf_counter()
        two = run_search(spec, runs, uri, name="two_stage", verbose=True)
        two_wall = time.perf_counter() - started
        stage1 = json.loads((two.run_dir / STAGE1_FILE).read_text())
        supernet, proxy = stage1["supernet"], stage1["proxy"]
        cpus_per_trial = spec.search.resources_per_trial.get("cpu", 1.0)
        stage2_s, stage2_n = trial_seconds(two.run_dir)
        two_parts = {
            "supernet": supernet["seconds"] * supernet["cpus"],
            "proxy": (proxy["seconds"] + proxy["cache_seconds"]) * supernet["cpus"],
            "stage 2": stage2_s * cpus_per_trial,
        }
        two_compute = sum(two_parts.values())
        ranked = yaml.safe_load((two.run_dir / "rank_correlation.yaml").read_text())

        # 2. random masks trained standalone vs their supernet proxy scores
        scorer = ProxyScorer.from_checkpoint(supernet["checkpoint"])
        ranking, trained, trained_acc, proxy_acc, masks_wall = {}, [], [], [], 0.0
        names = scorer.model.path_names
        mask_rows = torch.zeros(0, len(names), dtype=torch.bool)
        raw = yaml.safe_load(Path(args.file).read_text())
        raw["space"] = {"model.pruned": {"by": "path"}}  # masks only: EnsembleScale init stays the file's
        masks_file = work / "random_masks.yaml"
        masks_file.write_text(yaml.safe_dump(raw, sort_keys=False))
        random_sets = ["search.strategy=full", "search.sampler=random", "search.scheduler=none", "search.seed=1",
                       f"search.num_samples={args.masks + 1}"]  # fmt: skip
        if args.masks > 0:
            spec_masks = load_search_file(masks_file, [*args.set, *random_sets], model_depth=model_depth)
            started = time.perf_counter()
            masked = run_search(spec_masks, runs, uri, name="random_masks", verbose=True)
            masks_wall = time.perf_counter() - started
            study = json.loads((masked.run_dir / "optuna_trials.json").read_text())
            trained = [t for t in study if t["state"] == "COMPLETE" and not t["user_attrs"].get("pathsearch.reused")]
            mask_rows = torch.tensor([[not t["params"][f"prune.{n}"] for n in names] for t in trained])
            proxy_acc = scorer.score(mask_rows).acc.tolist()
            trained_acc = [t["values"][0] for t in trained]
            ranking = rank_correlation(proxy_acc, trained_acc)

        # 3. the full search (TPE + ASHA) of the same file and budget
        full_sets = ["search.strategy=full", "search.num_samples=1000", *budget]
        spec_full = load_search_file(args.file, [*args.set, *full_sets], model_depth=model_depth)
        started = time.perf_counter()
        full = run_search(spec_full, runs, uri, name="full", verbose=True)
        full_wall = time.perf_counter() - started
        full_s, full_n = trial_seconds(full.run_dir)
        full_compute = full_s * cpus_per_trial

        # 4. each search's best configuration with other seeds
        seeds = list(range(1000, 1000 + args.reseed))
        again = {label: reseed(spec, row["overrides"], seeds) if row and seeds else []
                 for label, row in (("two-stage", two.best), ("full (TPE + ASHA)", full.best))}  # fmt: skip
    ray.shutdown()

    print(f"\n== {args.file}: depth {scorer.model.depth}, {scorer.model.num_paths} paths, "
          f"{proxy['num_images']} validation images ==")  # fmt: skip
    if trained:
        print(f"\nsupernet proxy vs standalone training, {len(trained)} masks (baseline + random), {masks_wall:.0f} s:")
        print(f"  {'mask (kept paths)':<44} {'proxy val_acc':>13} {'trained val_acc':>15}")
        order = sorted(range(len(trained)), key=lambda i: -trained_acc[i])
        for i in order:
            kept = "".join("1" if k else "." for k in mask_rows[i].tolist())
            print(f"  {kept:<30} ({int(mask_rows[i].sum()):>2} kept)    {proxy_acc[i]:>13.4f} {trained_acc[i]:>15.4f}")
        print(f"  Kendall tau {ranking['kendall_tau']:.3f} (target >= 0.5), Spearman rho {ranking['spearman_rho']:.3f}")
    print(f"\ntwo-stage search: {proxy['evaluations']} proxy evaluations in {proxy['seconds']:.1f} s "
          f"({proxy['evaluations'] / max(proxy['seconds'], 1e-9):,.0f}/s, {proxy['distinct']} distinct); "
          f"stage 2 trained {stage2_n}; ranking over them: Kendall tau {ranked['kendall_tau']:.3f}, "
          f"Spearman rho {ranked['spearman_rho']:.3f}")  # fmt: skip
    for row in ranked["configurations"]:
        print(f"  proxy {row['proxy_val_acc']:.4f}  trained {row['trained_val_acc']:.4f}  {row['overrides']}")
    print(f"\n{'search':<22} {'best val_acc':>12} {'wall s':>8} {'compute cpu-s':>14} {'trials':>7}")
    two_best, full_best = two.best["val_acc"] if two.best else float("nan"), full.best["val_acc"] if full.best else 0.0
    print(f"{'two-stage':<22} {two_best:>12.4f} {two_wall:>8.0f} {two_compute:>14.0f} {stage2_n + 1:>7}")
    print("  (" + ", ".join(f"{k} {v:.0f}" for k, v in two_parts.items()) + " cpu-s)")
    print(f"{'full (TPE + ASHA)':<22} {full_best:>12.4f} {full_wall:>8.0f} {full_compute:>14.0f} {full_n:>7}")
    print(f"  ({', '.join(f'{k} {v}' for k, v in full.counts.items())}; budget {args.budget_s:.0f} s wall)")
    ratio = two_compute / max(full_compute, 1e-9)
    print(f"compute ratio two-stage / full: {ratio:.3f} (target <= 0.333); best val_acc two-stage - full: "
          f"{100 * (two_best - full_best):+.2f} points (target >= 0)")  # fmt: skip
    for label, accs in again.items():
        if accs:
            mean, std = statistics.fmean(accs), statistics.stdev(accs) if len(accs) > 1 else 0.0
            found = two.best if label == "two-stage" else full.best
            print(f"{label} best configuration, seeds {seeds}: val_acc {mean:.4f} ± {std:.4f} "
                  f"({', '.join(f'{a:.4f}' for a in accs)}): {found['overrides'] if found else ''}")  # fmt: skip


if __name__ == "__main__":
    main()
