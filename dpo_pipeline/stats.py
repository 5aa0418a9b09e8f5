"""Shares with 95% intervals, when two scores tie, the length baselines, and paired tests of two models."""

from __future__ import annotations

import math

import numpy as np

TIE_TOLERANCE = 1e-5  # scores closer than this tie: the same text scored in another batch moves by float noise


def wilson_interval(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval (95% for z=1.96): unlike p +- z*se, inside [0, 1] and not empty at 0 or n successes;
    [0, 1] for no observations. By hand, as `successes` may be fractional (win_rate's half points)."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denominator = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denominator
    half_width = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, center - half_width), min(1.0, center + half_width)


def _share(count: float, n: int) -> float:
    return count / n if n else float("nan")


def proportion(name: str, count: float, n: int) -> dict:
    """{name: count / n, name_ci: its Wilson interval}: how every share of a report is written."""
    return {name: _share(count, n), f"{name}_ci": list(wilson_interval(count, n))}


def with_ci(metrics: dict, name: str) -> str:
    """A share of a report with its interval, as text: `0.625 [0.31, 0.86]`."""
    low, high = metrics[f"{name}_ci"]
    return f"{metrics[name]:.3f} [{low:.2f}, {high:.2f}]"


def length_shares(lengths: list[tuple[int, int]]) -> dict:
    """The length baselines from (chosen, rejected) completion lengths: the share of pairs where the chosen completion
    is the shorter / the longer one, with Wilson intervals; pairs of equal length count for neither (`length_ties`)."""
    n, shorter, longer = len(lengths), sum(c < r for c, r in lengths), sum(c > r for c, r in lengths)
    return {**proportion("shorter_accuracy", shorter, n), **proportion("longer_accuracy", longer, n),
            "length_ties": _share(n - shorter - longer, n)}


def distinct_2(answers) -> float:
    """Distinct word bigrams over all bigrams of the answers: low when a model repeats itself (1.0 with none)."""
    bigrams = [tuple(words[i:i + 2]) for words in (a.split() for a in answers) for i in range(len(words) - 1)]
    return len(set(bigrams)) / len(bigrams) if bigrams else 1.0


def win_rate(wins: int, ties: int, n: int) -> dict:
    """Counts and the win rate with a tie as half a win. The 95% Wilson interval is on (wins + ties / 2) out of n: a
    half point varies less than a win or a loss, so the interval is, if anything, too wide."""
    return {"n": n, "wins": wins, "ties": ties, "losses": n - wins - ties, **proportion("win_rate", wins + ties / 2, n)}


def paired_bootstrap(differences, *, resamples: int = 2000, seed: int = 0) -> dict:
    """Mean of per-prompt differences (one number per prompt: a model's answers to it averaged first, so the
    resampling is clustered by prompt) with a 95% percentile bootstrap interval and a two-sided bootstrap p-value
    (twice the share of resampled means on the other side of 0)."""
    from scipy.stats import bootstrap

    d = np.asarray(differences, dtype=float)
    if len(d) < 2 or np.ptp(d) == 0:  # no spread: the interval is the point itself
        mean = float(d.mean()) if len(d) else float("nan")
        return {"n": len(d), "mean": mean, "ci": [mean, mean], "p": 1.0 if mean == 0 or len(d) < 2 else 0.0}
    result = bootstrap((d,), np.mean, n_resamples=resamples, confidence_level=0.95, method="percentile",
                       rng=np.random.default_rng(seed))
    means, (low, high) = result.bootstrap_distribution, result.confidence_interval
    p = min(1.0, 2 * min((means <= 0).mean(), (means >= 0).mean()))
    return {"n": len(d), "mean": float(d.mean()), "ci": [float(low), float(high)], "p": float(p)}


def mcnemar(first, second) -> dict:
    """Two models' yes/no outcomes on the same items (a pair ranked right, an answer refusing): the difference of their
    rates and McNemar's exact test (a two-sided sign test) on the items only one says yes to; concordant items say
    nothing (and interval overlap would ignore the pairing)."""
    from scipy.stats import binomtest

    a, b = np.asarray(first, dtype=bool), np.asarray(second, dtype=bool)
    only_first, only_second = int((a & ~b).sum()), int((~a & b).sum())
    discordant = only_first + only_second
    return {"difference": float(a.mean() - b.mean()), "only_first": only_first, "only_second": only_second,
            "test": "McNemar (exact)", "p": float(binomtest(only_first, discordant).pvalue) if discordant else 1.0}


def wilcoxon_p(first, second) -> float:
    """Two-sided Wilcoxon signed-rank p-value of paired values (answer lengths), zero differences dropped."""
    from scipy.stats import wilcoxon

    d = np.asarray(first, dtype=float) - np.asarray(second, dtype=float)
    return float(wilcoxon(d, zero_method="wilcox").pvalue) if np.any(d != 0) else 1.0


def holm(p_values: dict) -> dict:
    """Holm-adjusted p-values across a family of tests (family-wise error control). By hand: scipy has only
    Benjamini-Hochberg, and statsmodels is not a dependency."""
    adjusted, running = {}, 0.0
    ordered = sorted(p_values.items(), key=lambda item: item[1])
    for rank, (name, p) in enumerate(ordered):
        running = max(running, min(1.0, (len(ordered) - rank) * p))
        adjusted[name] = running
    return adjusted
