"""A mean with its two-sided 95 % Student t-interval, for paired differences over a few seeds (the LM study, the
demo). No scipy: the quantiles for up to 10 degrees of freedom are tabulated, beyond that the normal one."""

from __future__ import annotations

import statistics

# Two-sided 95 % Student t quantiles by degrees of freedom (n - 1 seeds).
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def interval(values: list[float]) -> tuple[float, float, float]:
    """(mean, low, high); low and high are NaN for a single value."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, float("nan"), float("nan")
    half = T_975.get(len(values) - 1, 1.96) * statistics.stdev(values) / len(values) ** 0.5
    return mean, mean - half, mean + half
