"""What the benchmark scripts share: the timer, the real CT volumes argument, and the tables of
README.md that the scripts write (not a script itself)."""

from __future__ import annotations

import argparse
import datetime
import json
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import torch

from lightning_fl.checkpoint import atomic_write_text

HERE = Path(__file__).resolve().parent
README = HERE / "README.md"
FIGURES = HERE / "figures"  # each written table's rows, as the scripts recorded them


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


def commit() -> str:
    """The commit the figures are measured at (short hash), `-dirty` when the working tree differs from it."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=HERE, capture_output=True, text=True, check=False).stdout.strip()

    return (git("rev-parse", "--short", "HEAD") or "unknown") + (
        "-dirty" if git("status", "--porcelain", "--", "lightning_fl", "configs", "benchmarks") else ""
    )


def table_markdown(rows: Sequence[Mapping[str, str]]) -> str:
    """A Markdown table of the rows (columns: the first row's keys, in order)."""
    columns = list(rows[0])
    lines = [columns, ["---"] * len(columns), *([row.get(c, "") for c in columns] for row in rows)]
    return "".join("| " + " | ".join(line) + " |\n" for line in lines)


def block(name: str) -> re.Pattern[str]:
    """README.md's generated table `name`: between `<!-- name:begin ... -->` and `<!-- name:end -->`."""
    return re.compile(rf"(<!-- {name}:begin.*?-->\n)(.*?)(<!-- {name}:end -->)", re.DOTALL)


def write_table(name: str, readme: Path = README) -> None:
    """Rewrite README.md's table `name` from its recorded rows (figures/<name>.json)."""
    rows = json.loads((FIGURES / f"{name}.json").read_text())
    text = readme.read_text()
    if not block(name).search(text):
        sys.exit(f"error: {readme}: no '<!-- {name}:begin -->' … '<!-- {name}:end -->' block to write")
    atomic_write_text(readme, block(name).sub(lambda m: m.group(1) + table_markdown(rows) + m.group(3), text))


def record(name: str, row: dict[str, str], key: Sequence[str]) -> None:
    """Add a measurement to table `name` (replacing an earlier row with the same `key` columns),
    dated and with its commit, and rewrite the table in README.md."""
    row = {"date": datetime.date.today().isoformat(), "commit": f"`{commit()}`"} | row
    path = FIGURES / f"{name}.json"
    rows = json.loads(path.read_text()) if path.is_file() else []
    rows = [r for r in rows if any(r.get(k) != row[k] for k in key)] + [row]
    FIGURES.mkdir(exist_ok=True)
    atomic_write_text(path, json.dumps(rows, indent=1, ensure_ascii=False) + "\n")
    write_table(name)
    print(f"recorded in {path.relative_to(HERE.parent)} and the '{name}' table of {README.relative_to(HERE.parent)}")
