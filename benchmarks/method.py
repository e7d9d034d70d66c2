"""What the method does here: the paper's claims, each measured against the unpruned baseline on paired seeds.

Run: .venv/bin/python benchmarks/method.py [--datasets fashion_mnist digits] [--depths 6 12] [--seeds 5]
     [--workers 2] [--search-trials N] [--search-depths 6] [--no-search] [--set KEY=VALUE ...]
     [--out docs/method] [--work .benchmarks/method] [--report-only]

For each dataset and depth (same width), every arm below is trained on the same seeds 1..N (seed s: the same
initialisation and data order in every arm) and scored once on the test split, which nothing here selects on:
- baseline: no path pruned, EnsembleScale frozen at 1 (the plain timm ViT), no distillation. Its path analysis (on
  the val split, after training) gives claim 1: single-path accuracy by path length, and what leaving each path out
  of the ensemble does;
- pruning: the k shortest paths pruned from the classifier's input from the first step;
- EnsembleScale: learnable per-channel (vector) scales at a few inits;
- self-distillation: the full ensemble teaches prefix ensembles of a third and two thirds of the paths;
- search: `pathsearch search` on the dataset's search file as shipped (val decides) at that depth, then its
  confirmation (its top_k and the product's own baseline, on the same seeds 1..N): the verdict's paired test
  difference.
Effects are paired differences in test accuracy (points) with a 95% t interval over seeds (pathsearch.search.verdict's
paired_difference, scipy.stats). Each run uses one thread; --workers runs side by side.

Results are appended to OUT/runs.jsonl as each run ends, and a run already there is not trained again: an
interrupted benchmark continues where it stopped. Writes OUT/method.md, OUT/method.csv and one PNG per claim; the
searches' run folders and MLflow store go to WORK (default .benchmarks/method/). --set adds overrides to every run
and search (a smaller budget for a quick look, say).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
FILES = {
    "fashion_mnist": ROOT / "search_spaces" / "fashion_mnist_vit.yaml",
    "digits": ROOT / "search_spaces" / "digits_tiny.yaml",
}
BASE = [
    "model.pruned=[]",
    "model.ensemble_scale.init=1.0",
    "model.ensemble_scale.learnable=false",
    "model.distill.alpha=0.0",
]
PRUNE_K = (3, 6)
SCALE_INITS = (0.01, 0.1, 1.0)
CLAIMS = {
    "analysis": "path analysis of the baseline (val split)",
    "pruning": "pruning the k shortest paths",
    "ensemble_scale": "EnsembleScale (learnable vector) init",
    "distillation": "self-distillation to short-path students",
    "search": "search + confirmation",
}


@dataclass(frozen=True)
class Arm:
    claim: str
    label: str
    overrides: tuple[str, ...]


def students(depth: int) -> list[int]:
    """Prefix ensembles of about a third and two thirds of the 2L+1 paths."""
    paths = 2 * depth + 1
    return [paths // 3, 2 * paths // 3]


def arms(depth: int) -> list[Arm]:
    from pathsearch.config.paths import path_names

    names = path_names(depth)
    out = [Arm("analysis", "baseline", ())]
    for k in (k for k in PRUNE_K if k < len(names)):
        out.append(Arm("pruning", f"prune {k} shortest", (f"model.pruned={json.dumps(names[:k])}",)))
    for init in SCALE_INITS:
        out.append(
            Arm(
                "ensemble_scale",
                f"scale init {init:g}",
                ("model.ensemble_scale.learnable=true", f"model.ensemble_scale.init={init}"),
            )
        )
    distill = (
        "model.distill.alpha=0.5",
        "model.distill.temperature=2.0",
        f"model.distill.students={json.dumps(students(depth))}",
    )
    out.append(Arm("distillation", "distill a=0.5 T=2", distill))
    return out


def run_overrides(dataset: str, depth: int, arm: Arm, seed: int, extra: Sequence[str] = ()) -> list[str]:
    return [
        f"model.kwargs.depth={depth}",
        f"model.distill.students={json.dumps(students(depth))}",
        *BASE,
        *arm.overrides,
        f"train.seed={seed}",
        "train.seeds=1",
        "train.threads=1",
        "train.test=true",
        "train.eval_every=1000",  # only the last epoch is evaluated
        *extra,
    ]


def train_one(dataset: str, depth: int, arm: Arm, seed: int, extra: Sequence[str] = ()) -> dict[str, Any]:
    """One seed of one arm (in a worker process): test and val accuracy, and the path analysis of the last epoch."""
    from pathsearch.config import load_trial_config
    from pathsearch.trial.train import fit

    cfg = load_trial_config(FILES[dataset], run_overrides(dataset, depth, arm, seed, extra))
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="pathsearch-method-") as tmp:
        result = fit(cfg, lambda metrics, checkpoint: None, work_dir=tmp, cpus=1, device="cpu")
        analysis = json.loads(Path(result.files["path_analysis_json"]).read_text())
    m = result.metrics
    return {
        "dataset": dataset,
        "depth": depth,
        "claim": arm.claim,
        "arm": arm.label,
        "seed": seed,
        "test_acc": m["test_acc"],
        "val_acc": m["val_acc"],
        "seconds": time.perf_counter() - started,
        "analysis": {"full_acc": analysis["full_acc"], "rows": analysis["rows"]},
    }


def read_records(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def append_record(path: Path, record: Mapping[str, Any]) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def run_grid(jobs: Sequence[tuple[str, int, Arm, int]], workers: int, results: Path, extra: Sequence[str] = ()) -> None:
    done = {(r["dataset"], r["depth"], r["arm"], r["seed"]) for r in read_records(results) if r["claim"] != "search"}
    todo = [j for j in jobs if (j[0], j[1], j[2].label, j[3]) not in done]
    print(f"grid: {len(jobs) - len(todo)} of {len(jobs)} runs already in {results}; training {len(todo)}", flush=True)
    if not todo:
        return
    # spawn: a fresh interpreter per worker (no forked torch thread pools); each keeps its loaded datasets
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        futures = {pool.submit(train_one, *job, extra): job for job in todo}
        for i, future in enumerate(as_completed(futures), 1):
            record = future.result()
            append_record(results, record)
            print(
                f"[{i}/{len(todo)}] {record['dataset']} depth {record['depth']} {record['arm']:<18} seed "
                f"{record['seed']}: test {100 * record['test_acc']:.2f}%  ({record['seconds']:.0f} s)",
                flush=True,
            )


def run_search(
    dataset: str, depth: int, seeds: int, trials: int | None, work: Path, results: Path, extra: Sequence[str] = ()
) -> None:
    """`pathsearch search` on the dataset's file as shipped (its space, trials and top_k) at `depth`, confirmed on
    the grid's seeds 1..N, then its verdict appended to the results: the paired test difference of the
    confirmation's winner (or, when the baseline won, of its best challenger) from the product's own baseline."""
    name = f"{dataset}-depth{depth}"
    if any(r["claim"] == "search" and r["dataset"] == dataset and r["depth"] == depth for r in read_records(results)):
        return
    searches = work / "searches"
    searches.mkdir(parents=True, exist_ok=True)
    run_dir = searches / name
    exe = str(Path(sys.executable).with_name("pathsearch"))
    started = time.perf_counter()
    if run_dir.exists():
        command = [exe, "resume", str(run_dir)]
    else:
        overrides = [
            f"model.kwargs.depth={depth}",
            f"model.distill.students={json.dumps(students(depth))}",
            f"search.confirm.seeds={seeds}",
            "search.confirm.max_seeds=null",  # the fixed confirmation this benchmark measured
            "search.confirm.first_seed=1",
            f"tracking.experiment=method-{name}",
            *([f"search.num_samples={trials}"] if trials else []),
            *extra,
        ]
        command = [exe, "search", str(FILES[dataset]), "--set", *overrides, "--storage-path", str(searches)]
        command += ["--name", name, "--tracking-uri", f"sqlite:///{searches}/mlflow.db"]
    print(f"search: {' '.join(command)}", flush=True)
    subprocess.run(command, check=True)
    summary = yaml.safe_load((run_dir / "confirmation.yaml").read_text())
    configurations = summary["configurations"]
    baseline = next(c for c in configurations if c["label"] == "baseline")
    challengers = [c for c in configurations if c["label"] != "baseline"]
    challenger = next((c for c in challengers if c["label"] == summary["winner"]), None)
    if challenger is None:  # the baseline won: the verdict is about the best challenger by mean val
        challenger = max(challengers, key=lambda c: c["val_acc_mean"])
    record = {
        "dataset": dataset,
        "depth": depth,
        "claim": "search",
        "arm": f"search's pick ({challenger['description']})",
        "seconds": time.perf_counter() - started,
        "verdict": summary["verdict"],
        "winner": summary["winner"],
        "seeds": summary["seeds"],
        "test_acc": [challenger["per_seed"][s]["test_acc"] for s in summary["seeds"]],
        "baseline_test_acc": [baseline["per_seed"][s]["test_acc"] for s in summary["seeds"]],
    }
    append_record(results, record)


# ----- statistics, table, plots ----------------------------------------------------------------------------------
def _by_seed(records: Iterable[Mapping[str, Any]], dataset: str, depth: int, arm: str) -> dict[int, Mapping[str, Any]]:
    return {r["seed"]: r for r in records if (r["dataset"], r["depth"], r["arm"]) == (dataset, depth, arm)}


def effect_row(
    dataset: str, depth: int, claim: str, arm: str, a: Sequence[float], b: Sequence[float]
) -> dict[str, Any]:
    from pathsearch.search.verdict import mean_std, paired_difference

    d = paired_difference(a, b)
    mean, std = mean_std(a)
    return {
        "dataset": dataset,
        "depth": depth,
        "claim": claim,
        "arm": arm,
        "seeds": d["n"],
        "value_mean": mean,
        "value_std": std,
        "effect": d["mean"],
        "ci_low": d["ci_low"],
        "ci_high": d["ci_high"],
        "p_value": d["p_value"],
        "wins": d["wins"],
        "q_value": math.nan,  # set by adjust_for_many_comparisons
        "held": held(d),
    }


def held(d: Mapping[str, Any]) -> str:
    """In words, from the 95% interval of a difference that should be positive if the claim holds."""
    if math.isnan(d["ci_low"]):
        return "undetermined"
    if d["ci_low"] > 0:
        return "yes"
    if d["ci_high"] < 0:
        return "no: opposite effect"
    return "no detectable effect"


def analysis_rows(
    records: Sequence[Mapping[str, Any]], dataset: str, depth: int
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Claim 1 from the baseline's per-seed path analyses: (table rows, per-path curves for the plot).

    Rows: the single-path accuracy of the first third of the layers' paths minus that of the last third (the
    paper: short paths are weaker on their own; `embed` is left out, its class token is the same for every image);
    and, for each path, leave-one-out accuracy minus the full ensemble's (a path whose removal helps "hurts").
    """
    from pathsearch.search.verdict import paired_difference

    runs = _by_seed(records, dataset, depth, "baseline")
    seeds = sorted(runs)
    if len(seeds) < 2:
        return [], {}
    rows_of = {s: runs[s]["analysis"]["rows"] for s in seeds}
    names = [r["path"] for r in rows_of[seeds[0]]]
    third = max(1, depth // 3)
    short = [i for i, n in enumerate(names) if n != "embed" and int(n.split(".")[1]) <= third]
    long = [i for i, n in enumerate(names) if n != "embed" and int(n.split(".")[1]) > depth - third]
    short_acc = [statistics.fmean(rows_of[s][i]["single_acc"] for i in short) for s in seeds]
    long_acc = [statistics.fmean(rows_of[s][i]["single_acc"] for i in long) for s in seeds]
    # the claim "short paths underperform" holds when long - short is above 0
    out = [
        effect_row(
            dataset,
            depth,
            "analysis",
            f"single path: layers {depth - third + 1}-{depth} minus 1-{third}",
            long_acc,
            short_acc,
        )
    ]
    out[0]["value_mean"], out[0]["value_std"] = statistics.fmean(short_acc), statistics.stdev(short_acc)
    full = [runs[s]["analysis"]["full_acc"] for s in seeds]
    loo = []
    for i, name in enumerate(names):
        values = [rows_of[s][i]["loo_acc"] for s in seeds]
        if any(v is None for v in values):
            continue
        loo.append((name, paired_difference(values, full)))
    hurting = [name for name, d in loo if d["ci_low"] > 0]
    worst_name, _ = max(loo, key=lambda item: item[1]["mean"])
    row = effect_row(
        dataset,
        depth,
        "analysis",
        f"leave one out: best removal ({worst_name})",
        [rows_of[s][names.index(worst_name)]["loo_acc"] for s in seeds],
        full,
    )
    row["held"] = f"paths whose removal helps (CI > 0): {', '.join(hurting) if hurting else 'none'}"
    out.append(row)
    curves = {
        "names": names,
        "single": [[rows_of[s][i]["single_acc"] for s in seeds] for i in range(len(names))],
        "loo": [
            [(rows_of[s][i]["loo_acc"] or math.nan) - runs[s]["analysis"]["full_acc"] for s in seeds]
            for i in range(len(names))
        ],
    }
    return out, curves


def summarise(
    records: Sequence[Mapping[str, Any]], datasets: Sequence[str], depths: Sequence[int]
) -> tuple[list[dict[str, Any]], dict[tuple[str, int], Any]]:
    rows: list[dict[str, Any]] = []
    curves: dict[tuple[str, int], Any] = {}
    for dataset in datasets:
        for depth in depths:
            base = _by_seed(records, dataset, depth, "baseline")
            if not base:
                continue
            seeds = sorted(base)
            b = [base[s]["test_acc"] for s in seeds]
            base_row = effect_row(dataset, depth, "baseline", "baseline (test accuracy)", b, b)
            base_row.update(effect=math.nan, ci_low=math.nan, ci_high=math.nan, p_value=math.nan, wins=0, held="")
            rows.append(base_row)
            found, curves[(dataset, depth)] = analysis_rows(records, dataset, depth)
            rows += found
            for arm in arms(depth)[1:]:
                runs = _by_seed(records, dataset, depth, arm.label)
                paired = [s for s in seeds if s in runs]
                if len(paired) >= 2:
                    a = [runs[s]["test_acc"] for s in paired]
                    rows.append(
                        effect_row(dataset, depth, arm.claim, arm.label, a, [base[s]["test_acc"] for s in paired])
                    )
            for r in records:
                if r["claim"] == "search" and (r["dataset"], r["depth"]) == (dataset, depth):
                    row = effect_row(dataset, depth, "search", r["arm"], r["test_acc"], r["baseline_test_acc"])
                    row["held"] += f"; confirmation's winner: {r['winner']}"
                    rows.append(row)
    return rows, curves


def pts(value: float, sign: bool = True) -> str:
    return "-" if math.isnan(value) else f"{100 * value:+.2f}" if sign else f"{100 * value:.2f}"


def budget(dataset: str) -> str:
    """One line on what every run of `dataset` trained on and for how long (from its search file)."""
    from pathsearch.config import load_trial_config

    cfg = load_trial_config(FILES[dataset])
    k, d, t = cfg.model.kwargs, cfg.data, cfg.train
    train = "60% of the 1,797" if d.train_size is None else f"{d.train_size:,}"
    return (
        f"{dataset} ({FILES[dataset].relative_to(ROOT)}): {train} training images, {t.epochs} epochs, batch "
        f"{d.batch_size}, {t.opt} lr {t.lr:g} wd {t.weight_decay:g}; ViT embed_dim {k['embed_dim']}, {k['num_heads']} "
        f"heads, patch {k['patch_size']} on {k['img_size']}x{k['img_size']} images"
    )


def write_table(rows: Sequence[Mapping[str, Any]], md: Path, csv_path: Path, header: Sequence[str] = ()) -> None:
    fields = list(rows[0])
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    lines = [
        *header,
        "| dataset | depth | claim | arm | seeds | accuracy % (mean ± std) | effect, points | 95% CI | p | q (BH) "
        "| better on | held? |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ci = "-" if math.isnan(r["ci_low"]) else f"{pts(r['ci_low'])} to {pts(r['ci_high'])}"
        p = "-" if math.isnan(r["p_value"]) else f"{r['p_value']:.3f}"
        q = "-" if math.isnan(r["q_value"]) else f"{r['q_value']:.3f}"
        better = "-" if r["claim"] == "baseline" else f"{r['wins']}/{r['seeds']}"
        lines.append(
            f"| {r['dataset']} | {r['depth']} | {CLAIMS.get(r['claim'], r['claim'])} | {r['arm']} | {r['seeds']} | "
            f"{pts(r['value_mean'], False)} ± {pts(r['value_std'], False)} | {pts(r['effect'])} | {ci} | {p} | {q} | "
            f"{better} | {r['held']} |"
        )
    md.write_text("\n".join(lines) + "\n")


def plot_effects(rows: Sequence[Mapping[str, Any]], claim: str, path: Path) -> Path | None:
    """Effect on test accuracy (points) with its 95% CI per arm, one series per dataset and depth."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chosen = [r for r in rows if r["claim"] == claim]
    if not chosen:
        return None
    series = sorted({(r["dataset"], r["depth"]) for r in chosen})
    labels = list(dict.fromkeys(r["arm"] if claim != "search" else "search's top config" for r in chosen))
    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 * len(labels) + 2), 3.4))
    width = 0.8 / len(series)
    for k, (dataset, depth) in enumerate(series):
        xs, ys, lo, hi = [], [], [], []
        for r in chosen:
            if (r["dataset"], r["depth"]) != (dataset, depth):
                continue
            label = r["arm"] if claim != "search" else "search's top config"
            xs.append(labels.index(label) - 0.4 + width * (k + 0.5))
            ys.append(100 * r["effect"])
            lo.append(100 * (r["effect"] - r["ci_low"]) if not math.isnan(r["ci_low"]) else 0)
            hi.append(100 * (r["ci_high"] - r["effect"]) if not math.isnan(r["ci_high"]) else 0)
        ax.errorbar(xs, ys, yerr=[lo, hi], fmt="o", capsize=3, label=f"{dataset}, depth {depth}")
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    ax.set_ylabel("test accuracy vs baseline (points)")
    ax.set_title(f"{CLAIMS[claim]}: paired difference, 95% CI", fontsize=9)
    ax.legend(fontsize=7, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def plot_analysis(curves: Mapping[tuple[str, int], Any], path: Path) -> Path | None:
    """Claim 1: single-path accuracy by path length, and leave-one-out minus full, mean and 95% CI over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from scipy import stats

    if not any(curves.values()):
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    for (dataset, depth), c in sorted(curves.items()):
        if not c:
            continue
        for ax, key, scale in ((axes[0], "single", 100), (axes[1], "loo", 100)):
            means, half = [], []
            for values in c[key]:
                v = [x for x in values if not math.isnan(x)]
                means.append(scale * statistics.fmean(v) if v else math.nan)
                sem = statistics.stdev(v) / math.sqrt(len(v)) if len(v) > 1 else math.nan
                half.append(scale * sem * stats.t.ppf(0.975, len(v) - 1) if len(v) > 1 else math.nan)
            xs = list(range(len(means)))
            line = ax.plot(xs, means, marker=".", label=f"{dataset}, depth {depth}")[0]
            ax.fill_between(
                xs,
                [m - h for m, h in zip(means, half, strict=True)],
                [m + h for m, h in zip(means, half, strict=True)],
                alpha=0.2,
                color=line.get_color(),
            )
    axes[0].set_title("single-path accuracy (val), by path length", fontsize=9)
    axes[0].set_ylabel("accuracy (%)")
    axes[1].set_title("leave one out minus full ensemble (val)", fontsize=9)
    axes[1].set_ylabel("points (> 0: the path hurts)")
    axes[1].axhline(0, color="black", linewidth=0.8)
    for ax in axes:
        ax.set_xlabel("path length (0 = embed, then attn.1, mlp.1, ...)")
        ax.legend(fontsize=7, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def adjust_for_many_comparisons(rows: Sequence[dict[str, Any]]) -> None:
    """Benjamini-Hochberg q-values (scipy.stats.false_discovery_control) over every effect in the table: with a few
    dozen comparisons at 95%, one or two intervals exclude 0 by chance alone. The leave-one-out row is left out: it
    is the best of many paths, picked after looking, so its p-value is optimistic whatever the correction."""
    from scipy.stats import false_discovery_control

    tested = [r for r in rows if not math.isnan(r["p_value"]) and not r["arm"].startswith("leave one out")]
    if tested:
        for r, q in zip(tested, false_discovery_control([r["p_value"] for r in tested]), strict=True):
            r["q_value"] = float(q)


def report(records: Sequence[Mapping[str, Any]], datasets: Sequence[str], depths: Sequence[int], out: Path) -> None:
    rows, curves = summarise(records, datasets, depths)
    if not rows:
        print("no results yet")
        return
    adjust_for_many_comparisons(rows)
    header = [
        "# What the method does here: every effect on paired seeds",
        "",
        "Written by `benchmarks/method.py` (its docstring says what each arm is). Test accuracy of each arm and its "
        "paired difference from the baseline (same seeds, same data order) with a 95% t interval over seeds; q is "
        "the Benjamini-Hochberg-adjusted p over the table. The path-analysis rows are on the val split of the "
        "baseline's models. Every run is in `runs.jsonl`. Budgets:",
        "",
        *[f"- {budget(d)}" for d in datasets],
        "",
    ]
    write_table(rows, out / "method.md", out / "method.csv", header)
    plot_analysis(curves, out / "analysis.png")
    for claim in ("pruning", "ensemble_scale", "distillation", "search"):
        plot_effects(rows, claim, out / f"{claim}.png")
    print((out / "method.md").read_text())
    seconds: dict[tuple[str, int, str], float] = {}
    for r in records:
        key = (r["dataset"], r["depth"], "search" if r["claim"] == "search" else "grid")
        seconds[key] = seconds.get(key, 0.0) + r["seconds"]
    for (dataset, depth, part), s in sorted(seconds.items()):
        kind = "wall" if part == "search" else "summed over runs"
        print(f"time: {dataset} depth {depth} {part}: {s / 60:.1f} min ({kind})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=list(FILES), choices=list(FILES))
    parser.add_argument("--depths", nargs="+", type=int, default=[6, 12])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--search-trials", type=int, default=None, help="default: the search file's num_samples")
    parser.add_argument("--search-depths", nargs="+", type=int, default=None, help="default: --depths")
    parser.add_argument("--no-search", action="store_true")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every run")
    parser.add_argument("--out", default=str(ROOT / "docs" / "method"))
    parser.add_argument("--work", default=str(ROOT / ".benchmarks" / "method"))
    parser.add_argument("--report-only", action="store_true", help="tabulate what OUT/runs.jsonl holds, train nothing")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "runs.jsonl"
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}", flush=True)
    if not args.report_only:
        seeds = range(1, args.seeds + 1)
        for depth in args.depths:  # the shallow models first: the whole table at one depth comes early
            jobs = [(d, depth, arm, s) for d in args.datasets for arm in arms(depth) for s in seeds]
            run_grid(jobs, args.workers, results, args.set)
            if not args.no_search and depth in (args.search_depths or args.depths):
                for dataset in args.datasets:
                    run_search(dataset, depth, args.seeds, args.search_trials, Path(args.work), results, args.set)
    report(read_records(results), args.datasets, args.depths, out)


if __name__ == "__main__":
    main()
