"""The sequential confirmation's rule (pathsearch.search.sequential), checked by simulation: its intervals keep their
error at alpha however often they are looked at, where the same intervals without spending do not."""

from __future__ import annotations

import math
import random
import statistics

import pytest

from pathsearch.search.sequential import (
    BEATS,
    NO_GAIN,
    WORSE,
    Design,
    assess,
    interval,
    naive,
    run,
    seeds_to_decide,
    summary,
    t_quantile,
)

SD = 0.0025  # seed noise of a paired difference, in accuracy: a quarter point (Fashion-MNIST's order)


def simulate(design: Design, delta: float, n: int, rule=assess, seed: int = 0) -> dict[str, float]:
    rng = random.Random(seed)
    outcomes = [run(design, lambda _, k: [rng.gauss(delta, SD) for _ in range(k)], ["c"], rule) for _ in range(n)]
    return summary(outcomes, "c")


def test_alpha_is_spent_over_the_looks_and_split_over_the_challengers():
    d = Design(seeds=3, step=2, max_seeds=10, min_effect=0.0025, alpha=0.05, challengers=2)
    assert d.looks() == [3, 5, 7, 9, 10]  # the last look is the budget
    assert math.fsum(d.level(k) for k in range(len(d.looks()))) == pytest.approx(0.05 / 2)
    assert Design(5, 2, 5, 0.0).looks() == [5]  # max_seeds == seeds: one round, the fixed design


def test_with_no_true_difference_beats_stays_under_alpha_where_a_repeated_t_test_does_not():
    """3,000 confirmations with no true difference, looked at after every seed from 3 to 12: the rule says "beats
    the baseline" in at most alpha of them; a plain 95% t interval at each look (the naive rule) measurably more
    often. Were the rule replaced by the naive one, this test would fail."""
    design = Design(seeds=3, step=1, max_seeds=12, min_effect=0.0025, alpha=0.05)
    ours = simulate(design, 0.0, 3000)
    theirs = simulate(design, 0.0, 3000, rule=naive)
    se = math.sqrt(0.05 * 0.95 / 3000)
    assert ours[BEATS] <= 0.05, ours
    assert theirs[BEATS] > 0.05 + 3 * se, theirs  # the repeated looks inflate the naive rule's error
    assert ours[BEATS] + ours[WORSE] <= 0.05  # both directions together: the interval missed 0


def test_a_clearly_worse_challenger_stops_early_and_a_true_gain_is_found():
    design = Design(seeds=3, step=2, max_seeds=15, min_effect=0.0025, alpha=0.05)
    worse = simulate(design, -3 * SD, 1000)
    assert worse[BEATS] == 0 and worse[WORSE] + worse[NO_GAIN] > 0.95
    assert worse["mean_seeds"] < 8  # of 15: it stops training once decided
    gain = simulate(design, 2 * SD, 1000)
    assert gain[BEATS] > 0.6 and gain["mean_seeds"] < 15


def test_no_spread_decides_nothing():
    mean, low, high = interval([0.01, 0.01, 0.01], 0.05)
    assert mean == 0.01 and (low, high) == (-math.inf, math.inf)
    d = assess([0.01, 0.01, 0.01], Design(3, 1, 6, 0.0025), 0)
    assert d.state is None


def test_the_seeds_to_decide_estimate_is_the_smallest_n_whose_interval_would_decide():
    design = Design(seeds=3, step=2, max_seeds=9, min_effect=0.0025)
    rng = random.Random(3)
    diffs = [rng.gauss(0.002, 0.004) for _ in range(9)]
    d = assess(diffs, design, len(design.looks()) - 1)
    assert d.state is None, d
    n = seeds_to_decide(d, design)
    assert n is not None and n > 9
    # with the same mean and spread at n seeds, the last look's interval clears the nearer boundary; at n - 1 not
    std = statistics.stdev(diffs)
    level = design.level(len(design.looks()) - 1)
    gap = max(d.mean, design.min_effect - d.mean)
    assert t_quantile(level, n) * std / math.sqrt(n) < gap <= t_quantile(level, n - 1) * std / math.sqrt(n - 1)
