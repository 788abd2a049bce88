"""Each of the paper's claims and each open question of issue 27 against the committed sweeps that
test it (experiments/claims.yaml): for every comparison, the paired difference a − b, its 95 %
intervals over seeds and over cases (as the sweep's results.md gives them) and whether both sides
had converged; then one verdict a claim; then what each sweep cost (its runs' wall time summed, and
the devices and precisions they ran on). Writes FILE as markdown with the command that made it.

A comparison gives an answer only when every run its sweep plans for both variants is in the
sweep's tables, and neither variant still climbs: the mean over seeds of its validation curve's
rise over the last quarter of the rounds is at most 0.01 (results.CONVERGED_CHANGE). A claim is
confirmed where every comparison shows the paper's direction (both intervals exclude 0), not
confirmed where none does, mixed otherwise. A claim's `small_budget` comparisons (the earlier sweeps,
8 rounds × 24 steps in 3D) get the same reading in their own column, to show how the answer changes
with the budget; they do not enter its verdict.

    python experiments/verdicts.py experiments/claims.yaml --output experiments/results/verdicts.md
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from lightning_fl.checkpoint import atomic_write_text
from lightning_fl.errors import UserInputError
from lightning_fl.results import (
    ALL_CLASSES,
    CONVERGED_CHANGE,
    Difference,
    markdown_table,
    paired_differences,
    read_sweep,
    rise_cell,
    run_costs,
)
from lightning_fl.sweep_plan import Sweep, load_sweep

DIRECTIONS = ("> 0", "< 0")


@dataclass
class Evidence:
    """One comparison of a sweep, and what its finished runs say."""

    sweep: Sweep
    a: str
    b: str
    phase: str
    cls: str
    difference: Difference | None = None
    runs: str = ""  # "finished of planned" runs of the two variants
    rise: float = math.nan  # the larger of the two variants' mean last-quarter rise
    state: str = ""  # "in progress", "still rising", or the difference's verdict


@dataclass
class Claim:
    text: str
    expect: str | None  # the paper's direction; None for an open question
    evidence: list[Evidence]
    small_budget: list[Evidence]  # the same comparisons at 8 × 24 steps (3D): shown beside, not weighed in


def read_claims(path: Path) -> list[Claim]:
    """The claims file, checked: every sweep file loads and names the variants compared."""
    try:
        entries = yaml.safe_load(path.read_text())["claims"]
    except (OSError, yaml.YAMLError, KeyError, TypeError) as err:
        raise UserInputError(f"{path}: expected a YAML mapping with a `claims` list ({err})") from None
    claims, sweeps = [], {}

    def read_evidence(where: str, items: Any) -> list[Evidence]:
        evidence = []
        for item in items or []:
            try:
                sweep_path, (a, b), phase = Path(item["sweep"]), item["compare"], item["phase"]
            except (KeyError, TypeError, ValueError):
                raise UserInputError(f"{where}: each evidence needs `sweep`, `compare: [a, b]` and `phase`") from None
            if sweep_path not in sweeps:
                sweeps[sweep_path] = load_sweep(sweep_path)
            sweep = sweeps[sweep_path]
            unknown = [v for v in (a, b) if v not in sweep.variants]
            if unknown:
                raise UserInputError(f"{where}: {sweep_path} has no variant {', '.join(unknown)}")
            evidence.append(Evidence(sweep, a, b, phase, item.get("class", ALL_CLASSES)))
        return evidence

    for number, entry in enumerate(entries, 1):
        where = f"{path}: claims[{number}]"
        text = entry.get("claim") or entry.get("question") if isinstance(entry, dict) else None
        expect = entry.get("expect") if isinstance(entry, dict) else None
        if not text or ("claim" in entry) != (expect is not None) or expect not in (None, *DIRECTIONS):
            raise UserInputError(f"{where}: expected `claim` with `expect` ('> 0' or '< 0'), or `question` without")
        evidence = read_evidence(where, entry.get("evidence"))
        if not evidence:
            raise UserInputError(f"{where}: expected at least one piece of `evidence`")
        claims.append(Claim(text, expect, evidence, read_evidence(where, entry.get("small_budget"))))
    return claims


@dataclass
class SweepCost:
    """A sweep's finished runs against its planned ones, and what they cost."""

    sweep: Sweep
    costs: dict[tuple[str, int], dict[str, Any]]  # results.run_costs of its tabulated runs

    def row(self) -> list[str]:
        planned = len(self.sweep.variants) * len(self.sweep.seeds)
        wall = [c["wall_s"] for c in self.costs.values()]
        where = sorted({f"{c['device']}, {c['precision']}" for c in self.costs.values()})
        hours = f"{sum(wall) / 3600:.1f}" if wall else ""
        longest = f"{max(wall) / 60:.1f}" if wall else ""
        return [self.sweep.name, f"{len(self.costs)} of {planned}", hours, longest, "; ".join(where)]


def weigh(claims: list[Claim]) -> list[SweepCost]:
    """Each comparison's difference, runs, rise and state, from its sweep's tabulated runs; what each
    sweep named cost, in the order first named."""
    read: dict[Path, tuple[Any, SweepCost]] = {}  # each sweep's tabulated runs, read once
    compared: dict[tuple[Path, str, str], list[Difference]] = {}  # each pair's bootstrap once
    for item in (e for claim in claims for e in claim.evidence + claim.small_budget):
        folder = item.sweep.folder
        if folder.path not in read:
            results, configs = read_sweep(folder.path) if folder.results_csv.is_file() else ({}, {})
            costs = run_costs({key: folder.run(*key) for key in results}, configs)
            read[folder.path] = results, SweepCost(item.sweep, costs)
        results, cost = read[folder.path]
        costs = cost.costs
        finished = [key for key in results if key[0] in (item.a, item.b)]
        planned = 2 * len(item.sweep.seeds)
        item.runs = f"{len(finished)} of {planned}"
        rises = [[costs[key]["tail_rise"] for key in finished if key[0] == v] for v in (item.a, item.b)]
        item.rise = max((sum(r) / len(r) for r in rises if r), default=math.nan)
        pair = (folder.path, item.a, item.b)
        if pair not in compared:
            compared[pair] = paired_differences(results, item.a, item.b)
        matching = [d for d in compared[pair] if (d.group, d.cls) == (item.phase, item.cls)]
        item.difference = matching[0] if matching else None
        if len(finished) < planned or item.difference is None:
            item.state = "in progress"
        elif item.rise > CONVERGED_CHANGE:
            item.state = "still rising"
        else:
            item.state = item.difference.verdict
    return [cost for _, cost in read.values()]


def verdict(expect: str | None, evidence: list[Evidence]) -> str:
    """A claim: confirmed, not confirmed or mixed; a question: how many comparisons show a difference
    either way; "in progress" or "still rising" while any comparison is; "" without evidence."""
    states = [e.state for e in evidence]
    for waiting in ("in progress", "still rising"):
        if waiting in states:
            return f"{waiting}: {states.count(waiting)} of {len(states)} comparisons"
    if expect is None:
        return ", ".join(f"{d}: {states.count(d)}" for d in (*DIRECTIONS, "not shown") if d in states)
    shown = states.count(expect)
    return "" if not states else "confirmed" if shown == len(states) else "not confirmed" if shown == 0 else "mixed"


def _table(evidence: list[Evidence]) -> list[str]:
    header = ["sweep", "a − b", "phase", "class", "runs", "seeds", "cases", "n", "a − b", "95 % CI, seeds"]
    rows = []
    for e in evidence:
        cells = e.difference.cells() if e.difference else [""] * 6
        rows.append([e.sweep.name, f"{e.a} − {e.b}", e.phase, e.cls, e.runs, *cells, rise_cell(e.rise), e.state])
    return markdown_table([*header, "95 % CI, cases", "rise", "state"], rows)


def report(claims: list[Claim], sweeps: list[SweepCost]) -> str:
    """The summary table (one row a claim, its verdict on the testbed and at the small budget), then
    every comparison of each claim, then each sweep's cost."""
    summary = [
        [str(i), c.text, c.expect or "(question)", verdict(c.expect, c.evidence), verdict(c.expect, c.small_budget)]
        for i, c in enumerate(claims, 1)
    ]
    lines = markdown_table(["#", "claim or question", "paper", "verdict", "at 8 × 24 steps (3D)"], summary)
    for number, claim in enumerate(claims, 1):
        lines += [f"### {number}. {claim.text}", "", *_table(claim.evidence)]
        if claim.small_budget:
            lines += ["At 8 × 24 steps (3D):", "", *_table(claim.small_budget)]
    lines += [
        "### What each sweep cost",
        "",
        "Wall time of the runs in each sweep's tables (training, validation and test), summed; a run a "
        "sweep shares with another (copied, not trained again) counts in both.",
        "",
    ]
    header = ["sweep", "runs", "hours, summed", "longest run, min", "device, precision"]
    lines += markdown_table(header, [cost.row() for cost in sweeps])
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("claims", type=Path, help="claims YAML (experiments/claims.yaml)")
    parser.add_argument("--output", type=Path, required=True, help="markdown file to write")
    args = parser.parse_args(argv)
    try:  # a bad claims or sweep file, or a damaged run record, is named; nothing is written
        claims = read_claims(args.claims)
        sweeps = weigh(claims)
    except UserInputError as err:
        print(f"verdicts: error: {err}", file=sys.stderr)
        return 2
    command = shlex.join(["python", "experiments/verdicts.py", *(argv if argv is not None else sys.argv[1:])])
    atomic_write_text(args.output, f"Written by `{command}`.\n\n{report(claims, sweeps)}")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
