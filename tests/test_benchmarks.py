"""The benchmark scripts stay runnable: they import what they use and parse their arguments (run in
this process as `python SCRIPT --help` runs them), and the round-time benchmark splits a real round."""

from __future__ import annotations

import runpy
import subprocess
import sys

import pytest

from tests.helpers.runs import REPO


@pytest.mark.parametrize("script", sorted((REPO / "benchmarks").glob("[!_]*.py")), ids=lambda p: p.name)
def test_benchmark_script_starts(script, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", [str(script), "--help"])
    monkeypatch.syspath_prepend(str(script.parent))  # as `python benchmarks/x.py` puts its folder first
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(script), run_name="__main__")
    assert done.value.code == 0 and capsys.readouterr().out.startswith("usage:")


def test_gpu_check_script_parses():
    result = subprocess.run(["bash", "-n", str(REPO / "benchmarks" / "gpu_check.sh")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.slow
def test_round_time_benchmark_splits_a_round(cli, data_home):
    result = cli.python(
        "benchmarks/round_time.py", "--config", "configs/smoke.yaml", "logger.wandb.mode=disabled", "fl.local_steps=1"
    )
    assert result.returncode == 0, result.stderr[-2000:]
    rows = {
        line[:32].strip(): float(line[32:41])
        for line in result.stdout.splitlines()
        if line[:32].strip() in ("local steps", "validation", "checkpoint", "round")
    }
    assert set(rows) == {"local steps", "validation", "checkpoint", "round"}
    assert 0 < rows["local steps"] < rows["round"] and rows["validation"] > 0
    assert "loop overhead / local steps" in result.stdout


@pytest.mark.parametrize("figures", sorted((REPO / "benchmarks" / "figures").glob("*.json")), ids=lambda p: p.stem)
def test_the_written_tables_are_the_recorded_figures(figures, monkeypatch):
    """Each table a script writes into benchmarks/README.md shows the rows it recorded, and nothing typed by hand."""
    import json

    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    from _timing import README, block, table_markdown

    written = block(figures.stem).search(README.read_text())
    assert written is not None, f"benchmarks/README.md has no '{figures.stem}' block"
    assert written.group(2) == table_markdown(json.loads(figures.read_text()))
