"""Sweep files and finished-looking runs made by hand, for the sweep, results and plot tests."""

from __future__ import annotations

import json
from pathlib import Path

from lightning_fl.config import to_yaml
from lightning_fl.run_folder import CaseRow
from lightning_fl.sweep_plan import PlannedRun


def write_sweep(folder: Path, base: Path, **content) -> Path:
    """`folder/sweep.yaml`: one seed, one FedAvg variant and `folder/out` unless `content` says otherwise."""
    content = {
        "base": str(base),
        "seeds": [0],
        "variants": {"fedavg": ["fl.aggregation=fedavg"]},
        "output_dir": str(folder / "out"),
    } | content
    path = folder / "sweep.yaml"
    path.write_text(json.dumps(content))  # JSON is YAML
    return path


# a finished run's test_cases.csv, one row long
CASES = "phase,model,site,case,class,dice\ntest,global,liver,c1,liver,0.5\n"


def summary(**values) -> dict:
    """A summary.json as fit writes it, with `values` instead of its made-up numbers."""
    return {
        "rounds": 2,
        "best_round": 2,
        "best_validation_dice": 0.5,
        "test_dice": {"liver": 0.5},
        "test_mean_dice": 0.5,
        "external_dice": {},
        "device": "cpu",
        "precision": "32-true",
        "wall_time_s": 1.0,
        "round_time_s": [0.5, 0.5],
    } | values


def finish(run: PlannedRun, files: tuple[str, ...], cfg=None) -> None:
    """The run's folder with its config.yaml and `files` (each `{}`), as fit would leave it; with
    summary.json, the run's whole record: a valid summary and test_cases.csv."""
    run.folder.path.mkdir(parents=True)
    run.folder.config.write_text(to_yaml(cfg if cfg is not None else run.cfg))
    for name in files:
        (run.folder.path / name).write_text("{}")
    if "summary.json" in files:
        run.folder.summary.write_text(json.dumps(summary()))
        run.folder.cases.write_text(CASES)


def federated_rows(shift: float, seed: int) -> list[CaseRow]:
    """A federated run: liver site (liver, liver tumour), spleen site, one external site."""
    d = lambda v: v - shift  # noqa: E731
    return [
        CaseRow("test", "global", "liver", "c1", "liver", d(0.8 + 0.1 * seed)),
        CaseRow("test", "global", "liver", "c1", "liver_tumor", None),  # no tumour in c1
        CaseRow("test", "global", "liver", "c2", "liver", d(0.6)),
        CaseRow("test", "global", "liver", "c2", "liver_tumor", d(0.5)),
        CaseRow("test", "global", "spleen", "c3", "spleen", d(0.9)),
        CaseRow("external", "global", "ext", "e1", "liver", d(0.7)),
        CaseRow("external", "global", "ext", "e1", "spleen", d(0.4 + 0.2 * seed)),
    ]


def standalone_rows(seed: int) -> list[CaseRow]:
    """Each site's model on every site; externally on every organ."""
    return [
        CaseRow("test", "liver", "liver", "c1", "liver", 0.8),
        CaseRow("test", "liver", "spleen", "c3", "spleen", 0.0),
        CaseRow("test", "spleen", "liver", "c1", "liver", 0.1 + 0.1 * seed),
        CaseRow("test", "spleen", "spleen", "c3", "spleen", 0.9),
        CaseRow("external", "liver", "ext", "e1", "liver", 0.6),
        CaseRow("external", "liver", "ext", "e1", "spleen", 0.05),
        CaseRow("external", "spleen", "ext", "e1", "liver", 0.02),
        CaseRow("external", "spleen", "ext", "e1", "spleen", 0.5),
    ]


# variants a and b (b 0.1 lower everywhere) and the standalone solo, seeds 0 and 1
RESULTS = {
    (v, s): rows
    for s in (0, 1)
    for v, rows in (("a", federated_rows(0.0, s)), ("b", federated_rows(0.1, s)), ("solo", standalone_rows(s)))
}
