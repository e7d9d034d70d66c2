"""The sequential confirmation's rule, as plain data: after each round of paired seeds, every challenger's paired
test difference from the baseline gets an interval that holds, with probability at least 1 - alpha for all
challengers and all rounds at once, however the confirmation goes on or stops. A challenger is decided when its
interval lies above 0 (it beats the baseline), below 0 (it is worse) or below `min_effect` (no gain worth having).

How the intervals stay valid: alpha is spent over the planned looks (seeds, seeds + step, ..., max_seeds) in
proportion to the seeds each look adds (linear spending, Lan and DeMets' alpha * t), split evenly over the
challengers, and each look's interval is the paired t interval at its share. By the union bound the chance that any
interval of any look misses its challenger's true difference is at most alpha, whatever was decided at the earlier
looks; this is conservative (the looks are correlated), never anti-conservative. A look with no spread (every seed
moved alike, common with few seeds on a few hundred test images) decides nothing. scipy.stats gives the t
quantiles; the spending and the decisions are a few lines nothing in scipy provides.

Knows nothing of Ray, MLflow or training (confirm.py runs the rounds).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache

BEATS, WORSE, NO_GAIN = "beats", "worse", "no_gain"  # how a challenger was decided (None: undecided)


@dataclass(frozen=True)
class Design:
    """A sequential confirmation's plan: the first round's seeds, the seeds each later round adds, the budget, the
    smallest gain worth having (in the metric's units: 0.0025 is a quarter point of accuracy) and alpha."""

    seeds: int
    step: int
    max_seeds: int
    min_effect: float
    alpha: float = 0.05
    challengers: int = 1

    def looks(self) -> list[int]:
        """Seeds per configuration at each planned look: seeds, seeds + step, ..., max_seeds (the last look is the
        budget even when the steps do not land on it)."""
        looks = list(range(self.seeds, self.max_seeds, self.step))
        return [*looks, self.max_seeds]

    def level(self, look: int) -> float:
        """The two-sided error level of one challenger's interval at look `look` (an index into `looks`)."""
        looks = self.looks()
        previous = looks[look - 1] if look > 0 else 0
        return self.alpha * (looks[look] - previous) / self.max_seeds / self.challengers


@dataclass
class Decision:
    """One challenger at one look."""

    n: int  # paired seeds it rests on
    mean: float
    low: float
    high: float
    state: str | None  # BEATS, WORSE, NO_GAIN or None (undecided)
    level: float  # the interval's two-sided error level

    @property
    def decided(self) -> bool:
        return self.state is not None


@lru_cache(maxsize=4096)
def t_quantile(level: float, n: int) -> float:
    from scipy.stats import t

    return float(t.ppf(1 - level / 2, n - 1))


def interval(diffs: Sequence[float], level: float) -> tuple[float, float, float]:
    """(mean, low, high): the paired t interval of the mean difference at two-sided error `level`; infinite bounds
    with fewer than 2 seeds or no spread (nothing to measure seed noise by)."""
    n = len(diffs)
    mean = statistics.fmean(diffs) if diffs else math.nan
    if n < 2:
        return mean, -math.inf, math.inf
    std = statistics.stdev(diffs)
    if std <= 1e-12 * max(1.0, abs(mean)):
        return mean, -math.inf, math.inf
    half = t_quantile(level, n) * std / math.sqrt(n)
    return mean, mean - half, mean + half


def decide(low: float, high: float, min_effect: float) -> str | None:
    if low > 0:
        return BEATS
    if high < 0:
        return WORSE
    if high < min_effect:
        return NO_GAIN
    return None


def assess(diffs: Sequence[float], design: Design, look: int) -> Decision:
    """A challenger's paired differences (its seeds so far, in order) judged at look `look`."""
    level = design.level(look)
    mean, low, high = interval(diffs, level)
    return Decision(len(diffs), mean, low, high, decide(low, high, design.min_effect), level)


def naive(diffs: Sequence[float], design: Design, look: int) -> Decision:
    """The rule without spending: a plain 1 - alpha t interval at every look. Not valid when looked at repeatedly
    (its error grows with the looks); kept to show that the checks of the real rule can fail."""
    mean, low, high = interval(diffs, design.alpha)
    return Decision(len(diffs), mean, low, high, decide(low, high, design.min_effect), design.alpha)


def seeds_to_decide(decision: Decision, design: Design) -> int | None:
    """About how many paired seeds would decide an undecided challenger at the last look's level, if its mean
    and spread stayed as they are: the n whose interval half-width fits between the mean and the nearer boundary
    it could cross (0 for 'beats', `min_effect` for 'no gain worth having'). None without a spread or a gap."""
    gaps = [g for g in (decision.mean, design.min_effect - decision.mean) if g > 0]
    if decision.n < 2 or not gaps or not math.isfinite(decision.high):
        return None
    std = (decision.high - decision.mean) * math.sqrt(decision.n) / t_quantile(decision.level, decision.n)
    level = design.level(len(design.looks()) - 1)
    n = decision.n
    while n < 100_000 and t_quantile(level, n) * std / math.sqrt(n) >= max(gaps):
        n += 1
    return n if n < 100_000 else None


@dataclass
class Outcome:
    """What a (simulated) sequential confirmation ended with."""

    decisions: dict[str, Decision]  # per challenger, at the look that decided it (or the last)
    looks: int  # rounds that ran
    seeds: dict[str, int]  # paired seeds each challenger trained
    baseline_seeds: int
    history: list[dict[str, Decision]] = field(default_factory=list)  # per look, the undecided challengers judged


def run(
    design: Design,
    draw: Callable[[str, int], Sequence[float]],
    labels: Sequence[str],
    rule: Callable[[Sequence[float], Design, int], Decision] = assess,
) -> Outcome:
    """A sequential confirmation of `labels` against the baseline, with `draw(label, k)` giving k more paired
    differences of that challenger (in a real one, training seeds; in a simulation, noise). Each round trains
    the baseline and the undecided; it ends when none is undecided or at `max_seeds`."""
    diffs: dict[str, list[float]] = {label: [] for label in labels}
    decided: dict[str, Decision] = {}
    history: list[dict[str, Decision]] = []
    looks = design.looks()
    baseline = 0
    look = 0
    for look, n in enumerate(looks):
        open_ = [label for label in labels if label not in decided]
        for label in open_:
            diffs[label] += list(draw(label, n - len(diffs[label])))
        baseline = n
        round_ = {label: rule(diffs[label], design, look) for label in open_}
        history.append(round_)
        decided.update({label: d for label, d in round_.items() if d.decided})
        if len(decided) == len(labels):
            break
    final = {**history[-1], **decided}
    return Outcome(final, look + 1, {k: len(v) for k, v in diffs.items()}, baseline, history)


def summary(outcomes: Sequence[Outcome], label: str) -> Mapping[str, float]:
    """Rates of each decision for one challenger over simulated confirmations, and the mean seeds it used."""
    total = len(outcomes)
    states = [o.decisions[label].state for o in outcomes]
    return {
        BEATS: states.count(BEATS) / total,
        WORSE: states.count(WORSE) / total,
        NO_GAIN: states.count(NO_GAIN) / total,
        "undecided": states.count(None) / total,
        "mean_seeds": statistics.fmean(o.seeds[label] for o in outcomes),
    }
