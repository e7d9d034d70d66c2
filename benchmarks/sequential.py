"""Is the sequential confirmation right? Simulated confirmations with the seed noise measured in docs/method/runs.jsonl.

Run: .venv/bin/python benchmarks/sequential.py [--sims 10000] [--file search_spaces/fashion_mnist_vit.yaml]
The noise: per dataset and depth, each arm's per-seed paired test difference from the baseline (same seed), minus
that arm's mean difference (so only seed noise is left), pooled over the arms and scaled by sqrt(n / (n - 1)) for
the mean taken out; a simulated seed draws a difference from that pool (a bootstrap of what was measured). The
design: the search file's `search.confirm` (seeds, step, max_seeds, min_effect, alpha, top_k challengers).
1. No true difference (every challenger equal to the baseline): the rate of "beats the baseline" verdicts for any
   challenger, with its Clopper-Pearson 95% interval, against alpha; and the same for the naive rule (a plain 95%
   t interval at every round), which is not valid when looked at repeatedly.
2. A true +0.3 points for the first challenger (the others equal to the baseline): how often it is found (beats),
   and the seeds it used, against the fixed designs of `seeds` and of `max_seeds` seeds (one look, its 95% paired t
   interval at alpha split over the challengers, as the sequential rule splits it).
3. A true -0.75 points (self-distillation's measured effect): how often it is decided worse (or of no gain), and
   the seeds spent before it stops.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pathsearch.config import load_search_file  # noqa: E402
from pathsearch.search.sequential import BEATS, NO_GAIN, WORSE, Design, assess, naive, run, summary  # noqa: E402


def noise_pools(path: Path) -> dict[str, list[float]]:
    """'<dataset> depth <d>' -> centred per-seed paired test differences from the baseline, pooled over arms."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    pools: dict[str, list[float]] = {}
    groups = {(r["dataset"], r["depth"]) for r in rows}
    for dataset, depth in sorted(groups):
        here = [r for r in rows if (r["dataset"], r["depth"]) == (dataset, depth)]
        base = {r["seed"]: r["test_acc"] for r in here if r["arm"] == "baseline"}
        arms = sorted({r["arm"] for r in here if r["arm"] != "baseline" and r["claim"] != "search"})
        pool = []
        for arm in arms:
            diffs = [r["test_acc"] - base[r["seed"]] for r in here if r["arm"] == arm and r["seed"] in base]
            if len(diffs) < 2:
                continue
            mean, scale = statistics.fmean(diffs), math.sqrt(len(diffs) / (len(diffs) - 1))
            pool += [scale * (d - mean) for d in diffs]
        pools[f"{dataset} depth {depth}"] = pool
    return pools


def simulate(design: Design, deltas: Sequence[float], pool: Sequence[float], sims: int, rule=assess, seed: int = 0):
    rng = random.Random(seed)
    labels = [f"c{i}" for i in range(len(deltas))]
    shift = dict(zip(labels, deltas, strict=True))

    def draw(label: str, k: int) -> list[float]:
        return [shift[label] + rng.choice(pool) for _ in range(k)]

    return [run(design, draw, labels, rule) for _ in range(sims)]


def rate_ci(hits: int, total: int) -> str:
    from scipy.stats import binomtest

    ci = binomtest(hits, total).proportion_ci(0.95)
    return f"{hits / total:.4f} (95% CI {ci.low:.4f} to {ci.high:.4f}, {hits} of {total})"


def fixed(n: int, design: Design, deltas: Sequence[float], pool: Sequence[float], sims: int, seed: int = 0) -> float:
    """Power of a fixed design of n seeds for the first challenger: its 95% paired t interval (alpha split over the
    challengers) lies above 0."""
    one = Design(n, 1, n, design.min_effect, design.alpha, design.challengers)
    outcomes = simulate(one, deltas, pool, sims, seed=seed)
    return summary(outcomes, "c0")[BEATS]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sims", type=int, default=10000)
    parser.add_argument("--file", default=str(ROOT / "search_spaces" / "fashion_mnist_vit.yaml"))
    parser.add_argument("--runs", default=str(ROOT / "docs" / "method" / "runs.jsonl"))
    args = parser.parse_args()
    c = load_search_file(args.file).search.confirm
    if c.max_seeds is None:
        raise SystemExit(f"{args.file}: search.confirm has no max_seeds: not a sequential confirmation")
    design = Design(c.seeds, c.step, c.max_seeds, c.min_effect, c.alpha, challengers=c.top_k)
    pools = noise_pools(Path(args.runs))
    print(f"design from {Path(args.file).name}: looks at {design.looks()} seeds, min_effect {100 * c.min_effect:.2f} "
          f"points, alpha {c.alpha} over {c.top_k} challengers; {args.sims} simulated confirmations each")  # fmt: skip
    for name, pool in pools.items():
        sd = statistics.pstdev(pool)
        print(f"\n{name}: seed noise of a paired difference sd {100 * sd:.2f} points ({len(pool)} measured seeds)")
        null = [0.0] * c.top_k
        for label, rule in (("sequential", assess), ("naive (95% t at every round)", naive)):
            outcomes = simulate(design, null, pool, args.sims, rule)
            beats = sum(any(o.decisions[f"c{i}"].state == BEATS for i in range(c.top_k)) for o in outcomes)
            seeds = statistics.fmean(o.baseline_seeds for o in outcomes)
            print(f"  no true difference, {label}: 'beats the baseline' rate {rate_ci(beats, len(outcomes))} "
                  f"(alpha {c.alpha}); baseline seeds used {seeds:.1f}")  # fmt: skip
        gain = [0.003] + [0.0] * (c.top_k - 1)
        s = summary(simulate(design, gain, pool, args.sims), "c0")
        f_first = fixed(design.seeds, design, gain, pool, args.sims)
        f_max = fixed(design.max_seeds, design, gain, pool, args.sims)
        print(f"  true +0.30 points: sequential power {s[BEATS]:.3f} with {s['mean_seeds']:.1f} seeds on average "
              f"(undecided {s['undecided']:.3f}); fixed {design.seeds} seeds {f_first:.3f}; fixed "
              f"{design.max_seeds} seeds {f_max:.3f}")  # fmt: skip
        worse = [-0.0075] + [0.0] * (c.top_k - 1)
        w = summary(simulate(design, worse, pool, args.sims), "c0")
        print(f"  true -0.75 points: decided worse {w[WORSE]:.3f}, of no gain {w[NO_GAIN]:.3f}, beats {w[BEATS]:.3f};"
              f" seeds spent before it stops {w['mean_seeds']:.1f} of {design.max_seeds}")  # fmt: skip


if __name__ == "__main__":
    main()
