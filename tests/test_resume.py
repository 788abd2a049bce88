"""Exact resume: a run killed with SIGKILL in the middle of a round and resumed ends with the same
weights and metrics as the same run uninterrupted; config changes on resume are refused unless asked.
The run holds its folder's lock while it runs; rank 0 alone moves an old folder aside (--overwrite)."""

from __future__ import annotations

import os
import shutil
import signal
import time

import pytest
import torch

from lightning_fl.checkpoint import RunFolderError, lock_run_folder

RUN = ["--config", "configs/smoke.yaml", "logger.wandb.mode=disabled", "fl.rounds=3"]


@pytest.mark.slow
@pytest.mark.parametrize("processes", [1, 2])
def test_a_run_killed_mid_round_resumes_to_the_same_result(cli, data_home, smoke_run, tmp_path, processes):
    run = RUN + (
        [f"fabric.devices={processes}", "fabric.accelerator=cpu", "fabric.precision=32-true"] if processes > 1 else []
    )
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    whole.mkdir()
    (whole / "old.txt").write_text("an earlier run\n")  # moved aside by rank 0 alone, before the others start
    result = cli("fit", *run, f"output_dir={whole}", "--overwrite", data_home=data_home)
    assert result.returncode == 0, result.stderr[-3000:]
    aside = next(tmp_path.glob("whole.replaced-*"))
    assert f"moved the previous {whole} aside to {aside}\n" in result.stdout
    assert sorted(p.name for p in aside.iterdir()) == ["old.txt", "run.lock"]

    process = cli.start("fit", *run, f"output_dir={killed}", data_home=data_home, capture=False)
    deadline = time.monotonic() + 120
    while not (killed / "state.ckpt").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    with pytest.raises(RunFolderError, match="is in use"):
        lock_run_folder(killed)  # held by the running fit
    time.sleep(0.3)  # into round 2's local training
    os.killpg(process.pid, signal.SIGKILL)  # every rank at once
    process.wait()
    assert torch.load(killed / "state.ckpt", weights_only=True)["round"] == 0, "the kill did not land in round 2"

    result = cli("fit", "--resume", str(killed), data_home=data_home)
    assert result.returncode == 0, result.stderr[-3000:]
    first = torch.load(whole / "last.ckpt", weights_only=True)["model"]
    second = torch.load(killed / "last.ckpt", weights_only=True)["model"]
    assert all(torch.equal(first[k], second[k]) for k in first)  # bitwise
    assert (whole / "metrics.csv").read_text() == (killed / "metrics.csv").read_text()
    assert "after_round: 1" in (killed / "resumes.yaml").read_text()
    lock_run_folder(killed).release()  # the killed run's lock went with its processes, the resumed one's at its end


@pytest.mark.slow
def test_resume_refuses_a_changed_config_unless_asked(cli, data_home, smoke_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(smoke_run, run)
    refused = cli("fit", "--resume", str(run), "optim.lr=0.01", data_home=data_home)
    assert refused.returncode == 2
    assert "the overrides change the run's config (optim.lr); pass --allow-config-change" in refused.stderr
    both = cli("fit", "--resume", str(run), "--config", "configs/smoke.yaml", data_home=data_home)
    assert both.returncode == 2 and "--config cannot be given with it" in both.stderr

    accepted = cli("fit", "--resume", str(run), "--allow-config-change", "fl.rounds=3", data_home=data_home)
    assert accepted.returncode == 0, accepted.stderr[-3000:]
    assert "changed:\n  - fl.rounds" in (run / "resumes.yaml").read_text()
    assert torch.load(run / "state.ckpt", weights_only=True)["round"] == 2
    # the finished run trains its third round; W&B continues the same (offline) run
    runs = sorted(p.name for p in (run / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and runs[0].rsplit("-", 1)[1] == runs[1].rsplit("-", 1)[1]
