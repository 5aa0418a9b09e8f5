"""Proportions with 95% intervals, when two scores tie, and the length baselines every accuracy is read against."""

from __future__ import annotations

import math

TIE_TOLERANCE = 1e-5  # scores closer than this tie: the same text scored in another batch moves by float noise


def wilson_interval(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval for a proportion (95% for z=1.96); unlike p +- z*se it stays inside [0, 1] and is
    not empty at 0 or n successes. No observations: the whole [0, 1]."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denominator = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denominator
    half_width = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, center - half_width), min(1.0, center + half_width)


def _share(count: float, n: int) -> float:
    return count / n if n else float("nan")


def length_shares(lengths: list[tuple[int, int]]) -> dict:
    """The length baselines from (chosen, rejected) completion lengths: the share of pairs where the chosen completion
    is the shorter / the longer one, with Wilson intervals; pairs of equal length count for neither (`length_ties`)."""
    n = len(lengths)
    shorter = sum(chosen < rejected for chosen, rejected in lengths)
    longer = sum(chosen > rejected for chosen, rejected in lengths)
    return {
        "shorter_accuracy": _share(shorter, n), "shorter_accuracy_ci": list(wilson_interval(shorter, n)),
        "longer_accuracy": _share(longer, n), "longer_accuracy_ci": list(wilson_interval(longer, n)),
        "length_ties": _share(n - shorter - longer, n),
    }


def distinct_2(answers) -> float:
    """Distinct word bigrams over all bigrams of the answers: low when a model repeats itself (1.0 with none)."""
    bigrams = [tuple(words[i:i + 2]) for words in (a.split() for a in answers) for i in range(len(words) - 1)]
    return len(set(bigrams)) / len(bigrams) if bigrams else 1.0


def win_rate(wins: int, ties: int, n: int) -> dict:
    """Counts and the win rate with a tie as half a win. The 95% Wilson interval is on (wins + ties / 2) out of n: a
    half point varies less than a win or a loss, so the interval is, if anything, too wide."""
    points = wins + ties / 2
    return {"n": n, "wins": wins, "ties": ties, "losses": n - wins - ties,
            "win_rate": _share(points, n), "win_rate_ci": list(wilson_interval(points, n))}


# ---------------------------------------------------------------- paired comparisons (the same prompts, two models)


def paired_bootstrap(differences, *, resamples: int = 2000, seed: int = 0) -> dict:
    """Mean of per-prompt differences (one number per prompt: a model's answers to it averaged first, so the
    resampling is clustered by prompt) with a 95% percentile bootstrap interval and a two-sided bootstrap p-value
    (twice the share of resampled means on the other side of 0)."""
    import numpy as np
    from scipy.stats import bootstrap

    d = np.asarray(differences, dtype=float)
    if len(d) < 2 or np.ptp(d) == 0:  # no spread: the interval is the point itself
        mean = float(d.mean()) if len(d) else float("nan")
        return {"n": len(d), "mean": mean, "ci": [mean, mean], "p": 1.0 if mean == 0 or len(d) < 2 else 0.0}
    result = bootstrap((d,), np.mean, n_resamples=resamples, confidence_level=0.95, method="percentile",
                       rng=np.random.default_rng(seed))
    means = result.bootstrap_distribution
    p = min(1.0, 2 * min((means <= 0).mean(), (means >= 0).mean()))
    return {"n": len(d), "mean": float(d.mean()), "ci": [float(result.confidence_interval.low),
                                                         float(result.confidence_interval.high)], "p": float(p)}


def sign_test(first_only: int, second_only: int) -> float:
    """Exact two-sided McNemar / sign test p-value from the discordant counts: prompts where only the first model
    shows a property (refuses, wins) against prompts where only the second does; concordant prompts say nothing."""
    from scipy.stats import binomtest

    n = first_only + second_only
    return float(binomtest(first_only, n, 0.5).pvalue) if n else 1.0


def wilcoxon_p(first, second) -> float:
    """Two-sided Wilcoxon signed-rank p-value of paired values (answer lengths), zero differences dropped."""
    import numpy as np
    from scipy.stats import wilcoxon

    d = np.asarray(first, dtype=float) - np.asarray(second, dtype=float)
    return float(wilcoxon(d, zero_method="wilcox").pvalue) if np.any(d != 0) else 1.0


def holm(p_values: dict[str, float]) -> dict[str, float]:
    """Holm-adjusted p-values across a family of tests (control of the family-wise error rate at any level). By
    hand: scipy has only Benjamini-Hochberg, and statsmodels would be a dependency for these five lines."""
    adjusted, running = {}, 0.0
    ordered = sorted(p_values.items(), key=lambda item: item[1])
    for rank, (name, p) in enumerate(ordered):
        running = max(running, min(1.0, (len(ordered) - rank) * p))
        adjusted[name] = running
    return adjusted
