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
