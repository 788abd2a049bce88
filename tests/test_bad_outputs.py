"""Output folders that cannot be written, damaged checkpoints and checkpoints of another network:
clear errors, and the previous files stay readable."""

from __future__ import annotations

import errno
import os
import shutil

import pytest
import torch

from lightning_fl.checkpoint import CheckpointError, OutputError, load_model, save_model
from lightning_fl.run_folder import RunFolder
from tests.helpers.cli import refused, run_main
from tests.helpers.runs import EXACT, SMOKE, fill_disk_at


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
    assert f"cannot create the run folder {blocker / 'run'}: {blocker} is a file, not a folder" in error
    error = refused(capsys, "fit", "--config", SMOKE, f"output_dir={blocker}")
    assert f"cannot create the run folder {blocker}: {blocker} is a file, not a folder" in error


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


def test_a_model_file_with_one_nan_weight_is_refused_by_every_command_and_never_written(
    capsys, data_home, smoke_run, tmp_path
):
    """A broken model (a diverged run, a damaged file) gives no label maps, no scores, no export and
    no further training: each command names the file and the first bad tensor."""
    broken = tmp_path / "broken"
    shutil.copytree(smoke_run, broken)
    payload = torch.load(broken / "best.ckpt", weights_only=True)
    payload["model"]["input_block.conv1.conv.weight"][0, 0, 0, 0, 0] = float("nan")
    torch.save(payload, broken / "best.ckpt")
    expected = f"{broken / 'best.ckpt'}: tensor model.input_block.conv1.conv.weight holds NaN or infinite values"
    image = sorted((data_home / "synthetic-smoke").rglob("external/images/*.nii.gz"))[0]
    model = ("--checkpoint", broken / "best.ckpt")
    for command in (
        ("infer", *model, "--input", image, "--output", tmp_path / "labels"),
        ("evaluate", *model, "--cross-site", "--output", tmp_path / "scores"),
        ("export", *model, "--output", tmp_path / "export"),
    ):
        assert expected in refused(capsys, *command), command
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken"]  # nothing written

    state = torch.load(broken / "state.ckpt", weights_only=True)
    state["models"]["global"]["state"]["input_block.conv1.conv.weight"][0, 0, 0, 0, 0] = float("inf")
    torch.save(state, broken / "state.ckpt")
    error = refused(capsys, "fit", "--resume", broken, "--allow-config-change", "fl.rounds=3")
    assert f"{broken / 'state.ckpt'}: tensor models.global.state.input_block.conv1.conv.weight holds NaN" in error

    scripted = torch.jit.script(torch.nn.Conv3d(1, 2, 3))
    with torch.no_grad():
        scripted.bias[1] = float("nan")
    torch.jit.save(scripted, tmp_path / "model.ts")
    scripted_model = ("--checkpoint", tmp_path / "model.ts")
    error = refused(capsys, "infer", *scripted_model, "--input", image, "--output", tmp_path / "o")
    assert f"{tmp_path / 'model.ts'}: tensor bias holds NaN or infinite values" in error

    with pytest.raises(CheckpointError, match=r"last.ckpt: tensor model.w holds NaN .*; refusing to write it"):
        save_model(tmp_path / "last.ckpt", {"w": torch.tensor([1.0, float("-inf")])}, round=1)
    assert not (tmp_path / "last.ckpt").exists()


# `lightning-fl fit ARGS` whose `n`-th write of the file named `target` fills the disk part-way:
# some bytes reach the temporary file, then ENOSPC
FULL_DISK = """import errno, os, sys
import lightning_fl.checkpoint as checkpoint
from lightning_fl.cli import main

target, n, args = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
write, calls = checkpoint._atomic_write, []


def full_disk(path, contents):
    calls.append(path.name)
    if calls.count(target) == n and path.name == target:

        def part_way(f):
            f.write(b"\\0" * 4096)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        return write(path, part_way)
    return write(path, contents)


checkpoint._atomic_write = full_disk
sys.exit(main(args))
"""


@pytest.mark.slow
@pytest.mark.parametrize("target", ["state.ckpt", "last.ckpt"])
def test_a_full_disk_stops_the_run_in_one_line_and_resume_ends_as_the_uninterrupted_run(
    cli, reference_fit, tmp_path, target
):
    """The second round's write fails: the previous round's files are intact and loadable, and
    `fit --resume` (disk freed) ends bitwise where the reference run ended."""
    run = tmp_path / "run"
    fit = ["fit", "--config", "configs/smoke.yaml", f"output_dir={run}", *EXACT]
    stopped = cli.python("-c", FULL_DISK, target, 2, *fit, OMP_NUM_THREADS="1")
    lines = stopped.stderr.strip().splitlines()
    assert stopped.returncode != 0 and "Traceback" not in stopped.stderr, stopped.stderr[-3000:]
    assert f"cannot write {run / target}: No space left on device" in lines[-1]
    assert load_model(run / "state.ckpt")["round"] == 1 and load_model(run / "best.ckpt")["round"] in (1, 2)
    assert not list(run.glob(".*.tmp"))  # the part-way file is gone
    resumed = cli("fit", "--resume", str(run), OMP_NUM_THREADS="1")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    first, second = (load_model(r / "last.ckpt")["model"] for r in (reference_fit, run))
    assert all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.slow
def test_an_interrupted_extension_resumes_to_the_extended_run_whose_record_covers_every_round(cli, smoke_run, tmp_path):
    """A finished 2-round run extended to 4 and stopped after round 3 (the disk fills): it is not
    finished, a plain `fit --resume` continues the extension, and its summary, per-case scores,
    checkpoints and timings describe the 4-round run."""
    run = tmp_path / "run"
    shutil.copytree(smoke_run, run)
    extend = ["fit", "--resume", str(run), "--allow-config-change", "fl.rounds=4"]
    stopped = cli.python("-c", FULL_DISK, "state.ckpt", 2, *extend)  # the extension's 2nd state: round 4's
    assert stopped.returncode == 2 and "No space left on device" in stopped.stderr, stopped.stderr[-3000:]
    folder = RunFolder(run)
    assert load_model(folder.state)["round"] == 3 and not folder.is_finished
    assert folder.read_config().fl.rounds == 4

    resumed = cli("fit", "--resume", str(run))
    assert resumed.returncode == 0 and "holds a finished run" not in resumed.stdout, resumed.stderr[-3000:]
    summary = folder.read_summary()
    assert folder.is_finished and summary["rounds"] == 4 and len(summary["round_time_s"]) == 4
    assert summary["wall_time_s"] > sum(summary["round_time_s"]) > 0
    assert load_model(run / "best.ckpt")["round"] == summary["best_round"]
    assert {row.case for row in folder.read_cases()} == {row.case for row in RunFolder(smoke_run).read_cases()}


def test_an_export_is_replaced_only_when_asked_and_a_full_disk_leaves_the_old_one_whole(
    capsys, smoke_run, tmp_path, monkeypatch
):
    """A second export into a folder that holds one is refused; with --overwrite, a full disk while
    writing metadata.json leaves both old files as they were (not a new model.ts beside old
    metadata), and a write that succeeds moves the old two aside, nothing else in the folder."""
    out = tmp_path / "export"
    export = ["export", "--checkpoint", smoke_run / "best.ckpt", "--output", out]
    assert run_main(capsys, *export)[0] == 0
    (out / "notes.txt").write_text("the user's")
    old = {name: (out / name).read_bytes() for name in ("model.ts", "metadata.json")}
    assert "holds an export (model.ts and metadata.json); pass --overwrite" in refused(capsys, *export)

    fill_disk_at(monkeypatch, "metadata.json")
    line = refused(capsys, *export, "--overwrite")
    assert f"cannot write {out / 'metadata.json'}: No space left on device; no file of" in line
    assert sorted(p.name for p in out.iterdir()) == ["metadata.json", "model.ts", "notes.txt"]
    assert {name: (out / name).read_bytes() for name in old} == old

    monkeypatch.undo()  # the disk freed
    assert run_main(capsys, *export, "--overwrite")[0] == 0
    for name, contents in old.items():
        (aside,) = out.glob(f"{name}.replaced-*")
        assert aside.read_bytes() == contents
    assert (out / "notes.txt").read_text() == "the user's" and (out / "model.ts").is_file()
