"""The few summary statistics the reports use: median, percentiles, worst, ratios.

Percentiles use linear interpolation between closest ranks (numpy's default), so a p95 over 30
samples is not simply the second largest value.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence


def percentile(values: Sequence[float], p: float) -> float:
    """The ``p``-th percentile (0-100) of ``values``; ValueError on an empty sequence."""
    if not values:
        raise ValueError("percentile of no values: expected at least one sample")
    if not 0 <= p <= 100:
        raise ValueError(f"p={p!r}: expected a percentile between 0 and 100")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * p / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def median(values: Sequence[float]) -> float:
    if not values:
        raise ValueError("median of no values: expected at least one sample")
    return float(statistics.median(values))


def summary(values: Sequence[float]) -> dict[str, float]:
    """Median, p95, worst (max), best (min) and the count, for a table row."""
    return {
        "n": float(len(values)),
        "median": median(values),
        "p95": percentile(values, 95),
        "worst": max(values),
        "best": min(values),
    }


def ratio(numerator: float, denominator: float) -> float | None:
    """numerator / denominator, or None when the denominator is zero (nothing to compare)."""
    return numerator / denominator if denominator else None
