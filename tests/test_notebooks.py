"""The notebooks run top to bottom on the folders of a real smoke sweep (the session's federated and
standalone runs) and save every plot they show: a failing cell or a missing plot fails the test."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from lightning_fl.checkpoint import atomic_write_text
from lightning_fl.results import results_csv
from lightning_fl.run_folder import COMPARISON_PLOT, DICE_PLOT, FINAL_PLOT, FREQUENCY_PLOT, LOSS_PLOT, SweepFolder
from tests.helpers.images import assert_image
from tests.helpers.runs import REPO

pytestmark = pytest.mark.slow  # two kernels: about half a minute on 2 shared cores


@pytest.fixture(scope="module")
def smoke_sweep(smoke_run: Path, standalone_run, tmp_path_factory) -> Path:
    """A sweep's results folder of 2 variants × 1 seed: the session's smoke run as `condistfl` and its
    standalone run (no run to pay for), with the results.csv the sweep writes."""
    folder = SweepFolder(tmp_path_factory.mktemp("smoke_sweep"))
    shutil.copytree(smoke_run, folder.run("condistfl", 0).path)
    shutil.copytree(standalone_run.folder, folder.run("standalone", 0).path)
    cases = {key: run.read_cases() for key, run in folder.runs().items()}
    atomic_write_text(folder.results_csv, results_csv(cases))
    return folder.path


def _execute(name: str, monkeypatch: pytest.MonkeyPatch, **env: str) -> nbformat.NotebookNode:
    """The notebook executed in a kernel with `env` set; nbclient raises on the first failing cell."""
    notebook = nbformat.read(REPO / "notebooks" / name, as_version=4)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(REPO / "notebooks")}}
    ).execute()
    return notebook


def _text(notebook: nbformat.NotebookNode) -> str:
    return "".join(o.get("text", "") for c in notebook.cells if c.cell_type == "code" for o in c.outputs)


def test_the_analysis_notebook_plots_each_of_several_runs(smoke_sweep, monkeypatch, tmp_path):
    runs = os.pathsep.join(str(smoke_sweep / "runs" / v / "seed0") for v in ("condistfl", "standalone"))
    notebook = _execute("analysis.ipynb", monkeypatch, LIGHTNING_FL_RUN=runs, LIGHTNING_FL_FIGURES=str(tmp_path))
    text = _text(notebook)
    assert "federated, 2 rounds × 2 local steps" in text and "standalone, 2 rounds × 1 local steps" in text
    expected = {f"run{i}_{p}" for i in (0, 1) for p in (DICE_PLOT, FINAL_PLOT, LOSS_PLOT)}
    assert {p.name for p in tmp_path.iterdir()} == expected
    for name in expected:
        assert_image(tmp_path / name)
    images = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) == len(expected) + 2  # and each run's overlays.png


def test_the_sweep_notebook_shows_the_table_curves_heatmap_and_frequency(smoke_sweep, monkeypatch, tmp_path):
    notebook = _execute(
        "sweep.ipynb", monkeypatch, LIGHTNING_FL_SWEEP=str(smoke_sweep), LIGHTNING_FL_FIGURES=str(tmp_path)
    )
    sweeps, verdicts, table = (notebook.cells[i].outputs[0]["data"] for i in (1, 2, 4))
    committed = sorted(p.parent.name for p in (REPO / "experiments" / "results").glob("*/results.csv"))
    assert committed and all(name in sweeps["text/plain"] for name in committed)  # every committed sweep listed
    assert verdicts["text/markdown"] == (REPO / "experiments" / "results" / "verdicts.md").read_text()
    assert "condistfl" in table["text/plain"] and "standalone" in table["text/plain"] and "mean" in table["text/plain"]
    # the variants differ in local steps (2 and 1), so the frequency curve is drawn too
    expected = {COMPARISON_PLOT, "validation_dice.png", "cross_site_standalone.png", FREQUENCY_PLOT}
    assert {p.name for p in tmp_path.iterdir()} == expected
    for name in expected:
        assert_image(tmp_path / name)
