"""The notebooks run top to bottom on the folders of a real smoke sweep (a federated and a standalone
run) and save every plot they show: a failing cell or a missing plot fails the test."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import nbformat
import pytest
from conftest import REPO
from nbclient import NotebookClient
from test_analysis import _assert_image

from lightning_fl import analysis
from lightning_fl.checkpoint import atomic_write_text
from lightning_fl.scores import CASES_FILE, read_test_cases
from lightning_fl.sweep import results_csv

pytestmark = pytest.mark.slow  # a standalone run and two kernels: about a minute on 2 shared cores


@pytest.fixture(scope="module")
def smoke_sweep(cli, data_home: Path, smoke_config_path: Path, smoke_run: Path, tmp_path_factory) -> Path:
    """A sweep's results folder of 2 variants × 1 seed: the session's smoke run as `condistfl`
    (no second federated run to pay for) and a standalone run, with the results.csv the sweep writes."""
    folder = tmp_path_factory.mktemp("smoke_sweep")
    shutil.copytree(smoke_run, folder / "runs" / "condistfl" / "seed0")
    standalone = folder / "runs" / "standalone" / "seed0"
    result = cli(
        "fit",
        "--config",
        str(smoke_config_path),
        "method=standalone",
        "fl.local_steps=1",
        f"output_dir={standalone}",
        data_home=data_home,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    cases = {key: read_test_cases(run / CASES_FILE) for key, run in analysis.sweep_run_folders(folder).items()}
    atomic_write_text(folder / analysis.RESULTS_FILE, results_csv(cases))
    return folder


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
    expected = {f"run{i}_{p}" for i in (0, 1) for p in (analysis.DICE_PLOT, analysis.FINAL_PLOT, analysis.LOSS_PLOT)}
    assert {p.name for p in tmp_path.iterdir()} == expected
    for name in expected:
        _assert_image(tmp_path / name)
    images = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) == len(expected) + 2  # and each run's overlays.png


def test_the_sweep_notebook_shows_the_table_curves_heatmap_and_frequency(smoke_sweep, monkeypatch, tmp_path):
    notebook = _execute(
        "sweep.ipynb", monkeypatch, LIGHTNING_FL_SWEEP=str(smoke_sweep), LIGHTNING_FL_FIGURES=str(tmp_path)
    )
    table = notebook.cells[1].outputs[0]["data"]["text/plain"]
    assert "condistfl" in table and "standalone" in table and "mean" in table
    # the variants differ in local steps (2 and 1), so the frequency curve is drawn too
    expected = {analysis.COMPARISON_PLOT, "validation_dice.png", "cross_site_standalone.png", analysis.FREQUENCY_PLOT}
    assert {p.name for p in tmp_path.iterdir()} == expected
    for name in expected:
        _assert_image(tmp_path / name)
