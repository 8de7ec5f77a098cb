"""Side-by-side timing for the benchmarks: one warm-up each, then the functions take
turns, so that machine noise hits them all alike; medians are compared."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Hashable


def median_seconds(fns: dict[Hashable, Callable[[], object]], repeats: int, warmup: bool = True) -> dict:
    if warmup:
        for fn in fns.values():
            fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def print_rates(seconds: dict, count: int, ours: str, base: str, digits: int = 2) -> None:
    """Images per second for each timed function, then the ratio ours / base."""
    rate = {k: count / v for k, v in seconds.items()}
    width = max(len(str(k)) for k in rate)
    for k, v in rate.items():
        print(f"{k:>{width}}: {v:8.{digits}f} img/s")
    print(f"{'ratio':>{width}}: {rate[ours] / rate[base]:8.3f}x ({ours} / {base})")
