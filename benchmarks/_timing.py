"""The one timer the benchmark scripts share (not a script itself)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

import torch


def median_times(
    fns: Sequence[Callable[[], object]], repeats: int, warmup: int = 1, setup: Callable[[], object] = lambda: None
) -> list[float]:
    """Median wall time of each function after `warmup` untimed calls, timed in alternation so that
    a slow spell of a shared machine falls on all of them alike; `setup` runs untimed before every
    call, and a GPU finishes its queued work before the clock starts and stops."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else lambda: None
    for fn in fns:
        for _ in range(warmup):
            setup()
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, spent in zip(fns, times):
            setup()
            sync()
            start = time.perf_counter()
            fn()
            sync()
            spent.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]
