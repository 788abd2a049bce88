"""A run's per-case test scores (`test_cases.csv`) and which of them speak for each model.

`fit` writes them and summarises them; `sweep` reads them back into its tables and paired
comparisons. Both take a run's headline numbers from the same rows (`headline_rows`), so the
summary of a run and a sweep's table of it cannot disagree on what "ConDistFL's liver Dice" is.
Pure Python: the sweep's process does not import torch.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

from lightning_fl.errors import UserInputError

CASES_FILE = "test_cases.csv"
CASE_COLUMNS = ("phase", "model", "site", "case", "class", "dice")
TEST, EXTERNAL, GLOBAL = "test", "external", "global"  # phases; the model of federated and centralized runs


class ResultsError(UserInputError):
    """A finished run's test_cases.csv that cannot be read into the tables; the message names the file."""


class CaseRow(NamedTuple):
    """One row of a run's test_cases.csv; dice is None where the class is absent from the case."""

    phase: str
    model: str
    site: str
    case: str
    cls: str
    dice: float | None


def case_table(rows: Iterable[CaseRow]) -> str:
    """test_cases.csv's text: an empty dice where the class is absent."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CASE_COLUMNS)
    for row in rows:
        writer.writerow([*row[:-1], "" if row.dice is None else f"{row.dice:.8g}"])
    return out.getvalue()


def read_test_cases(path: Path) -> list[CaseRow]:
    """A run's test_cases.csv, checked: the tables must not silently drop or misread a row."""
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not set(CASE_COLUMNS) <= set(reader.fieldnames):
            raise ResultsError(f"{path}: expected the columns {','.join(CASE_COLUMNS)}, got {reader.fieldnames}")
        rows = []
        for line, row in enumerate(reader, start=2):
            try:
                dice = float(row["dice"]) if row["dice"] else None
            except ValueError:
                raise ResultsError(f"{path}: line {line}: dice {row['dice']!r} is not a number") from None
            rows.append(CaseRow(row["phase"], row["model"], row["site"], row["case"], row["class"], dice))
    return rows


def headline_rows(rows: list[CaseRow]) -> list[CaseRow]:
    """The rows a run's headline numbers come from: the global model's (federated and centralized
    runs), or, where each site has its own model (standalone), each site's model on its own test
    split and, on the external sites, on the classes its site labels."""
    if any(row.model == GLOBAL for row in rows):
        return [row for row in rows if row.model == GLOBAL]
    own = [row for row in rows if row.phase == TEST and row.model == row.site]
    learnt = {(row.model, row.cls) for row in own}
    return own + [row for row in rows if row.phase == EXTERNAL and (row.model, row.cls) in learnt]


def pooled(rows: Iterable[CaseRow], phase: str, site: str | None = None) -> dict[str, list[float]]:
    """Each class's Dice over the cases that have it, pooled over the sites that label it (or of one site)."""
    values: dict[str, list[float]] = {}
    for row in rows:
        if row.phase == phase and site in (None, row.site):
            values.setdefault(row.cls, [])
            if row.dice is not None:
                values[row.cls].append(row.dice)
    return values
