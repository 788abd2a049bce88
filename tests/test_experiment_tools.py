"""The experiment scripts that read finished runs outside a sweep: experiments/compare_runs.py (a
table of probe runs) and experiments/organ_confusion.py (where a model's organ errors go), on the
session's smoke runs."""

from __future__ import annotations

import re
from pathlib import Path

import nibabel as nib
import numpy as np

from lightning_fl.data.datasets import read_datalist
from lightning_fl.labels import LabelSpace
from lightning_fl.run_folder import RunFolder


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
