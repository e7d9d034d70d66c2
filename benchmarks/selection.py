"""How trustworthy is a search's winner? The digits demo's search, then its confirmation on many paired seeds.

Run: .venv/bin/python benchmarks/selection.py [--file search_spaces/digits_tiny.yaml] [--top-k 4] [--seeds 10]
     [--set key=value ...] [--out selection.json]
1. The file's search as shipped (TPE + ASHA, one seed per trial, decided on the val split), then the confirmation:
   the top-k configurations by val and the baseline, trained again on --seeds fresh paired seeds each.
2. The winner's curse: each confirmed configuration's single-seed search score minus its mean val over the seeds.
3. The verdict: the confirmed winner's paired test difference from the baseline with its 95% CI (paired t).
4. The noise ceiling: the seeds split at random into two halves (200 splits); Kendall tau between the
   configurations' mean val in one half and in the other, and how often the halves agree on the winner.
5. Racing, simulated on the measured per-seed val scores (pathsearch does not race): every configuration starts
   with 2 seeds; a challenger whose paired 95% upper bound on (challenger - leader) is below 0 stops getting seeds;
   the baseline always gets every seed (the verdict needs it). Trials used against all, and how often it picks the
   winner that all seeds pick, over 200 random seed orders.
Each trial uses one thread; the machine's two cores run two trials at a time.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def half_split_agreement(values: Mapping[str, Sequence[float]], splits: int = 200, seed: int = 0) -> dict[str, float]:
    """Kendall tau between the configurations' mean scores on two random halves of the seeds, averaged over
    `splits` splits, and the share of splits whose halves pick the same best configuration."""
    from scipy.stats import kendalltau

    labels = list(values)
    n = len(next(iter(values.values())))
    rng = random.Random(seed)
    taus, same = [], 0
    for _ in range(splits):
        order = list(range(n))
        rng.shuffle(order)
        a, b = order[: n // 2], order[n // 2 :]
        mean_a = [statistics.fmean(values[c][i] for i in a) for c in labels]
        mean_b = [statistics.fmean(values[c][i] for i in b) for c in labels]
        tau = kendalltau(mean_a, mean_b).statistic
        if tau == tau:  # NaN when one half ties every configuration
            taus.append(float(tau))
        same += max(range(len(labels)), key=mean_a.__getitem__) == max(range(len(labels)), key=mean_b.__getitem__)
    return {
        "kendall_tau_mean": statistics.fmean(taus),
        "kendall_tau_std": statistics.stdev(taus),
        "same_winner": same / splits,
    }


def simulate_racing(
    values: Mapping[str, Sequence[float]], keep: str, start: int = 2, orders: int = 200, seed: int = 0
) -> dict[str, float]:
    """Racing on a measured (configuration x seed) score table, over random seed orders: seeds are added one at a
    time to every configuration still in the race; a challenger leaves when the paired t 95% upper bound of
    (challenger - leader) is below 0. `keep` (the baseline) always stays. Returns the mean share of trials used and
    how often the race's winner is the winner of the full table."""
    from pathsearch.search.verdict import paired_difference

    labels = list(values)
    n = len(values[labels[0]])
    full = max(labels, key=lambda c: statistics.fmean(values[c]))
    rng = random.Random(seed)
    used, agree = [], 0
    for _ in range(orders):
        order = list(range(n))
        rng.shuffle(order)
        alive, trials = set(labels), 0
        for r in range(1, n + 1):
            trials += len(alive)
            if r < start:
                continue
            seen = order[:r]
            mean = {c: statistics.fmean(values[c][i] for i in seen) for c in alive}
            leader = max(alive, key=mean.__getitem__)
            for c in list(alive - {leader, keep}):
                d = paired_difference([values[c][i] for i in seen], [values[leader][i] for i in seen])
                if d["ci_high"] < 0:
                    alive.discard(c)
        winner = max(alive, key=lambda c: statistics.fmean(values[c][i] for i in order))
        used.append(trials / (n * len(labels)))
        agree += winner == full
    return {"trials_used": statistics.fmean(used), "same_winner": agree / orders}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--file", default=str(ROOT / "search_spaces" / "digits_tiny.yaml"))
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", default=None, help="write every figure and the per-seed table as JSON")
    args = parser.parse_args()
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

    from pathsearch.config import load_search_file
    from pathsearch.ensemble.model import model_depth
    from pathsearch.search.driver import run_search
    from pathsearch.search.verdict import BASELINE, format_confirmation

    overrides = [
        *args.set,
        f"search.confirm.top_k={args.top_k}",
        f"search.confirm.seeds={args.seeds}",
        "search.confirm.max_seeds=null",
    ]
    spec = load_search_file(args.file, overrides, model_depth=model_depth)
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        result = run_search(spec, Path(tmp) / "runs", f"sqlite:///{tmp}/mlflow.db", name="selection", verbose=False)
    seconds = time.perf_counter() - started
    c = result.confirmation
    print(f"search + confirmation: {seconds:.0f} s; {result.counts}")
    print(format_confirmation(c))

    rows = sorted(c.candidates, key=lambda r: r["rank"])
    print("\nwinner's curse (single-seed search val_acc minus confirmed mean val_acc, points):")
    curse = {}
    for row in rows:
        found = row.get("search_val_acc")
        if found is not None:
            curse[row["label"]] = 100 * (found - row["val_acc_mean"])
            print(
                f"  {row['label']:<10} search {100 * found:6.2f}%  confirmed {100 * row['val_acc_mean']:6.2f}% "
                f"± {100 * row['val_acc_std']:.2f}  optimism {curse[row['label']]:+.2f}"
            )
    challengers = [v for k, v in curse.items() if k != BASELINE]
    search_best = max((r for r in rows if r["label"] != BASELINE), key=lambda r: r["search_val_acc"])
    print(
        f"  the search's own best ({search_best['label']}): optimism {curse[search_best['label']]:+.2f} points; "
        f"mean over the {len(challengers)} challengers {statistics.fmean(challengers):+.2f}"
    )

    d = c.difference
    print(
        f"\nconfirmed test gain over the baseline: {100 * d['mean']:+.2f} points, 95% CI {100 * d['ci_low']:+.2f} "
        f"to {100 * d['ci_high']:+.2f} (paired t, {d['n']} seeds; better on {d['wins']}), winner {c.winner}"
    )

    val = {r["label"]: [r["per_seed"][s]["val_acc"] for s in c.seeds] for r in rows}
    ceiling = half_split_agreement(val)
    print(
        f"\nnoise ceiling ({len(rows)} configurations, seeds split {len(c.seeds) // 2} + "
        f"{len(c.seeds) - len(c.seeds) // 2}, 200 splits): Kendall tau {ceiling['kendall_tau_mean']:.2f} "
        f"± {ceiling['kendall_tau_std']:.2f}; same winner in {100 * ceiling['same_winner']:.0f}% of splits"
    )
    racing = simulate_racing(val, BASELINE)
    print(
        f"racing (simulated, from 2 seeds, baseline kept): {100 * racing['trials_used']:.0f}% of the trials, "
        f"same winner as all seeds in {100 * racing['same_winner']:.0f}% of 200 seed orders"
    )
    if args.out:
        figures = {
            "seconds": seconds,
            "counts": result.counts,
            "verdict": c.verdict,
            "seeds": c.seeds,
            "winner": c.winner,
            "difference": d,
            "curse_points": curse,
            "noise_ceiling": ceiling,
            "racing": racing,
            "per_seed": {r["label"]: r["per_seed"] for r in rows},
            "configurations": {r["label"]: r["description"] for r in rows},
        }
        Path(args.out).write_text(json.dumps(figures, indent=1, default=str))
        print(f"figures: {args.out}")


if __name__ == "__main__":
    main()
