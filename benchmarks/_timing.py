"""Side-by-side timing helpers: interleaved runs, medians of per-pair ratios (BENCHMARKS.md)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def interleaved(fns: dict[str, Callable[[], object]], repeats: int = 5, warmup: int = 1) -> dict[str, list[float]]:
    """Run every function ``repeats`` times, A B C A B C ..., and return each one's wall times."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def ratio(times: dict[str, list[float]], num: str, den: str) -> float:
    """Median of the per-pair ratios num/den."""
    return statistics.median(a / b for a, b in zip(times[num], times[den]))


def describe(times: list[float]) -> str:
    return f"median {statistics.median(times) * 1e3:8.1f} ms  (min {min(times) * 1e3:.1f}, max {max(times) * 1e3:.1f})"


def header(title: str) -> None:
    print(f"== {title} ==  torch threads: {torch.get_num_threads()}")
