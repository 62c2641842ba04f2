"""The one timing rule of the benchmark scripts: warm up, then the median of repeated wall-clock runs."""

from __future__ import annotations

import statistics
import time


def median_seconds(run, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
