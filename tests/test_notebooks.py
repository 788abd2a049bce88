"""The analysis notebook runs top to bottom on a real run's outputs and draws its plots."""

from __future__ import annotations

import nbformat
from conftest import REPO
from nbclient import NotebookClient


def test_analysis_notebook_runs_on_a_real_run(smoke_run, monkeypatch):
    notebook = nbformat.read(REPO / "notebooks" / "analysis.ipynb", as_version=4)
    monkeypatch.setenv("LIGHTNING_FL_RUN", str(smoke_run))
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend draws the figures
    NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(REPO / "notebooks")}}
    ).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 3
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "2 rounds × 2 local steps" in text
