"""What the benchmark scripts share: the timer and the real CT volumes argument (not a script itself)."""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

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


REALDATA = Path(__file__).resolve().parent.parent.parent / "shared" / "realdata"  # beside the development checkout


def add_realdata_argument(parser: argparse.ArgumentParser) -> None:
    """`--realdata DIR`: the real CT volumes folder the benchmark reads in place."""
    parser.add_argument(
        "--realdata", type=Path, default=REALDATA, help="the real CT volumes folder (default: %(default)s)"
    )


def require_realdata(folder: Path, names: Iterable[str]) -> None:
    """Stop with one line naming the missing volumes, not a traceback."""
    missing = [name for name in names if not (folder / name).is_file()]
    if missing:
        sys.exit(f"error: {folder} lacks {missing}; pass --realdata DIR (the real CT volumes folder)")
