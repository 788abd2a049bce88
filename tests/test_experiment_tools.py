"""The experiment scripts that read finished runs outside a sweep: experiments/compare_runs.py (a
table of probe runs) and experiments/organ_confusion.py (where a model's organ errors go), on the
session's smoke runs; experiments/verdicts.py (each claim against its sweeps) on a sweep of planted
effects."""

from __future__ import annotations

import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from lightning_fl.data.datasets import read_datalist
from lightning_fl.labels import LabelSpace
from lightning_fl.results import results_csv
from lightning_fl.run_folder import CaseRow, RunFolder
from lightning_fl.sweep_plan import load_sweep
from tests.helpers.runs import REPO, SMOKE, experiment_script
from tests.helpers.sweeps import summary, write_sweep


def test_compare_runs_tabulates_each_run_and_what_it_changed_and_refuses_an_unfinished_folder(
    cli, smoke_run, reference_fit, tmp_path
):
    out = tmp_path / "compared.md"
    result = cli.python("experiments/compare_runs.py", "--output", out, f"smoke={smoke_run}", f"exact={reference_fit}")
    assert result.returncode == 0, result.stderr
    text = out.read_text()
    first, second = (RunFolder(run).read_summary() for run in (smoke_run, reference_fit))
    scored = [name for name, dice in first["test_dice"].items() if None not in (dice, second["test_dice"][name])]
    assert scored
    for name in scored:
        assert f"| {name} | {first['test_dice'][name]:.3f} | {second['test_dice'][name]:.3f} |" in text
    assert f"| best round | {first['best_round']} of 2 | {second['best_round']} of 2 |" in text
    assert "- exact: " in text and "`logger.wandb.mode=disabled`" in text  # what the second run changed

    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    script = "experiments/compare_runs.py"
    refused = cli.python(script, "--output", tmp_path / "x.md", f"a={smoke_run}", f"b={unfinished}")
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1 and str(unfinished) in refused.stderr
    assert not (tmp_path / "x.md").exists()


def test_organ_confusion_draws_each_test_case_again_exactly_as_its_site_labelled_it(cli, smoke_run, tmp_path):
    """Each organ's voxel count in the table is its count in the site's written test label maps:
    the phantoms drawn again from their seeds are the ones on disk; the misses and false voxels
    are counted once each."""
    result = cli.python("experiments/organ_confusion.py", smoke_run / "best.ckpt", "--output", tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    table = (tmp_path / "organ_confusion.md").read_text()
    cfg = RunFolder(smoke_run).read_config()
    labels = LabelSpace.of(cfg.labels)
    row = re.compile(r"^\| (\w+) \| (\d+) \| (\d+) % \| .*? \| (\d+) \| .*? \| (\d+) \|$", re.M)
    rows = {m[0]: m[1:] for m in row.findall(table)}
    written: dict[str, int] = {}
    for site in cfg.data.sites:
        for item in read_datalist(Path(cfg.data.root).expanduser() / site.datalist)["testing"]:
            label = np.asarray(nib.load(item["label"]).dataobj)
            for organ in set(site.classes) & set(rows):
                written[organ] = written.get(organ, 0) + int(np.count_nonzero(label == labels.index(organ)))
    assert set(rows) == {"liver", "spleen", "pancreas", "kidney"} and written
    for organ, (voxels, _, missed, _) in rows.items():
        assert int(voxels) == written[organ] and 0 <= int(missed) <= int(voxels)


# each variant's per-seed shift of every case's Dice against `ref` (seeds 0-2)
SHIFTS = {"ref": (0.0, 0.0, 0.0), "steady": (0.02, 0.02, 0.02), "spread": (0.10, -0.05, 0.02), "rising": (0.05,) * 3}


def _planted_sweep(tmp_path: Path) -> Path:
    """A sweep of 3 seeds whose runs' test Dice are planted (`SHIFTS` on 20 cases with noise of sd
    0.01) and whose validation curves plateau, except `rising`'s, which climbs 0.01 a round from
    round 5 of 8; `late` has finished seed 0 only; seed s took s + 1 minutes. Its results.csv
    tabulates them."""
    variants = {name: [] for name in (*SHIFTS, "late")}
    path = write_sweep(tmp_path, SMOKE, seeds=[0, 1, 2], variants=variants)
    folder, rng, planted = load_sweep(path).folder, np.random.default_rng(5), {}
    for variant, seed in [(v, s) for v in SHIFTS for s in range(3)] + [("late", 0)]:
        run = folder.run(variant, seed)
        run.path.mkdir(parents=True)
        run.config.write_text("defaults: [smoke]\n")
        run.summary.write_text(json.dumps(summary(rounds=8, wall_time_s=60.0 * (seed + 1))))
        shift = SHIFTS.get(variant, (0.0,))[seed]
        dice = 0.5 + shift + (rng.normal(0.0, 0.01, 20) if variant != "ref" else np.zeros(20))
        planted[(variant, seed)] = [CaseRow("test", "global", "liver", f"c{i}", "liver", d) for i, d in enumerate(dice)]
        run.write_cases(planted[(variant, seed)])
        climb = 0.01 if variant == "rising" else 0.0
        curve = [f"{r},validation,liver,global,liver,{0.5 + climb * max(0, r - 5)}" for r in range(1, 9)]
        run.metrics.write_text("\n".join(["round,phase,site,model,class,dice", *curve]) + "\n")
    folder.results_csv.write_text(results_csv(planted))
    return path


def test_verdicts_weigh_each_claim_by_its_comparisons_and_withhold_them_until_converged(tmp_path, capsys):
    """A planted steady gain confirms its claim (its small-budget comparisons are read apart); a gain
    that one seed reverses is not shown, so a claim resting on both is mixed; the wrong direction is
    not confirmed; a comparison with a variant still climbing or with runs missing gives no answer;
    the sweep's cost sums its finished runs' wall times."""
    verdicts = experiment_script("verdicts")
    sweep = _planted_sweep(tmp_path)
    evidence = lambda a, b="ref": {"sweep": str(sweep), "compare": [a, b], "phase": "test"}  # noqa: E731
    claims = [
        {
            "claim": "steady gains",
            "expect": "> 0",
            "evidence": [evidence("steady")],
            "small_budget": [evidence("spread")],
        },
        {"claim": "every gain", "expect": "> 0", "evidence": [evidence("steady"), evidence("spread")]},
        {"claim": "steady loses", "expect": "< 0", "evidence": [evidence("steady")]},
        {"question": "which gains?", "evidence": [evidence("steady"), evidence("spread")]},
        {"question": "still climbing?", "evidence": [evidence("rising")]},
        {"question": "unfinished?", "evidence": [evidence("late")]},
    ]
    claims_file, out = tmp_path / "claims.yaml", tmp_path / "verdicts.md"
    claims_file.write_text(json.dumps({"claims": claims}))
    assert verdicts.main([str(claims_file), "--output", str(out)]) == 0
    rows = dict(re.findall(r"^\| \d \| ([^|]+?) \| [^|]+ \| ([^|]+?) \| [^|]* \|$", out.read_text(), re.M))
    assert rows == {
        "steady gains": "confirmed",  # its small-budget comparison does not enter the verdict
        "every gain": "mixed",
        "steady loses": "not confirmed",
        "which gains?": "> 0: 1, not shown: 1",
        "still climbing?": "still rising: 1 of 1 comparisons",
        "unfinished?": "in progress: 1 of 1 comparisons",
    }
    text = out.read_text()
    assert "| steady gains | > 0 | confirmed | not confirmed |" in text  # the small budget in its own column
    steady = re.search(r"\| steady − ref \| test \| all classes \| 6 of 6 \| 3 \| 20 \| 60 \| ([-+.\d]+) \|", text)
    assert abs(float(steady[1]) - 0.02) < 0.005
    # the last quarter of rising's curve: rounds 6-8, 0.51 to 0.53
    assert re.search(r"\| rising − ref \| .* \| \+0\.020 \| still rising \|", text)
    assert "| late − ref | test | all classes | 4 of 6 | 1 |" in text
    # the sweep's cost: 13 of its 15 runs, 4 × (1 + 2 + 3) + 1 minutes = 0.42 h, the longest 3 minutes
    assert re.search(r"^\| \S+ \| 13 of 15 \| 0\.4 \| 3\.0 \| cpu, 32-true \|$", text, re.M)

    claims_file.write_text(json.dumps({"claims": [{"claim": "no direction", "evidence": [evidence("steady")]}]}))
    out.unlink()
    assert verdicts.main([str(claims_file), "--output", str(out)]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "claims[1]" in error and "expect" in error and not out.exists()


@pytest.mark.slow
def test_the_committed_verdicts_are_what_the_script_makes_of_the_committed_sweeps(tmp_path, monkeypatch):
    """experiments/results/verdicts.md is the script's reading of the committed sweep tables: no
    verdict in the docs is typed by hand or left behind by a sweep's later runs."""
    monkeypatch.chdir(REPO)  # the claims and sweep files name their paths from the repository root
    committed = REPO / "experiments" / "results" / "verdicts.md"
    (command,) = re.findall(r"^Written by `python experiments/verdicts.py (.*)`\.$", committed.read_text(), re.M)
    claims, _, output = command.split()
    out = tmp_path / "verdicts.md"
    assert experiment_script("verdicts").main([claims, "--output", str(out)]) == 0
    assert out.read_text().replace(str(out), output) == committed.read_text()
