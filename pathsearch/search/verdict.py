"""The confirmation's statistics and verdict as plain data: means and spreads over seeds, the paired difference with
its t interval (scipy.stats), the verdict in plain words, the table the CLI prints and the plot.

Knows nothing of Ray, MLflow or how the seeds were trained (confirm.py does that).
"""

from __future__ import annotations

import math
import statistics
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BASELINE = "baseline"


CONFIDENCE = 0.95


METHOD = "paired t over seeds (scipy.stats.ttest_rel), 95% confidence interval"
SEQUENTIAL_METHOD = (
    "sequential: paired t intervals, alpha spent over the planned rounds in proportion to their seeds and split over "
    "the challengers (valid at every round at once, by the union bound)"
)
EXACT_METHOD = (
    "sequential: bars for the paired t statistic computed for this design by simulation under the null (a wrong "
    "'beats' or 'worse' at most alpha over every round and challenger, one extension included)"
)


def method_of(design: Mapping[str, Any] | None) -> str:
    """How a confirmation decided: one paired t test, the union-bound sequential rule, or exact bars."""
    if design is None:
        return METHOD
    return EXACT_METHOD if design.get("rule") == "exact" else SEQUENTIAL_METHOD


@dataclass
class Confirmation:
    """What the confirmation measured, as plain data (also written to `confirmation.yaml`)."""

    metric: str
    mode: str
    seeds: list[int]
    candidates: list[dict[str, Any]]  # label, description, overrides, per-seed values, means and stds
    winner: str | None
    difference: dict[str, Any]  # the verdict's paired test difference (winner or best challenger vs baseline)
    verdict: str
    interrupted: bool = False
    files: dict[str, Path] = field(default_factory=dict)
    search_metric: str = "val_acc"  # what the candidates' search scores measured (proxy_val_acc in two_stage)
    design: dict[str, Any] | None = None  # a sequential confirmation's design (pathsearch.search.sequential.Design)
    rounds: list[dict[str, dict[str, Any]]] = field(default_factory=list)  # per round: challenger -> its Decision

    def candidate(self, label: str) -> dict[str, Any]:
        return next(c for c in self.candidates if c["label"] == label)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (NaN with fewer than two values)."""
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else math.nan


def paired_difference(a: Sequence[float], b: Sequence[float], confidence: float = CONFIDENCE) -> dict[str, Any]:
    """a - b over paired seeds: mean, std, the t confidence interval of the mean, its p-value (two-sided) and on
    how many seeds a beats b. When every seed gives the same difference (common with few seeds and accuracies on a
    few hundred images) t is undefined: the interval is NaN and the p-value is the exact sign test's."""
    from scipy.stats import binomtest, ttest_rel

    diffs = [x - y for x, y in zip(a, b, strict=True)]
    mean, std = mean_std(diffs)
    out: dict[str, Any] = {
        "mean": mean,
        "std": std,
        "n": len(diffs),
        "wins": sum(d > 0 for d in diffs),
        "ties": sum(d == 0 for d in diffs),
        "confidence": confidence,
    }
    if len(diffs) < 2:
        out.update(ci_low=math.nan, ci_high=math.nan, p_value=math.nan)
    elif std <= 1e-12 * max(1.0, abs(mean)):  # every seed moved alike (up to rounding): t is undefined
        signed = len(diffs) - out["ties"]
        p_value = float(binomtest(out["wins"], signed).pvalue) if signed else 1.0
        out.update(ci_low=math.nan, ci_high=math.nan, p_value=p_value)
    else:
        test = ttest_rel(a, b)
        ci = test.confidence_interval(confidence_level=confidence)
        out.update(ci_low=float(ci.low), ci_high=float(ci.high), p_value=float(test.pvalue))
    return out


def make_verdict(
    winner: str | None, diff: Mapping[str, Any], planned: int, paired: int, baseline: Mapping[str, Any]
) -> str:
    """One line in plain words: is the exported configuration better than the baseline on test, and by how much."""
    if winner == BASELINE and not diff and paired:
        return "no verdict: the search completed no configuration besides the baseline"
    if winner is None or not diff:
        return f"no verdict: only {paired} of {planned} seeds finished for every configuration"
    if paired < 2:
        return f"no verdict: {paired} of {planned} paired seeds finished for every configuration (2 are needed)"
    # seeds a configuration did not finish (a trial that failed for good) leave the verdict on fewer: said in it
    short = f"; {planned - paired} of {planned} planned seeds did not finish" if paired < planned else ""
    if not math.isfinite(diff["ci_low"]):  # the same difference on every seed: no spread to measure noise by
        same = (
            f"{pts(diff['mean'])} points test accuracy on each of {diff['n']} paired seeds (no spread, so no t "
            f"interval; sign test p = {diff['p_value']:.2g}{short})"
        )
        if winner != BASELINE and diff["mean"] > 0 and diff["p_value"] < 1 - CONFIDENCE:
            return f"{diff['description']}: {same} over the baseline"
        return f"no configuration beats the baseline beyond seed noise (best, {diff['description']}: {same})"
    points = (
        f"{pts(diff['mean'])} points test accuracy (95% CI {pts(diff['ci_low'])} to {pts(diff['ci_high'])}, "
        f"better on {diff['wins']} of {diff['n']} paired seeds{short})"
    )
    if winner == BASELINE:
        return (
            f"the baseline ({100 * baseline['test_acc_mean']:.1f}% test accuracy) is the best configuration on val: "
            f"no configuration beats it (best challenger, {diff['description']}: {points})"
        )
    if diff["ci_low"] > 0:
        return f"{diff['description']}: {points} over the baseline"
    if diff["ci_high"] < 0:
        return f"{diff['description']} won on val but is worse than the baseline on test: {points}"
    return f"no configuration beats the baseline beyond seed noise (best, {diff['description']}: {points})"


def pts(fraction: float, digits: int = 1) -> str:
    """An accuracy difference in points, signed: 0.0123 -> '+1.2'."""
    return f"{100 * fraction:+.{digits}f}" if math.isfinite(fraction) else "n/a"


def sequential_verdict(
    winner: str | None,
    challenger: str | None,
    decisions: Mapping[str, Mapping[str, Any]],
    descriptions: Mapping[str, str],
    design: Mapping[str, Any],
    baseline_seeds: int,
    rounds: int,
) -> str:
    """One line in plain words for a sequential confirmation: which of its four answers it reached (beats the
    baseline by X; no configuration gains min_effect or more; a configuration is worse; undecided, with the seeds
    an answer would take), always with the seeds and rounds it rests on. `decisions`: each challenger's last
    Decision (as a dict, with `to_decide` for the undecided)."""
    rest = f"{baseline_seeds} paired seeds of the baseline over {rounds} round{'s' if rounds != 1 else ''}"
    if design.get("extended_from") is not None:
        rest += f"; extended from {design['extended_from']} to {design['max_seeds']} seeds, on its reserve of alpha"
    if challenger is None or challenger not in decisions:
        return f"no verdict: the confirmation completed no configuration besides the baseline ({rest})"
    floor = pts(design["min_effect"], 2)
    d = decisions[challenger]
    what = descriptions[challenger]
    prefix = "the baseline is the best configuration on val; best challenger, " if winner == BASELINE else ""

    # exact bars: low is where "beats" is decided, high where "no gain" is (each at its own level), not one CI
    kind = "sequential bounds" if design.get("rule") == "exact" else "sequential 95% CI"

    def band(x: Mapping[str, Any]) -> str:
        return f"{pts(x['mean'])} points test accuracy ({kind} {pts(x['low'])} to {pts(x['high'])}, " \
            f"{x['n']} seeds)"  # fmt: skip

    worse = [label for label, x in decisions.items() if x["state"] == "worse"]
    worse_text = f"; worse than the baseline: {', '.join(worse)}" if worse else ""
    states = {"beats": "beats the baseline", "worse": "worse", "no_gain": "no gain worth having", None: "undecided"}
    states["identical"] = "identical to the baseline"
    others = [
        f"{label} {states[x['state']]} after {x['n']} seeds"
        + (f" (about {x['to_decide']} would decide it)" if x.get("to_decide") else "")
        + (f" (its settings had no effect: {descriptions[label]})" if x["state"] == "identical" else "")
        for label, x in decisions.items()
        if label != challenger
    ]
    others_text = f"; others: {', '.join(others)}" if others else ""
    if d["state"] == "beats":
        reach = (
            f"at least min_effect {floor} points" if d["low"] >= design["min_effect"]
            else f"its estimate reaches min_effect {floor} points, its lower bound does not"
            if d["mean"] >= design["min_effect"] else f"below min_effect {floor} points"
        )  # fmt: skip
        return f"{prefix}{what}: beats the baseline by {band(d)}; {reach}{others_text} ({rest})"
    if d["state"] == "identical":  # the same trained model as the baseline's on every paired seed
        return (
            f"{prefix}{what}: identical to the baseline on every one of its {d['n']} paired seeds (every test "
            f"accuracy the same): the settings it changes had no effect on training, so it was stopped after its "
            f"first round{others_text} ({rest})"
        )
    if all(x["state"] in ("no_gain", "worse", "identical") for x in decisions.values()):
        bounds = ", ".join(f"{label} {pts(x['high'])}" for label, x in decisions.items())
        return f"no configuration gains min_effect {floor} points or more (upper bounds: {bounds}){worse_text} ({rest})"
    if d["state"] == "worse":
        return f"{prefix}{what} is worse than the baseline: {band(d)}{others_text} ({rest})"
    need = d.get("to_decide")
    more = f"; about {need} seeds would decide it if its spread stays" if need else ""
    state = "no gain worth having" if d["state"] == "no_gain" else "undecided"
    return f"{prefix}{state} after {d['n']} seeds: {what}, {band(d)}{more}{others_text} ({rest})"


def seeds_text(seeds: Sequence[int]) -> str:
    if seeds and list(seeds) == list(range(seeds[0], seeds[0] + len(seeds))):
        return f"({seeds[0]}-{seeds[-1]})"
    return f"({', '.join(map(str, seeds))})"


def format_confirmation(confirmation: Confirmation) -> str:
    """The confirmation table, the winner's optimism and the verdict (last), as the CLI prints them."""
    c = confirmation
    search_metric = c.search_metric
    chosen = f"mean {c.metric}" if c.design is None else f"mean paired {c.metric} gain over the baseline"
    rounds = "" if c.design is None else f" in {len(c.rounds)} rounds (each configuration: mean over its own seeds)"
    lines = [
        f"\nconfirmation over {len(c.seeds)} paired seeds {seeds_text(c.seeds)}{rounds}; winner chosen by {chosen}, "
        "test read only here",
        f"{'':<14} {'search ' + search_metric:>18} {'val_acc':>16} {'test_acc':>16}  configuration",
    ]
    order = sorted(c.candidates, key=lambda r: r.get("rank", 1e9))
    for row in order:
        label = row["label"] + (" *" if row["label"] == c.winner else "")
        found = row.get(f"search_{search_metric}")
        search = f"{_score(search_metric, found)}" if found is not None else "-"
        val = _pm(row["val_acc_mean"], row["val_acc_std"])
        test = _pm(row["test_acc_mean"], row["test_acc_std"])
        seeds = f" [{len(row['seeds_finished'])} seeds]" if c.design is not None else ""
        lines.append(f"{label:<14} {search:>18} {val:>16} {test:>16}  {row['description']}{seeds}")
    if c.winner is not None:
        w = c.candidate(c.winner)
        found = w.get(f"search_{search_metric}")
        if found is not None and search_metric.endswith("val_acc") and math.isfinite(w["val_acc_mean"]):
            confirmed = w["val_acc_mean"]
            lines.append(
                # the search's score of the configuration it picked: one trial (a proxy score in two_stage)
                f"optimism: the winner ({c.winner}) scored {100 * found:.2f}% {search_metric} in the search, "
                f"{100 * confirmed:.2f}% mean val_acc confirmed ({100 * (found - confirmed):+.2f} points)"
            )
    lines.append(f"({method_of(c.design)}; * = winner)")
    lines.append(f"verdict: {c.verdict}")
    return "\n".join(lines)


def _score(metric: str, value: float) -> str:
    return f"{100 * value:.2f}%" if metric.endswith("acc") else f"{value:.4f}"


def _pm(mean: float, std: float) -> str:
    if not math.isfinite(mean):
        return "-"
    return f"{100 * mean:.2f} ± {100 * std:.2f}%" if math.isfinite(std) else f"{100 * mean:.2f}%"


def plot_confirmation(c: Confirmation, path: Path) -> Path | None:
    """Left: test accuracy per seed for each configuration (one seed's points joined across configurations), mean and
    95% CI of the mean marked. Right: each challenger's paired test difference from the baseline per seed, its mean
    and paired 95% CI (what the verdict reads), against the zero line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from scipy.stats import t as student_t

    order = sorted(c.candidates, key=lambda r: (r["label"] != BASELINE, r.get("rank", 1e9)))
    if not order or not c.seeds:
        return None
    fig, (ax, dx) = plt.subplots(1, 2, figsize=(max(10.0, 2.6 * len(order) + 3), 5.0), width_ratios=[1, 1])
    colors = {r["label"]: "tab:green" if r["label"] == c.winner else "tab:blue" if r["label"] == BASELINE else "0.45"
              for r in order}  # fmt: skip
    for seed in c.seeds:  # a sequential confirmation's decided challengers stopped early: their seeds only
        xs = [x for x, r in enumerate(order) if seed in r["per_seed"]]
        ys = [100 * order[x]["per_seed"][seed]["test_acc"] for x in xs]
        ax.plot(xs, ys, color="0.85", lw=0.8)
    for x, row in enumerate(order):
        ys = [100 * row["per_seed"][s]["test_acc"] for s in c.seeds if s in row["per_seed"]]
        ax.scatter([x] * len(ys), ys, color=colors[row["label"]], s=18, zorder=2)
        mean, std = 100 * row["test_acc_mean"], 100 * row["test_acc_std"]
        if len(ys) > 1 and math.isfinite(std):
            half = float(student_t.ppf(0.5 + CONFIDENCE / 2, len(ys) - 1)) * std / math.sqrt(len(ys))
            ax.errorbar([x + 0.15], [mean], yerr=[half], fmt="none", color="black", capsize=4, zorder=3)
        ax.hlines(mean, x - 0.25, x + 0.25, color=colors[row["label"]], lw=2.5, zorder=3)
    labels = [r["label"] + ("\n(winner)" if r["label"] == c.winner else "") for r in order]
    ax.set_xticks(range(len(order)), labels)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"test accuracy, {len(c.seeds)} paired seeds\n(bar: mean, whisker: 95% CI)", fontsize=9)
    base = next(r for r in order if r["label"] == BASELINE)
    others = [r for r in order if r["label"] != BASELINE]
    last = {label: d for round_ in c.rounds for label, d in round_.items()}  # each challenger's last look
    for x, row in enumerate(others):
        both = [s for s in c.seeds if s in row["per_seed"] and s in base["per_seed"]]
        diffs = [100 * (row["per_seed"][s]["test_acc"] - base["per_seed"][s]["test_acc"]) for s in both]
        d = paired_difference(diffs, [0.0] * len(diffs))
        if row["label"] in last:  # a sequential confirmation's verdict reads its own interval: shown instead
            own = last[row["label"]]
            d = {"mean": 100 * own["mean"], "ci_low": 100 * own["low"], "ci_high": 100 * own["high"]}
        dx.scatter([x] * len(diffs), diffs, color=colors[row["label"]], s=18, zorder=2)
        dx.hlines(d["mean"], x - 0.25, x + 0.25, color=colors[row["label"]], lw=2.5, zorder=3)
        if math.isfinite(d["ci_low"]):
            err = [[d["mean"] - d["ci_low"]], [d["ci_high"] - d["mean"]]]
            dx.errorbar([x + 0.15], [d["mean"]], yerr=err, fmt="none", color="black", capsize=4, zorder=3)
    dx.axhline(0.0, color="tab:blue", lw=1, ls="--")
    dx.set_xticks(range(len(others)), labels[1:])
    dx.set_xlim(-0.6, max(len(others), 1) - 0.4)
    dx.set_ylabel("test accuracy minus the baseline's\n(same seed, points)")
    kind = "95% CI, paired t" if c.design is None else "sequential bounds at its last round"
    dx.set_title(f"paired difference from the baseline\n(whisker: {kind})", fontsize=9)
    fig.suptitle("\n".join(textwrap.wrap(c.verdict, 120)), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_rounds(c: Confirmation, path: Path) -> Path | None:
    """A sequential confirmation round by round. Left: each challenger's interval for its paired test difference
    from the baseline (points) narrowing as seeds are added, against the 0 and min_effect lines; a challenger's last
    bar is the round that decided it. Right (exact boundaries): the boundaries themselves, drawn as lines over the
    seeds of each look, on the scale they are computed on: a challenger's paired t statistic (mean / standard
    error) must rise above the "beats" line or fall below the "worse" line; its statistic shifted by min_effect
    ((mean - min_effect) / standard error) must fall below the "no gain" line. Early lines lie further out: that is
    why an early look needs a larger effect."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if c.design is None or not c.rounds:
        return None
    labels = sorted({label for round_ in c.rounds for label in round_})
    exact = c.design.get("rule") == "exact" and bool(c.design.get("beats"))
    width = max(6.0, 1.2 * len(c.rounds) + 3)
    fig, axes = plt.subplots(1, 2 if exact else 1, figsize=(2 * width if exact else width, 4.2), squeeze=False)
    ax = axes[0][0]
    palette = ["tab:orange", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan", "tab:gray"]
    colors = {label: "tab:green" if label == c.winner else palette[j % len(palette)] for j, label in enumerate(labels)}
    step = 0.6 / max(1, len(labels))
    for j, label in enumerate(labels):
        for k, round_ in enumerate(c.rounds):
            d = round_.get(label)
            if d is None:
                continue
            x = k + 1 + (j - (len(labels) - 1) / 2) * step
            ax.scatter([x], [100 * d["mean"]], color=colors[label], s=16, zorder=3, label=label if k == 0 else None)
            if math.isfinite(d["low"]):
                ax.vlines(x, 100 * d["low"], 100 * d["high"], color=colors[label], lw=2)
    ax.axhline(0.0, color="tab:blue", lw=1, ls="--", label="0: the baseline")
    floor = 100 * c.design["min_effect"]
    ax.axhline(floor, color="tab:red", lw=1, ls=":", label=f"min_effect {floor:+.2f}")
    ax.set_xticks(range(1, len(c.rounds) + 1))
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy minus the baseline's (points)")
    ax.set_title("intervals per round (decided: above 0, below 0 or below min_effect)", fontsize=9)
    ax.legend(fontsize=7, loc="best")
    if exact:
        plot_bounds(axes[0][1], c, labels, colors)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_bounds(ax: Any, c: Confirmation, labels: Sequence[str], colors: Mapping[str, str]) -> None:
    """The exact design's boundaries as lines over the seeds of each look, and each challenger's statistics."""
    from pathsearch.search.sequential import Design

    saved: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in (c.design or {}).items()}
    design = Design(**saved)
    looks = design.looks()[: len(c.rounds)]
    beats, worse, no_gain = (
        [b if math.isfinite(b) else math.nan for b in bound[: len(looks)]]
        for bound in (design.beats, [-w for w in design.worse], [-g for g in design.no_gain])
    )
    # the boundaries exist at the looks only: a marker at each, joined by a thin line to read them as one schedule
    ax.plot(looks, beats, "_-", color="black", ms=16, mew=2, lw=0.8, label="beats: above this line")
    ax.plot(looks, worse, "_--", color="black", ms=16, mew=2, lw=0.8, label="worse: below this line")
    ax.plot(looks, no_gain, "_:", color="0.45", ms=16, mew=2, lw=0.8, label="no gain: shifted statistic below")
    ax.axhline(0.0, color="0.8", lw=0.8)
    for label in labels:
        points = []
        for k, round_ in enumerate(c.rounds):
            d = round_.get(label)
            if d is None or k >= len(looks) or not math.isfinite(d["low"]) or not math.isfinite(design.beats[k]):
                continue
            se = (d["mean"] - d["low"]) / design.beats[k]  # the bound is mean - beats[k] * se
            if se > 0:
                points.append((looks[k], d["mean"] / se, (d["mean"] - design.min_effect) / se))
        if points:
            xs, ts, shifted = zip(*points, strict=True)
            ax.plot(xs, ts, "o-", color=colors[label], ms=4, lw=1, label=f"{label}: mean / se")
            ax.plot(xs, shifted, "o", mfc="none", color=colors[label], ms=4, label=f"{label}: (mean - min_effect) / se")
    ax.set_xticks(looks)
    ax.set_xlabel("paired seeds at the look")
    ax.set_ylabel("paired t statistic")
    ax.set_title(f"the boundaries at each look (alpha {design.alpha:g}, {design.challengers} challenger"
                 f"{'s' if design.challengers != 1 else ''})", fontsize=9)  # fmt: skip
    ax.legend(fontsize=6, loc="best")
