"""Output folders that cannot be written, damaged checkpoints and checkpoints of another network:
clear errors, and the previous files stay readable."""

from __future__ import annotations

import errno
import os
import shutil

import pytest
import torch

from lightning_fl.checkpoint import CheckpointError, OutputError, load_model, save_model
from tests.helpers.cli import refused
from tests.helpers.runs import SMOKE


def test_a_full_disk_leaves_the_previous_checkpoint_readable(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    save_model(path, {"w": torch.ones(3)}, round=0)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(
        OutputError, match=r"cannot write .*last.ckpt: No space left on device; any previous version of it is intact"
    ):
        save_model(path, {"w": torch.zeros(3)}, round=1)
    monkeypatch.undo()
    assert load_model(path)["round"] == 0 and [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_an_output_folder_that_cannot_be_created_is_a_clear_error(capsys, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    error = refused(capsys, "fit", "--config", SMOKE, f"output_dir={blocker / 'run'}")
    assert f"cannot create the run folder {blocker / 'run'}: Not a directory" in error


def test_damaged_and_foreign_checkpoints_are_refused(capsys, data_home, smoke_run, tmp_path):
    damaged = tmp_path / "damaged"
    shutil.copytree(smoke_run, damaged)
    (damaged / "state.ckpt").write_bytes(b"\x00" * 100)
    assert f"cannot read checkpoint {damaged / 'state.ckpt'}" in refused(capsys, "fit", "--resume", damaged)

    foreign = tmp_path / "foreign"
    shutil.copytree(smoke_run, foreign)
    error = refused(
        capsys, "fit", "--resume", foreign, "--allow-config-change", "fl.rounds=3", "model.filters=[16,32,64,128]"
    )
    assert "holds another network than this run's model config" in error
    assert "of another shape (e.g. input_block.conv1.conv.weight (8, 1, 3, 3, 3) ≠ (16, 1, 3, 3, 3))" in error
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_model(tmp_path / "none.ckpt")
