"""The sequential confirmation's rule, as plain data: after each round of paired seeds, every undecided challenger's
paired test differences from the baseline are judged against boundaries for the paired t statistic; a challenger is
decided when it crosses one: it beats the baseline, it is worse, or it has no gain worth having (`min_effect`).

Exact boundaries (`Design.exact`, the rule of every new confirmation): computed at plan time for the looks the
confirmation plans (seeds, seeds + step, ..., max_seeds), its challengers and its alpha, by seeded Monte Carlo of the
paired t statistic under the null (the statistic's joint law over the looks does not depend on the noise's scale, so
normal paths of unit variance stand for every spread). alpha is split three ways, stored with the design: "beats"
(one-sided, spent O'Brien-Fleming-like: little early, most late, so an early stop needs a large effect), "worse"
(one-sided, spent Pocock-like: a clearly worse challenger stops early) and a reserve for one extension
(`Design.extend`: more seeds for the challengers a finished confirmation left undecided).
Each end is split evenly over the challengers (Bonferroni) and computed as if the other ends never stopped anything
(non-binding), so no stop can raise the error of another. "No gain worth having" is the same statistic shifted by
min_effect, with its own error (saying no gain when the true gain is min_effect) of alpha / 2, spent O'Brien-
Fleming-like. With alpha 0.05: "beats" 0.03, "worse" 0.01, the reserve 0.01 (SPLIT). Written by hand because no
maintained Python library computes exact small-sample t group-sequential boundaries (the ones we know use the
normal approximation, which is anti-conservative at 3 to 10 seeds).

The union-bound rule (`rule="spending"`: a paired t interval at alpha spent linearly over the looks) is how
confirmations planned before exact boundaries decide; they finish under it. Knows nothing of Ray, MLflow or training
(confirm.py runs the rounds); numpy and scipy.stats only.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

BEATS, WORSE, NO_GAIN = "beats", "worse", "no_gain"  # how a challenger was decided (None: undecided)
IDENTICAL = "identical"  # every paired difference exactly 0: the baseline in disguise (decided after one round)
# shares of alpha (chosen by benchmarks/sequential.py: power 0.95 at a true +0.25 points with a paired SD of 0.29 and
# 20 seeds, where a fixed 20-seed test has 0.95; a true -0.75 at SD 0.37 stopped within 9 seeds in 99% of runs);
# "no_gain" is the error of saying no gain when the true gain is min_effect, not a share of the null's alpha
SPLIT = {"beats": 0.6, "worse": 0.2, "reserve": 0.2, "no_gain": 0.5}
SIMS = 200_000  # simulated null paths per boundary computation (about a second for 20 seeds)
MIN_PATHS = 50  # paths that must cross an end's boundaries in all, so its estimate means something


@dataclass(frozen=True)
class Design:
    """A sequential confirmation's plan: the first round's seeds, the seeds each later round adds, the budget, the
    smallest gain worth having (in the metric's units: 0.0025 is a quarter point of accuracy), alpha, and how many
    challengers share it. With `rule="exact"` it carries the boundaries computed for it (`Design.exact`): the paired
    t statistic at look k must exceed beats[k] to beat the baseline, fall below -worse[k] to be worse, and the
    statistic shifted by min_effect below -no_gain[k] for no gain worth having (inf: no decision at that look)."""

    seeds: int
    step: int
    max_seeds: int
    min_effect: float
    alpha: float = 0.05
    challengers: int = 1
    rule: str = "spending"  # "exact"; "spending" for plans made before exact boundaries
    split: dict[str, float] | None = None  # alpha's split: beats, worse, reserve; and the no-gain error
    beats: tuple[float, ...] = ()
    worse: tuple[float, ...] = ()
    no_gain: tuple[float, ...] = ()
    sims: int = 0
    seed: int = 0
    extended_from: int | None = None  # an extended design: the max_seeds it had before (`extend`)

    @classmethod
    def exact(
        cls,
        seeds: int,
        step: int,
        max_seeds: int,
        min_effect: float,
        alpha: float = 0.05,
        challengers: int = 1,
        sims: int = SIMS,
        seed: int = 0,
        split: Mapping[str, float] | None = None,
    ) -> Design:
        """The design with its boundaries (ValueError, saying how many simulations it would need, when alpha is too
        small for `sims` paths to resolve)."""
        shares = dict(split or SPLIT)
        parts = {k: alpha * shares[k] for k in ("beats", "worse", "reserve", "no_gain")}
        looks = cls(seeds, step, max_seeds, min_effect, alpha, challengers).looks()
        fractions = [n / max_seeds for n in looks]
        stats = null_t_paths(looks, sims, seed)  # (sims, L)
        k = max(1, challengers)
        beats = calibrate(stats, [obrien_fleming(parts["beats"] / k, t) for t in fractions])
        worse = calibrate(-stats, [pocock(parts["worse"] / k, t) for t in fractions])
        no_gain = calibrate(-stats, [obrien_fleming(parts["no_gain"], t) for t in fractions])
        return cls(seeds, step, max_seeds, min_effect, alpha, challengers, "exact", parts, beats, worse, no_gain,
                   sims, seed)  # fmt: skip

    def looks(self) -> list[int]:
        """Seeds per configuration at each planned look: seeds, seeds + step, ..., max_seeds (the last look is the
        budget even when the steps do not land on it); an extended design's looks go on from its first budget."""
        if self.extended_from is not None:
            first = dataclasses.replace(self, max_seeds=self.extended_from, extended_from=None).looks()
            return [*first, *range(first[-1] + self.step, self.max_seeds, self.step), self.max_seeds]
        looks = list(range(self.seeds, self.max_seeds, self.step))
        return [*looks, self.max_seeds]

    def extend(self, max_seeds: int) -> Design:
        """The design with more looks, up to `max_seeds`, for the challengers a finished confirmation left
        undecided, spending the reserve: on simulated null paths of the whole extended design, the paths that
        already crossed "beats" or "worse" at the first looks (errors the first design's alpha pays for) are set
        aside, and the extension's boundaries are calibrated so that the others cross at most the reserve
        (split between "beats" and "worse" as the first design split alpha). The whole confirmation's chance of a
        wrong "beats" or "worse" stays at most beats + worse + reserve = alpha. Its "no gain" boundaries are
        computed afresh for the extension's looks (that error is not alpha's). ValueError when it cannot be."""
        if self.rule != "exact" or self.split is None:
            raise ValueError("only a confirmation planned with exact boundaries can be extended")
        if self.extended_from is not None:
            raise ValueError(f"it was extended once already (from {self.extended_from} seeds): its reserve is spent")
        if max_seeds <= self.max_seeds:
            raise ValueError(f"it has run {self.max_seeds} seeds: an extension needs more than that")
        import numpy as np

        grown = dataclasses.replace(self, max_seeds=max_seeds, extended_from=self.max_seeds)
        looks = grown.looks()
        first = len(self.looks())
        stats = null_t_paths(looks, self.sims, self.seed + 1)  # (sims, L): paths the first boundaries never saw
        crossed = np.zeros(stats.shape[0], dtype=bool)
        for k in range(first):
            crossed |= (stats[:, k] > self.beats[k]) | (stats[:, k] < -self.worse[k])
        rest = stats[:, first:]
        up = np.where(crossed[:, None], -np.inf, rest)
        down = np.where(crossed[:, None], -np.inf, -rest)
        reserve = self.split["reserve"] / max(1, self.challengers)
        share = self.split["beats"] / (self.split["beats"] + self.split["worse"])
        fractions = [(n - self.max_seeds) / (max_seeds - self.max_seeds) for n in looks[first:]]
        beats = calibrate(up, [obrien_fleming(reserve * share, t) for t in fractions])
        worse = calibrate(down, [pocock(reserve * (1 - share), t) for t in fractions])
        no_gain = calibrate(-rest, [obrien_fleming(self.split["no_gain"], t) for t in fractions])
        return dataclasses.replace(
            grown, beats=(*self.beats, *beats), worse=(*self.worse, *worse), no_gain=(*self.no_gain, *no_gain)
        )

    def level(self, look: int) -> float:
        """The spending rule's two-sided error level of one challenger's interval at look `look` (an index into
        `looks`); with exact boundaries, the one-sided "beats" alpha spent at that look."""
        looks = self.looks()
        previous = looks[look - 1] if look > 0 else 0
        if self.rule == "exact" and self.split is not None:
            k = max(1, self.challengers)
            return obrien_fleming(self.split["beats"] / k, looks[look] / looks[-1]) - obrien_fleming(
                self.split["beats"] / k, previous / looks[-1]
            )
        return self.alpha * (looks[look] - previous) / self.max_seeds / self.challengers


def design_problem(alpha: float, challengers: int, sims: int = SIMS) -> str | None:
    """Why exact boundaries for `alpha` over `challengers` cannot be computed from `sims` simulated paths (the
    smallest end, split over the challengers, must be crossed by MIN_PATHS of them), or None."""
    smallest = alpha * min(SPLIT["beats"], SPLIT["worse"], SPLIT["reserve"]) / max(1, challengers)
    smallest = min(smallest, alpha * SPLIT["no_gain"])
    if smallest * sims >= MIN_PATHS:
        return None
    return (
        f"the sequential boundaries for alpha {alpha:g} over {challengers} challenger(s) cannot be computed from "
        f"{sims} simulations: they would need {math.ceil(MIN_PATHS / smallest)}; raise alpha or confirm fewer "
        "configurations"
    )


def obrien_fleming(alpha: float, t: float) -> float:
    """Lan and DeMets' O'Brien-Fleming-like spending of a one-sided `alpha` by information fraction t (almost
    nothing early, alpha at t = 1)."""
    from scipy.stats import norm

    if t <= 0:
        return 0.0
    return float(2 * norm.sf(norm.isf(alpha / 2) / math.sqrt(t)))


def pocock(alpha: float, t: float) -> float:
    """Lan and DeMets' Pocock-like spending alpha ln(1 + (e - 1) t): more early than O'Brien-Fleming's."""
    return alpha * math.log(1 + (math.e - 1) * t) if t > 0 else 0.0


def null_t_paths(looks: Sequence[int], sims: int, seed: int) -> Any:
    """The paired t statistic at each look of `sims` seeded paths of N(0, 1) differences: (sims, len(looks))."""
    import numpy as np

    rng = np.random.default_rng(seed)
    total = np.zeros(sims)
    squares = np.zeros(sims)
    out = np.empty((sims, len(looks)))
    n = 0
    for j, look in enumerate(looks):
        draws = rng.standard_normal((sims, look - n))  # the seeds this look adds
        total += draws.sum(axis=1)
        squares += (draws * draws).sum(axis=1)
        n = look
        mean = total / n
        sd = np.sqrt(np.maximum(squares - n * mean * mean, 0.0) / (n - 1))
        out[:, j] = mean / (sd / math.sqrt(n))
    return out


def calibrate(stats: Any, spent: Sequence[float]) -> tuple[float, ...]:
    """Upper boundaries c_k with P(first crossing at look k) = spent[k] - spent[k - 1] on the simulated paths (a
    look whose share is under one path gets none: inf). ValueError when too few paths cross in all."""
    import numpy as np

    sims = stats.shape[0]
    if spent[-1] * sims < MIN_PATHS:
        need = math.ceil(MIN_PATHS / spent[-1]) if spent[-1] > 0 else "infinitely many"
        raise ValueError(
            f"boundaries at an error of {spent[-1]:.2g} cannot be computed from {sims} simulations: they would need "
            f"{need} (a larger alpha, fewer challengers, or fewer looks)"
        )
    alive = np.ones(sims, dtype=bool)
    crossed = 0
    out = []
    for k, level in enumerate(spent):
        want = math.floor(level * sims) - crossed
        values = stats[alive, k]
        if want < 1 or values.size <= want:
            out.append(math.inf)
            continue
        bound = float(np.partition(values, values.size - want - 1)[values.size - want - 1])
        hit = alive & (stats[:, k] > bound)
        crossed += int(hit.sum())
        alive &= ~hit
        out.append(bound)
    return tuple(out)


@dataclass
class Decision:
    """One challenger at one look."""

    n: int  # paired seeds it rests on
    mean: float
    low: float  # the "beats" bound: above 0, it beats the baseline
    high: float  # the "no gain" bound: below min_effect, no gain worth having (spending rule: below 0, worse too)
    state: str | None  # BEATS, WORSE, NO_GAIN, IDENTICAL or None (undecided)
    level: float  # the "beats" error spent at this look (spending rule: the interval's two-sided level)
    worse_high: float = math.nan  # exact boundaries: the "worse" bound (below 0: worse)

    @property
    def decided(self) -> bool:
        return self.state is not None

    @classmethod
    def of(cls, data: Mapping[str, Any]) -> Decision:
        """From a saved plan's dict (one saved before `worse_high` existed too)."""
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


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


def assess(diffs: Sequence[float], design: Design, look: int, identical: bool = True) -> Decision:
    """A challenger's paired differences (its seeds so far, in order) judged at look `look`. Every difference 0 is
    the baseline's own model again only when the caller saw nothing else differ either (`identical`: its losses, on
    every seed): a few hundred test images tie by chance."""
    level = design.level(look)
    if design.rule != "exact":
        mean, low, high = interval(diffs, level)
        return Decision(len(diffs), mean, low, high, decide(low, high, design.min_effect), level)
    n = len(diffs)
    if identical and n >= 2 and all(d == 0 for d in diffs):  # not noise: the baseline's trained model, seed by seed
        return Decision(n, 0.0, 0.0, 0.0, IDENTICAL, level, 0.0)
    mean = statistics.fmean(diffs) if diffs else math.nan
    std = statistics.stdev(diffs) if n >= 2 else 0.0
    if n < 2 or std <= 1e-12 * max(1.0, abs(mean)):  # nothing to measure seed noise by
        return Decision(n, mean, -math.inf, math.inf, None, level)
    se = std / math.sqrt(n)
    low = mean - design.beats[look] * se
    high = mean + design.no_gain[look] * se
    worse_high = mean + design.worse[look] * se
    state = BEATS if low > 0 else WORSE if worse_high < 0 else NO_GAIN if high < design.min_effect else None
    return Decision(n, mean, low, high, state, level, worse_high)


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
