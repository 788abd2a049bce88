"""What a run's scores say, computed once (`results.py`): the tables of fake finished runs (mean ±
std over seeds, standalone cross-site, paired bootstrap differences), the end-of-run summary, and
the committed experiments' tables rebuilt from their committed run folders."""

from __future__ import annotations

import csv
import io
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from lightning_fl import results
from lightning_fl.results import bootstrap_mean, paired_differences, seed_interval
from lightning_fl.run_folder import CaseRow, ResultsError, RunFolder, SweepFolder, read_cases
from lightning_fl.sweep_plan import load_sweep
from tests.helpers.runs import SMOKE, assert_reads_as_format_2
from tests.helpers.sweeps import RESULTS, summary, write_sweep


def _sweep_for_tables(tmp_path: Path):
    return load_sweep(
        write_sweep(
            tmp_path,
            SMOKE,
            seeds=[0, 1],
            variants={"a": [], "b": [], "solo": []},
            comparisons=[["a", "b"], ["solo", "a"]],
        )
    )


def test_results_csv_has_a_row_per_run_phase_model_site_and_class():
    rows = list(csv.DictReader(io.StringIO(results.results_csv(RESULTS))))
    assert list(rows[0]) == ["variant", "seed", "phase", "model", "site", "class", "dice", "cases"]
    first = [
        (r["phase"], r["site"], r["class"], float(r["dice"]), int(r["cases"]))
        for r in rows
        if (r["variant"], r["seed"]) == ("a", "1")
    ]
    assert first == [
        ("test", "liver", "liver", pytest.approx(0.75), 2),
        ("test", "liver", "liver_tumor", 0.5, 1),
        ("test", "spleen", "spleen", 0.9, 1),
        ("external", "ext", "liver", 0.7, 1),
        ("external", "ext", "spleen", pytest.approx(0.6), 1),
    ]
    assert len(rows) == 2 * 5 + 2 * 5 + 2 * 8


def test_results_md_gives_mean_and_std_over_seeds_and_a_cross_site_table(tmp_path):
    md = results.results_markdown(
        _sweep_for_tables(tmp_path), RESULTS, ["solo/seed2 (not finished)"], "lightning-fl sweep x"
    )
    assert (
        "- seeds: 0, 1" in md and "- command: `lightning-fl sweep x`" in md and "not: solo/seed2 (not finished)" in md
    )
    test = md[md.index("## Test") : md.index("## external: ext")]
    # a: liver 0.7 and 0.75 (mean over cases), std 0.035; solo: the liver model on the liver site alone
    assert "| liver | 0.725 ± 0.035 | 0.625 ± 0.035 | 0.800 ± 0.000 |" in test
    assert "| liver_tumor | 0.500 ± 0.000 | 0.400 ± 0.000 | n/a |" in test
    assert "| spleen | 0.900 ± 0.000 | 0.800 ± 0.000 | 0.900 ± 0.000 |" in test
    mean_a = [np.mean([0.7, 0.5, 0.9]), np.mean([0.75, 0.5, 0.9])]
    assert f"| mean | {np.mean(mean_a):.3f} ± {np.std(mean_a, ddof=1):.3f} |" in test
    external = md[md.index("## external: ext") : md.index("## cross-site")]
    assert "| liver | 0.700 ± 0.000 | 0.600 ± 0.000 | 0.600 ± 0.000 |" in external  # solo: the liver site's model
    assert "| spleen | 0.500 ± 0.141 | 0.400 ± 0.141 | 0.500 ± 0.000 |" in external
    cross = md[md.index("## cross-site: solo") : md.index("## Paired")]
    assert "| model \\ site/class | liver/liver | spleen/spleen |" in cross
    assert "| liver | 0.800 | 0.000 |" in cross and "| spleen | 0.150 | 0.900 |" in cross
    assert "## cross-site: a" not in md
    one_seed = results.results_markdown(_sweep_for_tables(tmp_path), {("a", 0): RESULTS[("a", 0)]}, [], "")
    assert "| liver | 0.700 | n/a | n/a |" in one_seed


def test_results_md_says_what_each_variant_cost_where_it_ran_and_whether_it_converged(tmp_path):
    """The last-quarter change of each seed's mean validation Dice, the largest over the seeds, and
    the same over the organs and over the tumours alone: which of them still moves; and the rise over
    those rounds, mean over the seeds: whether it still climbs or jitters."""
    sweep = _sweep_for_tables(tmp_path)
    # mean organ validation Dice of rounds 1-8 (liver and spleen, ± 0.1 about it); the last quarter is rounds 6-8
    curves = {
        ("a", 0): [0.1, 0.3, 0.5, 0.6, 0.70, 0.700, 0.705, 0.702],  # organs move 0.005
        ("a", 1): [0.1, 0.3, 0.5, 0.6, 0.65, 0.680, 0.700, 0.730],  # organs move 0.050: still rising
        ("b", 0): [0.1, 0.2, 0.3, 0.4, 0.50, 0.500, 0.500, 0.500],  # organs still, the tumour moves
    }
    tumour = {("b", 0): {7: 0.39}}  # the liver tumour's Dice is 0.3 in every other round
    for (variant, seed), wall in zip(curves, (600.0, 720.0, 300.0)):
        folder = sweep.output_dir / "runs" / variant / f"seed{seed}"
        folder.mkdir(parents=True)
        (folder / "config.yaml").write_text("defaults: [smoke]\n")  # its label space names the tumours
        (folder / "summary.json").write_text(
            json.dumps(
                summary(
                    rounds=8,
                    wall_time_s=wall,
                    round_time_s=[10.0, 20.0],
                    device="AMD EPYC, 2 cores",
                    precision="32-true",
                )
            )
        )
        rows = [
            f"{r},validation,s,global,{cls},{dice}"
            for r, organs in enumerate(curves[(variant, seed)], 1)
            for cls, dice in (
                ("liver", organs + 0.1),
                ("spleen", organs - 0.1),
                ("liver_tumor", tumour.get((variant, seed), {}).get(r, 0.3)),
            )
        ]
        (folder / "metrics.csv").write_text("\n".join(["round,phase,site,model,class,dice", *rows]) + "\n")
    runs = {(v, s): sweep.folder.run(v, s) for v in ("a", "b") for s in (0, 1)}
    configs = {v: sweep.folder.run(v, 0).read_config() for v in ("a", "b")}
    md = results.results_markdown(sweep, RESULTS, [], "", results.run_costs(runs, configs))
    time_table = md[md.index("## Time and convergence") :]
    # all three classes: two thirds of the organs' move (a), a third of the tumour's (b)
    # the rise, mean over seeds: a climbs (2 × 0.002 / 3 and 2 × 0.050 / 3), b's tumour only jitters
    device = "AMD EPYC, 2 cores, 32-true"
    assert f"| a | 2 | 11.0 | 15.0 | 0.033 | 0.050 | 0.000 | +0.017 | 1 of 2 | {device} |" in time_table
    assert f"| b | 1 | 5.0 | 15.0 | 0.030 | 0.000 | 0.090 | +0.000 | 0 of 1 | {device} |" in time_table


def test_a_rise_is_signed_or_n_a_where_too_few_rounds_were_validated():
    """A 12-round run validated every 4th round has one validated round in its last quarter: no rise."""
    assert (results.rise_cell(0.0123), results.rise_cell(-0.0004), results.rise_cell(math.nan)) == (
        "+0.012",
        "+0.000",
        "n/a",
    )


def test_paired_differences_are_over_the_cases_both_scored():
    diffs = {(d.group, d.cls): d for d in paired_differences(RESULTS, "a", "b")}
    assert list(diffs) == [
        ("test", "liver"),
        ("test", "liver_tumor"),
        ("test", "spleen"),
        ("test", "all classes"),
        ("external: ext", "liver"),
        ("external: ext", "spleen"),
        ("external: ext", "all classes"),
    ]
    liver = diffs[("test", "liver")]
    assert (liver.n, liver.seeds, liver.cases) == (4, 2, 2)  # c1 and c2 in two seeds; c1's absent tumour is no pair
    for d in diffs.values():  # a constant shift: no spread over seeds or cases
        assert d.mean == pytest.approx(0.1) and d.verdict == "> 0"
        assert (d.seed_low, d.seed_high, d.case_low, d.case_high) == pytest.approx((0.1,) * 4)
    assert diffs[("test", "all classes")].n == 8
    solo = {(d.group, d.cls): d for d in paired_differences(RESULTS, "solo", "a")}
    assert solo[("test", "liver")].n == 2  # the standalone liver site's own model, on c1 only
    assert solo[("test", "liver")].mean == pytest.approx(np.mean([0.8 - 0.8, 0.8 - 0.9]))
    assert solo[("external: ext", "spleen")].mean == pytest.approx(np.mean([0.5 - 0.4, 0.5 - 0.6]))


def _planted(seed_effects: tuple[float, ...], cases: int = 20) -> dict:
    """x − y = the seed's effect plus noise of sd 0.01 per case, on `cases` test cases of one class."""
    rng = np.random.default_rng(3)
    results = {}
    for seed, effect in enumerate(seed_effects):
        results[("y", seed)] = [CaseRow("test", "global", "s", f"c{i}", "liver", 0.5) for i in range(cases)]
        noise = rng.normal(0.0, 0.01, size=cases)
        results[("x", seed)] = [
            CaseRow("test", "global", "s", f"c{i}", "liver", 0.5 + effect + noise[i]) for i in range(cases)
        ]
    return results


def test_a_seed_effect_widens_the_interval_and_withholds_the_verdict():
    """The same cases, each seed's model shifted by its own amount: resampling cases alone sees only
    the case noise and excludes 0; the interval over seeds covers the seeds' spread and includes it."""
    planted = {d.cls: d for d in paired_differences(_planted((0.10, -0.05, 0.02)), "x", "y")}["liver"]
    assert (planted.seeds, planted.cases, planted.n) == (3, 20, 60)
    assert planted.case_low > 0  # cases alone would call it a gain
    assert planted.seed_low < 0 < planted.seed_high and planted.verdict == "not shown"
    assert planted.seed_high - planted.seed_low > 10 * (planted.case_high - planted.case_low)
    low, high = seed_interval([0.10, -0.05, 0.02])  # t with 2 degrees of freedom: 4.303 × sd / √3
    assert (high - low) / 2 == pytest.approx(4.303 * np.std([0.10, -0.05, 0.02], ddof=1) / np.sqrt(3), rel=1e-3)
    steady = {d.cls: d for d in paired_differences(_planted((0.02, 0.02, 0.02)), "x", "y")}["liver"]
    assert 0 < steady.seed_low < 0.02 < steady.seed_high and steady.verdict == "> 0"
    one_seed = {d.cls: d for d in paired_differences(_planted((0.02,)), "x", "y")}["liver"]
    assert np.isnan(one_seed.seed_low) and one_seed.case_low > 0 and one_seed.verdict == "not shown"


def test_the_bootstrap_interval():
    rng = np.random.default_rng(1)
    values = rng.normal(0.05, 0.1, size=40)
    assert bootstrap_mean(np.zeros(30)) == (0.0, 0.0, 0.0)  # identical scores
    mean, low, high = bootstrap_mean(np.full(30, 0.25))  # a constant shift
    assert mean == pytest.approx(0.25) and low == pytest.approx(0.25) and high == pytest.approx(0.25)
    mean, low, high = bootstrap_mean(values)
    assert low < mean < high and mean == pytest.approx(values.mean())
    assert high - low == pytest.approx(2 * 1.96 * values.std(ddof=1) / np.sqrt(len(values)), rel=0.15)
    assert bootstrap_mean(values) == (mean, low, high)  # reproducible
    assert bootstrap_mean(values, seed=2) != (mean, low, high)
    # cases resampled whole: each value twice in its own case gives the same interval as once
    assert bootstrap_mean(np.repeat(values, 2), clusters=np.repeat(np.arange(40), 2)) == pytest.approx(
        (mean, low, high)
    )
    assert bootstrap_mean([0.3]) == pytest.approx((0.3, 0.3, 0.3))


def test_a_malformed_test_cases_file_is_named(tmp_path):
    path = tmp_path / "test_cases.csv"
    path.write_text("phase,model\ntest,global\n")
    with pytest.raises(ResultsError, match=f"{path}: expected the columns phase,model,site,case,class,dice"):
        read_cases(path)
    RunFolder(tmp_path).write_cases([CaseRow("test", "global", "liver", "c1", "liver", 0.5)])
    path.write_text(path.read_text() + "test,global,liver,c2,liver,high\n")
    with pytest.raises(ResultsError, match=f"{path}: line 3: dice 'high' is not a number"):
        read_cases(path)
    with pytest.raises(ResultsError, match="test_cases.csv not found: the run's per-case test scores"):
        RunFolder(tmp_path / "none").read_cases()


def test_a_runs_summary_takes_each_models_headline_rows():
    federated = results.test_summary(RESULTS[("a", 1)], ["background", "liver", "liver_tumor", "spleen"], ["ext"])
    assert federated["test_dice"] == pytest.approx({"liver": 0.75, "liver_tumor": 0.5, "spleen": 0.9})
    assert federated["external_dice"] == {"ext": pytest.approx({"liver": 0.7, "spleen": 0.6})}
    assert "cross_site" not in federated
    solo = results.test_summary(RESULTS[("solo", 1)], ["background", "liver", "spleen"], ["ext"])
    assert solo["test_dice"] == {"liver": 0.8, "spleen": 0.9}  # each site's own model on its own site
    assert solo["external_dice"] == {"ext": {"liver": 0.6, "spleen": 0.5}}  # the organ by the model of its site
    assert solo["cross_site"]["spleen"] == {
        "liver": {"liver": pytest.approx(0.2)},
        "spleen": {"spleen": 0.9},
        "ext": {"liver": 0.02, "spleen": 0.5},
    }
    table = results.summary_table(solo | {"best_round": {"liver": 2, "spleen": 1}})
    assert "liver (round 2)" in table and "spleen (round 1)" in table


COMMITTED = Path(__file__).resolve().parent.parent / "experiments"


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(p.parent.name for p in (COMMITTED / "results").glob("*/results.md")), ids=str)
def test_the_committed_sweep_tables_are_what_this_version_makes_of_the_committed_runs(
    name, tmp_path, capsys, monkeypatch
):
    """`sweep --tables-only` on a copy of the committed results folder rewrites results.csv as it is
    committed and results.md but for the date it was written. (The runs generated their data in the
    default data home, as a user's sweep does: the session's is not theirs.)"""
    monkeypatch.delenv("LIGHTNING_FL_DATA")
    import dataclasses
    import shutil

    from lightning_fl.sweep import run_sweep

    committed = COMMITTED / "results" / name
    copy = Path(shutil.copytree(committed, tmp_path / name))
    sweep = dataclasses.replace(load_sweep(COMMITTED / f"{name}.yaml"), output_dir=copy)
    (command,) = re.findall(r"^- command: `(.*)`$", (committed / "results.md").read_text(), re.MULTILINE)
    run_sweep(sweep, tables_only=True, command=command)
    assert (copy / "results.csv").read_text() == (committed / "results.csv").read_text()

    def undated(path: Path) -> list[str]:
        return [line for line in path.read_text().splitlines() if not line.startswith("- date: ")]

    assert undated(copy / "results.md") == undated(committed / "results.md")
    for folder in SweepFolder(committed).runs().values():  # written before rounds were numbered from 1
        assert_reads_as_format_2(folder)
