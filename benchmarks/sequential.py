"""Is the sequential confirmation right, and how soon does it answer? Simulated confirmations, every error counted.

Run: .venv/bin/python benchmarks/sequential.py [--sims 20000]            # the table: every rule, noise and case
     .venv/bin/python benchmarks/sequential.py --sd 0.0029 --effect 0.0025 --max-seeds 20 --sims N --json
                                                                         # one case, one JSON line
A simulated challenger's paired test differences from the baseline are its true effect plus seed noise: normal with
a paired SD (0.19, 0.29, 0.37 points: the spreads measured on digits and Fashion-MNIST), a heavy-tailed t with 3 df
scaled to that SD, or drawn from the per-seed pools measured in docs/method/runs.jsonl (centred per arm, as a
bootstrap). Each row: the rate of every decision (beats, worse, no gain, undecided) with its Clopper-Pearson 95%
interval, and the seeds a challenger trained, for three rules on the same draws: the exact boundaries (every new
confirmation), the union-bound spending rule (confirmations planned before them) and one fixed look at max_seeds
(a paired t test at alpha, two-sided: the plain experiment). With no true difference every "beats" and every "worse"
is an error; with K = 2 the second challenger has no true difference and "any error" counts both.
Challengers are simulated independently (the shared baseline seeds make theirs positively correlated in a real
confirmation, which only lowers the chance that two err together).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pathsearch.search.sequential import BEATS, NO_GAIN, WORSE, Design, t_quantile  # noqa: E402

STATES = (BEATS, WORSE, NO_GAIN, "undecided")


def noise_pools(path: Path) -> dict[str, list[float]]:
    """'<dataset> depth <d>' -> centred per-seed paired test differences from the baseline, pooled over arms."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    pools: dict[str, list[float]] = {}
    for dataset, depth in sorted({(r["dataset"], r["depth"]) for r in rows}):
        here = [r for r in rows if (r["dataset"], r["depth"]) == (dataset, depth)]
        base = {r["seed"]: r["test_acc"] for r in here if r["arm"] == "baseline"}
        pool = []
        for arm in sorted({r["arm"] for r in here if r["arm"] != "baseline" and r["claim"] != "search"}):
            diffs = [r["test_acc"] - base[r["seed"]] for r in here if r["arm"] == arm and r["seed"] in base]
            if len(diffs) >= 2:
                mean, scale = statistics.fmean(diffs), math.sqrt(len(diffs) / (len(diffs) - 1))
                pool += [scale * (d - mean) for d in diffs]
        pools[f"{dataset} depth {depth}"] = pool
    return pools


def bounds_of(design: Design, rule: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(beats, worse, no gain) boundaries on the paired t statistic at each look: the design's exact ones, or the
    spending rule's interval at each look's level (its interval above 0 is t > q; below 0, t < -q; below
    min_effect, the shifted t < -q), or the fixed design's one look at alpha."""
    if rule == "exact":
        return np.array(design.beats), np.array(design.worse), np.array(design.no_gain)
    looks = design.looks()
    if rule == "fixed":
        q = np.full(len(looks), np.inf)
        q[-1] = t_quantile(design.alpha / design.challengers, looks[-1])
        return q, q, q
    spending = Design(design.seeds, design.step, design.max_seeds, design.min_effect, design.alpha, design.challengers)
    q = np.array([t_quantile(spending.level(k), n) for k, n in enumerate(looks)])
    return q, q, q


def simulate(
    design: Design, rule: str, effect: float, noise: str, sd: float, sims: int, seed: int, pool: Sequence[float] = ()
) -> dict[str, np.ndarray]:
    """`sims` confirmations of one challenger with true `effect`: its decision (index into STATES) and seeds."""
    rng = np.random.default_rng(seed)
    n_max = design.max_seeds
    if noise == "normal":
        draws = rng.standard_normal((sims, n_max)) * sd
    elif noise == "t3":
        draws = rng.standard_t(3, (sims, n_max)) * sd / math.sqrt(3.0)  # t(3) has variance 3
    else:
        draws = rng.choice(np.asarray(pool), (sims, n_max))
    x = effect + draws
    beats, worse, no_gain = bounds_of(design, rule)
    state = np.full(sims, 3)
    seeds = np.full(sims, n_max)
    open_ = np.ones(sims, dtype=bool)
    for k, n in enumerate(design.looks()):
        part = x[:, :n]
        mean = part.mean(axis=1)
        sd_hat = part.std(axis=1, ddof=1)
        spread = sd_hat > 1e-12
        se = np.where(spread, sd_hat, np.nan) / math.sqrt(n)
        with np.errstate(invalid="ignore"):
            t = mean / se
            shifted = (mean - design.min_effect) / se
            verdicts = [t > beats[k], t < -worse[k], shifted < -no_gain[k]]
        for index, hit in enumerate(verdicts):
            now = open_ & spread & hit
            state[now], seeds[now] = index, n
            open_ &= ~now
        if not open_.any():
            break
    return {"state": state, "seeds": seeds}


def rate(hits: int, total: int) -> dict[str, float]:
    from scipy.stats import binomtest

    ci = binomtest(hits, total).proportion_ci(0.95)
    return {"rate": hits / total, "low": float(ci.low), "high": float(ci.high)}


def case(
    design: Design, rule: str, effect: float, noise: str, sd: float, sims: int, pool: Sequence[float] = ()
) -> dict[str, object]:
    """Every decision's rate with its interval, the mean seeds (with its 95% interval) and, for K = 2, any error
    (the second challenger's "beats" or "worse", or the first's wrong end)."""
    first = simulate(design, rule, effect, noise, sd, sims, 1, pool)
    out: dict[str, object] = {name: rate(int((first["state"] == i).sum()), sims) for i, name in enumerate(STATES)}
    spent = first["seeds"].astype(float)
    half = 1.96 * spent.std(ddof=1) / math.sqrt(sims)
    out["mean_seeds"] = {
        "mean": float(spent.mean()),
        "low": float(spent.mean() - half),
        "high": float(spent.mean() + half),
    }
    wrong = first["state"] == (1 if effect > 0 else 0) if effect != 0 else np.isin(first["state"], (0, 1))
    if design.challengers > 1:  # the others have no true difference: any "beats" or "worse" of theirs is an error
        for j in range(1, design.challengers):
            other = simulate(design, rule, 0.0, noise, sd, sims, 1 + j, pool)
            wrong |= np.isin(other["state"], (0, 1))
    out["any_error"] = rate(int(wrong.sum()), sims)
    return out


def design_of(max_seeds: int, challengers: int, min_effect: float = 0.0025, seeds: int = 3, step: int = 2) -> Design:
    return Design.exact(seeds, step, max_seeds, min_effect, 0.05, challengers)


def table(sims: int, runs: Path) -> None:
    pools = noise_pools(runs)
    fmt = "{:<11} {:<7} {:<2} {:<9} {:>7}  {:>22} {:>22} {:>8} {:>10} {:>6}"
    print(fmt.format("noise", "sd pts", "K", "rule", "effect", "beats [95% CI]", "worse [95% CI]", "no gain",
                     "undecided", "seeds"))  # fmt: skip
    cases: list[tuple[str, float, Sequence[float]]] = [("normal", sd, ()) for sd in (0.0019, 0.0029, 0.0037)]
    cases += [("t3", 0.0029, ())]
    for name, pool in pools.items():  # '<dataset> depth <d>'
        if len(pool) > 20:
            dataset, depth = name.split()[0], name.split()[-1]
            cases.append((f"{dataset[:7]}/d{depth}", statistics.pstdev(pool), pool))
    for k in (1, 2):
        design = design_of(20, k)
        for noise, sd, pool in cases:
            kind = noise if noise in ("normal", "t3") else "pool"
            effects = [0.0, 0.0025] if kind == "normal" else [0.0]
            if kind == "normal" and sd == 0.0037:
                effects.append(-0.0075)
            for effect in effects:
                for rule in ("exact", "spending", "fixed"):
                    r = case(design, rule, effect, kind, sd, sims, pool)

                    def cell(name: str, r: dict[str, object] = r) -> str:
                        v = r[name]
                        assert isinstance(v, dict)
                        return f"{v['rate']:.3f} [{v['low']:.3f},{v['high']:.3f}]"

                    seeds = r["mean_seeds"]
                    assert isinstance(seeds, dict)
                    print(fmt.format(noise, f"{100 * sd:.2f}", k, rule, f"{100 * effect:+.2f}", cell(BEATS),
                                     cell(WORSE), f"{r[NO_GAIN]['rate']:.3f}", f"{r['undecided']['rate']:.3f}",  # type: ignore[index]
                                     f"{seeds['mean']:.1f}"))  # fmt: skip
                    if k == 2 and effect == 0.0:
                        print(f"{'':>40} any error (both challengers): {cell('any_error')}")
    worse = design_of(20, 1)
    stop = simulate(worse, "exact", -0.0075, "normal", 0.0037, sims, 7)
    within = rate(int((stop["seeds"] <= 9).sum() - ((stop["state"] == 3) & (stop["seeds"] <= 9)).sum()), sims)
    print(f"\ntrue -0.75 points at sd 0.37, exact: stopped within 9 seeds {within['rate']:.3f} "
          f"[{within['low']:.3f}, {within['high']:.3f}]")  # fmt: skip
    d = design_of(20, 1)
    no_reserve = Design.exact(3, 2, 20, 0.0025, split={"beats": 0.75, "worse": 0.25, "reserve": 0.0001, "no_gain": 0.5})
    for sd in (0.0029, 0.0037):  # what holding the reserve costs, and what one extension to 40 seeds buys
        kept = simulate(d, "exact", 0.0025, "normal", sd, sims, 21)
        spent = simulate(no_reserve, "exact", 0.0025, "normal", sd, sims, 21)
        grown = d.extend(40)
        extended = simulate(grown, "exact", 0.0025, "normal", sd, sims, 21)
        null = simulate(grown, "exact", 0.0, "normal", sd, sims, 22)
        print(f"sd {100 * sd:.2f} points, true +0.25: power at 20 seeds {float((kept['state'] == 0).mean()):.3f} with "
              f"the reserve held, {float((spent['state'] == 0).mean()):.3f} without it; extended to 40 for the "
              f"undecided {float((extended['state'] == 0).mean()):.3f} ({extended['seeds'].mean():.1f} seeds); no "
              f"true difference, extension included: any error "
              f"{float(np.isin(null['state'], (0, 1)).mean()):.4f}")  # fmt: skip
    split = d.split or {}
    print(f"alpha {d.alpha} split: beats {split['beats']:.4f}, worse {split['worse']:.4f}, reserve for one "
          f"extension {split['reserve']:.4f}; 'no gain' errs at most {split['no_gain']:.4f} for a true gain of "
          "min_effect")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sims", type=int, default=20000)
    parser.add_argument("--runs", default=str(ROOT / "docs" / "method" / "runs.jsonl"))
    parser.add_argument("--sd", type=float, help="one case: the paired SD (accuracy units: 0.0029 is 0.29 points)")
    parser.add_argument("--effect", type=float, default=0.0, help="one case: the true paired difference")
    parser.add_argument("--max-seeds", type=int, default=20)
    parser.add_argument("--challengers", type=int, default=1)
    parser.add_argument("--min-effect", type=float, default=0.0025)
    parser.add_argument("--noise", choices=("normal", "t3"), default="normal")
    parser.add_argument("--rule", choices=("exact", "spending", "fixed"), default="exact")
    parser.add_argument("--json", action="store_true", help="one case as one JSON line")
    args = parser.parse_args()
    if args.sd is None:
        table(args.sims, Path(args.runs))
        return
    design = design_of(args.max_seeds, args.challengers, args.min_effect)
    result = case(design, args.rule, args.effect, args.noise, args.sd, args.sims)
    result.update(sd=args.sd, effect=args.effect, max_seeds=args.max_seeds, rule=args.rule, sims=args.sims,
                  looks=design.looks(), split=design.split)  # fmt: skip
    print(json.dumps(result) if args.json else result)


if __name__ == "__main__":
    main()
