"""A run folder belongs to one run: `fit` does not replace a run unless told (`--overwrite` moves it
aside), one process at a time writes a folder (`run.lock`), and `fit --resume` refuses a folder
whose config.yaml or metrics.csv are not those of the run that saved its state.ckpt. Every file
name is `run_folder.py`'s alone, and its readers upgrade folders written before rounds were
numbered from 1, such as the committed experiments."""

from __future__ import annotations

import ast
import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_fl.checkpoint import RunFolderError
from lightning_fl.cli import main
from lightning_fl.config import load_config, to_yaml
from lightning_fl.run_folder import (
    COMPARISON_PLOT,
    DICE_PLOT,
    FINAL_PLOT,
    FREQUENCY_PLOT,
    LOSS_PLOT,
    METRICS_COLUMNS,
    OVERLAY_PLOT,
    ResultsError,
    RunFolder,
    SweepFolder,
)
from tests.helpers.runs import REPO, assert_reads_as_format_2

HOLD_LOCK = """import sys, time
from lightning_fl.run_folder import RunFolder
lock = RunFolder(sys.argv[1]).lock()
print("locked", flush=True)
time.sleep(120)
"""


@pytest.fixture
def run(smoke_run: Path, data_home: Path, tmp_path: Path) -> Path:
    """A copy of the finished 2-round smoke run."""
    return Path(shutil.copytree(smoke_run, tmp_path / "run"))


def _snapshot(folder: Path) -> dict[Path, tuple[bytes, int]]:
    """Every file's bytes and modification time."""
    return {
        p.relative_to(folder): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.rglob("*")) if p.is_file()
    }


def _error(capsys: pytest.CaptureFixture) -> str:
    """The one error line of a refused command."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("lightning-fl fit: error: ")]
    assert len(lines) == 1, err
    return lines[0]


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_fit_refuses_a_folder_that_holds_files(run, smoke_config_path, tmp_path, capsys):
    before = _snapshot(run)
    assert main(["fit", "--config", str(smoke_config_path), f"output_dir={run}"]) == 2
    assert _error(capsys) == (
        f"lightning-fl fit: error: output_dir {run} already holds files; pass --overwrite to move it aside (to "
        f"{run}.replaced-<date-time>) and start a new run there, or fit --resume {run} to continue its run"
    )
    assert _snapshot(run) == before and [p.name for p in tmp_path.iterdir()] == ["run"]

    other = tmp_path / "notes"  # not a run: refused all the same, and nothing is written into it
    other.mkdir()
    (other / "todo.txt").write_text("compare with the paper\n")
    assert main(["fit", "--config", str(smoke_config_path), f"output_dir={other}"]) == 2
    assert f"output_dir {other} already holds files" in _error(capsys)
    assert [p.name for p in other.iterdir()] == ["todo.txt"]

    # --overwrite moves only a run aside: a folder without config.yaml (notes, data, `.`) stays where it is
    assert main(["fit", "--config", str(smoke_config_path), f"output_dir={other}", "--overwrite"]) == 2
    assert _error(capsys) == (
        f"lightning-fl fit: error: output_dir {other} holds files but no config.yaml, so it is not a run folder; "
        "--overwrite moves only a run aside: choose another output_dir"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes", "run"]
    assert [p.name for p in other.iterdir()] == ["todo.txt"]

    assert main(["fit", "--resume", str(run), "--overwrite"]) == 2
    assert "--overwrite starts a new run in place of the old one, --resume continues it" in _error(capsys)


def test_overwrite_moves_the_old_folder_aside_and_deletes_nothing(run, smoke_run, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    lock, aside = RunFolder(empty).claim(overwrite=False)  # an empty folder (or one a lock alone) is free
    assert aside is None
    lock.release()

    lock, aside = RunFolder(run).claim(overwrite=True)
    assert re.fullmatch(r"run\.replaced-\d{8}-\d{6}", aside.name) and aside.parent == run.parent.absolute()
    assert {p.name: p.read_bytes() for p in aside.iterdir() if p.is_file()} == {
        p.name: p.read_bytes() for p in smoke_run.iterdir() if p.is_file()
    }
    assert [p.name for p in run.iterdir()] == ["run.lock"]
    with pytest.raises(RunFolderError, match=f"{re.escape(str(run))} is in use"):
        RunFolder(run).lock()  # the new run's folder is held until the lock is released
    lock.release()

    (run / "config.yaml").write_text("a second run\n")
    lock, second = RunFolder(run).claim(overwrite=True)  # within the same second: another name
    lock.release()
    assert second != aside and (second / "config.yaml").read_text() == "a second run\n"
    assert (aside / "state.ckpt").read_bytes() == (smoke_run / "state.ckpt").read_bytes()


def test_a_folder_in_use_is_refused_at_once(run, smoke_config_path, tmp_path, capsys):
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        assert main(["fit", "--resume", str(run)]) == 2
        assert _error(capsys) == (
            f"lightning-fl fit: error: {run} is in use: another lightning-fl fit is writing the run there (it holds "
            f"{run / 'run.lock'}); wait for it to end, or choose another output_dir"
        )
        assert main(["fit", "--config", str(smoke_config_path), f"output_dir={run}", "--overwrite"]) == 2
        assert f"{run.absolute()} is in use" in _error(capsys)
        assert [p.name for p in tmp_path.iterdir()] == ["run"]  # not moved aside under the running process
    finally:
        holder.kill()
        holder.wait()
    assert main(["fit", "--resume", str(run)]) == 0  # the lock went with its process
    assert "holds a finished run" in capsys.readouterr().out


def test_resume_refuses_a_metrics_file_shorter_than_the_checkpoint_records(run, capsys):
    recorded = torch.load(run / "state.ckpt", weights_only=True)["metrics_bytes"]
    cut = (run / "metrics.csv").read_bytes()[: recorded // 2]
    (run / "metrics.csv").write_bytes(cut)
    assert main(["fit", "--resume", str(run)]) == 2
    assert (
        f"error: {run / 'metrics.csv'} has {len(cut)} bytes, {run / 'state.ckpt'} records {recorded}: "
        "rows of the rounds the checkpoint holds are missing"
    ) in _error(capsys)
    assert (run / "metrics.csv").read_bytes() == cut  # not padded with NUL bytes, not resumed
    assert not (run / "resumes.yaml").exists()
    RunFolder(run).lock().release()  # a refused resume leaves the folder free


def test_resume_refuses_a_folder_that_mixes_two_runs(run, smoke_run, smoke_config_path, capsys):
    state = torch.load(run / "state.ckpt", weights_only=True)
    # a new run started in the old run's folder and killed before its first round ended
    (run / "config.yaml").write_text(to_yaml(load_config(smoke_config_path, [f"output_dir={run}", "fl.rounds=3"])))
    (run / "metrics.csv").write_text(",".join(METRICS_COLUMNS) + "\r\n")
    assert main(["fit", "--resume", str(run)]) == 2
    assert (
        f"error: {run / 'config.yaml'} is not the config of run {state['run_id']}, which saved "
        f"{run / 'state.ckpt'} (their sha256 differ)"
    ) in _error(capsys)

    shutil.copy(smoke_run / "config.yaml", run / "config.yaml")  # the same config run again: metrics.csv differs
    assert main(["fit", "--resume", str(run)]) == 2
    header = len(",".join(METRICS_COLUMNS)) + 2
    assert f"has {header} bytes, {run / 'state.ckpt'} records {state['metrics_bytes']}" in _error(capsys)

    metrics = bytearray((smoke_run / "metrics.csv").read_bytes())
    digit = re.search(rb"0\.\d", bytes(metrics)).start() + 2
    metrics[digit] = ord("9") if metrics[digit] != ord("9") else ord("8")  # one Dice value edited
    (run / "metrics.csv").write_bytes(bytes(metrics))
    assert main(["fit", "--resume", str(run)]) == 2
    assert (
        f"error: {run / 'metrics.csv'}: its first {state['metrics_bytes']} bytes are not the ones "
        f"{run / 'state.ckpt'} records"
    ) in _error(capsys)
    assert not (run / "resumes.yaml").exists()


def test_checkpoints_carry_the_run_identity(smoke_run):
    state, best, last = (
        torch.load(smoke_run / name, weights_only=True) for name in ("state.ckpt", "best.ckpt", "last.ckpt")
    )
    assert re.fullmatch(r"[0-9a-f]{32}", state["run_id"])
    config = (smoke_run / "config.yaml").read_bytes()
    for checkpoint in (state, best, last):
        assert checkpoint["run_id"] == state["run_id"]
        assert checkpoint["config_sha256"] == _sha256(config)
        assert checkpoint["seed"] == load_config(smoke_run / "config.yaml").seed
    assert state["metrics_sha256"] == _sha256((smoke_run / "metrics.csv").read_bytes()[: state["metrics_bytes"]])


def test_resume_refuses_a_checkpoint_without_a_run_identity(run, capsys):
    state = torch.load(run / "state.ckpt", weights_only=True)
    for key in ("run_id", "config_sha256", "seed", "metrics_sha256"):  # as written before runs had one
        del state[key]
    torch.save(state, run / "state.ckpt")
    assert main(["fit", "--resume", str(run)]) == 2
    assert (
        f"error: {run / 'state.ckpt'} was written by an older lightning-fl that did not record which run it belongs to"
    ) in _error(capsys)


def test_resuming_a_finished_run_changes_nothing(run, capsys):
    before = _snapshot(run)
    for extra in ([], ["--allow-config-change", "eval.overlap=0.5"]):
        assert main(["fit", "--resume", str(run), *extra]) == 0
        out = capsys.readouterr().out
        assert out == (
            f"{run} holds a finished run (round 2 of 2 trained, then tested: summary.json); nothing to do. "
            f"To train more rounds: fit --resume {run} --allow-config-change fl.rounds=N\n"
        )
        assert _snapshot(run) == before


def test_summary_json_is_written_after_the_plots(smoke_run):
    """summary.json marks a finished run: written after the plots, a run that fails to draw them is
    cut off, and its resume tests and draws again (a finished run's resume changes nothing)."""
    finished = (smoke_run / "summary.json").stat().st_mtime_ns
    plots = [smoke_run / name for name in (DICE_PLOT, FINAL_PLOT, LOSS_PLOT)]
    assert all(plot.stat().st_mtime_ns <= finished for plot in plots)


def test_each_run_folder_file_is_named_in_run_folder_py_alone():
    """One home per name: no string in the package's code outside run_folder.py (docstrings aside)
    holds the name of a run or sweep folder's file; paths and messages take it from run_folder."""
    names = [*RunFolder.RECORD, RunFolder.STATE, RunFolder.LOCK, RunFolder.RESUMES, "best.ckpt", "last.ckpt"]
    names += [SweepFolder.RESULTS_CSV, SweepFolder.RESULTS_MD, DICE_PLOT, FINAL_PLOT, LOSS_PLOT, OVERLAY_PLOT]
    names += [COMPARISON_PLOT, FREQUENCY_PLOT]
    found = []
    for path in sorted((REPO / "lightning_fl").rglob("*.py")):
        if path.name == "run_folder.py":
            continue
        tree = ast.parse(path.read_text())
        docstrings = {
            id(node.body[0].value)
            for node in ast.walk(tree)
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef))
            and node.body
            and isinstance(node.body[0], ast.Expr)
        }
        found += [
            f"{path.relative_to(REPO)}:{node.lineno}: {name}"
            for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
            for name in names
            if name in node.value
        ]
    assert not found, found


def _format_1(folder: Path) -> None:
    """Rewrite a run folder as lightning-fl wrote it before rounds were numbered from 1 (and before
    fl.strategy was renamed): metrics.csv's rounds and summary.json's best round counted from 0."""
    text = (folder / "metrics.csv").read_text().splitlines(keepends=True)
    head, rows = text[0], text[1:]
    (folder / "metrics.csv").write_text(
        head + "".join(re.sub(r"^(\d+),", lambda m: f"{int(m[1]) - 1},", r) for r in rows)
    )
    summary = json.loads((folder / "summary.json").read_text())
    del summary["format"]
    summary["best_round"] -= 1
    (folder / "summary.json").write_text(json.dumps(summary))
    (folder / "config.yaml").write_text((folder / "config.yaml").read_text().replace("aggregation:", "strategy:"))
    state = torch.load(folder / "state.ckpt", weights_only=True)
    del state["format"]
    state["round"] -= 1
    for saved in state["models"].values():
        saved["strategy"] = saved.pop("server")
        saved["best"]["round"] -= 1
    torch.save(state, folder / "state.ckpt")


def test_a_folder_written_before_rounds_were_numbered_from_one_reads_as_a_new_one(run, smoke_run):
    _format_1(run)
    old, new = RunFolder(run), RunFolder(smoke_run)
    assert old.read_metrics() == new.read_metrics()
    assert old.read_summary() == {k: v for k, v in new.read_summary().items() if k != "format"}
    assert old.read_config() == load_config(smoke_run / "config.yaml")  # fl.strategy is read as fl.aggregation
    state, expected = old.read_state(), new.read_state()
    assert state["round"] == expected["round"] == 2
    assert [m["best"]["round"] for m in state["models"].values()] == [
        m["best"]["round"] for m in expected["models"].values()
    ]
    assert list(state["models"]["global"]) == ["state", "server", "best"]


def test_the_committed_demo_run_reads_with_this_version():
    """Written before rounds were numbered from 1 (the sweeps' runs: test_results.py), with fl.strategy."""
    demo = RunFolder(REPO / "experiments" / "results" / "demo")
    assert_reads_as_format_2(demo)
    assert demo.read_config().fl.aggregation == "fedopt"


def _cut_mid_number(text: str) -> str:
    """test_cases.csv cut inside its last Dice: 0.020398842 would read as 0.0203."""
    return text[:-4]


DAMAGES = {
    "summary.json truncated": ("summary.json", lambda t: t[: len(t) // 2], "not the JSON lightning-fl writes"),
    "summary.json empty": ("summary.json", lambda t: "", "not the JSON lightning-fl writes"),
    "summary.json a list": ("summary.json", lambda t: "[1, 2]", "expected a JSON object, got list"),
    "summary.json a string for a Dice": (
        "summary.json",
        lambda t: re.sub(r'"test_mean_dice": [^,]+', '"test_mean_dice": "high"', t),
        "'test_mean_dice' is 'high', expected a Dice",
    ),
    "summary.json without rounds": ("summary.json", lambda t: re.sub(r'"rounds": \d+,', "", t), "no 'rounds'"),
    "test_cases.csv cut mid-row": ("test_cases.csv", _cut_mid_number, "its last line is cut short"),
    "test_cases.csv a field missing": (
        "test_cases.csv",
        lambda t: re.sub(r",[0-9.]*\n", "\n", t, count=1),
        "line 2: expected the 6 fields phase,model,site,case,class,dice",
    ),
    "test_cases.csv an unknown class": (
        "test_cases.csv",
        lambda t: re.sub(r",liver,([0-9.]*)\n", r",liver_tumour,\1\n", t, count=1),  # the class, not the site
        "class 'liver_tumour' of case",
    ),
    "test_cases.csv a Dice above 1": ("test_cases.csv", lambda t: re.sub(r",0\.", ",7.", t, count=1), "not in [0, 1]"),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_record_is_refused_naming_the_file_and_the_run_is_not_finished(smoke_run, tmp_path, damage):
    name, change, message = DAMAGES[damage]
    run = tmp_path / "run"
    shutil.copytree(smoke_run, run)
    folder = RunFolder(run)
    assert folder.is_finished and folder.damage() is None
    (run / name).write_text(change((run / name).read_text()))
    assert not folder.is_finished
    assert folder.damage().startswith(f"{run / name}: ") and message in folder.damage(), folder.damage()
    with pytest.raises(ResultsError, match=re.escape(message)):
        folder.read_summary() if name == "summary.json" else folder.read_cases()


def test_fit_resume_tests_a_run_with_a_damaged_record_again_and_rewrites_it(smoke_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(smoke_run, run)
    (run / "test_cases.csv").write_text(_cut_mid_number((run / "test_cases.csv").read_text()))
    (run / "overlays.png").unlink()  # plots come last: a run stopped while testing has none
    assert main(["fit", "--resume", str(run)]) == 0
    assert "holds a finished run" not in capsys.readouterr().out
    assert RunFolder(run).is_finished
    assert (run / "test_cases.csv").read_bytes() == (smoke_run / "test_cases.csv").read_bytes()
    assert (run / "overlays.png").stat().st_size > 0  # the last round's model drawn again
