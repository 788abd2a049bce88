"""Exact resume: a run killed with SIGKILL in the middle of a round and resumed ends with the weights
and metrics of the same run uninterrupted (the session's smoke run; two ranks killed and resumed
with the other start method: tests/test_two_d.py); config changes on resume are refused unless
asked. The run holds its folder's lock while it runs."""

from __future__ import annotations

import shutil

import pytest
import torch

from lightning_fl.run_folder import RunFolder
from tests.helpers.cli import run_main
from tests.helpers.runs import SMOKE, SMOKE_WANDB, kill_in_round_2, last_model


@pytest.mark.slow
def test_a_run_killed_mid_round_resumes_to_the_run_left_alone(cli, smoke_run, tmp_path):
    killed = tmp_path / "killed"
    kill_in_round_2(cli, killed, *SMOKE_WANDB[1:], "logger.wandb.mode=disabled")
    result = cli("fit", "--resume", str(killed))
    assert result.returncode == 0, result.stderr[-3000:]
    first, second = last_model(smoke_run), last_model(killed)
    assert all(torch.equal(first[k], second[k]) for k in first)  # bitwise
    assert (smoke_run / "metrics.csv").read_text() == (killed / "metrics.csv").read_text()
    assert "after_round: 1" in (killed / "resumes.yaml").read_text()
    RunFolder(killed).lock().release()  # the killed run's lock went with its processes, the resumed one's at its end


def test_resume_refuses_a_changed_config_unless_asked(capsys, smoke_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(smoke_run, run)
    status, _, err = run_main(capsys, "fit", "--resume", run, "optim.lr=0.01")
    assert status == 2
    assert "the overrides change the run's config (optim.lr); pass --allow-config-change" in err
    status, _, err = run_main(capsys, "fit", "--resume", run, "--config", SMOKE)
    assert status == 2 and "--config cannot be given with it" in err


@pytest.mark.slow
def test_a_finished_run_trains_more_rounds_when_asked_in_the_same_wandb_run(capsys, smoke_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(smoke_run, run)
    status, _, err = run_main(capsys, "fit", "--resume", run, "--allow-config-change", "fl.rounds=3")
    assert status == 0, err[-3000:]
    assert "changed:\n  - fl.rounds" in (run / "resumes.yaml").read_text()
    assert torch.load(run / "state.ckpt", weights_only=True)["round"] == 3
    # the finished run trains its third round; W&B continues the same (offline) run
    runs = sorted(p.name for p in (run / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and runs[0].rsplit("-", 1)[1] == runs[1].rsplit("-", 1)[1]
